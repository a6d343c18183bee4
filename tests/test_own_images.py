"""Your own images: image folders and torch/ datasets read as train.py reads them, decoded once, fine-tuning.

The data is real: Fashion-MNIST release images written out as PNG folders and in MNIST's file layout. The oracles
are the release files themselves, timm's own dataset factory (class indices, sample order) and Pillow's resize.
"""

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_dataset
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.optim import param_groups_layer_decay
from torchvision.datasets import KMNIST, MNIST

from timm_smallvit import data as data_module
from timm_smallvit import export_checkpoint
from timm_smallvit import trainer as trainer_module
from timm_smallvit.data import FASHION_MNIST_CLASSES, SmallImageDataset, load_fashion_mnist
from timm_smallvit.recipe import resolve_args
from timm_smallvit.trainer import train

N_TRAIN, N_VAL = 2000, 500
# class folder names as a user would write them (no '/'), deliberately not in Fashion-MNIST's index order
FOLDER_NAMES = tuple(name.replace('/', ' or ') for name in FASHION_MNIST_CLASSES)

QUICK = dict(
    model='smallvit_tiny_convstem_28',
    dataset='',
    opt='adamw',
    lr=3e-3,
    weight_decay=0.05,
    sched='cosine',
    warmup_epochs=0,
    batch_size=64,
    smoothing=0.0,
    scale=[0.7, 1.0],
    color_jitter=0.0,
    checkpoint_hist=2,
    in_chans=1,
)


def _write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, split: str, rgb: bool = False) -> None:
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / split / FOLDER_NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        array = img.numpy()
        if rgb:  # three different channels, so a channel mix-up shows
            array = np.stack([array, 255 - array, array // 2], axis=-1)
        Image.fromarray(array).save(folder / f'{i:05d}.png')


@pytest.fixture(scope='session')
def release(fmnist_src):
    train_x, train_y = load_fashion_mnist(fmnist_src, train=True)
    test_x, test_y = load_fashion_mnist(fmnist_src, train=False)
    return train_x[:N_TRAIN], train_y[:N_TRAIN], test_x[:N_VAL], test_y[:N_VAL]


@pytest.fixture(scope='session')
def folder(tmp_path_factory, release):
    """An image folder of Fashion-MNIST PNGs: train/<class>/ and val/<class>/."""
    root = tmp_path_factory.mktemp('fmnist_png')
    _write_folder(root, release[0], release[1], 'train')
    _write_folder(root, release[2], release[3], 'val')
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # one decoded-image cache for this module, never the user's
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path_factory.getbasetemp() / 'cache'))


def _index_of(path: str) -> int:
    return int(Path(path).stem)


def test_a_folder_decodes_bit_for_bit_as_the_release_files_with_timms_classes(folder, release):
    data = SmallImageDataset('', folder)
    train_split = data.load('train', in_chans=1, img_size=(28, 28), progress=False)
    val_split = data.load('val', in_chans=1, img_size=(28, 28), progress=False)

    # timm's own dataset factory, as train.py calls it, is the oracle for class indices and sample order
    for split, ours, (images, labels) in (
        ('train', train_split, release[:2]),
        ('validation', val_split, release[2:]),
    ):
        timm_ds = create_dataset('', root=str(folder), split=split, input_img_mode='L')
        assert timm_ds.reader.class_to_idx == {name: i for i, name in enumerate(ours.classes)}
        assert ours.labels.tolist() == [label for _, label in timm_ds.reader.samples]
        order = [_index_of(path) for path, _ in timm_ds.reader.samples]
        assert torch.equal(ours.images, images[order].unsqueeze(1))  # bit for bit
        # each label names the image's Fashion-MNIST class
        assert [ours.classes[i] for i in ours.labels] == [FOLDER_NAMES[int(labels[i])] for i in order]
    assert train_split.classes == tuple(sorted(FOLDER_NAMES))
    assert train_split.images.dtype == torch.uint8 and train_split.images.shape == (N_TRAIN, 1, 28, 28)


def test_a_second_load_comes_from_the_cache_and_a_changed_image_is_decoded_again(tmp_path, release, monkeypatch):
    root = tmp_path / 'imgs'
    _write_folder(root, release[0][:40], release[1][:40], 'train')
    _write_folder(root, release[2][:20], release[3][:20], 'validation')
    first = SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False)

    calls = []
    real_decode = data_module._decode
    monkeypatch.setattr(data_module, '_decode', lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    again = SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False)
    assert not calls and torch.equal(again.images, first.images)

    path = next((root / 'train' / FOLDER_NAMES[int(release[1][0])]).glob('*.png'))
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(path)
    changed = SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False)
    assert calls == [1]
    position = [p for p, _ in SmallImageDataset('', root)._samples['train']].index(str(path))
    assert torch.equal(changed.images[position], torch.full((1, 28, 28), 7, dtype=torch.uint8))


