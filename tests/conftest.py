import os
from pathlib import Path

import pytest
import torch

import timm_smallvit  # noqa: F401  (registers the smallvit family)

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_FILES = (
    'train-images-idx3-ubyte.gz',
    'train-labels-idx1-ubyte.gz',
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
)


def fashion_mnist_source() -> Path:
    """The official Fashion-MNIST release files: $SMALLVIT_FASHION_MNIST, else ../shared beside the repo."""
    return Path(os.environ.get('SMALLVIT_FASHION_MNIST', REPO_ROOT.parent / 'shared' / 'data' / 'fashion-mnist'))


@pytest.fixture(scope='session')
def fmnist_src() -> Path:
    src = fashion_mnist_source()
    if not all((src / f).is_file() for f in FASHION_MNIST_FILES):
        message = f'Fashion-MNIST release files not found in {src} (set SMALLVIT_FASHION_MNIST)'
        if os.environ.get('CI'):
            pytest.fail(message)  # CI always has ../shared: a missing copy is a broken set-up, not a skip
        pytest.skip(message)
    return src


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
