"""Single-view top-1 of finished runs against their training compute (TFLOP): a table and a plot, on any machine.

    python scripts/accuracy_vs_tflop.py RUN_DIR [RUN_DIR ...] --out docs/results/tflop [--labels A B ...]

RUN_DIR is a `smallvit train` run folder (its args.yaml and summary.csv). A run the trainer counted has the
cumulative compute in summary.csv (`train_tflop`). For a run from before it counted, the compute is counted now the
same way: FLOPs per training image of the run's model (`timm_smallvit.flops`, FlopCounterMode; the FLOPs depend on
the model and the input size, not on the machine, the batch or the precision) times the images of each epoch (full
batches of the training split less `val_holdout`, or `train_num_samples`). Each evaluated epoch is a point; the
table gives each run's last epoch. The Fashion-MNIST training split has 60,000 images (`--train-images` for another).
"""

import argparse
import csv
import json
from pathlib import Path

import timm
import yaml
from matplotlib.figure import Figure

import timm_smallvit  # noqa: F401  (registers the smallvit models for timm.create_model)
from timm_smallvit.flops import training_flops_per_image


def run_points(run_dir: Path, train_images: int) -> dict:
    """A run's evaluated epochs as (epoch, TFLOP, single-view top-1), and how its compute was found."""
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    with (run_dir / 'summary.csv').open(newline='') as f:
        rows = list(csv.DictReader(f))
    counted = all(row.get('train_tflop') not in (None, '') for row in rows)
    gflop = args.get('train_gflop_per_image')
    if not counted or gflop is None:
        model = timm.create_model(args['model'], num_classes=args.get('num_classes') or 10,
                                  in_chans=args.get('in_chans') or 1, **(args.get('model_kwargs') or {}))  # fmt: skip
        size = args.get('img_size') or model.pretrained_cfg['input_size'][-1]
        gflop = training_flops_per_image(model, (model.in_chans, size, size), model.num_classes) / 1e9
    images = args.get('train_num_samples') or train_images - (args.get('val_holdout') or 0)
    global_batch = args['batch_size'] * (args.get('world_size') or 1)
    per_epoch = gflop * (images // global_batch * global_batch) / 1e3  # TFLOP
    points = []
    for row in rows:
        epoch = int(float(row['epoch']))
        tflop = float(row['train_tflop']) if counted else (epoch + 1) * per_epoch
        top1 = float(row.get('eval_top1_single') or row['eval_top1'])  # eval_hflip runs log the mirror as eval_top1
        points.append(dict(epoch=epoch, tflop=tflop, top1=top1))
    return dict(
        run=str(run_dir), model=args['model'], seed=args.get('seed'), epochs=args['epochs'], gflop_per_image=gflop,
        counted='by the trainer' if counted else 'counted now', device=args.get('train_device'), points=points,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', type=Path, help='run folders (args.yaml, summary.csv)')
    parser.add_argument('--labels', nargs='+', help='one label per run (default: the folder names)')
    parser.add_argument('--out', type=Path, required=True, help='output folder: results.md, results.json, plot')
    parser.add_argument('--train-images', type=int, default=60_000, help='images in the training split')
    parser.add_argument('--target', type=float, default=95.0, help='a line at this top-1 (%%)')
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f'{len(labels)} labels for {len(args.runs)} runs')
    runs = [dict(run_points(run, args.train_images), label=label) for run, label in zip(args.runs, labels, strict=True)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'results.json').write_text(json.dumps(runs, indent=1))

    lines = [
        '| run | model | seed | GFLOP per image | epochs | training TFLOP | single-view top-1 (%) | compute |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in runs:
        last = r['points'][-1]
        lines.append(
            f'| {r["label"]} | `{r["model"]}` | {r["seed"]} | {r["gflop_per_image"]:.4f} | {last["epoch"] + 1} '
            f'| {last["tflop"]:.1f} | {last["top1"]:.2f} | {r["counted"]} |'
        )
    (args.out / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in runs:
        ax.plot([p['tflop'] for p in r['points']], [p['top1'] for p in r['points']], marker='o', markersize=2,
                linewidth=1, label=r['label'])  # fmt: skip
    ax.axhline(args.target, color='grey', linestyle=':', linewidth=1, label=f'{args.target:g}%')
    ax.set(xlabel='training compute (TFLOP, counted)', ylabel='test top-1, single view (%)', ylim=(90, None))
    ax.set_title('Fashion-MNIST: accuracy against training compute')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / 'accuracy_vs_tflop.png', dpi=120)


if __name__ == '__main__':
    main()
