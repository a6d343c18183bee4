"""Small image datasets read into memory: the Fashion-MNIST release, torchvision datasets, image folders.

:class:`SmallImageDataset` reads a dataset as timm's train.py names it (an image folder, or ``torch/<name>``),
decodes it once into a uint8 tensor at the model's input size and keeps that tensor in the cache, so later runs
start in seconds.

Fashion-MNIST comes from the official release files, offline: :func:`prepare_fashion_mnist` checks them against
their published MD5 sums every time they are read and unpacks copies into a torchvision root in the cache, keyed by
those sums, where torchvision's ``FashionMNIST(root)`` reads them (and train.py, through ``smallvit train-py``).

The quick trainer batches the decoded tensors with :class:`~timm_smallvit.loader.BatchLoader`.
"""

import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save
from timm.data import get_img_extensions
from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM
from timm.data.readers.class_map import load_class_map
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.data.transforms import str_to_pil_interp
from torchvision.datasets import CIFAR10, CIFAR100, KMNIST, MNIST, FashionMNIST
from torchvision.datasets.utils import calculate_md5, check_integrity
from tqdm import tqdm

from ._files import disk_full_error, is_disk_full, write_atomically
from .preprocess import to_model_mode

__all__ = [
    'CIFAR10_CLASSES',
    'FASHION_MNIST_CLASSES',
    'IMAGE_EXTENSIONS',
    'ImageSplit',
    'SmallImageDataset',
    'default_cache_dir',
    'load_dataset',
    'load_fashion_mnist',
    'prepare_fashion_mnist',
]

_logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(FashionMNIST.classes)  # torchvision's names, in label order
CIFAR10_CLASSES: tuple[str, ...] = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)
_RELEASE_MD5 = dict(FashionMNIST.resources)  # the release files' published MD5 sums, as torchvision checks them
_RELEASE_FILES = tuple(_RELEASE_MD5)
_STAMP = '.smallvit-md5.json'  # in an unpacked root: the MD5 sums of the release files it was made from

# timm's torch/<name> datasets of small images (train.py's --dataset torch/mnist): torchvision's class, the train
# and test image counts (for the memory check before anything is read), channels, size and number of classes
TORCH_DATASETS: dict[str, tuple[Any, int, int, int, int, int]] = {
    'torch/mnist': (MNIST, 60_000, 10_000, 1, 28, 10),
    'torch/kmnist': (KMNIST, 60_000, 10_000, 1, 28, 10),
    'torch/fashion_mnist': (FashionMNIST, 60_000, 10_000, 1, 28, 10),
    'torch/cifar10': (CIFAR10, 50_000, 10_000, 3, 32, 10),
    'torch/cifar100': (CIFAR100, 50_000, 10_000, 3, 32, 100),
}
# the classes of a dataset known by name (a folder's are its class folders)
DATASETS: dict[str, tuple[str, ...]] = {
    'torch/fashion_mnist': FASHION_MNIST_CLASSES,
    'torch/cifar10': CIFAR10_CLASSES,
}
# the one definition of what counts as an image file (image folders, predict's folder and glob search): timm's
# extensions (what train.py reads) and the other common formats Pillow reads
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(dict.fromkeys((*get_img_extensions(), '.bmp', '.webp')))
# a dataset whose decoded tensors would take more than this share of the machine's memory is refused
MEMORY_SHARE = 0.5
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_DECODE_VERSION = 3  # part of every cache key: a change to how images are decoded decodes them again


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
    def write(tmp: str) -> None:
        with gzip.open(src, 'rb') as fin, open(tmp, 'wb') as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)

    write_atomically(dst, write)


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


def _unpack_lock(root: Path) -> AbstractContextManager[Any]:
    # Processes started together (torchrun ranks, parallel runs) would read each other's half-written files. The
    # lock lives in the cache, since the dataset folder may be read-only.
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    path = default_cache_dir() / 'locks' / f'{key}.lock'
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))  # what taking the lock needs
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        # a read-only cache (a shared copy): what it holds is read without a lock, and nothing is written to it
        _logger.debug(f'{path.parent}: read-only ({e.strerror}); reading the cache without a lock.')
        return nullcontext()
    return FileLock(path)


