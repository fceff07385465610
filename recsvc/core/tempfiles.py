"""Temporary files and folders that tell whether their writer is still alive.

A writer holds an advisory lock (``flock``) on its temporary path for as long as it writes. The
kernel drops the lock when the process ends, however it ends (``SIGKILL`` included), so a later run
can tell a crashed writer's leftover (lock free) from a live writer's work (lock held) at once --
no age threshold, no pid guessing -- and remove it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def hold(path: str | os.PathLike) -> int:
    """Take the writer's lock on ``path`` (a file or a folder); return the descriptor to release."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    """Drop a lock taken by :func:`hold` (closing the descriptor releases it)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def abandoned(path: str | os.PathLike) -> bool:
    """True when nobody holds ``path``'s writer lock.

    A writer takes the lock right after creating the path. Should a sweep fall between the two,
    the path is gone when the writer tries to lock it (or to rename it into place), and the writer
    fails loudly -- a retry, never a corrupt result.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer holds it
    finally:
        os.close(fd)
    return True


def sweep(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the paths among ``paths`` whose writer is gone (see :func:`abandoned`); return them."""
    removed = []
    for raw in paths:
        path = Path(raw)
        if not abandoned(path):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
