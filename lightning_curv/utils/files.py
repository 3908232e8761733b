"""Writing files so that a reader sees the old file, no file, or the whole new one, never a truncated one.

Every output of the package (factor and eigen files, ``metrics.json``, ``config.yaml``, plots, caches) goes through
:func:`atomic_path`: the content is written to a temporary name in the destination folder (same file system, so
the final ``os.replace`` is atomic), flushed to disk, given the mode an ordinary ``open()`` would give it under the
user's umask (``mkstemp`` alone would leave 0600), and only then renamed onto the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems do not support fsync on a read-only descriptor
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    Readers (other ranks, other processes) see either the old file, no file, or the complete new one.

    Args:
        path: Final destination; parent folders are created.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file atomically: ``write`` fills a temporary file beside ``path``, which is then renamed.

    Args:
        path: Final location; parent folders are created.
        write: Called with the temporary file's path; must write the whole content there.
    """
    with atomic_path(path) as tmp:
        write(str(tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for tensors, paths and dtypes."""
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype)):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (indented by default, compact with ``indent=None``)."""
    text = json.dumps(obj, indent=indent, default=json_default)
    atomic_write_text(path, text + "\n" if indent is not None else text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with :func:`torch.save` to ``path`` atomically.

    Args:
        obj: Tensors and plain containers (loadable with ``weights_only=True``).
        path: Destination file.
    """
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success rename it onto ``path``, on error delete it.

    An existing folder at ``path`` is replaced only once the new one is complete, so an interrupted writer
    (``save_pretrained`` on a full disk, a kill) leaves the old folder or none, never a half-written one.

    Args:
        path: Final folder; parent folders are created.

    Yields:
        The temporary folder to fill.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not path.exists() and (old / path.name).exists():  # the final rename failed: put the old one back
                os.replace(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)