def load_dataset(
    name: str, data_dir: str | os.PathLike, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) uint8 at their own size and labels (N,) of a ``torch/<name>`` dataset.

    Args:
        name: One of :data:`TORCH_DATASETS`, as train.py names it ('torch/mnist', 'torch/cifar10', ...).
        data_dir: The torchvision root (Fashion-MNIST: also the folder of the release files).
        train: Train split, else the test split (train.py's 'validation' for torch/ datasets).
        download: Let torchvision download the dataset when its files are absent (never over damaged files).
    """
    images, labels, _ = _read_torch_dataset(name, Path(data_dir), train, download)
    return images, labels


def _read_torch_dataset(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    if name not in TORCH_DATASETS:
        raise ValueError(f'Unknown dataset {name!r}; the quick trainer reads {", ".join(TORCH_DATASETS)}.')
    cls = TORCH_DATASETS[name][0]
    if cls is FashionMNIST:
        images, labels = load_fashion_mnist(root, train=train, download=download)
        return images.unsqueeze(1), labels, FASHION_MNIST_CLASSES
    if cls in (MNIST, KMNIST):
        raw = root / cls.__name__ / 'raw'
        with _unpack_lock(root):
            try:
                ds = cls(str(root), train=train, download=download)  # torchvision's downloader, MD5-checked
            except RuntimeError as e:
                if 'not found' not in str(e):
                    raise
                files = ', '.join(Path(url).stem for url, _ in cls.resources)
                raise FileNotFoundError(
                    f'{name}: no {cls.__name__} files in {raw}: expected {files} there (the release files unpacked, '
                    'as torchvision reads them). Point data_dir at the folder holding '
                    f'{cls.__name__}/raw/, or set dataset_download: true to download them there.'
                ) from None
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long(), tuple(ds.classes)
    ds = _load_cifar(cls, root, train, download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets), tuple(ds.classes)


def _load_cifar(cls: type[CIFAR10], root: Path, train: bool, download: bool) -> CIFAR10:
    folder = root / cls.base_folder
    files = [*cls.train_list, *cls.test_list, (cls.meta['filename'], cls.meta['md5'])]
    title = 'CIFAR-100' if cls is CIFAR100 else 'CIFAR-10'
    with _unpack_lock(root):
        if download and not folder.exists():
            return cls(str(root), train=train, download=True)  # torchvision's downloader, MD5-checked
        # every file's MD5 is checked before torchvision unpickles any (the batches are pickles)
        bad = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
        if bad:
            state = 'missing' if not any((folder / name).exists() for name in bad) else 'damaged (MD5 mismatch)'
            archive = 'cifar-100-python.tar.gz' if cls is CIFAR100 else 'cifar-10-python.tar.gz'
            raise ValueError(
                f'{title} files {state} in {folder}: {", ".join(bad)}. Point data_dir at the folder holding '
                f'{cls.base_folder}/ from the official {archive}'
                + (', or set dataset_download: true to download it there.' if not download else '.')
            )
        return cls(str(root), train=train)


@dataclass(frozen=True)
class ImageSplit:
    """One split of a dataset, decoded: what the quick trainer trains or evaluates on."""

    images: torch.Tensor  # (N, C, H, W) uint8, at the model's input size
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]  # class index -> name
    source: str  # the folder or dataset it came from


class SmallImageDataset:
    """A dataset as timm's train.py names it, found and checked; :meth:`load` decodes a split.

    ``dataset: ''`` with ``data_dir`` an image folder reads ``<data_dir>/<split>/<class>/<images>`` as train.py's
    ImageDataset does: the split folder found by timm's rule (the split's own name, then ``train``/``training`` or
    ``val``/``valid``/``validation``/``eval``/``evaluation``), classes from timm's folder reader (class folder names
    in natural order) or from a ``class_map`` file. The validation split takes the train split's class indices. A
    ``torch/<name>`` dataset is torchvision's, read from ``data_dir`` offline unless ``download``.

    Everything that can be checked without decoding an image is checked here, with an error naming the folder or
    file: a missing folder or split, an empty class folder, validation classes the train split lacks, a class_map
    class without a folder.

    Args:
        dataset: '' (an image folder) or one of :data:`TORCH_DATASETS`.
        data_dir: The image folder, or the torchvision root.
        train_split, val_split: Split names (train.py's ``--train-split`` / ``--val-split``).
        class_map: A class map file (train.py's ``--class-map``: a .txt of class names, one per line, in index
            order), for image folders.
        download: ``torch/`` datasets: let torchvision download the files when they are absent.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str | os.PathLike,
        *,
        train_split: str = 'train',
        val_split: str = 'validation',
        class_map: str = '',
        download: bool = False,
    ) -> None:
        self.dataset = dataset or ''
        self.root = Path(data_dir)
        self.splits = {'train': train_split, 'val': val_split}
        self.download = download
        self._samples: dict[str, list[tuple[str, int]]] = {}
        self.classes: tuple[str, ...] | None = None  # a torch/ dataset's are known once its files are read
        if self.dataset:
            if self.dataset not in TORCH_DATASETS:
                raise ValueError(
                    f"dataset {self.dataset!r}: the quick trainer reads an image folder (dataset: '') and "
                    f'{", ".join(TORCH_DATASETS)}.'
                )
            if not self.root.is_dir() and not download:
                raise FileNotFoundError(f'data_dir {self.root}: no such folder (the {self.dataset} files go there).')
            self.name = self.dataset
            self.classes = DATASETS.get(self.dataset)  # others are known once the files are read
            return
        if not self.root.is_dir():
            raise FileNotFoundError(
                f'data_dir {self.root}: no such folder. An image folder holds train/<class>/<images> and '
                'validation/<class>/<images> (or val/).'
            )
        self.name = self.root.resolve().name
        self.folders = {which: _find_split(self.root, split, which) for which, split in self.splits.items()}
        found = {which: _list_images(folder) for which, folder in self.folders.items()}
        if class_map:
            class_to_idx = _read_class_map(class_map, self.root, self.folders['train'], found['train'][1])
        else:
            class_to_idx = found['train'][1]
        unknown = sorted(set(found['val'][1]) - set(found['train'][1]))
        if unknown:
            raise ValueError(
                f'{self.folders["val"]} has class folder(s) {", ".join(unknown)} that {self.folders["train"]} lacks: '
                'a class the model is not trained on cannot be evaluated. Add its training images, or remove it.'
            )
        for which, (samples, names) in found.items():
            idx_to_name = {i: n for n, i in names.items()}
            kept = [(path, class_to_idx[idx_to_name[i]]) for path, i in samples if idx_to_name[i] in class_to_idx]
            if len(kept) < len(samples):
                skipped = sorted(set(names) - set(class_to_idx))
                _logger.warning(
                    f'{self.folders[which]}: class folder(s) {", ".join(skipped)} are not in class_map {class_map}: '
                    f'their {len(samples) - len(kept)} images are left out.'
                )
            self._samples[which] = kept
        self.classes = tuple(sorted(class_to_idx, key=class_to_idx.__getitem__))
        if len(self.classes) == 1:
            _logger.warning(
                f'{self.folders["train"]}: one class ({self.classes[0]}): every prediction is right, so its accuracy '
                'says nothing. Add a folder of images for each other class.'
            )

    def num_images(self, which: str) -> int:
        """Images in the 'train' or 'val' split."""
        if self.dataset:
            _, n_train, n_test, *_ = TORCH_DATASETS[self.dataset]
            return n_train if self._torch_train(which) else n_test
        return len(self._samples[which])

    def check_memory(self, in_chans: int, img_size: tuple[int, int], limit: int | None = None) -> None:
        """Refuse, before anything is read, a dataset whose decoded splits would not fit in memory."""
        limit = int(MEMORY_SHARE * _physical_memory()) if limit is None else limit
        count = self.num_images('train') + self.num_images('val')
        need = count * in_chans * img_size[0] * img_size[1]
        if need > limit:
            raise MemoryError(
                f'{self.root}: {count:,} images at {in_chans}x{img_size[0]}x{img_size[1]} take {need / 2**30:.1f} GiB '
                f"decoded, more than {MEMORY_SHARE:.0%} of this machine's memory ({limit / 2**30:.1f} GiB): the "
                "quick trainer holds datasets in memory. Train on it with timm's train.py (`smallvit train-py` prints "
                'the command), whose loader streams images from disk.'
            )

    def load(
        self,
        which: str,
        *,
        in_chans: int,
        img_size: tuple[int, int],
        input_img_mode: str | None = None,
        interpolation: str = 'bilinear',
        progress: bool = True,
    ) -> ImageSplit:
        """Decode the 'train' or 'val' split at ``img_size`` with ``in_chans`` channels (cached on disk).

        Images of another size are resized with antialiasing (Pillow's resize, ``interpolation``); images are
        converted to ``input_img_mode`` (default: 'L' for one channel, 'RGB' for three, as train.py reads them).
        """
        mode = input_img_mode or ('RGB' if in_chans == 3 else 'L')
        if _channels(mode) != in_chans:
            raise ValueError(
                f'input_img_mode {mode!r} gives {_channels(mode)} channel(s), but the model takes in_chans '
                f"{in_chans}: use 'L' for 1 channel, 'RGB' for 3."
            )
        size = (int(img_size[0]), int(img_size[1]))
        if self.dataset:
            return self._load_torch(which, mode, size, interpolation, progress)
        return self._load_folder(which, mode, size, interpolation, progress)

    def _torch_train(self, which: str) -> bool:
        return self.splits[which] in _TRAIN_SYNONYM  # timm's rule: any other split name is the test split

    def _load_torch(self, which: str, mode: str, size: tuple[int, int], interp: str, progress: bool) -> ImageSplit:
        images, labels, classes = _read_torch_dataset(self.dataset, self.root, self._torch_train(which), self.download)
        self.classes = classes
        source = f'{self.dataset} ({"train" if self._torch_train(which) else "test"} split, {self.root})'
        native_mode = 'L' if images.shape[1] == 1 else 'RGB'
        native = (images.shape[-2], images.shape[-1])
        # shrinking needs antialiasing, done once here; an image smaller than the input is enlarged with each batch's
        # crop (as before), which keeps its pixels and a quarter of the memory of a 28 px set held at 56 px
        target = native if native[0] <= size[0] and native[1] <= size[1] else size
        if native_mode == mode and native == target:
            return ImageSplit(images, labels, classes, source)
        # keyed by the bytes read: a changed file (or another root) decodes again
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        key = _cache_key('torch', self.dataset, digest, mode, target, interp)

        def decode() -> torch.Tensor:
            arrays = (img.permute(1, 2, 0).squeeze(-1).numpy() for img in images)
            return _decode((partial(Image.fromarray, a, native_mode) for a in arrays), len(images), mode, target,
                           interp, source, progress)  # fmt: skip

        return ImageSplit(_cached(key, decode), labels, classes, source)

    def _load_folder(self, which: str, mode: str, size: tuple[int, int], interp: str, progress: bool) -> ImageSplit:
        samples = self._samples[which]
        folder = self.folders[which]
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        paths = [Path(p) for p, _ in samples]
        key = _cache_key('folder', str(folder.resolve()), mode, size, interp, self.classes,
                         [label for _, label in samples], _content_digest(paths, folder))  # fmt: skip

        def decode() -> torch.Tensor:
            return _decode((partial(_open_image, p, mode) for p in paths), len(paths), mode, size, interp,
                           str(folder), progress)  # fmt: skip

        assert self.classes is not None  # an image folder's are known from its listing
        return ImageSplit(_cached(key, decode), labels, self.classes, str(folder))


