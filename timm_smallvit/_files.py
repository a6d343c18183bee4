"""Writing files so that a killed process never leaves half of one, and saying so when a disk is full."""

import errno
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it into place: a killed run never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# errno of a write that found no room: the disk (or the user's quota) is full, or a size limit was reached
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    """Whether a failed write ran out of room: an OSError's errno, or torch's and safetensors' wrapped messages."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL_ERRNOS
    # torch.save: '[enforce fail at inline_container.cc] ... file write failed' or '... unexpected pos';
    # safetensors: 'I/O error: No space left on device (os error 28)'
    text = str(error)
    return 'inline_container.cc' in text or any(f'os error {n}' in text for n in DISK_FULL_ERRNOS)


def disk_full_error(
    path: str | os.PathLike, need_bytes: int, what: str, hint: str = 'Free some space there, or write to another disk.'
) -> OSError:
    """The one-line error for a write that found no room: the device (mount point), the megabytes needed, the file."""
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    device = folder
    while not os.path.ismount(device):
        device = device.parent
    free = shutil.disk_usage(folder).free
    return OSError(
        f'no space left on {device}: {math.ceil(need_bytes / 1e6)} MB needed for {what} {path} '
        f'({free / 1e6:.0f} MB free). {hint}'
    )
