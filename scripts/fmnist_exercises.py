"""The textbook chapter's exercises on Fashion-MNIST, each variant trained for the same CPU time.

d2l.ai 11.8 asks how the image size changes training time, what mean pooling of the patch tokens does instead of
the class token, and how depth and heads matter. This trains one baseline (smallvit_tiny_patch4_28: width 128,
depth 6, 4 heads, patch 4) and one change at a time with `smallvit train`'s trainer. Equal budget: each run first
measures its training images/s, then gets as many whole epochs as fit in --budget seconds, with the schedule
spread over them; a variant too slow for one epoch trains on as many images as fit. Writes results.json, a
Markdown table and a plot of test accuracy against wall time.

    python scripts/fmnist_exercises.py --data ../shared/data/fashion-mnist --budget 300 --out results/exercises
"""

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import timm_smallvit  # noqa: F401
from timm_smallvit.recipe import resolve_args
from timm_smallvit.trainer import train

BASE_MODEL = 'smallvit_tiny_patch4_28'
RECIPE = dict(
    model=BASE_MODEL,
    dataset='torch/fashion_mnist',
    input_img_mode='L',
    in_chans=1,
    batch_size=128,
    opt='adamw',
    lr=2e-3,
    weight_decay=0.05,
    sched='cosine',
    sched_on_updates=True,
    warmup_epochs=0,
    smoothing=0.1,
    no_aug=True,
    seed=42,
)
# (group, label, model kwargs, data image size)
EXERCISES = [
    ('baseline', 'class token, 28 px, depth 6, 4 heads', {}, 28),
    ('pooling', 'mean of patch tokens (no class token)', dict(class_token=False), 28),
    ('image size', '64 px (256 patches)', dict(img_size=64), 64),
    ('image size', '96 px (576 patches)', dict(img_size=96), 96),
    ('depth', 'depth 2', dict(depth=2), 28),
    ('depth', 'depth 4', dict(depth=4), 28),
    ('depth', 'depth 8', dict(depth=8), 28),
    ('heads', '1 head', dict(num_heads=1), 28),
    ('heads', '2 heads', dict(num_heads=2), 28),
    ('heads', '8 heads', dict(num_heads=8), 28),
]
TRAIN_IMAGES = 60_000


def train_throughput(model_kwargs: dict, img_size: int, batch_size: int, steps: int = 4) -> float:
    """Training images/s of one variant (forward, backward, AdamW step) on random data, after warm-up."""
    model = timm.create_model(BASE_MODEL, **model_kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 1, img_size, img_size), torch.randint(0, 10, (batch_size,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='folder with the Fashion-MNIST release files')
    parser.add_argument('--budget', type=float, default=300.0, help='training seconds per variant')
    parser.add_argument('--out', default='results/exercises', help='output folder')
    parser.add_argument(
        '--val-samples', type=int, default=10_000, help='test images scored per variant (the same for all)'
    )
    parser.add_argument('--only', help='comma-separated groups to run (baseline, pooling, image size, depth, heads)')
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = set(args.only.split(',')) if args.only else None

    results = []
    for group, label, kwargs, img_size in EXERCISES:
        if groups and group not in groups:
            continue
        ips = train_throughput(kwargs, img_size, RECIPE['batch_size'])
        affordable = args.budget * ips
        epochs = max(1, math.floor(affordable / TRAIN_IMAGES))
        # at least one batch, so a variant too slow for the budget still takes a step
        samples = max(int(affordable), RECIPE['batch_size']) if affordable < TRAIN_IMAGES else None
        print(
            f'== {group}: {label}: {ips:.0f} img/s, {epochs} epoch(s) of {samples or TRAIN_IMAGES} images', flush=True
        )
        recipe = dict(
            RECIPE,
            model_kwargs=kwargs,
            img_size=img_size,
            epochs=epochs,
            train_num_samples=samples,
            val_num_samples=args.val_samples,
        )
        run = train(
            resolve_args(recipe, data_dir=args.data, output=str(out / 'runs'), experiment=f'{group}-{label}'[:60])
        )
        model = run['model']  # the trained model, for its token and parameter counts
        results.append(
            dict(
                group=group,
                label=label,
                model_kwargs=kwargs,
                img_size=img_size,
                tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
                params=sum(p.numel() for p in model.parameters()),
                probe_img_per_s=ips,
                epochs=epochs,
                train_images=samples or TRAIN_IMAGES,
                train_time=run['history'][-1]['wall_time'],
                top1=run['eval_metrics']['top1'],
                top5=run['eval_metrics']['top5'],
                history=run['history'],
            )
        )
        (out / 'results.json').write_text(json.dumps(dict(budget_s=args.budget, recipe=RECIPE, runs=results), indent=2))

    lines = [
        f'Each variant of `{BASE_MODEL}` trained for about {args.budget:.0f} s of this CPU '
        f'(`python scripts/fmnist_exercises.py --budget {args.budget:.0f} --val-samples {args.val_samples}`); '
        f'top-1 on the first {args.val_samples:,} test images.',
        '',
        '| exercise | variant | tokens | params | train img/s | images x epochs | time (s) | top-1 (%) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        lines.append(
            f'| {r["group"]} | {r["label"]} | {r["tokens"]} | {r["params"]:,} | {r["probe_img_per_s"]:.0f} '
            f'| {r["train_images"]:,} x {r["epochs"]} | {r["train_time"]:.0f} | {r["top1"]:.2f} |'
        )
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for r in results:
        ax.plot([h['wall_time'] for h in r['history']], [h['top1'] for h in r['history']], marker='o', label=r['label'])
    ax.set(xlabel='training wall time (s)', ylabel='test top-1 (%)', title='Fashion-MNIST, equal CPU budget')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / 'accuracy_vs_time.png', dpi=120)


if __name__ == '__main__':
    main()