def test_images_of_another_size_and_mode_are_converted_and_resized_as_pillow_does(tmp_path, release):
    root = tmp_path / 'rgb'
    _write_folder(root, release[0][:30], release[1][:30], 'train', rgb=True)
    _write_folder(root, release[2][:10], release[3][:10], 'val', rgb=True)
    (root / 'train' / FOLDER_NAMES[0] / 'big.webp').parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)).save(
        root / 'train' / FOLDER_NAMES[0] / 'big.webp', lossless=True
    )
    data = SmallImageDataset('', root)
    split = data.load('train', in_chans=3, img_size=(32, 32), interpolation='bicubic', progress=False)
    for (path, _), decoded in zip(data._samples['train'], split.images, strict=True):
        expected = Image.open(path).convert('RGB').resize((32, 32), Image.Resampling.BICUBIC)
        assert torch.equal(decoded, torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    gray = data.load('train', in_chans=1, img_size=(28, 28), progress=False)
    path = data._samples['train'][0][0]
    assert torch.equal(gray.images[0, 0], torch.from_numpy(np.array(Image.open(path).convert('L'))))


@pytest.mark.parametrize('cls', [MNIST, KMNIST], ids=['mnist', 'kmnist'])
def test_the_same_bytes_in_mnists_file_layout_load_as_torch_mnist_offline(cls, tmp_path, fmnist_src, release):
    raw = tmp_path / cls.__name__ / 'raw'
    raw.mkdir(parents=True)
    for name in (
        'train-images-idx3-ubyte',
        'train-labels-idx1-ubyte',
        't10k-images-idx3-ubyte',
        't10k-labels-idx1-ubyte',
    ):
        with gzip.open(fmnist_src / f'{name}.gz') as f:
            (raw / name).write_bytes(f.read())
    name = f'torch/{cls.__name__.lower()}'
    data = SmallImageDataset(name, tmp_path)
    train_split = data.load('train', in_chans=1, img_size=(28, 28), progress=False)
    val_split = data.load('val', in_chans=1, img_size=(28, 28), progress=False)
    assert torch.equal(train_split.images[:N_TRAIN, 0], release[0]) and torch.equal(
        val_split.labels[:N_VAL], release[3]
    )
    assert train_split.classes == tuple(cls.classes) and len(val_split.images) == 10_000
    # timm's train.py reads the same root the same way
    timm_ds = create_dataset(name, root=str(tmp_path), split='validation')
    assert torch.equal(timm_ds.data[:N_VAL], release[2])
    # 3 channels for an RGB model, as Pillow converts L to RGB
    rgb = data.load('val', in_chans=3, img_size=(28, 28), progress=False)
    assert torch.equal(rgb.images[:N_VAL], release[2].unsqueeze(1).expand(-1, 3, -1, -1))


def test_missing_mnist_files_are_a_clear_error_and_nothing_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'torch/mnist: no MNIST files in .*MNIST/raw.*dataset_download'):
        SmallImageDataset('torch/mnist', tmp_path).load('train', in_chans=1, img_size=(28, 28))


@pytest.fixture(scope='session')
def trained(tmp_path_factory, folder):
    """A short run on the PNG folder, and its export."""
    out = tmp_path_factory.mktemp('runs')
    result = train(resolve_args(dict(QUICK, data_dir=str(folder), output=str(out), experiment='folder', epochs=3)))
    export = export_checkpoint(result['output_dir'] / 'last.pth.tar', out / 'export')
    return result, export


@pytest.mark.slow
def test_training_on_a_folder_learns_resumes_and_exports_the_folders_class_names(trained, folder, tmp_path):
    result, export = trained
    assert result['eval_metrics']['top1'] > 50  # chance is 10%
    assert result['args'].num_classes == 10 and result['args'].label_names == sorted(FOLDER_NAMES)

    config = json.loads((export / 'config.json').read_text())
    assert config['label_names'] == sorted(FOLDER_NAMES)
    card = (export / 'README.md').read_text()
    assert folder.name in card and 'Ankle boot' in card

    # resume the run in a copy of its folder for one more epoch
    run = tmp_path / 'folder'
    shutil.copytree(result['output_dir'], run)
    resumed = train(resolve_args(dict(QUICK, data_dir=str(folder), epochs=4, resume=str(run / 'last.pth.tar'))))
    assert resumed['output_dir'] == run
    epochs = [line.split(',')[0] for line in (run / 'summary.csv').read_text().splitlines()[1:]]
    assert epochs == ['0', '1', '2', '3']


