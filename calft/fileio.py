"""Low-level file helpers shared by the data cache, the model cache and run directories:
advisory locks between processes, and atomic writes (readers never see a partial file).

Nothing here knows about calft's data: data.py, models.py and checkpoint.py import it, never
the other way round.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path, blocking: bool = True):
    """Exclusive advisory lock (fcntl.flock) on `path`, created if needed; yields True once held
    (blocking=False: yields False at once when another process holds it). Released when the block
    ends or the process dies (the kernel drops the flocks of dead processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


_HELD: dict[str, int] = {}  # path -> fd of the locks taken by hold_lock


def hold_lock(path: Path) -> bool:
    """Take the lock on `path` without waiting and keep it until release_locks() or the end of
    the process. False when another process (or open file) holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _HELD[str(path)] = fd
    return True


def release_locks() -> None:
    """Release every lock taken by hold_lock (a script run in-process, e.g. by runpy, ends)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


@contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Yield a file open on a temp file in `path`'s folder; rename it onto `path` when the block
    ends without error (os.replace is atomic on POSIX), delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically (`atomic_write`)."""
    with atomic_write(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
