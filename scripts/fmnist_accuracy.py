"""Train shipped recipes on Fashion-MNIST and plot test top-1 against training compute (TFLOP) and wall time.

    python scripts/fmnist_accuracy.py --data ../shared/data/fashion-mnist --recipes fashion_mnist_demo fashion_mnist_28

Each recipe runs with `smallvit train`'s trainer, as `smallvit train --config NAME` would; its test top-1 is
measured after every evaluated epoch (each val_interval-th and the last), on the EMA weights when the recipe keeps
an EMA; with each image and its mirror when it sets eval_hflip, and then also single-view. Writes results.json,
results.md, accuracy_vs_tflop.png (single view against the training compute counted: the same on any machine) and
accuracy_vs_time.png (against this machine's wall time) to --out; `--replot` redraws them from results.json.
"""

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from timm_smallvit.launch import recipe_path
from timm_smallvit.recipe import load_recipe, resolve_args
from timm_smallvit.trainer import train

BUDGET_S = 30 * 60  # issue 6: the best test top-1 reached within 30 minutes of training on this CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help='folder with the Fashion-MNIST release files (not needed with --replot)')
    parser.add_argument('--recipes', nargs='+', default=['fashion_mnist_demo', 'fashion_mnist_28'])
    parser.add_argument('--seeds', nargs='+', type=int, help='run each recipe once per seed (default: its own seed)')
    parser.add_argument('--out', default='results/accuracy', help='output folder')
    parser.add_argument('--replot', action='store_true', help='only redraw from --out/results.json, no training')
    args = parser.parse_args()
    if not args.replot and not args.data:
        parser.error('--data is required, unless --replot')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.replot:
        runs = json.loads((out / 'results.json').read_text())
    else:
        runs = []
        for name in args.recipes:
            recipe = load_recipe(recipe_path(name))
            for seed in args.seeds or [recipe.get('seed', 42)]:
                experiment = Path(name).stem + (f'-seed{seed}' if args.seeds else '')
                run_args = resolve_args(
                    recipe, data_dir=args.data, output=str(out / 'runs'), experiment=experiment, seed=seed
                )
                result = train(run_args)
                # epochs as trained: a recipe with budget_minutes fits them to this machine's speed
                trained = result['args']
                runs.append(
                    dict(
                        recipe=name,
                        model=recipe['model'],
                        seed=seed,
                        epochs=trained.epochs,
                        amp=bool(trained.amp),
                        gflop_per_image=trained.train_gflop_per_image,
                        device=trained.train_device,
                        history=result['history'],
                    )
                )
                (out / 'results.json').write_text(json.dumps(runs, indent=2))

    lines = [
        '| recipe | model | seed | compute | TFLOP | epochs | training time (s) | test top-1 (%) '
        '| best epoch top-1 (%) | top-1 at 30 min (%) | single view at 30 min (%) |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for run in runs:
        history = run['history']
        last, best = history[-1], max(h['top1'] for h in history)
        in_budget = [h for h in history if h['wall_time'] <= BUDGET_S] or [dict(top1=float('nan'))]
        # with eval_hflip, top1 is each image with its mirror and top1_single the image alone; else they are one
        single = in_budget[-1].get('top1_single', in_budget[-1]['top1'])
        lines.append(
            f'| `{run["recipe"]}` | `{run["model"]}` | {run.get("seed", "")} | {_compute(run)} '
            f'| {_tflop(last)} | {run["epochs"]} '
            f'| {last["wall_time"]:.0f} '
            f'| {last["top1"]:.2f} | {best:.2f} | {in_budget[-1]["top1"]:.2f} | {single:.2f} |'
        )
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    fig, ax = _axes()
    for run in runs:
        points = [(h['tflop'], h.get('top1_single', h['top1'])) for h in run['history'] if 'tflop' in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker='o', markersize=3, label=_label(run))
    ax.axhline(95.0, color='grey', linestyle=':', linewidth=1, label='95.0%')
    ax.set(xlabel='training compute (TFLOP, counted)', ylabel='test top-1, single view (%)', title='Fashion-MNIST')
    _save(fig, ax, out / 'accuracy_vs_tflop.png')

    fig, ax = _axes()
    for run in runs:
        minutes = [h['wall_time'] / 60 for h in run['history']]
        line = ax.plot(minutes, [h['top1'] for h in run['history']], marker='o', markersize=3, label=_label(run))
        if 'top1_single' in run['history'][-1]:
            single = [h['top1_single'] for h in run['history']]
            ax.plot(minutes, single, color=line[0].get_color(), linestyle='--', linewidth=1, label='(single view)')
    ax.axvline(BUDGET_S / 60, color='grey', linestyle='--', linewidth=1, label='30 min budget')
    ax.axhline(94.0, color='grey', linestyle=':', linewidth=1, label='94.0% target')
    ax.set(xlabel='training wall time (min), 2 CPU cores', ylabel='test top-1 (%)', title='Fashion-MNIST')
    _save(fig, ax, out / 'accuracy_vs_time.png')


def _axes():
    fig = Figure(figsize=(7, 4.5))
    return fig, fig.subplots()


def _save(fig: Figure, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _label(run: dict) -> str:
    return f'{Path(run["recipe"]).stem}, seed {run.get("seed", "?")}, {_compute(run)}'


def _tflop(row: dict) -> str:
    return f'{row["tflop"]:.1f}' if 'tflop' in row else '-'  # runs from before the trainer counted compute


def _compute(run: dict) -> str:
    return {True: 'bf16', False: 'fp32'}.get(run.get('amp'), '?')


if __name__ == '__main__':
    main()
