"""Hostile and careless input (issue 31): each case is one row of CASES.

A row names the input (its id starts with the issue's case number), builds it (``setup``), makes the call a user
would make (``act``), and says what must happen: a one-line error matching ``error``, or a call that succeeds and
passes ``check``; ``warning`` is a logged line the call must give either way. To add an input, add a row; the
helpers below build image folders, symlinks, full disks and caches.
"""

import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from timm_smallvit import data as data_module
from timm_smallvit.data import SmallImageDataset

Setup = Callable[[Path, pytest.MonkeyPatch], Any]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup  # (tmp_path, monkeypatch) -> what `act` takes
    act: Callable[[Any], Any]
    error: str = ''  # regex of the one-line error; '' : the call must succeed
    warning: str = ''  # regex of a line the call must log
    check: Callable[[Any, Any], None] | None = None  # (setup's value, act's result): asserts on a success


# ---- inputs ----------------------------------------------------------------------------------------------------------


def png(value: int | np.ndarray = 0) -> bytes:
    """A PNG: 28x28 of one grey value, or the given array (uint16 arrays are 16-bit PNGs)."""
    array = np.full((28, 28), value, np.uint8) if isinstance(value, int) else value
    buf = BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


GOOD = {'train/a/1.png': png(1), 'train/b/2.png': png(2), 'val/a/3.png': png(3), 'val/b/4.png': png(4)}
RAMP = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256  # 8-bit values, written 16-bit as v * 257


def folder(files: dict[str, bytes] = GOOD, links: dict[str, str] | None = None, then: Setup | None = None) -> Setup:
    """An image folder ``data/`` with these files and symlinks (name -> target, relative to the link's folder)."""

    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
        root = tmp / 'data'
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        for rel, target in (links or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(target)
        if then is not None:
            then(root, mp)
        return root

    return setup


def load_train(root: Path) -> torch.Tensor:
    """What the quick trainer decodes from a folder's train split."""
    return SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False).images


def cached_then(change: Callable[[Path], None]) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Decode the train split once (filling the cache), then change something behind the cache's back."""

    def then(root: Path, mp: pytest.MonkeyPatch) -> None:
        load_train(root)
        change(root)

    return then


def flip_cache_bytes(root: Path) -> None:
    (path,) = (Path(os.environ['SMALLVIT_CACHE']) / 'decoded').glob('*.safetensors')
    raw = bytearray(path.read_bytes())
    raw[-10:] = bytes(255 - b for b in raw[-10:])  # pixels of the last image; the header stays intact
    path.write_bytes(bytes(raw))


def replace_keeping_stat(*pairs: tuple[str, bytes]) -> Callable[[Path], None]:
    """New bytes of the same size in each file, its modification time put back: names, sizes and times lie."""

    def change(root: Path) -> None:
        for rel, content in pairs:
            st = (root / rel).stat()
            assert len(content) == st.st_size
            (root / rel).write_bytes(content)
            os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns))

    return change


def read_only_cache(root: Path, mp: pytest.MonkeyPatch) -> None:
    """The cache already holds the decoded data, then its file system becomes read-only (simulated: tests may run
    as root, whom permissions do not stop): opening anything in it for writing fails with EROFS."""
    load_train(root)
    cache = str(Path(os.environ['SMALLVIT_CACHE']).resolve())
    real_open = os.open

    def open_read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and os.path.abspath(path).startswith(cache):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    mp.setattr(os, 'open', open_read_only)


def full_disk(module: Any) -> Setup:
    """The disk fills while ``module`` writes a file (its write_atomically writes, then hits ENOSPC)."""

    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        real = module.write_atomically

        def write_atomically(path: Any, write: Callable[[str], Any]) -> None:
            def fill(tmp_name: str) -> None:
                write(tmp_name)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            real(path, fill)

        mp.setattr(module, 'write_atomically', write_atomically)

    return setup


def both(*setups: Setup) -> Setup:
    """Setups in order; the value of the first."""

    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> Any:
        values = [s(tmp, mp) for s in setups]
        return values[0]

    return setup


def pillow_limit(pixels: int) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        mp.setattr(Image, 'MAX_IMAGE_PIXELS', pixels)

    return setup


