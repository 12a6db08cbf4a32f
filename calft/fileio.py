"""Low-level file helpers shared by the data cache, the model cache and run directories:
advisory locks between processes, and the one way calft writes a file: a temp file in the same
folder, fsync, rename (readers and a kill at any moment see the old file or the new one, never a
partial one), refusing symbolic links and paths that resolve outside the folder they must stay in.

Nothing here knows about calft's data: data.py, models.py, run_dir.py, checkpoint.py, plots.py and the CLIs
import it, never the other way round.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"  # every temp name is ".<final name>.tmp-<random>": a kill leaves only these


class UnsafePathError(ValueError):
    """A write that would go through a symbolic link or outside its folder."""


def check_target(path: Path, root: Path | None = None) -> Path:
    """`path` when writing it cannot reach another file: it is not a symbolic link, and (with
    `root`) it lies inside `root` once every link in its folders is resolved."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(f"{path} is a symbolic link (to {os.readlink(path)}); calft never writes "
                              "through one: remove it")
    if root is not None:
        real_root, real_parent = Path(root).resolve(), path.parent.resolve()
        if real_parent != real_root and real_root not in real_parent.parents:
            raise UnsafePathError(f"{path} resolves to {real_parent / path.name}, outside {root}: "
                                  "a folder on its way is a symbolic link; remove it")
    return path


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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, mode: str = "wb", root: Path | None = None):
    """Yield a file open on a temp file next to `path`; when the block ends without error it is
    flushed, fsynced and renamed onto `path` (os.replace: atomic on POSIX), else deleted."""
    path = check_target(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        try:
            f = os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_target(path, root)  # a link planted while we wrote is replaced, never followed
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: str | bytes, root: Path | None = None) -> None:
    """Write `data` (text or bytes) to `path` atomically (`atomic_write`)."""
    with atomic_write(path, "w" if isinstance(data, str) else "wb", root) as f:
        f.write(data)


def append_line(path: Path, line: str, root: Path | None = None) -> None:
    """Append one line (a log record) and fsync it. Never through a symbolic link (O_NOFOLLOW); a
    kill can only tear this last line, which readers of such logs drop."""
    path = check_target(path, root)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symbolic link; calft never writes through one: remove it") from None
        raise
    with os.fdopen(fd, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def temp_dir(folder: Path, name: str):
    """A fresh temp folder ".<name>.tmp-*" in `folder`, removed when the block ends (whatever
    was not moved out of it)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_files_into(src: Path, dst: Path, root: Path | None = None) -> list[str]:
    """Rename every file of folder `src` into folder `dst` (one atomic rename each, fsynced
    first), refusing links at the destination; the names moved."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in Path(src).iterdir() if p.is_file())
    for name in names:
        fd = os.open(Path(src) / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for name in names:
        os.replace(Path(src) / name, check_target(dst / name, root))
    _fsync_dir(dst)
    return names


def remove_temps(folder: Path, name: str = "") -> None:
    """Delete the temp files and folders ".<name>*.tmp-*" a killed writer left in `folder` (call
    it only while holding the lock under which those writers run)."""
    for p in Path(folder).glob(f".{name}*{TMP_MARK}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def write_errors(report):
    """Writes inside the block: a failure (OSError: a full disk, permissions; UnsafePathError: a
    link where calft writes) calls report(why) with one line instead of raising."""
    try:
        yield
    except (OSError, UnsafePathError) as err:
        report(describe_os_error(err) if isinstance(err, OSError) else str(err))


def describe_os_error(err: OSError) -> str:
    """'the disk is full' for ENOSPC / EDQUOT, else the system's message; with the path."""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}"
    return f"{err.strerror or err}{where}"


def describe_error(err: Exception) -> str:
    """One line for a user: describe_os_error for an OSError, the message otherwise."""
    return describe_os_error(err) if isinstance(err, OSError) else str(err)


def machine_memory() -> int:
    """Bytes this process may use: physical memory, capped by a cgroup limit and RLIMIT_AS."""
    import resource

    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1):
        limits.append(soft)
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"
