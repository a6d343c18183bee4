"""Nothing lost, nothing claimed that did not happen: dataset files, resume, run metadata, bad recipe values."""

import argparse
import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.datasets import mnist as tv_mnist

from timm_smallvit import trainer as trainer_module
from timm_smallvit.cli import main
from timm_smallvit.data import load_dataset, load_fashion_mnist
from timm_smallvit.recipe import resolve_args
from timm_smallvit.trainer import NonFiniteLossError, train

from .conftest import FASHION_MNIST_FILES
from .test_trainer import QUICK

TINY = dict(QUICK, model='smallvit_nano_patch4_28', train_num_samples=256, val_num_samples=256, no_aug=True, epochs=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f'tried the network: {args} {kwargs}')

    monkeypatch.setattr(tv_mnist, 'download_and_extract_archive', refuse)
    monkeypatch.setattr('torchvision.datasets.cifar.download_and_extract_archive', refuse)


def _copy_release(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        shutil.copyfile(src / name, dst / name)
    return dst


def _run(tmp_path: Path, fmnist_src: Path, name: str | None, **overrides):
    recipe = dict(TINY, data_dir=str(fmnist_src), output=str(tmp_path))
    if name is not None:
        recipe['experiment'] = name
    recipe.update(overrides)
    return train(resolve_args(recipe))


def _epochs(run_dir: Path) -> list[int]:
    with (run_dir / 'summary.csv').open() as f:
        return [int(row['epoch']) for row in csv.DictReader(f)]


def _meta(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- dataset files ---------------------------------------------------------------------------------------------


def test_release_files_are_verified_on_every_read_and_never_downloaded(fmnist_src, tmp_path, cache, no_network):
    good = load_fashion_mnist(fmnist_src, train=False)[0]
    # after a good run has filled the cache, damaged files in another data dir are still refused by name
    bad = _copy_release(fmnist_src, tmp_path / 'bad')
    with (bad / 't10k-images-idx3-ubyte.gz').open('r+b') as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r't10k-images-idx3-ubyte\.gz is not the Fashion-MNIST release file.*MD5'):
        load_fashion_mnist(bad, train=False)
    empty = tmp_path / 'empty'
    empty.mkdir()
    for name in FASHION_MNIST_FILES:
        (empty / name).touch()
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte\.gz is not the Fashion-MNIST release'):
        load_dataset('torch/fashion_mnist', empty, train=True)
    # and the good files still load from the same cache
    assert torch.equal(load_fashion_mnist(fmnist_src, train=False)[0], good)


def test_a_truncated_file_in_a_fresh_cache_then_the_real_files_load(fmnist_src, tmp_path, cache, no_network):
    bad = _copy_release(fmnist_src, tmp_path / 'bad')
    with (bad / 'train-labels-idx1-ubyte.gz').open('r+b') as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r'train-labels-idx1-ubyte\.gz'):
        load_fashion_mnist(bad, train=True)
    images, labels = load_fashion_mnist(fmnist_src, train=True)
    assert images.shape == (60_000, 28, 28) and torch.bincount(labels).tolist() == [6000] * 10


def test_a_damaged_cache_is_rebuilt(fmnist_src, cache, no_network):
    images, labels = load_fashion_mnist(fmnist_src, train=False)
    (unpacked,) = cache.glob('fashion-mnist/*/FashionMNIST/raw/t10k-images-idx3-ubyte')
    with unpacked.open('r+b') as f:
        f.truncate(5000)
    again, again_labels = load_fashion_mnist(fmnist_src, train=False)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    # the cache is keyed by the release files' checksums: one folder, however many data dirs hold those bytes
    assert len(list(cache.glob('fashion-mnist/*/FashionMNIST'))) == 1


def test_missing_files_download_only_when_asked(tmp_path, cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match='dataset_download: true'):
        load_fashion_mnist(tmp_path / 'nowhere', train=False)
    asked = []

    def fake_download(url, download_root, filename, md5):
        asked.append(filename)
        raise RuntimeError('offline')

    monkeypatch.setattr(tv_mnist, 'download_and_extract_archive', fake_download)
    with pytest.raises(RuntimeError, match='Error downloading'):
        load_fashion_mnist(tmp_path / 'nowhere', train=False, download=True)
    assert asked and asked[0].endswith('-ubyte.gz')


def test_cifar10_files_are_checked_and_a_damaged_copy_is_not_downloaded_over(tmp_path, cache, no_network):
    with pytest.raises(ValueError, match=r'CIFAR-10 files missing.*dataset_download: true'):
        load_dataset('torch/cifar10', tmp_path, train=True)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    (folder / 'data_batch_1').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match=r'CIFAR-10 files damaged \(MD5 mismatch\).*data_batch_1'):
        load_dataset('torch/cifar10', tmp_path, train=True, download=True)