def _find_split(root: Path, split: str, which: str) -> Path:
    # timm's _search_split, which falls back to the root itself: here a missing split is an error
    name = split.split('[')[0]
    synonyms = _TRAIN_SYNONYM if which == 'train' else _EVAL_SYNONYM
    tried = [name, *(s for s in synonyms if s != name)] if name in synonyms else [name]
    for candidate in tried:
        if (root / candidate).is_dir():
            return root / candidate
    key = 'train_split' if which == 'train' else 'val_split'
    raise FileNotFoundError(
        f'{root}: no {"train" if which == "train" else "validation"} split: looked for the folder(s) '
        f"{', '.join(t + '/' for t in tried)}. Put each split's class folders there, or set {key} to the split "
        "folder's name."
    )


def _list_images(folder: Path) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """timm's folder reader on one split: (path, class index) in timm's order, and its class index."""
    for current, subdirs, files in _walk_once(folder):
        if any(part.startswith('.') for part in current.relative_to(folder).parts):
            continue  # .ipynb_checkpoints and the like
        subdirs = [d for d in subdirs if not d.startswith('.')]
        has_images = any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files)
        if not subdirs and current != folder and not has_images:
            raise ValueError(
                f'{current}: empty class folder (no {", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)} images). '
                'Add its images, or remove the folder.'
            )
    loose = [f for f in os.listdir(folder) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise ValueError(
            f"{folder / loose[0]}: images directly in the split folder have no class. Put each class's images in "
            f'a folder named after it: {folder}/<class>/.'
        )
    samples, class_to_idx = find_images_and_targets(str(folder), types=IMAGE_EXTENSIONS)
    if not samples:
        raise ValueError(f'{folder}: no class folders of images ({folder}/<class>/<images>).')
    return samples, class_to_idx


def _walk_once(folder: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk following symlinked folders, as timm's reader does, but each folder once: a loop is an error."""
    # timm's reader walks with followlinks=True: a link to an ancestor (`ln -s .. loop`, `ln -s . self`) repeats the
    # tree until the path is too long, and a second way to a folder reads its images twice under another class
    seen: dict[tuple[int, int], Path] = {}

    def visit(path: Path, above: frozenset[tuple[int, int]]) -> Iterator[tuple[Path, list[str], list[str]]]:
        st = path.stat()
        ident = (st.st_dev, st.st_ino)
        if ident in above:
            raise ValueError(f'{path}: symlink loop: it leads back to {seen[ident]}, which holds it. Remove the link.')
        if ident in seen:
            raise ValueError(
                f'{path}: the same folder as {seen[ident]} (through a symlink): its images would be read twice. '
                'Remove the link.'
            )
        seen[ident] = path
        with os.scandir(path) as entries:
            listing = sorted((e.name, e.is_dir()) for e in entries)
        subdirs = [name for name, is_dir in listing if is_dir]
        yield path, subdirs, [name for name, is_dir in listing if not is_dir]
        for name in subdirs:
            yield from visit(path / name, above | {ident})

    return visit(folder, frozenset())


def _read_class_map(class_map: str, root: Path, train_folder: Path, found: dict[str, int]) -> dict[str, int]:
    try:
        class_to_idx = load_class_map(class_map, str(root))  # timm's reader: the file, or the file in data_dir
    except AssertionError:
        raise FileNotFoundError(f'class_map {class_map}: no such file (looked there and in {root}).') from None
    missing = [name for name in class_to_idx if name not in found]
    if missing:
        raise ValueError(
            f'class_map {class_map} names class(es) {", ".join(map(str, missing[:5]))} with no folder in '
            f'{train_folder}. Add their folders, or remove them from the class map.'
        )
    if sorted(class_to_idx.values()) != list(range(len(class_to_idx))):
        raise ValueError(f'class_map {class_map}: expected the class indices 0-{len(class_to_idx) - 1}, each once.')
    return class_to_idx


def _open_image(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            # as timm's ImageDataset reads it, but 16-bit images scaled, not clipped (predict converts with it too)
            return to_model_mode(img, mode)
    except Image.DecompressionBombError as e:
        raise ValueError(f'{path}: refused as a decompression bomb ({e}). Shrink it, or remove it.') from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # Pillow's errors for bad files
        raise ValueError(f'{path}: not a readable image ({e}). Replace or remove it.') from None


def _decode(
    images: Iterable[Callable[[], Image.Image]],
    count: int,
    mode: str,
    size: tuple[int, int],
    interp: str,
    source: str,
    progress: bool,
) -> torch.Tensor:
    """(count, C, H, W) uint8 from Pillow images (each given by a callable), converted and resized."""
    out = torch.empty(count, _channels(mode), *size, dtype=torch.uint8)
    resample = str_to_pil_interp(interp)
    for i, load in enumerate(tqdm(images, total=count, desc=f'decoding {source}', disable=not progress,
                                  mininterval=1.0, leave=False)):  # fmt: skip
        img = load()
        if img.mode != mode:
            img = to_model_mode(img, mode)
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), resample)  # Pillow's resize is antialiased when it shrinks
        array = torch.from_numpy(np.array(img, dtype=np.uint8))
        out[i] = array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)
    return out