# ---- checks --------------------------------------------------------------------------------------------------------


def grey_values(*values: int) -> Callable[[Any, torch.Tensor], None]:
    """The decoded train images are these constant images, in order."""

    def check(given: Any, images: torch.Tensor) -> None:
        expected = torch.stack([torch.full((1, 28, 28), v, dtype=torch.uint8) for v in values])
        assert torch.equal(images, expected), images.flatten(1).float().mean(1).tolist()

    return check


def first_image(expected: np.ndarray) -> Callable[[Any, torch.Tensor], None]:
    def check(given: Any, images: torch.Tensor) -> None:
        assert torch.equal(images[0, 0], torch.from_numpy(expected.astype(np.uint8)))

    return check


def classes(*names: str) -> Callable[[Path, Any], None]:
    def check(root: Path, result: Any) -> None:
        assert SmallImageDataset('', root).classes == names

    return check


# ---- the cases -------------------------------------------------------------------------------------------------------

CASES = [
    # 4: the decoded cache is verified by a digest of its pixels and keyed by the files' content
    Case('4_cache_bytes_flipped', folder(then=cached_then(flip_cache_bytes)), load_train,
         warning=r'decoded cache .*pixels', check=grey_values(1, 2)),
    Case('4_image_replaced_same_size_and_mtime',
         folder(then=cached_then(replace_keeping_stat(('train/a/1.png', png(9))))), load_train,
         check=grey_values(9, 2)),
    Case('4_images_swapped_same_sizes_and_mtimes',
         folder({**GOOD, 'train/b/2.png': png(9)},
                then=cached_then(replace_keeping_stat(('train/a/1.png', png(9)), ('train/b/2.png', png(1))))),
         load_train, check=grey_values(9, 1)),
    Case('8_cache_write_on_a_full_disk', both(folder(), full_disk(data_module)), load_train,
         error=r'no space left on .*: \d+(\.\d+)? MB needed .*decoded'),
    # 5: symlinked folders are followed once at most; a loop is an error naming it
    Case('5_symlink_loop_to_the_split', folder(links={'train/a/loop': '..'}), load_train,
         error=r'train/a/loop: symlink loop'),
    Case('5_symlink_to_itself', folder(links={'train/b/self': '.'}), load_train, error=r'train/b/self: symlink loop'),
    Case('5_two_links_to_one_folder', folder(links={'train/c': 'a'}), load_train,
         error=r'train/c: .*same folder as .*train/a'),
    Case('5_link_to_a_folder_outside_is_read_once',
         folder({**GOOD, 'extra/c/5.png': png(5)}, links={'train/c': '../extra/c'}), load_train,
         check=grey_values(1, 2, 5)),
    # 7: 16-bit images are scaled to 8 bits, not clipped to white
    Case('7_16_bit_png', folder({**GOOD, 'train/a/1.png': png(RAMP * 257)}), load_train, check=first_image(RAMP)),
    # 8: one-line errors naming the file
    Case('8_decompression_bomb', both(folder(), pillow_limit(100)), load_train,
         error=r'train/a/1.png: .*decompression bomb'),
    # 12: a read-only cache that holds the data works; a one-class dataset warns
    Case('12_read_only_cache_holding_the_data', folder(then=read_only_cache), load_train, check=grey_values(1, 2)),
    Case('12_one_class', folder({'train/a/1.png': png(1), 'val/a/3.png': png(3)}), load_train,
         warning=r'train: one class \(a\)'),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    caplog.set_level(logging.WARNING)
    given = case.setup(tmp_path, monkeypatch)
    if case.error:
        with pytest.raises(Exception) as info:  # the message is what is checked
            case.act(given)
        message = str(info.value)
        assert re.search(case.error, message), f'{type(info.value).__name__}: {message}'
        assert '\n' not in message.strip(), message
    else:
        result = case.act(given)
        if case.check is not None:
            case.check(given, result)
    if case.warning:
        assert re.search(case.warning, caplog.text), caplog.text


def test_case_ids_are_unique_and_numbered():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(re.match(r'\d+_', i) for i in ids)
