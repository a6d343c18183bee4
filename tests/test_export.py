"""smallvit export: timm training checkpoint -> model.safetensors + timm's config.json + model card, and bad input."""

import argparse
import builtins
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard, metadata_load

import timm_smallvit
from tests.hub_server import make_training_run
from timm_smallvit import cli, export
from timm_smallvit.data import FASHION_MNIST_CLASSES

MODEL = 'smallvit_nano_patch4_28'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def reference_model(state_dict: dict, in_chans: int = 1) -> torch.nn.Module:
    model = timm.create_model(MODEL, in_chans=in_chans, img_size=28)
    model.load_state_dict(state_dict)
    return model.eval()


def logits(model: torch.nn.Module, in_chans: int = 1) -> torch.Tensor:
    x = torch.randn(4, in_chans, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def summary_row(run: Path, epoch: int) -> dict:
    with (run / 'summary.csv').open() as f:
        return next(r for r in csv.DictReader(f) if int(r['epoch']) == epoch)


def python_block(card_text: str) -> str:
    return re.search(r'```python\n(.*?)```', card_text, re.S).group(1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # tiny models: on a busy 2-core machine a 2-thread forward took 0.5 s, a 1-thread one 5 ms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    return make_training_run(tmp_path_factory.mktemp('run'))


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory) -> Path:
    """The EMA weights of model_best: what the run's summary.csv measured."""
    return timm_smallvit.export_checkpoint(
        run / 'model_best.pth.tar', tmp_path_factory.mktemp('exports') / 'best', use_ema=True
    )


def test_export_writes_safetensors_and_timm_config(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        'README.md',
        'config.json',
        'learning_curve.png',
        'model.safetensors',
    ]
    ckpt = load_ckpt(run / 'model_best.pth.tar')
    weights = safetensors.torch.load_file(exported / 'model.safetensors')
    assert weights.keys() == ckpt['state_dict_ema'].keys()
    assert all(torch.equal(weights[k], ckpt['state_dict_ema'][k]) for k in weights)
    assert not all(torch.equal(weights[k], ckpt['state_dict'][k]) for k in weights)  # EMA, not the trained ones

    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == MODEL
    assert (config['num_classes'], config['num_features'], config['global_pool']) == (10, 64, 'token')
    # num_classes only at the top level (timm reads it there): transformers' TimmWrapper fails on a second one
    assert config['model_args'] == {'in_chans': 1, 'global_pool': 'token', 'img_size': [28, 28], 'gray_from_rgb': True}
    assert config['num_classes'] == 10
    assert config['label_names'] == list(FASHION_MNIST_CLASSES)
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 28, 28]
    assert (cfg['mean'], cfg['std'], cfg['interpolation'], cfg['crop_pct']) == ([0.286], [0.353], 'bilinear', 1.0)
    assert cfg['num_classes'] == 10 and cfg['license'] == 'apache-2.0'


def test_pull_from_local_dir_gives_the_checkpoint_logits(run, exported):
    expected = logits(reference_model(load_ckpt(run / 'model_best.pth.tar')['state_dict_ema']))
    model = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    assert torch.equal(logits(model), expected)
    assert model.pretrained_cfg['label_names'] == list(FASHION_MNIST_CLASSES)
    assert model.pretrained_cfg['input_size'] == (1, 28, 28)
    helper = timm_smallvit.create_model(f'local-dir:{exported}', pretrained=True).eval()
    assert torch.equal(logits(helper), expected)


def test_checked_pull_builds_the_model_once(exported, monkeypatch):
    built = []
    init = timm_smallvit.SmallViT.__init__

    def counted(self, *args, **kwargs):
        built.append(kwargs.get('num_classes'))
        init(self, *args, **kwargs)

    monkeypatch.setattr(timm_smallvit.SmallViT, '__init__', counted)
    timm_smallvit.create_model(f'local-dir:{exported}', pretrained=True)
    assert built == [10]


