"""The id contract shared by training and serving.

Ids are strings of at most 128 characters from ``[A-Za-z0-9._:-]``. They are checked before they
touch a Redis key or a file, so a key can never be forged from user input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Model versions become folder names and Redis key parts: the same alphabet, but no leading dot.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_id(value: object) -> bool:
    """Return True when ``value`` is a string that satisfies the id contract."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: object, field: str) -> str:
    """Return ``value`` unchanged, or raise ``ValueError`` naming ``field``."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if not value:
        raise ValueError(f"{field} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if ID_PATTERN.fullmatch(value) is None:
        raise ValueError(f"{field} has characters outside [A-Za-z0-9._:-]")
    return value


def is_valid_version(value: object) -> bool:
    return isinstance(value, str) and VERSION_PATTERN.fullmatch(value) is not None


def valid_id_mask(values: np.ndarray) -> np.ndarray:
    """Vectorised :func:`is_valid_id` over an array of strings (object or unicode dtype)."""
    arr = pa.array(values, type=pa.string(), from_pandas=True)
    ok = pc.match_substring_regex(arr, r"^[A-Za-z0-9._:-]{1,128}$")
    return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)


class IdMap(Mapping[str, int]):
    """An ordered set of unique ids: id -> index (a read-only mapping) and index -> id.

    The order is a model's row or column order; it is saved with the model (``user_ids.json``,
    ``item_ids.json``), so an index means the same id wherever the model goes. Single lookups are a
    dict lookup (``id_map.get(item_id, -1)`` on the request path), built on first use; many at once
    go through :meth:`positions`, which needs no dict and hashes each distinct value once.
    """

    def __init__(self, ids: Sequence[str] | np.ndarray):
        self.ids = np.asarray(ids, dtype=object)
        self.ids.flags.writeable = False
        self._index: dict[str, int] | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, int]) -> IdMap:
        """An IdMap from any mapping of ids to the positions ``0..n-1``."""
        if isinstance(mapping, IdMap):
            return mapping
        ids = np.empty(len(mapping), dtype=object)
        positions = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
        if len(positions) and (
            positions.min() < 0 or positions.max() >= len(mapping) or len(set(positions)) != len(mapping)
        ):
            raise ValueError("an index mapping must map ids to the positions 0..n-1")
        ids[positions] = list(mapping.keys())
        return cls(ids)

    @property
    def index(self) -> dict[str, int]:
        """The id -> index dict (built once; raises ValueError when ids repeat)."""
        if self._index is None:
            index = {value: i for i, value in enumerate(self.ids.tolist())}
            if len(index) != len(self.ids):
                raise ValueError("ids of an IdMap must be unique")
            self._index = index
        return self._index

    def __getitem__(self, value: str) -> int:
        return self.index[value]

    def __contains__(self, value: object) -> bool:
        return value in self.index

    def get(self, value: str, default: int | None = None) -> int | None:  # type: ignore[override]
        return self.index.get(value, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids.tolist())

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """int64 index of each of ``values`` (-1 where absent), vectorised with arrow."""
        found = pc.index_in(
            pa.array(np.asarray(values, dtype=object), type=pa.string()),
            value_set=pa.array(self.ids, type=pa.string()),
        )
        return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def as_id_map(index: Mapping[str, int] | Sequence[str] | np.ndarray) -> IdMap:
    """An :class:`IdMap` from an IdMap, a mapping of ids to positions, or a sequence of ids in order."""
    if isinstance(index, IdMap):
        return index
    if isinstance(index, Mapping):
        return IdMap.from_mapping(index)
    return IdMap(index)