def _channels(mode: str) -> int:
    return len(Image.new(mode, (1, 1)).getbands())


def _content_digest(paths: Sequence[Path], base: Path) -> str:
    """SHA-256 of every file's name and bytes: names, sizes and times can lie (`touch -d`), the bytes cannot."""
    digest = hashlib.sha256()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)  # the lowest-cost read of many small files
        try:
            chunks = [os.read(fd, 1 << 16)]
            while len(chunks[-1]) == 1 << 16:
                chunks.append(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        name = os.path.relpath(path, base).encode('utf-8', 'surrogateescape')
        content = b''.join(chunks)
        digest.update(b'%d:%b%d:' % (len(name), name, len(content)))
        digest.update(content)
    return digest.hexdigest()


def _cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_DECODE_VERSION, *parts], default=str).encode()).hexdigest()[:32]


def _cached(key: str, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The decoded images stored under ``key`` in the cache, decoding (and storing) them when absent or damaged."""
    path = default_cache_dir() / 'decoded' / f'{key}.safetensors'
    with _unpack_lock(path):  # torchrun ranks decode once
        if path.is_file():
            images = _read_cache(path)
            if images is not None:
                return images
        images = decode().contiguous()
        _write_cache(path, images)
        return images


def _pixels_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().data).hexdigest()


def _read_cache(path: Path) -> torch.Tensor | None:
    # the file's digest of its pixels catches what its header cannot: bytes changed behind an intact header
    try:
        with safe_open(path, 'pt') as f:
            stored = (f.metadata() or {}).get('pixels_sha256')
            images = f.get_tensor('images')
    except Exception as e:  # a damaged or truncated cache file: decode again
        _logger.warning(f'{path}: unreadable decoded cache ({e}); decoding again.')
        return None
    if stored != _pixels_digest(images):
        _logger.warning(f'{path}: decoded cache whose pixels do not match their digest (damaged); decoding again.')
        return None
    return images


def _write_cache(path: Path, images: torch.Tensor) -> None:
    # written from Python, so that a full disk is an OSError with its errno (safetensors' writer hides it)
    content = save({'images': images}, metadata={'pixels_sha256': _pixels_digest(images)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: Path(tmp).write_bytes(content))
    except OSError as e:
        if is_disk_full(e):
            hint = 'Free some space there, or set SMALLVIT_CACHE to a folder on another disk.'
            raise disk_full_error(path, len(content), 'the decoded cache', hint) from None
        if e.errno not in _READ_ONLY:
            raise
        _logger.warning(f'{path.parent}: cannot store the decoded images ({e.strerror}); decoding again next time.')


def _physical_memory() -> int:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
