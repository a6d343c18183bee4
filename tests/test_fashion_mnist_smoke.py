"""Smoke test on real Fashion-MNIST images, read offline from the release files in ../shared."""

from pathlib import Path

import filelock
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import FashionMNIST

from timm_smallvit import data
from timm_smallvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist, prepare_fashion_mnist


def test_release_files_load_as_torchvision_dataset(fmnist_src, tmp_path):
    images, labels = load_fashion_mnist(fmnist_src, train=False, root=tmp_path)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert len(FASHION_MNIST_CLASSES) == 10


@pytest.mark.slow
def test_timm_pipeline_classifies_real_images_and_a_few_steps_learn(fmnist_src, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('smallvit_nano_patch4_28')
    config = resolve_data_config({}, model=model)
    assert config['input_size'] == (1, 28, 28) and config['crop_pct'] == 1.0
    transform = create_transform(**config)  # timm's eval transform: PIL 'L' image -> normalised tensor

    root = prepare_fashion_mnist(fmnist_src, tmp_path)
    train = FashionMNIST(root, train=True, download=True, transform=transform)
    test = FashionMNIST(root, train=False, download=True, transform=transform)
    x_train = torch.stack([train[i][0] for i in range(4096)])
    y_train = train.targets[:4096]
    x_test = torch.stack([test[i][0] for i in range(1000)])
    y_test = test.targets[:1000]
    assert x_train.shape == (4096, 1, 28, 28) and -1.0 <= x_train.min() < x_train.max() <= 1.0

    model.eval()
    with torch.no_grad():
        before = (model(x_test).argmax(-1) == y_test).float().mean().item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    losses = []
    for _ in range(3):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    after = (logits.argmax(-1) == y_test).float().mean().item()
    predictions = [FASHION_MNIST_CLASSES[i] for i in logits[:5].argmax(-1)]
    print(f'accuracy before {before:.3f}, after 3 short epochs {after:.3f}; first predictions {predictions}')
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f'mean loss of the first 8 steps {first:.3f}, of the last 8 {last:.3f}')
    # 96 steps are not a training run (that is `smallvit train`): ask only for clear learning, well above chance
    # (seen here: loss 2.20 -> 1.62, accuracy 0.12 -> 0.38).
    assert last < 0.8 * first
    assert after > 0.3 and after > before + 0.15


def test_unpacking_holds_a_lock_that_other_processes_wait_on(fmnist_src, tmp_path, monkeypatch):
    # parallel runs and torchrun ranks unpack into the same root; a second lock on it must not be granted meanwhile
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))
    real, entered = data.FashionMNIST, []

    def unpack_while_checking_the_lock(root, **kwargs):
        with pytest.raises(filelock.Timeout):
            data._unpack_lock(Path(root)).acquire(timeout=0)  # a separate lock object: as another process sees it
        entered.append(root)
        return real(root, **kwargs)

    monkeypatch.setattr(data, 'FashionMNIST', unpack_while_checking_the_lock)
    images, _ = load_fashion_mnist(fmnist_src, train=False, root=tmp_path / 'root')
    assert len(entered) == 1 and images.shape == (10_000, 28, 28)
    # the lock file lives in the cache, so a read-only dataset folder still loads
    assert not [p for p in (tmp_path / 'root').rglob('*') if 'lock' in p.name]
    assert list((tmp_path / 'cache' / 'locks').glob('*.lock'))
