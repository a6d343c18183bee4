"""Small image datasets held in memory, with augmentation done on whole batches.

Fashion-MNIST comes from the official release files, offline: :func:`prepare_fashion_mnist` checks them against
their published MD5 sums every time they are read and unpacks copies into a torchvision root in the cache, keyed by
those sums, where torchvision's ``FashionMNIST(root)`` reads them (and train.py, through ``smallvit train-py``).

For 28-32 px images, per-image PIL transforms and worker processes cost more than the model; here the uint8 images
stay in one tensor and each batch is cropped, flipped and erased as a whole (one ``grid_sample`` call), which is
what :class:`BatchLoader` does for the quick trainer.
"""

import gzip
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from timm.data.random_erasing import RandomErasing
from torchvision.datasets import CIFAR10, FashionMNIST
from torchvision.datasets.utils import calculate_md5, check_integrity

__all__ = [
    'CIFAR10_CLASSES',
    'FASHION_MNIST_CLASSES',
    'BatchAugment',
    'BatchLoader',
    'default_cache_dir',
    'load_dataset',
    'load_fashion_mnist',
    'prepare_fashion_mnist',
]

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
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
_RELEASE_MD5 = dict(FashionMNIST.resources)  # the release files' published MD5 sums, as torchvision checks them
_RELEASE_FILES = tuple(_RELEASE_MD5)
_STAMP = '.smallvit-md5.json'  # in an unpacked root: the MD5 sums of the release files it was made from

# dataset names as timm's train.py spells them (--dataset torch/fashion_mnist), and the classes of each
DATASETS = {
    'torch/fashion_mnist': FASHION_MNIST_CLASSES,
    'torch/cifar10': CIFAR10_CLASSES,
}


def default_cache_dir() -> Path:
    """Where unpacked datasets go: $SMALLVIT_CACHE, else ~/.cache/timm_smallvit."""
    return Path(os.environ.get('SMALLVIT_CACHE', Path.home() / '.cache' / 'timm_smallvit'))


