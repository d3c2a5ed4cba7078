"""Atomic writes of files and folders: a temporary path beside the target, fsync, then a rename.

A reader never sees a half-written file or folder, and a crash or Ctrl-C leaves the previous one intact.
Temporary names carry the writer's pid (``.NAME.tmp-PID-*``), so a later write can remove what a dead
writer left behind. Files and folders get the modes a plain write would (``0o666`` / ``0o777`` less the
umask), not the private ones of ``mkstemp`` / ``mkdtemp``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from layerprune.errors import InvalidInputError
from layerprune.faults import fault_point


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a plain ``mkdir`` gives: ``0o777`` less the umask."""
    return 0o777 & ~_umask()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync one file or folder (a folder's entries: the names of what was renamed into it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file below ``folder``, then every folder, deepest first."""
    root = Path(folder)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(target: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` beside ``target`` left by writers that are no longer running."""
    if not target.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def temp_sibling_dir(target: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A new empty folder ``.NAME.<kind>-PID-*`` beside ``target``, with a plain folder's mode."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    os.chmod(folder, dir_mode())
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the finished folder ``tmp`` at ``target``, replacing what is there, and fsync it all.

    An existing ``target`` is swapped with ``tmp`` in one atomic step where the system allows it (then the
    old copy is deleted), so ``target`` is at every moment either the old folder or the new one. Elsewhere
    the old folder is renamed aside first; a crash between the two renames leaves it as ``.NAME.old-PID-*``,
    which the next write to ``target`` puts back before it starts.
    """
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    fault_point("folder-swap-start")
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
    else:
        aside = temp_sibling_dir(target, "old")
        aside.rmdir()
        os.replace(target, aside)
        fault_point("folder-swap")  # between the two renames: the next write puts the old folder back
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_path(target.parent)
    return target


def restore_interrupted(target: str | os.PathLike[str]) -> None:
    """If a crash left ``target`` missing and its old copy aside (the two-rename path), put the old copy back."""
    target = Path(target)
    if target.exists():
        return
    asides = sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []
    for aside in asides:
        pid = aside.name[len(f".{target.name}.old-"):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            os.replace(aside, target)
            return


_claimed: dict[Path, int] = {}  # outputs this process holds: path -> nesting depth


@contextmanager
def claim_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``target`` for this process while a run writes it: a second writer of the same path, in another
    process, is refused at once in one line (InvalidInputError naming the holder's pid) instead of both running
    and one silently replacing the other's folder. Re-entrant within a process.

    The claim is an exclusive ``flock`` on ``.NAME.lock`` beside ``target``: the kernel drops it when the holder
    exits, however it dies, so a killed run never blocks the next one. The lock file is removed when the claim
    ends; one a killed holder left is taken over (a lock on a file that was removed is detected and retried).
    """
    import fcntl

    target = Path(target).expanduser().absolute()
    if target in _claimed:
        _claimed[target] += 1
        try:
            yield target
        finally:
            _claimed[target] -= 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InvalidInputError(f"{target} is being written by another layerprune process (pid {holder}); "
                                    "wait for it to finish or write elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we opened it: try again on the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _claimed[target] = 1
        yield target
    finally:
        _claimed.pop(target, None)
        lock.unlink(missing_ok=True)
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, fsync and an atomic rename."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextmanager
def atomic_output_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens files by name. When the block ends normally the
    file is fsync'd, given a plain file's mode and renamed onto ``path``; on any error it is removed."""
    target = Path(path).expanduser()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """`obj` as strict JSON values: non-finite floats become None, tuples lists, paths strings, numpy and
    torch scalars and arrays plain numbers and lists. Any other type raises InvalidInputError."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if callable(getattr(obj, "tolist", None)):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    raise InvalidInputError(f"value of type {type(obj).__name__} cannot be written as JSON")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """`write_text_atomic` of `obj` as indented JSON (NaN/inf are written as null)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
