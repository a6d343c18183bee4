"""Train variants of shipped recipes side by side, each in its own process, and collect their per-epoch results.

    python scripts/recipe_sweep.py --plan docs/results/gpu/plan_lr.yaml --data ../shared/data/fashion-mnist \
        --out results/sweep --parallel 4 --limit 500

A plan is a YAML list of runs: ``{name, base (a shipped recipe or a recipe file), overrides (recipe keys)}``. Each run
is `smallvit train`'s trainer on ``base`` with ``overrides``. One small model leaves a GPU mostly idle (its steps are
launch-bound), so several runs share it well; on a 2-core CPU use --parallel 1. After every poll, --out/results.json
holds each run's epochs so far (from its summary.csv), so a run stopped at --limit (seconds) still reports how far it
got; a finished run reports its full history with wall times. A table of the runs is printed at the end.
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _worker(spec: dict) -> None:
    from timm_smallvit.launch import recipe_path
    from timm_smallvit.recipe import load_recipe, resolve_args
    from timm_smallvit.trainer import train

    recipe = load_recipe(recipe_path(spec['base']))
    recipe.update(spec.get('overrides') or {})
    args = resolve_args(recipe, data_dir=spec['data'], output=spec['runs'], experiment=spec['name'])
    result = train(args)
    params = sum(p.numel() for p in result['model'].parameters())
    Path(spec['result']).write_text(json.dumps(dict(history=result['history'], params=params)))


def _rows(summary: Path) -> list[dict[str, float]]:
    if not summary.exists():
        return []
    with summary.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--plan', required=True, help='YAML list of {name, base, overrides}')
    parser.add_argument('--data', required=True, help='dataset folder (Fashion-MNIST: the release *-ubyte.gz files)')
    parser.add_argument('--out', default='results/sweep', help='output folder: results.json, runs/, logs/')
    parser.add_argument('--parallel', type=int, default=1, help='runs at a time')
    parser.add_argument('--limit', type=float, default=None, help='stop every run after this many seconds')
    args = parser.parse_args()

    plan = yaml.safe_load(Path(args.plan).read_text())
    names = [run['name'] for run in plan]
    if len(set(names)) != len(names):
        parser.error(f'run names must be unique in {args.plan}')
    out = Path(args.out)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    results = {run['name']: dict(run, status='pending') for run in plan}
    pending, running = list(plan), {}
    t0 = time.monotonic()

    def over_limit() -> bool:
        return args.limit is not None and time.monotonic() - t0 > args.limit

    while pending or running:
        while pending and len(running) < args.parallel and not over_limit():
            run = pending.pop(0)
            spec = dict(run, data=args.data, runs=str(out / 'runs'), result=str(out / f'{run["name"]}.json'))
            with (out / 'logs' / f'{run["name"]}.log').open('w') as log:
                cmd = [sys.executable, __file__, '--worker', json.dumps(spec)]
                running[run['name']] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            results[run['name']].update(status='running', started_s=round(time.monotonic() - t0, 1))
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None or over_limit():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    results[name]['status'] = f'stopped at the {args.limit:.0f} s limit'
                else:
                    results[name]['status'] = 'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'
                del running[name]
        if over_limit():
            for run in pending:
                results[run['name']]['status'] = 'not started (limit)'
            pending.clear()
        for name, entry in results.items():
            final = out / f'{name}.json'
            if final.exists():
                entry.pop('epochs_so_far', None)  # the history replaces it
                entry.update(json.loads(final.read_text()))
            else:
                entry['epochs_so_far'] = _rows(out / 'runs' / name / 'summary.csv')
        (out / 'results.json').write_text(json.dumps(list(results.values()), indent=1))

    print('| run | status | epochs | test top-1 (%) | best (%) | wall time (s) |')
    print('|---|---|---|---|---|---|')
    for name, entry in results.items():
        rows = entry.get('history') or [dict(top1=r['eval_top1']) for r in entry.get('epochs_so_far', [])]
        top1 = [r['top1'] for r in rows]
        wall = f'{rows[-1]["wall_time"]:.0f}' if rows and 'wall_time' in rows[-1] else '-'
        last, best = (f'{top1[-1]:.2f}', f'{max(top1):.2f}') if top1 else ('-', '-')
        print(f'| {name} | {entry["status"]} | {len(rows)} | {last} | {best} | {wall} |')
    if any(entry['status'].startswith('failed') for entry in results.values()):
        sys.exit(1)


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--worker':
        _worker(json.loads(sys.argv[2]))
    else:
        main()