def test_checked_pull_refuses_weights_timm_would_resample_unless_asked(exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / 'export')
    config = json.loads((folder / 'config.json').read_text())
    config['model_args']['img_size'] = [32, 32]  # the weights are 28 px: timm alone would resample pos_embed
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r'safetensors do not fit smallvit_nano_patch4_28: shapes differ: pos_embed'):
        timm_smallvit.create_model(f'local-dir:{folder}', pretrained=True)
    # asked for another size, the weights are adapted as timm adapts any pretrained weights
    model = timm_smallvit.create_model(f'local-dir:{exported}', pretrained=True, img_size=32).eval()
    assert model.patch_embed.img_size == (32, 32) and model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_card_parses_and_carries_the_measured_results(run, exported):
    text = (exported / 'README.md').read_text()
    card = ModelCard.load(exported / 'README.md')
    assert card.data.library_name == 'timm'
    assert {'image-classification', 'timm'} <= set(card.data.tags)
    assert card.data.license == 'apache-2.0'
    assert card.data.datasets == ['zalando-datasets/fashion_mnist']

    best_epoch = load_ckpt(run / 'model_best.pth.tar')['epoch']
    row = summary_row(run, best_epoch)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {'accuracy', 'top_5_accuracy'}
    assert results['accuracy'].metric_value == float(row['eval_top1'])
    assert results['top_5_accuracy'].metric_value == float(row['eval_top5'])
    assert results['accuracy'].dataset_type == 'zalando-datasets/fashion_mnist'
    assert results['accuracy'].dataset_split == 'test'

    # architecture table, recipe, and every epoch of summary.csv
    for fragment in (
        '| Parameters | 303,498 |',
        # patch embed 49*16*64, five blocks of 50*12*64^2 + 2*50^2*64, the last block for the class token alone
        # (keys and values of 50 tokens, then one token: 50*2*64^2 + 10*64^2 + 2*50*64), head 64*10
        '| GMACs | 0.0144 (one 1×28×28 image) |',
        '| Patch size | 4×4 (49 patches) |',
        '| Width | 64 |',
        '| Depth | 6 |',
        '| Heads | 2 |',
        '| Pooling | class token |',
        '| optimizer | `adamw` |',
        '| learning rate | 0.003 |',
        '| EMA decay | 0.5 |',
        f'| epoch {best_epoch} | {float(row["eval_top1"]):.2f} | {float(row["eval_top5"]):.2f} |',
        '![Learning curve: loss and accuracy per epoch](learning_curve.png)',
    ):
        assert fragment in text, fragment
    for epoch in range(3):
        assert f'| {epoch} | {float(summary_row(run, epoch)["train_loss"]):.4f} |' in text
    png = (exported / 'learning_curve.png').read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_card_usage_snippet_runs_as_written(exported, capsys, monkeypatch):
    code = python_block((exported / 'README.md').read_text())
    assert f"timm.create_model('local-dir:{exported}', pretrained=True)" in code
    monkeypatch.chdir(exported.parent)
    exec(compile(code, 'README.md', 'exec'), {'__name__': '__main__'})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.split(':')[0] in FASHION_MNIST_CLASSES for line in lines)


def test_cli_export_of_trained_weights_keeps_ema_metrics_out_of_model_index(run, tmp_path, capsys):
    out = tmp_path / 'trained'
    assert cli.main(['export', str(run / 'last.pth.tar'), str(out)]) == 0
    assert f'Exported to {out}' in capsys.readouterr().out
    ckpt = load_ckpt(run / 'last.pth.tar')
    weights = safetensors.torch.load_file(out / 'model.safetensors')
    assert all(torch.equal(weights[k], ckpt['state_dict'][k]) for k in ckpt['state_dict'])
    card = ModelCard.load(out / 'README.md')
    assert not card.data.eval_results  # summary.csv measured the EMA weights, not these
    assert 'measured on the EMA weights, while this export holds the trained (non-EMA) weights' in card.text
    assert f'(epoch {ckpt["epoch"]})' in card.text


