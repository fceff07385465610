"""Handing freed memory back to the system between the stages of a job."""

from __future__ import annotations

import ctypes

import pyarrow as pa


def release_unused_memory() -> None:
    """Return memory freed so far to the system, so the next stage's peak does not stack on it.

    Arrow's pool keeps the pages of freed buffers, and glibc keeps freed heap pages below the last
    live allocation (numpy arrays of a few MB live there) until ``malloc_trim``. Both are cheap
    (milliseconds) next to the stages they separate.
    """
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass


def use_system_allocator() -> None:
    """Make arrow allocate with the C library's malloc from now on (buffers already allocated
    stay with their pool).

    For a batch job that reads a file once and hands its columns to numpy: measured on 5.2M
    events, loading peaked at about 800 MB instead of 1,030 MB with arrow's default mimalloc pool,
    which keeps the pages of the reader's freed blocks, and was no slower.
    """
    pa.set_memory_pool(pa.system_memory_pool())
