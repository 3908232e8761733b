"""A lock file that keeps two live commands out of one run directory.

``<run_dir>/.lock`` holds the process id of the command using the folder. It is created with
``O_CREAT | O_EXCL``, so of two commands starting together exactly one gets it; a lock whose process is gone
(killed, crashed without cleanup) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirInUseError(RuntimeError):
    """The run directory is in use by another live command."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def acquire_run_lock(run_dir: str | os.PathLike) -> Path:
    """Take ``run_dir/.lock`` for this process (the folder must exist).

    Raises:
        RunDirInUseError: Another live process holds the lock.

    Returns:
        The lock file's path (pass it to :func:`release_run_lock`).
    """
    path = Path(run_dir) / LOCK_NAME
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _read_pid(path)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise RunDirInUseError(
                    f"Run directory {run_dir} is in use by another command (process {pid}, lock file {path}); "
                    "wait for it to finish, or pick another --run_dir."
                ) from None
            if pid is None:  # being written right now by a process that just created it: look again
                with contextlib.suppress(OSError):
                    if os.path.getsize(path) == 0 and _recently_created(path):
                        time.sleep(0.1)
                        continue
            warnings.warn(
                f"Taking over the stale lock {path} (process {pid} is no longer running).", UserWarning, stacklevel=2
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return path
    raise RunDirInUseError(f"Could not take the lock {path} of run directory {run_dir}; another command holds it.")


def _recently_created(path: Path, seconds: float = 2.0) -> bool:
    return time.time() - path.stat().st_mtime < seconds


def release_run_lock(path: str | os.PathLike | None) -> None:
    """Remove the lock file if this process still holds it."""
    if path is None:
        return
    path = Path(path)
    if _read_pid(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
