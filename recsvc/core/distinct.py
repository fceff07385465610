"""Sorted distinct values of a numeric array, by sorting.

``np.unique(a)`` without ``return_*`` takes a hash-table path since NumPy 2.3 that is fast for few
distinct values and slow for many: on 5.3M int64 keys that are mostly distinct (user x item pairs)
it took 5.0 s where sorting takes 0.05 s. :func:`distinct` is the sort-based equivalent, for the
keys training builds from millions of events.
"""

from __future__ import annotations

import numpy as np


def distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` of a numeric array (sorted distinct values), computed by sorting."""
    out = np.sort(np.asarray(values).ravel())
    if len(out) < 2:
        return out
    keep = np.empty(len(out), dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]
