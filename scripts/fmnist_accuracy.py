"""Train shipped recipes on Fashion-MNIST and plot test top-1 against training wall time.

    python scripts/fmnist_accuracy.py --data ../shared/data/fashion-mnist --recipes fashion_mnist_demo fashion_mnist_28

Each recipe runs with `smallvit train`'s trainer, as `smallvit train --config NAME` would; its test top-1 is
measured after every epoch (on the EMA weights when the recipe keeps an EMA). Writes results.json, results.md and
accuracy_vs_time.png to --out.
"""

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from timm_smallvit.launch import recipe_path
from timm_smallvit.trainer import load_recipe, resolve_args, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='folder with the Fashion-MNIST release files')
    parser.add_argument('--recipes', nargs='+', default=['fashion_mnist_demo', 'fashion_mnist_28'])
    parser.add_argument('--out', default='results/accuracy', help='output folder')
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for name in args.recipes:
        recipe = load_recipe(recipe_path(name))
        result = train(resolve_args(recipe, data_dir=args.data, output=str(out / 'runs'), experiment=Path(name).stem))
        runs.append(dict(recipe=name, model=recipe['model'], epochs=recipe['epochs'], history=result['history']))
        (out / 'results.json').write_text(json.dumps(runs, indent=2))

    lines = [
        '| recipe | model | epochs | training time (s) | test top-1 (%) | best epoch top-1 (%) |',
        '|---|---|---|---|---|---|',
    ]
    for run in runs:
        last, best = run['history'][-1], max(h['top1'] for h in run['history'])
        lines.append(
            f'| `{run["recipe"]}` | `{run["model"]}` | {run["epochs"]} | {last["wall_time"]:.0f} '
            f'| {last["top1"]:.2f} | {best:.2f} |'
        )
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run in runs:
        minutes = [h['wall_time'] / 60 for h in run['history']]
        ax.plot(minutes, [h['top1'] for h in run['history']], marker='o', markersize=3, label=run['recipe'])
    ax.set(xlabel='training wall time (min), 2 CPU cores', ylabel='test top-1 (%)', title='Fashion-MNIST')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'accuracy_vs_time.png', dpi=120)


if __name__ == '__main__':
    main()
