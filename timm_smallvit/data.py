"""Fashion-MNIST from the official release files, offline.

torchvision's ``FashionMNIST(root, download=True)`` verifies and unpacks the release files without a network when
they already lie in ``<root>/FashionMNIST/raw/``; :func:`prepare_fashion_mnist` puts them there (as links).
"""

import os
import shutil
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

__all__ = ['FASHION_MNIST_CLASSES', 'default_cache_dir', 'load_fashion_mnist', 'prepare_fashion_mnist']

FASHION_MNIST_CLASSES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)
_RELEASE_FILES = tuple(name for name, _ in FashionMNIST.resources)


def default_cache_dir() -> Path:
    """Where unpacked datasets go: $SMALLVIT_CACHE, else ~/.cache/timm_smallvit."""
    return Path(os.environ.get('SMALLVIT_CACHE', Path.home() / '.cache' / 'timm_smallvit'))


def prepare_fashion_mnist(src: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Make ``root`` a torchvision dataset root for Fashion-MNIST from the release files in ``src``.

    Args:
        src: Folder holding the four ``*-ubyte.gz`` release files.
        root: Dataset root to fill; default ``<cache>/fashion-mnist``.

    Returns:
        The root, ready for ``FashionMNIST(root, download=True)`` (which then checks MD5 sums, no network).
    """
    src = Path(src)
    missing = [name for name in _RELEASE_FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST release files missing from {src}: {", ".join(missing)}. '
            f'Point --data at the folder holding the official *-ubyte.gz files.'
        )
    root = Path(root) if root is not None else default_cache_dir() / 'fashion-mnist'
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True, exist_ok=True)
    for name in _RELEASE_FILES:
        target = raw / name
        if not target.exists():
            try:
                target.symlink_to((src / name).resolve())
            except OSError:
                shutil.copyfile(src / name, target)
    return root


def load_fashion_mnist(
    src: str | os.PathLike,
    train: bool = True,
    root: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the train (60k) or test (10k) split."""
    dataset = FashionMNIST(prepare_fashion_mnist(src, root), train=train, download=True)
    return dataset.data, dataset.targets