# ---- resume ----------------------------------------------------------------------------------------------------


def test_resume_never_writes_into_another_runs_folder(tmp_path, fmnist_src):
    _run(tmp_path, fmnist_src, 'keep')
    other = _run(tmp_path, fmnist_src, 'other', seed=1)['output_dir']
    before = _snapshot(tmp_path / 'keep')
    with pytest.raises(FileExistsError, match='holds another run'):
        _run(tmp_path, fmnist_src, 'keep', seed=1, epochs=2, resume=str(other / 'last.pth.tar'))
    assert _snapshot(tmp_path / 'keep') == before
    # without an experiment name the run continues in its own folder
    resumed = _run(tmp_path, fmnist_src, None, seed=1, epochs=2, resume=str(other / 'last.pth.tar'))
    assert resumed['output_dir'] == other and _epochs(other) == [0, 1]


def test_model_best_only_improves_across_a_resume(tmp_path, fmnist_src, monkeypatch):
    real = trainer_module.evaluate
    scores = iter([60.0, 50.0])  # epoch 0 scores better than epoch 1

    def scored(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics['top1'] = next(scores)
        return metrics

    monkeypatch.setattr(trainer_module, 'evaluate', scored)
    run_dir = _run(tmp_path, fmnist_src, 'best')['output_dir']
    _run(tmp_path, fmnist_src, 'best', epochs=2, resume=str(run_dir / 'last.pth.tar'))
    best = _meta(run_dir / 'model_best.pth.tar')
    assert (best['epoch'], best['metric']) == (0, 60.0)
    assert _meta(run_dir / 'last.pth.tar')['epoch'] == 1
    assert _epochs(run_dir) == [0, 1]  # one row per epoch, one header
    assert (run_dir / 'summary.csv').read_text().count('epoch,') == 1


def test_resume_from_an_earlier_epoch_does_not_overwrite_later_ones(tmp_path, fmnist_src):
    run_dir = _run(tmp_path, fmnist_src, 'two', epochs=2)['output_dir']
    before = _snapshot(run_dir)
    with pytest.raises(FileExistsError, match=r'already holds epochs from 1 on \(checkpoint-1.pth.tar'):
        _run(tmp_path, fmnist_src, 'two', epochs=2, resume=str(run_dir / 'checkpoint-0.pth.tar'))
    assert _snapshot(run_dir) == before


def test_overrides_a_resume_cannot_honour_are_refused_not_recorded(tmp_path, fmnist_src):
    run_dir = _run(tmp_path, fmnist_src, 'lr')['output_dir']
    args_before = (run_dir / 'args.yaml').read_text()
    last = str(run_dir / 'last.pth.tar')
    with pytest.raises(ValueError, match=r"lr 1000000000.0 differs from the checkpoint's 0.003.*no_resume_opt: true"):
        _run(tmp_path, fmnist_src, 'lr', epochs=2, resume=last, lr=1e9)
    with pytest.raises(ValueError, match=r"val_num_samples 128 differs from the checkpoint's 256"):
        _run(tmp_path, fmnist_src, 'lr', epochs=2, resume=last, val_num_samples=128)
    assert (run_dir / 'args.yaml').read_text() == args_before
    # with a fresh optimizer the new lr is honoured, and then it is what the run records
    _run(tmp_path, fmnist_src, 'lr', epochs=2, resume=last, lr=1e-3, no_resume_opt=True)
    ckpt = _meta(run_dir / 'last.pth.tar')
    assert ckpt['args'].lr == 1e-3 and ckpt['optimizer']['param_groups'][0]['initial_lr'] == 1e-3
    assert yaml.safe_load((run_dir / 'args.yaml').read_text())['lr'] == 1e-3


def test_nan_before_the_first_checkpoint_leaves_nothing_and_the_command_runs_again(tmp_path, fmnist_src):
    with pytest.raises(NonFiniteLossError, match=r'No checkpoint was written \(nothing kept\): run the same command'):
        _run(tmp_path, fmnist_src, 'nan0', opt='sgd', lr=1e12)
    assert not (tmp_path / 'nan0').exists()
    assert _run(tmp_path, fmnist_src, 'nan0')['output_dir'] == tmp_path / 'nan0'


def test_nan_after_a_checkpoint_says_a_resume_that_works(tmp_path, fmnist_src):
    bad = dict(opt='sgd', lr=0.05, sched='step', decay_epochs=1, decay_rate=1e12, epochs=2, train_num_samples=512)
    with pytest.raises(NonFiniteLossError, match='resume from it with no_resume_opt: true and a lower lr') as info:
        _run(tmp_path, fmnist_src, 'nan1', **bad)
    assert str(tmp_path / 'nan1' / 'last.pth.tar') in str(info.value)
    good = dict(bad, decay_rate=0.1, no_resume_opt=True, lr=0.01)
    _run(tmp_path, fmnist_src, 'nan1', resume=str(tmp_path / 'nan1' / 'last.pth.tar'), **good)
    assert _epochs(tmp_path / 'nan1') == [0, 1]


# ---- one-line errors from the command line ---------------------------------------------------------------------


def _cli_error(capsys, recipe: Path, *extra: str) -> str:
    code = main(['train', '--config', str(recipe), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err, err
    assert err[-1].startswith('smallvit train: error: ') and 'Traceback' not in '\n'.join(err)
    return err[-1]


@pytest.mark.parametrize(
    'setting, message',
    [
        ('epochs=0', 'epochs 0: expected a whole number of at least 1'),
        ('batch_size=0', 'batch_size 0: expected a whole number of at least 1'),
        ('val_num_samples=-1', 'val_num_samples -1: expected a whole number of at least 1, or leave it unset'),
        ('train_num_samples=0', 'train_num_samples 0'),
        ('epochs=two', "epochs 'two'"),
        ('num_classes=3', 'num_classes 3: torch/fashion_mnist has 10 classes (T-shirt/top, Trouser,'),
        ('num_classes=12', 'num_classes 12: torch/fashion_mnist has 10 classes'),
    ],
)
def test_bad_values_are_one_line_errors(setting, message, tmp_path, fmnist_src, capsys):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(dict(TINY, data_dir=str(fmnist_src), output=str(tmp_path), experiment='x')))
    assert message in _cli_error(capsys, recipe, '--set', setting)
    assert not (tmp_path / 'x').exists()


def test_malformed_yaml_and_bad_resume_files_are_one_line_errors(tmp_path, fmnist_src, capsys):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('model: smallvit_nano_patch4_28\nepochs: [1, 2\nlr: 0.1\n')
    assert f'{broken} is not valid YAML at line' in _cli_error(capsys, broken)

    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(dict(TINY, data_dir=str(fmnist_src), output=str(tmp_path))))
    missing = tmp_path / 'gone' / 'last.pth.tar'
    assert f'resume {missing}: no such checkpoint' in _cli_error(capsys, recipe, '--resume', str(missing))

    run_dir = _run(tmp_path, fmnist_src, 'src')['output_dir']
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes((run_dir / 'last.pth.tar').read_bytes()[:4000])
    line = _cli_error(capsys, recipe, '--experiment', 'y', '--resume', str(truncated))
    assert f'resume {truncated}: not a readable training checkpoint' in line

    foreign = tmp_path / 'foreign.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'epoch': 0}, foreign)
    line = _cli_error(capsys, recipe, '--experiment', 'z', '--resume', str(foreign))
    assert f'resume {foreign}: its state does not fit smallvit_nano_patch4_28' in line

    other_model = _run(tmp_path, fmnist_src, 'tiny', model='smallvit_tiny_patch4_28')['output_dir']
    line = _cli_error(capsys, recipe, '--experiment', 'w', '--resume', str(other_model / 'last.pth.tar'))
    assert "model 'smallvit_nano_patch4_28' differs from the checkpoint's 'smallvit_tiny_patch4_28'" in line
    assert not any((tmp_path / name).exists() for name in ('y', 'z', 'w'))


def test_train_data_dir_override_reaches_the_checksum_check(tmp_path, fmnist_src, capsys):
    bad = _copy_release(fmnist_src, tmp_path / 'bad')
    (bad / 'train-images-idx3-ubyte.gz').write_bytes(b'')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(dict(TINY, data_dir=str(fmnist_src), output=str(tmp_path), experiment='d')))
    line = _cli_error(capsys, recipe, '--data-dir', str(bad))
    assert 'train-images-idx3-ubyte.gz is not the Fashion-MNIST release file' in line
    assert not (tmp_path / 'd').exists()


def test_a_runs_args_yaml_is_a_recipe_that_repeats_it(tmp_path, fmnist_src):
    first = _run(tmp_path, fmnist_src, 'first')
    recipe = yaml.safe_load((first['output_dir'] / 'args.yaml').read_text())
    assert {'world_size', 'rank'} <= set(recipe)  # what timm's init_distributed_device added
    again = train(resolve_args(recipe, experiment='again'))
    assert again['eval_metrics']['top1'] == first['eval_metrics']['top1']
