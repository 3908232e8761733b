"""User errors: what counts as one, how it is reported, and the early check of a checkpoint file.

A user error (a bad option, a missing or damaged input file, a busy run directory) is reported by the command
line as one line ``error: <message>`` and exit code 2; everything else keeps its traceback.
"""

from __future__ import annotations

import os
import traceback
import zipfile
from pathlib import Path

from lightning_curv.utils.runlock import RunDirInUseError

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


class UserError(Exception):
    """An error in what the user gave (a file, an option): reported as one line, exit code 2."""


class CheckpointError(UserError, ValueError):
    """A ``--ckpt_path`` that is not a readable Lightning checkpoint."""


def validate_checkpoint(path: str | os.PathLike) -> None:
    """Fail with one clear line when ``path`` (an existing file) is not a readable checkpoint.

    Cheap: ``torch.save``'s zip archive must be complete (its central directory is at the end, so a truncated file
    fails) and its pickle must load memory-mapped, without reading the tensors.

    Raises:
        CheckpointError: Truncated, corrupt or not a checkpoint.
    """
    import torch

    hint = "is not a readable checkpoint (truncated or corrupt?); pass a checkpoint written by `fit`"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} {hint}.")
    try:
        torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to read means the same to the user
        raise CheckpointError(
            f"{path} {hint} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def is_user_error(err: BaseException) -> bool:
    """User errors: our own checks' ``ValueError``s, missing input files, a damaged checkpoint, a busy run dir."""
    if isinstance(err, (UserError, RunDirInUseError, FileNotFoundError)):
        return True
    if isinstance(err, ValueError):  # raised by lightning_curv's own code, not deep inside a library
        frames = traceback.extract_tb(err.__traceback__)
        return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE_DIR)
    return False


def one_line(err: BaseException) -> str:
    """The error message on one line (its type name when empty)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__
