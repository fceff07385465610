"""Packed values of the Redis layout: per-user records, popularity lists, item arrays.

Pure numpy <-> bytes: no JSON per item, no pickle. The publisher packs with these functions and
the serving side unpacks with the same ones.
"""

from __future__ import annotations

import json
from typing import overload

import numpy as np
import scipy.sparse as sp

from recsvc.core.artifact import Artifact


def index_dtype(n_items: int) -> str:
    """Packed dtype of item indices: 2 bytes while the catalog fits (the top value pads), else 4."""
    return "<u2" if n_items <= 0xFFFF else "<i4"


def pad_index(dtype: str) -> int:
    """The index that pads a cached list shorter than K (never a real item of the version)."""
    return 0xFFFF if np.dtype(dtype).itemsize == 2 else np.iinfo(np.int32).max


def pack_user_rows(
    indices: np.ndarray, scores: np.ndarray | None, vectors: np.ndarray, dtype: str
) -> np.ndarray:
    """One row of bytes per user: top-K item indices (``dtype``), their float32 scores (when given),
    then the float32 user factors.

    The stored value of a user is this row followed by the indices of the items they may not be
    shown again (variable length, same ``dtype``), so one ``HGET`` returns everything a request
    needs. ``-1`` in ``indices`` (fewer than K candidates) is stored as :func:`pad_index`. A plain
    ALS model stores no scores: ``item_factors[indices] @ vector`` gives them back exactly, which
    keeps a user at ~0.7 KB instead of ~1.5 KB for K = 200.
    """
    idx = np.where(np.asarray(indices) < 0, pad_index(dtype), indices)
    parts = [np.ascontiguousarray(idx, dtype=dtype).view(np.uint8)]
    if scores is not None:
        parts.append(np.ascontiguousarray(scores, dtype="<f4").view(np.uint8))
    parts.append(np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8))
    return np.concatenate([p.reshape(len(indices), -1) for p in parts], axis=1)


def unpack_user(
    value: bytes, k: int, factors: int, dtype: str = "<i4", with_scores: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Inverse of the per-user value: ``(top-K items, their scores or None, user vector, excluded)``.

    Indices come back as int32 whatever their packed ``dtype``; padding is dropped.
    """
    width = np.dtype(dtype).itemsize
    # copy=False: with 4-byte indices these stay read-only views of ``value`` (no copy per request).
    indices = np.frombuffer(value, dtype=dtype, count=k).astype(np.int32, copy=False)
    offset = width * k
    scores = None
    if with_scores:
        scores = np.frombuffer(value, dtype="<f4", count=k, offset=offset)
        offset += 4 * k
    vector = np.frombuffer(value, dtype="<f4", count=factors, offset=offset)
    excluded = np.frombuffer(value, dtype=dtype, offset=offset + 4 * factors).astype(np.int32, copy=False)
    pad = pad_index(dtype)
    if k and indices[-1] == pad:
        real = int(np.argmax(indices == pad))
        indices = indices[:real]
        scores = None if scores is None else scores[:real]
    return indices, scores, vector, excluded


def unpack_indices(value: bytes | None) -> np.ndarray:
    """int32 item indices packed by publish (an absent field means none)."""
    if not value:
        return np.zeros(0, dtype=np.int32)
    return np.frombuffer(value, dtype="<i4")


def unpack_weighted(value: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 indices, float32 weights)`` of a user's packed interactions row."""
    if not value:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    n = len(value) // 8
    indices = np.frombuffer(value, dtype="<i4", count=n)
    return indices, np.frombuffer(value, dtype="<f4", count=n, offset=4 * n)


def array_bytes(arr: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Item indices by popularity, most popular first; ties by lower index (stable)."""
    return np.argsort(-popularity.astype(np.float64), kind="stable").astype(np.int32)


def popular_lists(popularity: np.ndarray, category: np.ndarray, n_categories: int) -> dict[str, bytes]:
    """Packed popularity orders: ``"*"`` overall and ``"c<code>"`` for each category with items."""
    order = popularity_order(popularity)
    out = {"*": array_bytes(order, "<i4")}
    cats = category[order]
    for code in range(n_categories):
        members = order[cats == code]
        if len(members):
            out[f"c{code}"] = array_bytes(members, "<i4")
    return out


class PackedRows:
    """Rows of a CSR matrix as packed bytes: indices (+ float32 values when weighted).

    The arrays are turned into ``bytes`` once; a row is then two slices of those (much cheaper per
    user than slicing numpy arrays and calling ``tobytes``).
    """

    def __init__(self, mat, dtype: str, weighted: bool):
        mat = mat.tocsr()
        self.indptr = mat.indptr.tolist()
        self.width = np.dtype(dtype).itemsize
        self.indices = np.ascontiguousarray(mat.indices, dtype=dtype).tobytes()
        self.data = np.ascontiguousarray(mat.data, dtype="<f4").tobytes() if weighted else None

    def row(self, r: int) -> bytes:
        lo, hi = self.indptr[r], self.indptr[r + 1]
        if self.data is None:
            return self.indices[self.width * lo : self.width * hi]
        return self.indices[self.width * lo : self.width * hi] + self.data[4 * lo : 4 * hi]


def csr_mapping(matrix: sp.csr_matrix) -> dict[str, bytes]:
    """A CSR matrix as hash fields: ``shape`` (2 x int64), ``indptr`` (int64), ``indices`` (int32),
    ``data`` (float32)."""
    m = sp.csr_matrix(matrix)
    return {
        "shape": array_bytes(np.asarray(m.shape), "<i8"),
        "indptr": array_bytes(m.indptr, "<i8"),
        "indices": array_bytes(m.indices, "<i4"),
        "data": array_bytes(m.data, "<f4"),
    }


def csr_from_mapping(fields: dict[bytes, bytes]) -> sp.csr_matrix:
    """Inverse of :func:`csr_mapping` (arrays are read-only views of the reply)."""
    shape = np.frombuffer(fields[b"shape"], dtype="<i8")
    return sp.csr_matrix(
        (
            np.frombuffer(fields[b"data"], dtype="<f4"),
            np.frombuffer(fields[b"indices"], dtype="<i4"),
            np.frombuffer(fields[b"indptr"], dtype="<i8"),
        ),
        shape=(int(shape[0]), int(shape[1])),
        copy=False,
    )


def items_mapping(artifact: Artifact) -> dict[str, bytes | str]:
    prior = {} if artifact.prior is None else {"prior": array_bytes(artifact.prior, "<f4")}
    return {
        **prior,
        "ids": json.dumps(list(artifact.item_ids), separators=(",", ":")),
        "titles": json.dumps(list(artifact.titles), ensure_ascii=False, separators=(",", ":")),
        "categories": json.dumps(list(artifact.categories), ensure_ascii=False, separators=(",", ":")),
        "factors": array_bytes(artifact.item_factors, "<f4"),
        "price": array_bytes(artifact.price, "<f4"),
        "available": array_bytes(artifact.available, "u1"),
        "category": array_bytes(artifact.category, "<i4"),
        "popularity": array_bytes(artifact.popularity, "<f4"),
    }


@overload
def text(value: None) -> None: ...
@overload
def text(value: bytes | str) -> str: ...
def text(value: bytes | str | None) -> str | None:
    """A Redis reply as text (replies are bytes; None stays None)."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
