"""scripts/fmnist_accuracy.py, fmnist_exercises.py, recipe_sweep.py: tiny real runs write the tables and plots."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from timm_smallvit.card import read_summary
from timm_smallvit.launch import recipe_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'smallvit_{name}', REPO_ROOT / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_script_trains_a_recipe_and_plots_it(tmp_path, fmnist_src, monkeypatch):
    recipe = yaml.safe_load(recipe_path('fashion_mnist_demo').read_text())
    # a budget two epochs overrun: the run is fitted to 2 epochs, and the table says so
    recipe.update(epochs=3, budget_minutes=0.001, eval_hflip=True, train_num_samples=512, val_num_samples=256)
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump(recipe))
    out = tmp_path / 'out'
    argv = [
        'fmnist_accuracy.py',
        '--data',
        str(fmnist_src),
        '--recipes',
        str(tmp_path / 'tiny.yaml'),
        '--out',
        str(out),
    ]
    monkeypatch.setattr(sys, 'argv', argv)
    load_script('fmnist_accuracy').main()

    runs = json.loads((out / 'results.json').read_text())
    assert [len(r['history']) for r in runs] == [2] and runs[0]['epochs'] == 2
    assert all(0 <= h['top1'] <= 100 and h['wall_time'] > 0 for h in runs[0]['history'])
    table = (out / 'results.md').read_text()
    last = runs[0]['history'][-1]
    assert f'| 2 | {last["wall_time"]:.0f} | {last["top1"]:.2f} |' in table
    assert table.splitlines()[-1].endswith(f'| {last["top1"]:.2f} | {last["top1_single"]:.2f} |')  # at 30 min
    assert (out / 'accuracy_vs_time.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the machine-independent axis: compute counted by the trainer, two epochs of 512 images each
    assert last['tflop'] == pytest.approx(2 * 512 * runs[0]['gflop_per_image'] / 1e3)
    assert f'| {last["tflop"]:.1f} | 2 | {last["wall_time"]:.0f} |' in table
    assert (out / 'accuracy_vs_tflop.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # --replot redraws from results.json alone, without data or training
    (out / 'results.md').unlink()
    monkeypatch.setattr(sys, 'argv', ['fmnist_accuracy.py', '--out', str(out), '--replot'])
    load_script('fmnist_accuracy').main()
    assert (out / 'results.md').read_text() == table


def test_exercises_script_gives_each_variant_the_same_budget(tmp_path, fmnist_src, monkeypatch):
    exercises = load_script('fmnist_exercises')
    out = tmp_path / 'out'
    argv = ['fmnist_exercises.py', '--data', str(fmnist_src), '--budget', '2', '--val-samples', '128']
    monkeypatch.setattr(sys, 'argv', [*argv, '--out', str(out), '--only', 'baseline,pooling'])
    exercises.main()

    results = json.loads((out / 'results.json').read_text())
    runs = results['runs']
    assert [r['group'] for r in runs] == ['baseline', 'pooling']
    for run in runs:
        # a 2 s budget affords less than an epoch: the run trains on what its measured speed affords, one batch or more
        assert run['epochs'] == 1
        assert run['train_images'] == max(int(2 * run['probe_img_per_s']), 128)
    assert runs[0]['tokens'] == 50 and runs[1]['tokens'] == 49  # class token or not
    assert '--val-samples 128' in (out / 'results.md').read_text()
    assert (out / 'accuracy_vs_time.png').is_file()


def _run_sweep(
    tmp_path: Path, fmnist_src: Path, plan: list[dict], *extra: str
) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / 'plan.yaml').write_text(yaml.safe_dump(plan))
    out = tmp_path / 'out'
    cmd = [sys.executable, str(REPO_ROOT / 'scripts' / 'recipe_sweep.py'), '--plan', str(tmp_path / 'plan.yaml')]
    cmd += ['--data', str(fmnist_src), '--out', str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300), out


TINY_SWEEP_RUN = dict(epochs=2, train_num_samples=256, val_num_samples=128, batch_size=64)


@pytest.mark.slow
def test_recipe_sweep_runs_variants_side_by_side_and_reports_each(tmp_path, fmnist_src):
    plan = [
        dict(name='demo', base='fashion_mnist_demo', overrides=TINY_SWEEP_RUN),
        dict(name='smooth0', base='fashion_mnist_demo', overrides=dict(TINY_SWEEP_RUN, smoothing=0.0)),
        dict(name='typo', base='fashion_mnist_demo', overrides=dict(TINY_SWEEP_RUN, learning_rate=0.1)),
    ]
    # no --limit here: on a loaded 2-core CI machine three runs side by side took over 40 s, and a limit that the
    # short runs race against makes the test flaky (the limit has its own test below)
    proc, out = _run_sweep(tmp_path, fmnist_src, plan, '--parallel', '3')
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the run with the unknown key failed

    results = {r['name']: r for r in json.loads((out / 'results.json').read_text())}
    for name in ('demo', 'smooth0'):
        assert results[name]['status'] == 'done' and len(results[name]['history']) == 2
        assert results[name]['params'] == 536_602 and 'epochs_so_far' not in results[name]
        assert f'| {name} | done | 2 | {results[name]["history"][-1]["top1"]:.2f} |' in proc.stdout
    assert results['typo']['status'].startswith('failed')
    assert 'learning_rate' in (out / 'logs' / 'typo.log').read_text()  # the trainer names the key it refuses


@pytest.mark.slow
def test_recipe_sweep_limit_stops_the_running_run_and_reports_its_epochs_so_far(tmp_path, fmnist_src):
    # one-step epochs, one run at a time: the long run logs epochs well inside the limit even on a slow machine
    long = dict(TINY_SWEEP_RUN, epochs=1000, train_num_samples=64, val_num_samples=64)
    plan = [
        dict(name='long', base='fashion_mnist_demo', overrides=long),
        dict(name='next', base='fashion_mnist_demo', overrides=TINY_SWEEP_RUN),
    ]
    proc, out = _run_sweep(tmp_path, fmnist_src, plan, '--parallel', '1', '--limit', '30')
    assert proc.returncode == 0, proc.stdout + proc.stderr  # stopping at the limit is not a failure

    results = {r['name']: r for r in json.loads((out / 'results.json').read_text())}
    assert results['long']['status'] == 'stopped at the 30 s limit'
    epochs = results['long']['epochs_so_far']
    assert 0 < len(epochs) < 1000 and [row['epoch'] for row in epochs] == list(range(len(epochs)))
    assert f'| long | stopped at the 30 s limit | {len(epochs)} |' in proc.stdout
    assert results['next']['status'] == 'not started (limit)'


def test_distill_script_trains_a_cnn_teacher_then_a_student_from_its_folder(tmp_path, fmnist_src, monkeypatch):
    tiny = dict(epochs=1, train_num_samples=512, val_num_samples=256, model_ema=True, model_ema_decay=0.9)
    teacher = yaml.safe_load(recipe_path('fashion_mnist_28').read_text())
    teacher.update(tiny, model='test_resnet', amp=False)  # timm's own tiny CNN stands in for resnet18
    (tmp_path / 'teacher.yaml').write_text(yaml.safe_dump(teacher))
    out = tmp_path / 'out'
    argv = ['distill.py', '--data', str(fmnist_src), '--teacher', str(tmp_path / 'teacher.yaml')]
    argv += ['--student', 'fashion_mnist_demo', '--out', str(out), '--set', 'epochs=1', 'train_num_samples=512']
    argv += ['val_num_samples=256', 'kd_temperature=2.0']
    monkeypatch.setattr(sys, 'argv', argv)
    load_script('distill').main()

    # the teacher folder is timm's: config.json names the CNN, and timm rebuilds the run's EMA weights from it
    folder = out / 'teacher'
    assert json.loads((folder / 'config.json').read_text())['architecture'] == 'test_resnet'
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    expected = timm.create_model('test_resnet', num_classes=10, in_chans=1)
    timm.models.load_checkpoint(expected, str(out / 'runs' / 'teacher' / 'last.pth.tar'), use_ema=True)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)
    assert list(reloaded.pretrained_cfg['mean']) == [0.5] and list(reloaded.pretrained_cfg['input_size']) == [1, 28, 28]

    # the student ran with the teacher (its args name the folder) and the overrides
    student_args = yaml.safe_load((out / 'runs' / 'student' / 'args.yaml').read_text())
    assert student_args['kd_model_name'] == f'local-dir:{folder.resolve()}'
    assert student_args['kd_temperature'] == 2.0 and student_args['epochs'] == 1
    # the teacher's training compute counts towards the student's: one epoch of the teacher's, then the student's own
    teacher_args = yaml.safe_load((out / 'runs' / 'teacher' / 'args.yaml').read_text())
    assert student_args['kd_teacher_tflop'] == teacher_args['train_tflop'] > 0
    own = student_args['train_gflop_per_image'] * 512 / 1e3
    assert student_args['train_tflop'] == pytest.approx(teacher_args['train_tflop'] + own, abs=2e-3)
    results = json.loads((out / 'results.json').read_text())
    assert [r['run'] for r in results['runs']] == ['teacher', 'student']
    table = (out / 'results.md').read_text()
    assert all(f'{r["top1"]:.2f} | {r["top1_single"]:.2f} |' in table for r in results['runs'])
    # the teacher's recipe (fashion_mnist_28's) scores with the mirror, and keeps the single view apart
    teacher_rows = {int(r['epoch']): r for r in read_summary(out / 'runs' / 'teacher' / 'summary.csv')}
    assert results['runs'][0]['top1_single'] == teacher_rows[0]['eval_top1_single']

    # a finished teacher run can be reused, but not into the same --out: that would overwrite the exported teacher
    reuse = [*argv[:3], '--teacher-run', str(out / 'runs' / 'teacher'), *argv[5:]]
    monkeypatch.setattr(sys, 'argv', reuse)
    with pytest.raises(FileExistsError, match='not empty'):
        load_script('distill').main()
    out2 = tmp_path / 'out2'
    monkeypatch.setattr(sys, 'argv', [*reuse, '--out', str(out2)])
    load_script('distill').main()
    reused = json.loads((out2 / 'results.json').read_text())['runs']
    assert reused[0]['top1'] == results['runs'][0]['top1'] and reused[0]['wall_time'] is None  # from summary.csv
    assert reused[0]['top1_single'] == results['runs'][0]['top1_single']
    assert (out2 / 'teacher' / 'model.safetensors').read_bytes() == (folder / 'model.safetensors').read_bytes()


def test_accuracy_vs_tflop_counts_a_runs_compute_as_the_trainer_does(tmp_path, fmnist_src, monkeypatch):
    from timm_smallvit.recipe import load_recipe, resolve_args
    from timm_smallvit.trainer import train

    recipe = load_recipe(recipe_path('fashion_mnist_demo'))
    recipe.update(epochs=2, train_num_samples=512, val_num_samples=128, amp=False)
    args = resolve_args(recipe, data_dir=str(fmnist_src), output=str(tmp_path), experiment='counted')
    run = train(args)['output_dir']
    # the same run as one from before the trainer counted compute: no train_tflop column, no train_* args
    old = tmp_path / 'old'
    old.mkdir()
    args = yaml.safe_load((run / 'args.yaml').read_text())
    measured = ('train_gflop_per_image', 'train_tflop', 'train_wall_s', 'train_device')
    (old / 'args.yaml').write_text(yaml.safe_dump({k: v for k, v in args.items() if k not in measured}))
    rows = read_summary(run / 'summary.csv')
    header = [k for k in rows[0] if k != 'train_tflop']
    (old / 'summary.csv').write_text(
        '\n'.join([','.join(header), *(','.join(str(r[k]) for k in header) for r in rows)]) + '\n'
    )
    out = tmp_path / 'out'
    argv = ['accuracy_vs_tflop.py', str(run), str(old), '--labels', 'counted', 'old', '--out', str(out)]
    monkeypatch.setattr(sys, 'argv', argv)
    load_script('accuracy_vs_tflop').main()
    counted, recounted = json.loads((out / 'results.json').read_text())
    assert (counted['counted'], recounted['counted']) == ('by the trainer', 'counted now')
    assert [p['tflop'] for p in recounted['points']] == pytest.approx([p['tflop'] for p in counted['points']])
    assert [p['tflop'] for p in counted['points']] == pytest.approx([r['train_tflop'] for r in rows])
    assert counted['points'][-1]['top1'] == rows[-1]['eval_top1']  # no eval_hflip here: one view
    assert f'| counted | `{args["model"]}` | {args["seed"]} |' in (out / 'results.md').read_text()
    assert (out / 'accuracy_vs_tflop.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