@pytest.mark.slow
def test_an_rgb_folder_at_32px_trains_a_3_channel_variant(tmp_path, release):
    root = tmp_path / 'rgb32'
    _write_folder(root, release[0], release[1], 'train', rgb=True)
    _write_folder(root, release[2], release[3], 'validation', rgb=True)
    recipe = dict(QUICK, model='smallvit_tiny_patch4_32', in_chans=3, data_dir=str(root), output=str(tmp_path))
    result = train(resolve_args(dict(recipe, experiment='rgb', epochs=3, lr=1e-3)))
    assert result['model'].in_chans == 3 and result['data_config']['input_size'] == (3, 32, 32)
    assert result['eval_metrics']['top1'] > 25


def _five_classes(tmp_path: Path, folder: Path) -> Path:
    keep = sorted(FOLDER_NAMES)[:5]
    root = tmp_path / 'five'
    for split in ('train', 'val'):
        for name in keep:
            shutil.copytree(folder / split / name, root / split / name)
    return root


@pytest.mark.slow
def test_fine_tuning_from_an_export_at_another_num_classes_and_img_size_starts_from_its_weights(
    trained, folder, tmp_path, monkeypatch
):
    _, export = trained
    exported = load_file(export / 'model.safetensors')
    root = _five_classes(tmp_path, folder)
    created = []
    real_create = trainer_module._create_model
    monkeypatch.setattr(trainer_module, '_create_model', lambda *a: created.append(real_create(*a)) or created[-1])

    base = dict(QUICK, data_dir=str(root), output=str(tmp_path), model_kwargs={'img_size': 56}, epochs=2)
    for name, recipe in (
        ('local_dir', dict(base, model=f'local-dir:{export}', pretrained=True)),
        ('initial_checkpoint', dict(base, initial_checkpoint=str(export / 'model.safetensors'))),
    ):
        result = train(resolve_args(dict(recipe, experiment=name)))
        model = created[-1]
        assert model.num_classes == 5 and model.patch_embed.img_size == (56, 56)
        assert result['eval_metrics']['top1'] > 40, name  # chance is 20%
    # the fine-tuned run exports as the architecture it started from, at its own size and classes
    tuned = export_checkpoint(tmp_path / 'local_dir' / 'last.pth.tar', tmp_path / 'tuned')
    config = json.loads((tuned / 'config.json').read_text())
    assert config['architecture'] == 'smallvit_tiny_convstem_28'
    assert config['pretrained_cfg']['input_size'] == [1, 56, 56] and config['label_names'] == sorted(FOLDER_NAMES)[:5]
    reloaded = timm.create_model(f'local-dir:{tuned}', pretrained=True)
    assert reloaded(torch.zeros(2, 1, 56, 56)).shape == (2, 5)
    # the weights each run started from: the exported ones, the head reset, the positions resampled to the new grid
    for recipe in (dict(base, model=f'local-dir:{export}', pretrained=True),
                   dict(base, initial_checkpoint=str(export / 'model.safetensors'))):  # fmt: skip
        args = resolve_args(dict(recipe, num_classes=5))
        model = real_create(args, 1)
        start = model.state_dict()
        assert start['pos_embed'].shape[1] > exported['pos_embed'].shape[1]
        for key, value in exported.items():
            if key.startswith('head.'):
                assert start[key].shape[0] == 5
            elif key == 'pos_embed':
                grid = list(model.patch_embed.grid_size)
                expected = resample_abs_pos_embed(value, grid, num_prefix_tokens=model.num_prefix_tokens)
                torch.testing.assert_close(start[key], expected)
            else:
                assert torch.equal(start[key], value), key


def test_pretrained_by_name_fine_tunes_the_shipped_weights_and_a_name_without_weights_is_refused(tmp_path, folder):
    args = resolve_args(dict(QUICK, model='smallvit_nano_patch4_28.fmnist', pretrained=True, data_dir=str(folder)))
    args.num_classes = 3
    model = trainer_module._create_model(args, 1)
    shipped = timm.create_model('smallvit_nano_patch4_28.fmnist', pretrained=True)
    assert model.head.weight.shape[0] == 3
    assert torch.equal(model.blocks[0].attn.qkv.weight, shipped.blocks[0].attn.qkv.weight)
    rgb = trainer_module._create_model(args, 3)  # an RGB dataset: the input conv adapted from 1 channel, as timm does
    expected = adapt_input_conv(3, shipped.patch_embed.proj.weight, base_chans=1)
    torch.testing.assert_close(rgb.patch_embed.proj.weight, expected)

    with pytest.raises(ValueError, match=r'pretrained: true, but smallvit_tiny_patch4_28 has no pretrained weights'):
        train(resolve_args(dict(QUICK, model='smallvit_tiny_patch4_28', pretrained=True, data_dir=str(folder),
                                output=str(tmp_path), experiment='x')))  # fmt: skip
    assert not (tmp_path / 'x').exists()


