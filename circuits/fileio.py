"""Atomic writes of files and directories, shared by every artifact."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `directory` whole. Replacing
    takes two renames: a process killed between them leaves no `directory`, and its previous
    version in `.{name}.old.{pid}` (`surviving_directory` finds it; the next success removes it)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name what was being written
            raise OSError(e.errno, e.strerror, str(directory)) from e
        raise
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
        directory.rename(old)
    tmp.rename(directory)
    for stale in directory.parent.glob(f".{glob.escape(directory.name)}.old.*"):  # ours, and any a killed swap left
        _remove_out_of_sight(stale, directory)


def _remove_out_of_sight(stale: Path, directory: Path) -> None:
    """Delete `stale` after renaming it to a temporary name (`.{name}.XXXXXXXX/old`): a process
    killed while deleting leaves a half-deleted tree there, never under the `.old.*` name that
    `surviving_directory` would resume from."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    stale.rename(trash / "old")
    shutil.rmtree(trash)


def surviving_directory(directory: Path) -> Path:
    """`directory`, or when a swap of `atomic_directory` was killed between its renames, the
    previous version it left (the newest)."""
    directory = Path(directory)
    if directory.exists():
        return directory
    old = sorted(directory.parent.glob(f".{glob.escape(directory.name)}.old.*"), key=lambda p: p.stat().st_mtime)
    return old[-1] if old else directory


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path` for writing; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if missing) while writing a set of files into
    it: writers of the same set take turns. The lock is flock(2) on the folder itself, so no lock
    file is left behind, and a killed holder releases it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json(path: Path, value, indent: int | None = None) -> None:
    """Write `value` as JSON to `path`, atomically."""
    with atomic_file(path) as f:
        json.dump(value, f, indent=indent)
