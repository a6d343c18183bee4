"""Files written so that a killed process never leaves half of one (or, once killed, nothing of it for long), a full
disk said so, a destination checked before the work, and a zip-format file (a torch checkpoint) checked whole."""

import errno
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


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


def check_writable_folder(folder: str | os.PathLike, shown: str | os.PathLike) -> None:
    """A PermissionError naming ``shown`` (the file to be written) when nothing can be created in ``folder``.

    A real probe (a temporary file, removed at once): access() says yes to root where the file system refuses.
    """
    try:
        with tempfile.TemporaryFile(dir=os.fspath(folder)):
            pass
    except OSError as e:
        raise PermissionError(f'{shown}: cannot write in {folder} ({e.strerror or e}).') from None


def check_zip(path: str | os.PathLike, source: str | None = None) -> None:
    """Read every record of a zip-format file (a torch checkpoint) against the CRC-32 stored with it.

    torch.load reads a checkpoint's tensors without checking their CRC, so a flipped byte in the weights loads
    silently; here it is a ValueError naming the file and the record. A file that is not a zip (safetensors, torch's
    legacy format) is left to its reader. Records saved without a CRC (torch.serialization.set_crc32_options(False)
    writes 0) cannot be checked and are skipped. ``source`` names the file in the error (default: its path).
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                with archive.open(info) as f:  # zipfile compares the CRC-32 at the end of the record
                    while f.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(
            f'{source or path}: damaged: its bytes changed since it was written ({" ".join(str(e).split())}); the '
            'weights it holds are not what was saved. Use another copy or another checkpoint.'
        ) from None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's counts as alive); always True where that cannot be asked."""
    if os.name != 'posix':  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_folders(
    parent: str | os.PathLike, name: re.Pattern[str], files: re.Pattern[str], age_s: float
) -> None:
    """Remove the temporary folders in ``parent`` that killed processes (SIGKILL, power loss) left.

    A folder is removed when its name fully matches ``name``, it is a real folder (never a link) of this user holding
    only regular files whose names fully match ``files``, and the process named by the pattern's ``pid`` group is
    gone; without a pid (older versions), when it is older than ``age_s`` seconds.
    """
    try:
        entries = list(os.scandir(os.fspath(parent)))
    except OSError:
        return
    for entry in entries:
        match = name.fullmatch(entry.name)
        if match is None or not _is_stale(entry, match.groupdict().get('pid'), files, age_s):
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as e:  # another process removing it too, or not ours to remove
            _logger.debug('Could not remove %s: %s', entry.path, e)
        else:
            _logger.info('Removed %s, left by an interrupted process.', entry.path)


def _is_stale(entry: os.DirEntry, pid: str | None, files: re.Pattern[str], age_s: float) -> bool:
    try:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            return False
        st = entry.stat(follow_symlinks=False)
        if hasattr(os, 'getuid') and st.st_uid != os.getuid():
            return False
        with os.scandir(entry.path) as inside:
            if any(not files.fullmatch(f.name) or not f.is_file(follow_symlinks=False) for f in inside):
                return False
    except OSError:
        return False
    if pid is None:
        return time.time() - st.st_mtime > age_s
    return not pid_alive(int(pid))
