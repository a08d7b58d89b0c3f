"""Write a file whole, then rename it over its target: a full disk or an interrupt leaves the
previous file, never a truncated one (model files, the command line's predictions)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(path: str, *, special_in_place: bool = False) -> Iterator[str]:
    """Yield a temporary path beside the file ``path`` names (through symlinks: the link is kept, as
    open(path, "w") would); once the block completes, the temporary file takes the target's permission
    bits (a new one a normal file's, not mkstemp's owner-only) and is renamed over it (``os.replace``:
    atomic on POSIX and Windows), then the folder is synced so the rename is durable. On any error the
    temporary file is removed and the target left as it was.

    A target that is a device or a FIFO: written in place where ``special_in_place`` (-o /dev/null),
    else refused (the rename would replace /dev/null itself)."""
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    if os.path.exists(target) and not os.path.isfile(target):
        if special_in_place:
            yield target
            return
        raise ValueError(f"{path} is not a regular file (a device, a FIFO, ...); the file is written whole "
                         f"and renamed over its target: give a file name")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its permission bits
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    folder = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
