"""`smallvit train` from the command line, under torchrun with 2 CPU processes, and the launchers."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from timm_smallvit.cli import main
from timm_smallvit.launch import list_recipes, recipe_path, train_py_command
from timm_smallvit.recipe import TRAIN_PY_WITHOUT, load_recipe

from .test_trainer import QUICK

# nano: no BatchNorm, so 2 processes x batch 32 compute exactly what 1 process x batch 64 does
SETTINGS = dict(
    QUICK, model='smallvit_nano_patch4_28', no_aug=True, train_num_samples=1024, val_num_samples=256, epochs=2
)


def _write_recipe(tmp_path: Path, **overrides) -> Path:
    recipe = {k: v for k, v in dict(SETTINGS, **overrides).items() if v is not None}
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    return path


def _state_dict(run_dir: Path) -> dict[str, torch.Tensor]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']


def test_cli_train_runs_a_recipe_with_overrides(tmp_path, fmnist_src, capsys):
    recipe = _write_recipe(tmp_path)
    code = main(
        [
            'train',
            '--config',
            str(recipe),
            '--data-dir',
            str(fmnist_src),
            '--output',
            str(tmp_path),
            '--experiment',
            'cli',
            '--set',
            'epochs=1',
            'lr=0.002',
        ]
    )
    assert code == 0
    out = capsys.readouterr()
    assert 'top-1' in out.out and str(tmp_path / 'cli') in out.out
    assert 'img_s=' in out.err  # the progress bar
    args = yaml.safe_load((tmp_path / 'cli' / 'args.yaml').read_text())
    assert args['epochs'] == 1 and args['lr'] == 0.002


def test_cli_train_refuses_unknown_keys_without_a_traceback(tmp_path, fmnist_src, capsys):
    recipe = _write_recipe(tmp_path, color_jitter_prob=0.5)
    code = main(['train', '--config', str(recipe), '--data-dir', str(fmnist_src), '--output', str(tmp_path)])
    assert code == 1
    assert 'does not honour recipe key(s): color_jitter_prob' in capsys.readouterr().err
    assert not any(tmp_path.glob('*/args.yaml'))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path, fmnist_src):
    """2 processes x batch 32 (gloo, DDP) take the same steps as 1 process x batch 64."""
    # with a budget that all 3 epochs fit: the processes agree on the fitted length (a broadcast) after epoch 1
    recipe = _write_recipe(tmp_path, batch_size=32, epochs=3, budget_minutes=600)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    command = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        '-m', 'timm_smallvit.cli', 'train', '--config', str(recipe), '--data-dir', str(fmnist_src),
        '--output', str(tmp_path), '--experiment', 'ddp',
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(
        ['train', '--config', str(recipe), '--data-dir', str(fmnist_src), '--output', str(tmp_path),
         '--experiment', 'single', '--set', 'batch_size=64']
    ) == 0  # fmt: skip
    ddp, single = _state_dict(tmp_path / 'ddp'), _state_dict(tmp_path / 'single')
    assert set(ddp) == set(single)  # saved unwrapped: no 'module.' prefix
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
    ddp_args = yaml.safe_load((tmp_path / 'ddp' / 'args.yaml').read_text())
    assert ddp_args['world_size'] == 2 and ddp_args['distributed'] is True


def test_recipes_are_listed_and_resolved(capsys):
    recipes = list_recipes()
    assert {'fashion_mnist_seed', 'fashion_mnist_demo', 'cifar10_32'} <= set(recipes)
    assert recipe_path('fashion_mnist_seed') == recipes['fashion_mnist_seed']
    with pytest.raises(FileNotFoundError, match='shipped recipes: '):
        recipe_path('no_such_recipe')
    assert main(['recipes']) == 0
    assert 'fashion_mnist_demo' in capsys.readouterr().out


def test_train_py_command_lines(tmp_path):
    single = train_py_command('fashion_mnist_seed', '/opt/timm/train.py', '/data/fmnist', output='out')
    assert single[:2] == [sys.executable, '/opt/timm/train.py']
    assert single[2:4] == ['--config', str(recipe_path('fashion_mnist_seed'))]
    assert single[4:6] == ['--device-modules', 'timm_smallvit'] and '--dataset-download' in single
    multi = train_py_command(
        'cifar10_32', 'train.py', 'd', nproc_per_node=8, nnodes=2, node_rank=1, master_addr='10.0.0.1'
    )
    assert multi[:6] == [
        'torchrun',
        '--nproc_per_node=8',
        '--nnodes=2',
        '--node_rank=1',
        '--master_addr=10.0.0.1',
        '--master_port=29500',
    ]
    with pytest.raises(ValueError, match='master_addr'):
        train_py_command('cifar10_32', 'train.py', 'd', nproc_per_node=8, nnodes=2)


def test_run_refuses_a_missing_script():
    with pytest.raises(FileNotFoundError, match='pytorch-image-models checkout'):
        main(['run', '/nonexistent/validate.py', '--model', 'smallvit'])


def test_cli_train_py_prints_the_command(fmnist_src, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))
    code = main(
        ['train-py', 'fashion_mnist_demo', '--train-py', '/opt/timm/train.py', '--data-dir', str(fmnist_src),
         '--', '--epochs', '1']
    )  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f'{sys.executable} /opt/timm/train.py --config ')
    assert '--epochs 1' in line and '--device-modules timm_smallvit' in line
    # the verified release files were unpacked into the torchvision root train.py's --data-dir needs
    root = Path(line.split('--data-dir ')[1].split()[0])
    assert root.parent == tmp_path / 'cache' / 'fashion-mnist'
    assert (root / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').is_file()


@pytest.mark.parametrize('native', [True, False])
def test_cli_train_py_warns_when_bf16_would_be_slower(fmnist_src, capsys, monkeypatch, tmp_path, native):
    import timm_smallvit.amp

    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(timm_smallvit.amp, 'cpu_has_native_bf16', lambda: native)
    monkeypatch.setattr(timm_smallvit.amp, 'bf16_speedup', lambda step: 3.0)
    argv = ['train-py', 'fashion_mnist_demo', '--train-py', 'train.py', '--data-dir', str(fmnist_src)]
    assert main([*argv, '--', '--device', 'cpu']) == 0  # the demo recipe sets amp: true
    err = capsys.readouterr().err
    assert ('train.py would train in bf16, slower than float32' in err) != native
    assert native or 'no native bfloat16' in err


def test_cli_train_py_warns_about_keys_only_the_quick_trainer_honours(fmnist_src, capsys, monkeypatch, tmp_path):
    # train.py's --config would take crop_off_epoch etc. silently as defaults and never read them
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))
    argv = ['--train-py', 'train.py', '--data-dir', str(fmnist_src), '--', '--device', 'cpu']
    assert main(['train-py', 'fashion_mnist_28', *argv]) == 0
    recipe, err = load_recipe(recipe_path('fashion_mnist_28')), capsys.readouterr().err
    assert "which only `smallvit train` honours: timm's train.py has no such argument" in err
    for key in ('budget_minutes', 'crop_off_epoch', 'eval_hflip'):  # each with what train.py does instead
        assert f'{key}: {recipe[key]}' in err and f'{key}: {TRAIN_PY_WITHOUT[key]}' in err, key
    assert main(['train-py', 'fashion_mnist_demo', *argv]) == 0
    assert 'only `smallvit train` honours' not in capsys.readouterr().err
    # each key says what train.py does without it
    recipe = dict(load_recipe(recipe_path('fashion_mnist_demo')), eval_hflip=True)
    (tmp_path / 'hflip.yaml').write_text(yaml.safe_dump(recipe))
    assert main(['train-py', str(tmp_path / 'hflip.yaml'), *argv]) == 0
    err = capsys.readouterr().err
    assert 'sets eval_hflip: True, which only' in err and '(eval_hflip: it evaluates one view of each image)' in err
