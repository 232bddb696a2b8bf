"""Atomic writes of a file and of a directory: the content goes to a temporary name in the same
directory, is fsync'ed, then renamed onto the target, so a reader (or a process killed mid-write)
never sees a half-written file or directory. The one helper for this job on both sides (the JIT
cache, the artifact writer, the example and emulation tools, keys, reports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o600, *, suffix: str = "", exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write it in the block. On success it is fsync'ed,
    given `mode` and renamed onto `path`; on an exception it is removed. `exclusive`: publish only
    if `path` does not exist yet (raises FileExistsError, the temporary file removed)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        if exclusive:
            os.link(tmp, path)  # fails if another writer published first
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: str | Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> None:
    with atomic_file(path, mode, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)


def copy_atomic(src: str | Path, path: str | Path, mode: int = 0o600) -> None:
    with atomic_file(path, mode) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, mode: int = 0o755, *, prefix: str | None = None) -> Iterator[Path]:
    """Yield a new, empty temporary directory next to `path`; fill it in the block. On success it
    gets `mode` and is renamed to `path` (an existing `path` is removed first); on an exception it
    is deleted. `prefix` names the temporary directory (default `.<name>.`), e.g. to find ones a
    killed process left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
