"""Distil a CNN teacher into a smallvit student on Fashion-MNIST: logit distillation through timm.task.

    python scripts/distill.py --data ../shared/data/fashion-mnist --teacher scripts/recipes/teacher_resnet18.yaml \
        --student fashion_mnist_28 --set epochs=34 --out results/distill

1. trains the teacher recipe with `smallvit train`'s trainer (or takes --teacher-run, a finished run's folder);
2. writes the teacher's weights (its EMA when the recipe keeps one: the weights it was evaluated with) as a timm
   folder with timm's save_for_hf, which timm.create_model('local-dir:<folder>', pretrained=True) loads;
3. trains the student recipe with ``kd_model_name: local-dir:<folder>`` plus the --set overrides: timm.task's
   LogitDistillationTask adds the KL divergence to the teacher's softened logits to the student's loss. The
   teacher's training compute (its args.yaml's train_tflop) is the student's ``kd_teacher_tflop``: with
   ``budget_tflop`` the two runs share one budget, and the student's logged TFLOP include the teacher's;
4. writes results.json and results.md: each run's test top-1 after every epoch, wall times, and the student's top-1
   at 30 minutes (issue 6's budget); with a recipe that sets eval_hflip, top-1 is with the mirror and the table adds
   the single-view top-1.

The teacher folder serves timm's train.py the same way: ``--kd-model-name local-dir:<folder>``.
"""

import argparse
import json
from pathlib import Path

import timm
import yaml
from timm.data import resolve_data_config
from timm.models import load_checkpoint
from timm.models._hub import save_for_hf
from timm.utils import ParseKwargs, setup_default_logging

from timm_smallvit.card import read_summary
from timm_smallvit.launch import recipe_path
from timm_smallvit.recipe import load_recipe, resolve_args
from timm_smallvit.trainer import train

BUDGET_S = 30 * 60


def _check_empty(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f'{folder} is not empty: remove it or choose another --out.')


def save_teacher(run_dir: Path, folder: Path) -> Path:
    """Write a finished run's model (EMA weights when it kept an EMA) as a folder timm loads with local-dir:."""
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    model = timm.create_model(
        args['model'], num_classes=args['num_classes'], in_chans=args['in_chans'], **(args.get('model_kwargs') or {})
    )
    load_checkpoint(model, str(run_dir / 'last.pth.tar'), use_ema=bool(args.get('model_ema')))
    data_config = resolve_data_config(args, model=model)  # as train.py does: recipe values over model defaults
    _check_empty(folder)
    save_for_hf(model, folder, safe_serialization=True, data_config=data_config)
    return folder


def _summary(name: str, history: list[dict]) -> dict:
    timed = 'wall_time' in history[-1]  # a reused teacher run has only its summary.csv: no wall times
    in_budget = [h['top1'] for h in history if timed and h['wall_time'] <= BUDGET_S]
    return dict(
        run=name,
        epochs=history[-1]['epoch'] + 1,  # history has the evaluated epochs only (val_interval)
        wall_time=history[-1]['wall_time'] if timed else None,
        top1=history[-1]['top1'],
        # a recipe with eval_hflip scores each image with its mirror as top1, the image alone as top1_single
        top1_single=history[-1].get('top1_single', history[-1]['top1']),
        best_top1=max(h['top1'] for h in history),
        top1_at_30min=in_budget[-1] if in_budget else None,
        tflop=history[-1].get('tflop'),
        history=history,
    )


def _history(run_dir: Path) -> list[dict]:
    # read_summary keeps one row per epoch where a resumed run repeated some
    rows = read_summary(run_dir / 'summary.csv')
    return [
        dict(epoch=int(r['epoch']), top1=r['eval_top1'], top1_single=r.get('eval_top1_single', r['eval_top1']))
        | ({'tflop': r['train_tflop']} if 'train_tflop' in r else {})
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='folder with the Fashion-MNIST release files')
    parser.add_argument('--teacher', help='teacher recipe (name or YAML path), trained first')
    parser.add_argument('--teacher-run', help="a finished teacher run's folder (args.yaml, last.pth.tar) instead")
    parser.add_argument('--student', default='fashion_mnist_28', help='student recipe (name or YAML path)')
    parser.add_argument('--set', nargs='*', action=ParseKwargs, default={}, metavar='KEY=VALUE', help='student keys')
    parser.add_argument('--teacher-set', nargs='*', action=ParseKwargs, default={}, metavar='KEY=VALUE')
    parser.add_argument('--out', default='results/distill', help='output folder')
    args = parser.parse_args()
    setup_default_logging()  # the trainer reports each epoch through logging, as `smallvit train` shows it
    if bool(args.teacher) == bool(args.teacher_run):
        parser.error('give one of --teacher (a recipe to train) or --teacher-run (a finished run)')
    out = Path(args.out)
    _check_empty(out / 'teacher')  # before hours of training, not after
    out.mkdir(parents=True, exist_ok=True)
    results = []

    if args.teacher:
        teacher_recipe = dict(load_recipe(recipe_path(args.teacher)), **args.teacher_set)
        teacher_args = resolve_args(teacher_recipe, data_dir=args.data, output=str(out / 'runs'), experiment='teacher')
        teacher = train(teacher_args)
        teacher_run = teacher['output_dir']
        results.append(_summary('teacher', teacher['history']))
    else:
        teacher_run = Path(args.teacher_run)
        results.append(_summary('teacher', _history(teacher_run)))
    folder = save_teacher(teacher_run, out / 'teacher')

    recipe = load_recipe(recipe_path(args.student))
    # the teacher's training counts towards the student's compute (a run from before it was counted: none recorded)
    teacher_tflop = yaml.safe_load((teacher_run / 'args.yaml').read_text()).get('train_tflop') or 0
    recipe.update({'kd_teacher_tflop': teacher_tflop, **args.set}, kd_model_name=f'local-dir:{folder.resolve()}')
    student_args = resolve_args(recipe, data_dir=args.data, output=str(out / 'runs'), experiment='student')
    student = train(student_args)
    results.append(_summary('student', student['history']))
    (out / 'results.json').write_text(json.dumps(dict(teacher_run=str(teacher_run), runs=results), indent=1))

    lines = [
        '| run | epochs | TFLOP (cumulative) | wall time (s) | test top-1 (%) | single view (%) | best epoch (%) '
        '| top-1 at 30 min (%) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        wall = f'{r["wall_time"]:.0f}' if r['wall_time'] is not None else '-'
        at_30 = f'{r["top1_at_30min"]:.2f}' if r['top1_at_30min'] is not None else '-'
        tflop = f'{r["tflop"]:.1f}' if r.get('tflop') is not None else '-'
        top1 = f'{r["top1"]:.2f} | {r["top1_single"]:.2f}'
        lines.append(f'| {r["run"]} | {r["epochs"]} | {tflop} | {wall} | {top1} | {r["best_top1"]:.2f} | {at_30} |')
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