def prepare_fashion_mnist(
    src: str | os.PathLike, root: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """Make ``root`` a torchvision dataset root for Fashion-MNIST from the release files in ``src``, verified.

    The four release files are checked against their published MD5 sums (torchvision's) every time, so a damaged or
    foreign file is refused by name. The root gets the verified files unpacked (what torchvision reads), and is
    rebuilt whenever what it holds was not made from exactly these bytes; nothing tries the network.

    Args:
        src: Folder holding the four ``*-ubyte.gz`` release files, or a dataset root laid out as
            ``<src>/FashionMNIST/raw/`` (as train.py's ``--data-dir`` expects).
        root: Dataset root to fill; default ``<cache>/fashion-mnist/<key of the files' checksums>``.
        download: When the release files are not in ``src``, let torchvision download them into it (train.py's
            ``dataset_download``); never when they are there, however damaged.

    Returns:
        The root, ready for ``FashionMNIST(root)`` (no download needed).
    """
    src = Path(src)
    folder = _release_folder(src)
    if folder is None:
        if not download:
            raise FileNotFoundError(
                f'Fashion-MNIST release files missing from {src}: expected {", ".join(_RELEASE_FILES)} there or in '
                f'{src / "FashionMNIST" / "raw"}. Point data_dir at the folder holding the official *-ubyte.gz '
                f'files, or set dataset_download: true to download them into it.'
            )
        FashionMNIST(src, download=True)  # torchvision's downloader, MD5-checked
        folder = src / 'FashionMNIST' / 'raw'
    digests = _verify_release(folder)
    if root is None:
        key = hashlib.sha256(''.join(digests[n] for n in _RELEASE_FILES).encode()).hexdigest()[:16]
        root = default_cache_dir() / 'fashion-mnist' / key
    root = Path(root)
    with _unpack_lock(root):
        _fill_root(folder, root, digests)
    return root


def _release_folder(src: Path) -> Path | None:
    for folder in (src, src / 'FashionMNIST' / 'raw'):
        if all((folder / name).is_file() for name in _RELEASE_FILES):
            return folder
    return None


def _verify_release(folder: Path) -> dict[str, str]:
    """MD5 of each release file, checked against the published ones (a ValueError naming the first bad file)."""
    digests = {}
    for name, expected in _RELEASE_MD5.items():
        digest = calculate_md5(str(folder / name))
        if digest != expected:
            raise ValueError(
                f'{folder / name} is not the Fashion-MNIST release file: its MD5 is {digest}, the release has '
                f'{expected}. The file is damaged or truncated; replace it with the official {name}.'
            )
        digests[name] = digest
    return digests


def _fill_root(folder: Path, root: Path, digests: dict[str, str]) -> None:
    # The stamp names the bytes the root was made from; it is written last, so an interrupted fill is redone.
    raw = root / 'FashionMNIST' / 'raw'
    stamp = raw / _STAMP
    want = json.dumps(digests, sort_keys=True)
    unpacked = [raw / name[: -len('.gz')] for name in _RELEASE_FILES]
    if stamp.is_file() and stamp.read_text() == want and all(p.is_file() and not p.is_symlink() for p in unpacked):
        return
    raw.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for name, target in zip(_RELEASE_FILES, unpacked, strict=True):
        for stale in (raw / name, target):  # links to other files (an older layout) or bytes of another source
            if stale.is_symlink() or stale.exists():
                stale.unlink()
        _unpack(folder / name, target)
    stamp.write_text(want)


def _unpack(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f'.{dst.name}.{os.getpid()}.tmp')
    try:
        with gzip.open(src, 'rb') as fin, tmp.open('wb') as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_fashion_mnist(
    src: str | os.PathLike,
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the train (60k) or test (10k) split."""
    for attempt in range(2):
        prepared = prepare_fashion_mnist(src, root, download=download)
        with _unpack_lock(prepared):
            try:
                dataset = FashionMNIST(prepared, train=train)
                return dataset.data, dataset.targets
            except (AssertionError, RuntimeError, ValueError, OSError):
                if attempt:
                    raise
                # unpacked files changed after they were made (torchvision checks their sizes): make them again
                (prepared / 'FashionMNIST' / 'raw' / _STAMP).unlink(missing_ok=True)
    raise AssertionError('unreachable')


def _unpack_lock(root: Path) -> FileLock:
    # Processes started together (torchrun ranks, parallel runs) would read each other's half-written files. The
    # lock lives in the cache, since the dataset folder may be read-only.
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    locks = default_cache_dir() / 'locks'
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(locks / f'{key}.lock')


def load_dataset(
    name: str, data_dir: str | os.PathLike, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) uint8 and labels (N,) of a dataset named as train.py names it.

    Args:
        name: 'torch/fashion_mnist' or 'torch/cifar10'.
        data_dir: Fashion-MNIST: the release files or a torchvision root. CIFAR-10: a torchvision root.
        train: Train split, else the test split (train.py's 'validation' for torch/ datasets).
        download: Let torchvision download the dataset when its files are absent (never over damaged files).
    """
    if name == 'torch/fashion_mnist':
        images, labels = load_fashion_mnist(data_dir, train=train, download=download)
        return images.unsqueeze(1), labels
    if name == 'torch/cifar10':
        dataset = _load_cifar10(Path(data_dir), train, download)
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)
    raise ValueError(f'Unknown dataset {name!r}; the quick trainer reads {", ".join(DATASETS)}.')


def _load_cifar10(root: Path, train: bool, download: bool) -> CIFAR10:
    folder = root / CIFAR10.base_folder
    files = CIFAR10.train_list + CIFAR10.test_list
    with _unpack_lock(root):
        if download and not folder.exists():
            return CIFAR10(str(root), train=train, download=True)  # torchvision's downloader, MD5-checked
        # torchvision checks every batch file's MD5 before it unpickles any (the batches are pickles)
        bad = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
        if bad:
            state = 'missing' if not any((folder / name).exists() for name in bad) else 'damaged (MD5 mismatch)'
            raise ValueError(
                f'CIFAR-10 files {state} in {folder}: {", ".join(bad)}. Point data_dir at the folder holding '
                f'{CIFAR10.base_folder}/ from the official cifar-10-python.tar.gz'
                + (', or set dataset_download: true to download it there.' if not download else '.')
            )
        return CIFAR10(str(root), train=train)


class BatchAugment:
    """timm's training augmentation for a whole batch: random-resized crop, horizontal flip, colour jitter.

    Same parameters as timm's ``create_transform(is_training=True)`` (``scale``, ``ratio``, ``hflip``,
    ``color_jitter``): each image gets its own crop box, flip and jitter factors, and the resize to ``img_size``
    happens in the same ``grid_sample`` call. ``scale=None`` skips cropping (resize only). Random erasing works on
    normalised images, so :class:`BatchLoader` applies it after normalising.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        scale: Sequence[float] | None = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] | None = None,
        interpolation: str = 'bilinear',
    ) -> None:
        self.img_size = tuple(img_size)
        self.scale = tuple(scale) if scale is not None else None
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = hflip
        if color_jitter is None or isinstance(color_jitter, (int, float)):
            color_jitter = (float(color_jitter or 0.0),) * 3  # timm: one value is brightness, contrast, saturation
        self.jitter = tuple(float(c) for c in color_jitter[:3])  # hue (a 4th value) is not applied
        self.mode = interpolation if interpolation in ('bilinear', 'bicubic', 'nearest') else 'bilinear'

    def _factors(
        self, strength: float, B: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        factors = torch.empty(B, 1, 1, 1).uniform_(max(0.0, 1 - strength), 1 + strength, generator=generator)
        return factors.to(device)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: float images in [0, 1], (B, C, H, W) -> augmented (B, C, *img_size), still in [0, 1].

        The random parameters come from ``generator`` on the CPU (so a seed gives the same batch on any device);
        the resampling runs where ``x`` is.
        """
        B = x.shape[0]
        if self.scale is not None:
            area = torch.empty(B).uniform_(*self.scale, generator=generator)
            log_r = torch.empty(B).uniform_(*self.log_ratio, generator=generator)
            # crop width and height as fractions of the image, clipped to it (torchvision retries instead)
            w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
            h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
            cx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - w)
            cy = (torch.rand(B, generator=generator) * 2 - 1) * (1 - h)
        else:
            w = h = torch.ones(B)
            cx = cy = torch.zeros(B)
        flip = torch.where(torch.rand(B, generator=generator) < self.hflip, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta.to(x.device), [B, x.shape[1], *self.img_size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.mode, padding_mode='border', align_corners=False)

        brightness, contrast, saturation = self.jitter  # applied in this order (torchvision shuffles it)
        if brightness > 0:
            x = (x * self._factors(brightness, B, generator, x.device)).clamp_(0, 1)
        if contrast > 0 or (saturation > 0 and x.shape[1] == 3):
            gray = x.mean(dim=1, keepdim=True) if x.shape[1] == 1 else (x * _LUMA.to(x)).sum(1, keepdim=True)
            if contrast > 0:
                c = self._factors(contrast, B, generator, x.device)
                x = (c * x + (1 - c) * gray.mean(dim=(2, 3), keepdim=True)).clamp_(0, 1)
            if saturation > 0 and x.shape[1] == 3:
                gray = (x * _LUMA.to(x)).sum(1, keepdim=True)
                s = self._factors(saturation, B, generator, x.device)
                x = (s * x + (1 - s) * gray).clamp_(0, 1)
        return x


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # torchvision's rgb_to_grayscale weights


class BatchLoader:
    """Batches of an in-memory uint8 dataset, normalised and (optionally) augmented, one shard per process.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        batch_size: Per-process batch size.
        mean, std: Normalisation, per channel, for [0, 1] images.
        img_size: Output size; eval batches are resized to it when the images differ.
        augment: Training augmentation; None for evaluation batches (resize only).
        erase: Random erasing (timm's, on normalised images) after augmentation.
        shuffle: Reshuffle every epoch (seeded with seed + epoch, identical on every process).
        drop_last: Drop the last partial batch (training).
        rank, world_size: This process's shard of each epoch's order.
        interpolation: Resize mode for evaluation batches.
        channels_last: Yield batches in NHWC memory layout (for a model converted to channels_last).
        device: Where the dataset is held and batches are built and augmented (a GPU: no per-batch copies and no
            CPU augmentation in the GPU's way; Fashion-MNIST is 47 MB). Random parameters are drawn on the CPU,
            so a seed gives the same crops and flips on every device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: tuple[int, int],
        augment: BatchAugment | None = None,
        erase: RandomErasing | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        interpolation: str = 'bilinear',
        channels_last: bool = False,
        device: torch.device | str = 'cpu',
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f'Expected (N, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}.')
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f'mean/std have {len(mean)}/{len(std)} values for {images.shape[1]}-channel images.')
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.img_size = tuple(img_size)
        self.augment = augment
        self.erase = erase
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.interpolation = interpolation if interpolation in ('bilinear', 'bicubic', 'nearest') else 'bilinear'
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # a fresh stream per epoch, so a run resumed at epoch N augments exactly as an uninterrupted one
        self.generator.manual_seed(self.seed * 1000 + self.rank + 7919 * epoch)

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return torch.arange(n)

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        n = len(self.images)
        return n // global_batch if self.drop_last else math.ceil(n / global_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Each step takes one global batch of the shared order and gives every process its slice of it, so
        # N processes with batch_size B see the same samples per step as one process with batch_size N * B.
        order = self._order().to(self.device)  # one copy an epoch, not one a batch
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            idx = torch.tensor_split(order[i * global_batch : (i + 1) * global_batch], self.world_size)[self.rank]
            x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            if self.augment is not None:
                x = self.augment(x, generator=self.generator)
            elif x.shape[-2:] != self.img_size:
                x = F.interpolate(x, size=self.img_size, mode=self.interpolation, align_corners=False)
            x = x.sub_(self.mean).div_(self.std)
            if self.erase is not None:
                x = self.erase(x)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]
