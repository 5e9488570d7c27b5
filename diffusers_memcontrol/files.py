"""Atomic file writes: a crash mid-write never leaves a truncated file where a reader expects a whole one.

Every file the package writes (metrics, masks, configs, tables, caches, plots) goes through here: the content is
written to a temporary file in the destination folder, flushed to disk, given the usual permissions and moved in
place with `os.replace`, which is atomic on POSIX and Windows within one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any


def _read_umask() -> int:
    """The process umask, read without changing it (changing it races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def usual_mode(path: str) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the permissions a plain `open` would give it."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_read_umask())


class DiskFullError(OSError):
    """A write ran out of disk space: names the folder, the bytes the write needs and the bytes free."""

    def __init__(self, folder: str, needed: int | None, free: int, at_least: bool = False):
        self.folder, self.needed, self.free = folder, needed, free
        need = (f"more than {needed:,} bytes" if at_least else f"about {needed:,} bytes") if needed else \
            "more than that"
        super().__init__(errno.ENOSPC, f"No space left on device in {folder!r}: the write needs {need}, {free:,} "
                                       "bytes are free. Nothing was left half written; free some space (or choose "
                                       "another folder) and run the command again.")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write that ran out of space (an OSError ENOSPC/EDQUOT, or safetensors' error for it)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)  # safetensors and torch raise their own types with the OS message in the text
    return "No space left on device" in text or "os error 28" in text


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the filesystem of `folder` (its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a file's own size for a file; 0 when it is missing)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


@contextlib.contextmanager
def reporting_full_disk(folder: str | os.PathLike, needed: int | Callable[[], int] | None = None,
                        at_least: bool = False) -> Iterator[None]:
    """Turn a write that runs out of space inside the block into a DiskFullError naming `folder`, the bytes
    `needed` (a number, or a function called after the failure) and the bytes free, measured after the block's own
    clean-up (what a rerun has). The outermost block names the error: it knows the whole write."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        need = needed() if callable(needed) else needed
        if need is None and isinstance(err, DiskFullError):
            raise
        raise DiskFullError(os.fspath(folder), need, free_bytes(folder), at_least) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to `path` for a library that writes by file name; move it to `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    written = 0  # a lower bound of what the write needs, when the disk fills
    with reporting_full_disk(folder, needed=lambda: written, at_least=True):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
        os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            usual_mode(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                written = os.path.getsize(tmp)
                os.remove(tmp)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create `path` holding `text` in one step, unless it exists (then False): a complete temporary file is
    hard-linked to `path`, so no reader ever sees it empty or half written. Where the filesystem has no hard links,
    O_CREAT | O_EXCL then a write."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        usual_mode(tmp)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_read_umask())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        os.remove(tmp)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a file or folder to `dst` on the same filesystem in one step (`os.rename`: atomic; an existing file
    `dst` is replaced). Raises FileNotFoundError when `src` is gone (another process moved it first)."""
    os.rename(src, dst)


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `new` at `target` with renames only: an old `target` is renamed away, then removed, so
    a kill at any moment leaves either the old folder or the new one, whole."""
    if not os.path.lexists(target):
        move(new, target)
        return
    old = _hidden_sibling(target, "old")
    move(target, old)
    move(new, target)
    shutil.rmtree(old, ignore_errors=True)


def discard_folder(folder: str | os.PathLike) -> None:
    """Remove a folder, renamed to a hidden name first, so a kill mid-way never leaves it half deleted."""
    trash = _hidden_sibling(folder, "trash")
    move(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _hidden_sibling(path: str | os.PathLike, what: str) -> str:
    """A fresh hidden name next to `path` (on the same filesystem, so a rename to it is atomic)."""
    parent, name = os.path.split(os.path.abspath(path))
    sibling = tempfile.mkdtemp(prefix=f".{name}-{what}-", dir=parent)
    os.rmdir(sibling)
    return sibling


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
                ) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing (`"w"` or `"wb"`); it replaces `path` when the block ends.

    `newline` means what it means for `open` (text mode; "" for the csv module)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(text)
    return os.fspath(path)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (`hashlib` algorithm name), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for numpy/torch scalars and arrays; non-finite floats become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays/scalars, torch tensors
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"value of type {type(value).__name__} is not JSON-serializable: {value!r}")


def write_json_atomic(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> str:
    """Write `data` as strict JSON (no NaN/inf) to `path` atomically; returns the path."""
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=sort_keys, allow_nan=False)
    return write_text_atomic(path, text + "\n")
