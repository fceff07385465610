"""The in-memory form of events and catalogs: columnar tables shared by training and serving.

:class:`EventTable` holds validated events as parallel numpy arrays (ids as object arrays, event
codes of :data:`recsvc.core.contract.EVENT_CODE`, Unix seconds); :class:`Catalog` the items. Files
become these tables through :mod:`recsvc.core.eventfiles`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from recsvc.core import contract


@dataclass
class EventTable:
    """Events as parallel arrays, one entry per event (see docs/ARCHITECTURE.md).

    Only ``user_id, item_id, event, timestamp`` are required to build one by hand; the optional
    columns default to "absent" (``""``, ``1.0``, ``NaN``, ``""``). Tables built by
    :func:`load_events` also carry the dictionary encoding of their id columns, which makes
    :meth:`codes` free; hand-built tables compute it on first use.
    """

    user_id: np.ndarray
    item_id: np.ndarray
    event: np.ndarray
    timestamp: np.ndarray
    order_id: np.ndarray | None = None
    quantity: np.ndarray | None = None
    price: np.ndarray | None = None
    rec_id: np.ndarray | None = None
    # column name -> (codes int32, distinct values object array); may hold unused values.
    _codes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.user_id)
        self.user_id = np.asarray(self.user_id, dtype=object)
        self.item_id = np.asarray(self.item_id, dtype=object)
        self.event = np.asarray(self.event, dtype=np.int8)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        self.order_id = _object_column(self.order_id, n)
        self.rec_id = _object_column(self.rec_id, n)
        self.quantity = (
            np.ones(n, np.float32) if self.quantity is None else np.asarray(self.quantity, np.float32)
        )
        self.price = (
            np.full(n, np.nan, np.float32) if self.price is None else np.asarray(self.price, np.float32)
        )
        for name in ("item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"EventTable column {name} has {len(getattr(self, name))} entries, expected {n}"
                )

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, mask_or_index: np.ndarray) -> EventTable:
        """Return the events selected by a boolean mask or an integer index array."""
        sel = np.asarray(mask_or_index)
        if sel.dtype == bool:
            sel = np.flatnonzero(sel)
        # __post_init__ fills every optional column, so none of them is None here.
        assert self.order_id is not None and self.quantity is not None
        assert self.price is not None and self.rec_id is not None
        out = EventTable(
            user_id=self.user_id[sel],
            item_id=self.item_id[sel],
            event=self.event[sel],
            timestamp=self.timestamp[sel],
            order_id=self.order_id[sel],
            quantity=self.quantity[sel],
            price=self.price[sel],
            rec_id=self.rec_id[sel],
        )
        out._codes = {name: (codes[sel], uniques) for name, (codes, uniques) in self._codes.items()}
        return out

    def codes(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Dictionary encoding of an id column: ``(codes, values)`` with ``values[codes] == column``.

        ``values`` may contain entries no row uses (after :meth:`take`); callers that need the
        distinct values present should use ``np.bincount(codes, minlength=len(values)) > 0``.
        """
        if column not in self._codes:
            encoded = pa.array(getattr(self, column), type=pa.string()).dictionary_encode()
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            values = np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
            self._codes[column] = (codes, values)
        return self._codes[column]

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> EventTable:
        """Build a table from contract-shaped dicts (each is checked with ``validate_event``).

        Convenient for tests and small tools; files should go through :func:`load_events`.
        """
        rows = [contract.validate_event(r) for r in records]
        return cls(
            user_id=np.array([r["user_id"] for r in rows], dtype=object),
            item_id=np.array([r["item_id"] for r in rows], dtype=object),
            event=np.array([contract.EVENT_CODE[r["event"]] for r in rows], dtype=np.int8),
            timestamp=np.array([r["timestamp"] for r in rows], dtype=np.int64),
            order_id=np.array([r.get("order_id", "") for r in rows], dtype=object),
            quantity=np.array([r.get("quantity", 1.0) for r in rows], dtype=np.float32),
            price=np.array([r.get("price", np.nan) for r in rows], dtype=np.float32),
            rec_id=np.array([r.get("rec_id", "") for r in rows], dtype=object),
        )

    @classmethod
    def concat(cls, tables: Sequence[EventTable]) -> EventTable:
        """Concatenate tables (the id encodings are recomputed lazily)."""
        if not tables:
            raise ValueError("nothing to concatenate")
        columns: dict[str, Any] = {
            name: np.concatenate([getattr(t, name) for t in tables]) for name in _EVENT_FIELDS
        }
        return cls(**columns)


_EVENT_FIELDS = ("user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id")


def _object_column(values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        out = np.empty(n, dtype=object)
        out[:] = ""
        return out
    return np.asarray(values, dtype=object)


@dataclass
class Catalog:
    """Catalog items as parallel arrays; ``price`` is NaN and ``category``/``title`` ``""`` when unknown."""

    item_id: np.ndarray  # object
    title: np.ndarray  # object, "" where absent
    category: np.ndarray  # object, "" where absent
    price: np.ndarray  # float32, NaN where unknown
    available: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.item_id)


_HASH_MULTIPLIERS = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9),
)


_HASHED_KEYS = 3  # the hash covers the first keys only; the exact check uses all of them


def duplicate_mask(keys: Sequence[np.ndarray]) -> np.ndarray:
    """True for every row that repeats an earlier row on all ``keys`` (the first stays False).

    A 64-bit hash of the first three keys is sorted (a vectorised sort of one integer column);
    only rows whose hash occurs more than once are compared exactly (lexsort over all keys). A
    file without duplicates therefore costs a hash and one sort of 8-byte values, and memory of a
    few columns. Put the most distinguishing keys first.

    Parameters
    ----------
    keys : sequence of numpy arrays
        Equal-length integer arrays (floats should be passed as their bit patterns).

    Returns
    -------
    numpy.ndarray
        Boolean mask, one entry per row.
    """
    n = len(keys[0])
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    with np.errstate(over="ignore"):
        h = np.zeros(n, dtype=np.uint64)
        for j, key in enumerate(keys[:_HASHED_KEYS]):
            h += np.asarray(key).astype(np.uint64, copy=False) * _HASH_MULTIPLIERS[j]
            h ^= h >> np.uint64(31)
        h *= _HASH_MULTIPLIERS[0]
    ordered = np.sort(h)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated) == 0:
        return dup
    repeated = repeated[np.r_[True, repeated[1:] != repeated[:-1]]]
    at = np.minimum(np.searchsorted(repeated, h), len(repeated) - 1)
    candidates = np.flatnonzero(repeated[at] == h)
    del h, ordered
    # Exact comparison among the remaining candidates; ties keep original order, so the first wins.
    sub = [np.asarray(key)[candidates] for key in keys]
    order = np.lexsort([candidates, *reversed(sub)])
    same = np.ones(len(order) - 1, dtype=bool)
    for col in sub:
        s = col[order]
        same &= s[1:] == s[:-1]
    dup[candidates[order[1:][same]]] = True
    return dup