def test_train_py_default_of_three_channels_comes_from_the_weights(tmp_path):
    # train.py builds in_chans=3 models unless --in-chans / --input-size is given, even for Fashion-MNIST
    run = make_training_run(tmp_path / 'run', epochs=1, in_chans=None, model_ema=False)
    out = export.export_checkpoint(run / 'last.pth.tar', tmp_path / 'out', repo_id='alice/rgb')
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['in_chans'] == 3 and config['pretrained_cfg']['input_size'] == [3, 28, 28]
    code = python_block((out / 'README.md').read_text())
    assert "Image.new('RGB', (28, 28))" in code and "create_model('hf-hub:alice/rgb', pretrained=True)" in code
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    expected = logits(reference_model(load_ckpt(run / 'last.pth.tar')['state_dict'], in_chans=3), in_chans=3)
    assert torch.equal(logits(model, in_chans=3), expected)
    assert ModelCard.load(out / 'README.md').data.eval_results[0].metric_value == float(
        summary_row(run, 0)['eval_top1']
    )


def test_safetensors_input_needs_the_model_name(run, tmp_path):
    state_dict = load_ckpt(run / 'last.pth.tar')['state_dict']
    weights = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(state_dict, weights)
    with pytest.raises(ValueError, match=r'does not say which model it holds .* pass --model'):
        export.export_checkpoint(weights, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    out = export.export_checkpoint(weights, tmp_path / 'out', model_name=MODEL, model_kwargs={'img_size': 28})
    assert torch.equal(
        logits(timm.create_model(f'local-dir:{out}', pretrained=True).eval()), logits(reference_model(state_dict))
    )
    assert 'The checkpoint carries no training arguments.' in (out / 'README.md').read_text()
    assert not (out / 'learning_curve.png').exists()


def test_non_empty_out_dir_is_refused_unless_overwrite(run, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='is not empty: choose a new OUT_DIR, or pass --overwrite'):
        export.export_checkpoint(run / 'last.pth.tar', out)
    assert snapshot(out) == {'keep.txt': b'mine'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no temporary folder left behind

    export.export_checkpoint(run / 'last.pth.tar', out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        'README.md',
        'config.json',
        'learning_curve.png',
        'model.safetensors',
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_overwrite_never_replaces_the_run_folder_it_reads(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / 'run')
    before = snapshot(copy)
    with pytest.raises(ValueError, match='an input of this export: choose an OUT_DIR outside it'):
        export.export_checkpoint(copy / 'last.pth.tar', copy, overwrite=True)
    assert snapshot(copy) == before


@pytest.mark.parametrize('where', ['new', 'overwrite'])
def test_interrupted_export_leaves_nothing_half_written(run, tmp_path, monkeypatch, where):
    out = tmp_path / 'out'
    if where == 'overwrite':
        out.mkdir()
        (out / 'old.txt').write_text('old export')

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelCard, 'save', interrupt)  # the last file written
    with pytest.raises(KeyboardInterrupt):
        export.export_checkpoint(run / 'last.pth.tar', out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (['out'] if where == 'overwrite' else [])
    if where == 'overwrite':
        assert snapshot(out) == {'old.txt': b'old export'}


class _Payload:
    """Pickles as a call to open(marker, 'w'): a load that executes pickled code leaves the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), 'w')


def _bad_checkpoint(kind: str, run: Path, tmp_path: Path) -> Path:
    good = run / 'last.pth.tar'
    ckpt = load_ckpt(good)
    path = tmp_path / f'{kind}.pth.tar'
    if kind == 'truncated':
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == 'pickled_code':
        torch.save({**ckpt, 'extra': _Payload(tmp_path / 'marker')}, path)
    elif kind == 'other_architecture':
        resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(1000, 512)}
        torch.save(
            {**ckpt, 'arch': 'resnet18', 'args': argparse.Namespace(model='resnet18'), 'state_dict': resnet}, path
        )
    elif kind == 'not_smallvit_weights':
        resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(1000, 512)}
        torch.save({**ckpt, 'state_dict': resnet}, path)
    elif kind == 'num_classes':
        torch.save({**ckpt, 'args': argparse.Namespace(**{**vars(ckpt['args']), 'num_classes': 5})}, path)
    elif kind == 'in_chans':
        torch.save({**ckpt, 'args': argparse.Namespace(**{**vars(ckpt['args']), 'in_chans': 3})}, path)
    elif kind == 'img_size':
        args = argparse.Namespace(**{**vars(ckpt['args']), 'model_kwargs': {'img_size': 32}})
        torch.save({**ckpt, 'args': args}, path)
    elif kind == 'no_ema':
        torch.save({k: v for k, v in ckpt.items() if k != 'state_dict_ema'}, path)
    elif kind == 'nan_weights':
        state_dict = dict(ckpt['state_dict'])
        state_dict['blocks.2.attn.qkv.weight'] = state_dict['blocks.2.attn.qkv.weight'].clone()
        state_dict['blocks.2.attn.qkv.weight'][0, 0] = float('nan')
        state_dict['head.bias'] = torch.full_like(state_dict['head.bias'], float('inf'))
        torch.save({**ckpt, 'state_dict': state_dict}, path)
    elif kind == 'args_not_namespace':
        torch.save({**ckpt, 'args': ['--model', MODEL]}, path)
    elif kind == 'model_kwargs_string':
        torch.save({**ckpt, 'args': argparse.Namespace(**{**vars(ckpt['args']), 'model_kwargs': 'img_size=28'})}, path)
    elif kind == 'missing':
        pass
    return path


BAD_CHECKPOINTS = {
    'truncated': (ValueError, r'Could not read .* as a PyTorch checkpoint .* Is it truncated\?'),
    'pickled_code': (ValueError, r'holds Python objects other than tensors and training args, so it is not loaded'),
    'other_architecture': (ValueError, r"was trained as 'resnet18', which is not a smallvit model"),
    'not_smallvit_weights': (ValueError, r'is not a smallvit checkpoint: its weights have no patch_embed'),
    'num_classes': (ValueError, r'num_classes mismatch .* training args say 5 classes, but the classifier'),
    'in_chans': (ValueError, r'in_chans mismatch .* training args say 3 input channels'),
    'img_size': (ValueError, r'do not fit smallvit_nano_patch4_28: shapes differ: pos_embed .* img_size'),
    'no_ema': (ValueError, r'has no EMA weights \(state_dict_ema\): train with --model-ema'),
    'missing': (FileNotFoundError, r'No checkpoint at'),
    'nan_weights': (
        ValueError,
        r'nan_weights.pth.tar has non-finite weights \(NaN or inf\) in blocks.2.attn.qkv.weight, head.bias: '
        r'the run diverged. Nothing was exported; export an earlier checkpoint',
    ),
    'args_not_namespace': (ValueError, r"'args' is a list, not train.py's argparse.Namespace of training args"),
    'model_kwargs_string': (ValueError, r"the training arg model_kwargs is 'img_size=28', not a mapping"),
}


@pytest.mark.parametrize('kind', list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_a_clear_error_and_writes_nothing(kind, run, tmp_path):
    checkpoint = _bad_checkpoint(kind, run, tmp_path)
    before = snapshot(tmp_path)
    error, message = BAD_CHECKPOINTS[kind]
    with pytest.raises(error, match=message) as info:
        export.export_checkpoint(checkpoint, tmp_path / 'out', use_ema=kind == 'no_ema')
    assert '\n' not in str(info.value)
    assert snapshot(tmp_path) == before  # no OUT_DIR, no temporary folder, and the payload never ran
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    assert not (tmp_path / 'marker').exists()


def test_cli_reports_bad_input_without_a_traceback(run, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'x').write_text('x')
    assert cli.main(['export', str(run / 'last.pth.tar'), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('smallvit export: error: ') and 'is not empty' in err and 'Traceback' not in err


def test_cli_refuses_nan_weights_in_one_line(run, tmp_path, capsys):
    checkpoint = _bad_checkpoint('nan_weights', run, tmp_path)
    assert cli.main(['export', str(checkpoint), str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('smallvit export: error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert 'the run diverged' in err and 'bug' not in err
    assert not (tmp_path / 'out').exists()


# An export that stops in ModelCard.save (the last file written), after config.json and model.safetensors
_STALLED_EXPORT = """
import sys, time
from pathlib import Path
import torch
from huggingface_hub import ModelCard
from timm_smallvit import export
torch.set_num_threads(1)
def stall(self, path):
    Path(sys.argv[3]).write_text('stalled')
    time.sleep(600)
ModelCard.save = stall
export.export_checkpoint(sys.argv[1], sys.argv[2])
"""


def _temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if '.export-' in p.name)


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_temp_folder_of_a_killed_export_goes_at_the_next_export(run, tmp_path, sig):
    parent, marker = tmp_path / 'exports', tmp_path / 'stalled'
    checkpoint = run / 'last.pth.tar'
    proc = subprocess.Popen(
        [sys.executable, '-c', _STALLED_EXPORT, str(checkpoint), str(parent / 'best'), str(marker)],
        env={**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=5)[0].decode() if proc.poll() is not None else 'timed out'
        proc.send_signal(sig)
        proc.wait(timeout=30)  # reaped: its pid is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [left] = _temp_folders(parent)
    assert left.startswith(f'.best.export-{proc.pid}-') and not (parent / 'best').exists()
    assert {'config.json', 'model.safetensors'} <= {p.name for p in (parent / left).iterdir()}

    # what the next export must leave alone: in use, not an export's content, a link, and a recent old-style folder
    live = parent / f'.other.export-{os.getpid()}-abcd1234'
    live.mkdir()
    (live / 'config.json').write_text('{}')
    dead = proc.pid  # exited and reaped
    foreign = parent / f'.notes.export-{dead}-abcd1234'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    outside = tmp_path / 'outside'
    outside.mkdir()
    (outside / 'config.json').write_text('{}')
    link = parent / f'.link.export-{dead}-abcd1234'
    link.symlink_to(outside, target_is_directory=True)
    recent = parent / '.best.export-abcd1234'
    recent.mkdir()
    # ... and an old-style folder (no pid in its name) of a day ago, which goes
    old = parent / '.best.export-efgh5678'
    old.mkdir()
    (old / 'model.safetensors').write_bytes(b'x')
    os.utime(old, (time.time() - 86400,) * 2)

    out = export.export_checkpoint(checkpoint, parent / 'best')
    assert _temp_folders(parent) == sorted(p.name for p in (live, foreign, link, recent))
    assert (outside / 'config.json').read_text() == '{}' and (foreign / 'notes.txt').read_text() == 'mine'
    # every export file (predictions.png only when the run's test images are at hand: not for this checkpoint;
    # model.onnx only with --onnx)
    leave_out = (export.GRID_NAME, export.ONNX_NAME)
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in export.EXPORT_FILES if n not in leave_out)
    expected = logits(reference_model(load_ckpt(checkpoint)['state_dict']))
    assert torch.equal(logits(timm.create_model(f'local-dir:{out}', pretrained=True).eval()), expected)


def test_card_says_which_images_were_evaluated(tmp_path):
    run = make_training_run(tmp_path / 'run', epochs=1, model_ema=False, val_num_samples=512, train_num_samples=1024)
    out = export.export_checkpoint(run / 'last.pth.tar', tmp_path / 'out')
    card = ModelCard.load(out / 'README.md')
    splits = {r.dataset_split for r in card.data.eval_results}
    assert splits == {'test[:512]'}  # the Hub's split syntax, not the whole test split
    results = metadata_load(out / 'README.md')['model-index'][0]['results']
    assert [r['dataset']['split'] for r in results] == ['test[:512]'] * len(results) and results
    text = ' '.join(card.text.split())
    assert 'evaluated on the first 512 images of the test split' in text
    assert 'on the first 512 images of the test split, epoch 0:' in text
    assert 'trained on the first 1,024 images of the training split' in text
    assert '| evaluation images (first N) | 512 |' in card.text and '| training images (first N) | 1024 |' in card.text


def test_card_of_a_run_evaluated_on_a_holdout_says_so_and_claims_no_test_split(tmp_path):
    run = make_training_run(tmp_path / 'run', epochs=1, model_ema=False, val_holdout=5000)
    out = export.export_checkpoint(run / 'last.pth.tar', tmp_path / 'out')
    card = ModelCard.load(out / 'README.md')
    assert {r.dataset_split for r in card.data.eval_results} == {'train'}
    text = ' '.join(card.text.split())
    assert 'evaluated on 5,000 images held out from the training split (val_holdout 5000' in text
    assert 'test split,' not in text.replace('not on the test split,', '')
    assert '| evaluation images held out from training | 5000 |' in card.text