def test_layer_decay_gives_timms_per_layer_learning_rates(tmp_path, folder, monkeypatch):
    built = []
    real = trainer_module.create_optimizer_v2
    monkeypatch.setattr(trainer_module, 'create_optimizer_v2', lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    result = train(resolve_args(dict(QUICK, data_dir=str(folder), output=str(tmp_path), experiment='ld', epochs=1,
                                     train_num_samples=256, val_num_samples=64, layer_decay=0.7)))  # fmt: skip
    scales = sorted({g['lr_scale'] for g in built[0].param_groups})
    expected = param_groups_layer_decay(result['model'], weight_decay=0.05, layer_decay=0.7)
    assert scales == sorted({g['lr_scale'] for g in expected}) and len(scales) > 2


# ---- bad input: a one-line error naming the folder or file, before anything is written -----------------------------


def _tree(root: Path, files: dict[str, bytes | None]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(content)
    return root


def _png(value: int = 0) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


GOOD = {'train/a/1.png': _png(1), 'train/b/2.png': _png(2), 'val/a/3.png': _png(3), 'val/b/4.png': _png(4)}


@pytest.mark.parametrize(
    ('files', 'extra', 'message'),
    [
        (None, {}, r'data_dir .*nowhere: no such folder'),
        ({'validation/a/1.png': _png()}, {}, r'no train split: looked for the folder\(s\) train/, training/'),
        (
            {'train/a/1.png': _png()},
            {},
            r'no validation split: looked for the folder\(s\) validation/, val/, valid/, eval/, evaluation/',
        ),
        (
            {'train/a/1.png': _png()},
            {'val_split': 'holdout'},
            r'no validation split: looked for the folder\(s\) holdout/',
        ),
        ({**GOOD, 'val/c/5.png': _png()}, {}, r'val has class folder\(s\) c that .*train lacks'),
        ({**GOOD, 'train/c/readme.txt': b'x'}, {}, r'train/c: empty class folder'),
        ({**GOOD, 'train/b/bad.png': b'not a png'}, {}, r'train/b/bad.png: not a readable image'),
        ({**GOOD, 'map.txt': b'a\nb\nzebra\n'}, {'class_map': 'map.txt'}, r'class_map map.txt names class\(es\) zebra'),
        (GOOD, {'class_map': 'nomap.txt'}, r'class_map nomap.txt: no such file'),
        ({**GOOD, 'train/5.png': _png()}, {}, r'train/5.png: images directly in the split folder have no class'),
        (GOOD, {'num_classes': 3}, r'num_classes 3: data has 2 classes \(a, b\)\. Set num_classes: 2'),
    ],
    ids=[
        'no_data_dir',
        'no_train',
        'no_val',
        'no_named_val',
        'val_class',
        'empty',
        'corrupt',
        'map_class',
        'no_map',
        'loose',
        'num_classes',
    ],
)
def test_bad_image_folders_are_refused_before_anything_is_written(files, extra, message, tmp_path):
    root = tmp_path / 'nowhere' if files is None else _tree(tmp_path / 'data', files)
    out = tmp_path / 'out'
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        train(resolve_args(dict(QUICK, data_dir=str(root), output=str(out), experiment='x', epochs=1, **extra)))
    text = str(info.value)
    assert re.search(message, text), text
    assert '\n' not in text
    assert not out.exists()


def test_a_class_map_sets_the_class_indices(tmp_path):
    root = _tree(tmp_path / 'data', {**GOOD, 'map.txt': b'b\na\n'})
    data = SmallImageDataset('', root, class_map='map.txt')
    split = data.load('train', in_chans=1, img_size=(28, 28), progress=False)
    assert data.classes == ('b', 'a')
    assert split.labels.tolist() == [1, 0] and split.images[0].max() == 1  # a/1.png is class 1 ('a')


def test_a_dataset_too_large_for_memory_is_refused_before_any_image_is_read(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(data_module, '_physical_memory', lambda: 1 << 20)
    monkeypatch.setattr(data_module, '_decode', lambda *a, **k: pytest.fail('an image was decoded'))
    out = tmp_path / 'out'
    with pytest.raises(MemoryError, match=r"2,500 images at 1x28x28 .* timm's train.py"):
        train(resolve_args(dict(QUICK, data_dir=str(folder), output=str(out), experiment='x', epochs=1)))
    assert not out.exists()
