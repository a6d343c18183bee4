"""timm's own train.py and validate.py with the smallvit family: a short real run, export, validate.

These need a pytorch-image-models checkout (train.py is not in the timm wheel): set TIMM_TRAIN_PY to its
train.py; validate.py is taken from the same folder. Without it they skip, saying so.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_smallvit
from timm_smallvit.data import FASHION_MNIST_CLASSES, prepare_fashion_mnist
from timm_smallvit.launch import train_py_command

TRAIN_PY = os.environ.get('TIMM_TRAIN_PY')
pytestmark = [
    pytest.mark.train_py,
    pytest.mark.skipif(
        not TRAIN_PY, reason="TIMM_TRAIN_PY is not set (path to timm's train.py from a pytorch-image-models checkout)"
    ),
]


@pytest.fixture(scope='module')
def train_py_run(tmp_path_factory, fmnist_src):
    """One short train.py run: smallvit_nano_patch4_28, grayscale 28 px, 1 epoch on 10k images."""
    tmp = tmp_path_factory.mktemp('train_py')
    root = prepare_fashion_mnist(fmnist_src, tmp / 'data')
    recipe = tmp / 'recipe.yaml'
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model='smallvit_nano_patch4_28', dataset='torch/fashion_mnist', input_img_mode='L', in_chans=1,
                num_classes=10, img_size=28, mean=[0.5], std=[0.5], crop_pct=1.0, scale=[0.8, 1.0], hflip=0.5,
                color_jitter=0.0, opt='adamw', lr=2e-3, weight_decay=0.05, epochs=1, warmup_epochs=0,
                batch_size=128, workers=1, device='cpu', seed=0,
            )
        )
    )  # fmt: skip
    command = train_py_command(recipe, TRAIN_PY, root, output=tmp / 'output', experiment='nano')
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp / 'output' / 'nano', root, done


def test_train_py_run_trains_and_writes_a_checkpoint(train_py_run):
    run_dir, _, done = train_py_run
    assert (run_dir / 'last.pth.tar').is_file() and (run_dir / 'summary.csv').is_file()
    rows = (run_dir / 'summary.csv').read_text().splitlines()
    top1 = float(rows[1].split(',')[3])
    assert top1 > 60.0, rows  # one epoch of real data, well above chance
    assert 'Model smallvit_nano_patch4_28 created' in done.stdout + done.stderr


def test_export_takes_a_train_py_checkpoint_and_validate_py_agrees(train_py_run, tmp_path):
    run_dir, root, _ = train_py_run
    export = timm_smallvit.export_checkpoint(run_dir / 'last.pth.tar', tmp_path / 'export')
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == list(FASHION_MNIST_CLASSES)
    assert model.in_chans == 1 and model.patch_embed.img_size == (28, 28)

    # timm's validate.py, run through `smallvit run`, measures the export as train.py measured the checkpoint
    validate_py = Path(TRAIN_PY).with_name('validate.py')
    command = [
        sys.executable, '-m', 'timm_smallvit.cli', 'run', str(validate_py), '--model', f'local-dir:{export}',
        '--pretrained', '--data-dir', str(root), '--dataset', 'torch/fashion_mnist', '--split', 'validation',
        '--input-img-mode', 'L', '--in-chans', '1', '--batch-size', '256', '--workers', '1', '--device', 'cpu',
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    measured = float(re.search(r'"top1": ([0-9.]+)', done.stdout).group(1))
    logged = float((run_dir / 'summary.csv').read_text().splitlines()[1].split(',')[3])
    assert abs(measured - logged) < 0.02, (measured, logged)


def test_validate_py_without_the_launcher_does_not_know_smallvit(train_py_run, tmp_path):
    validate_py = Path(TRAIN_PY).with_name('validate.py')
    command = [sys.executable, str(validate_py), '--model', 'smallvit_nano_patch4_28', '--data-dir', str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and 'Unknown model' in done.stderr


def test_train_py_cannot_run_ddp_on_cpu(train_py_run, tmp_path):
    """The documented limit: train.py gives DDP device_ids=[cpu], which DDP refuses; use smallvit train there."""
    _, root, _ = train_py_run
    command = train_py_command(
        'fashion_mnist_demo', TRAIN_PY, root, output=tmp_path, nproc_per_node=2, extra=['--device', 'cpu']
    )
    command[0:1] = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert 'device_ids' in done.stderr and torch.cuda.is_available() is False
