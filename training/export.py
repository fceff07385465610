"""Email personalization exports: top-N picks for every user of a segment, streamed to CSV or JSONL.

``recsvc export --segment dormant --events events.csv --n 8 --out campaign.csv``

One row per (user, pick): ``user_id, segment, rank, item_id, title, price, score, reason,
model_version, export_id`` (plus ``bundle_item_ids, bundle_price`` with ``--with-bundles``).

How picks are made (see docs/batch.md for the full story):

* users known to the model (not ``new``): ``user_factors @ item_factors.T`` scored in chunks of
  users, filtered, top-N (reason ``personalized``);
* ``dormant`` users: items in their categories that are new or back in stock since their last visit
  are ranked first (reasons ``winback_new`` / ``winback_back_in_stock``), at most ``winback_slots``
  of them, then the personalized picks;
* ``new`` users get onboarding picks: the most popular items of the categories they looked at, then
  the most popular items overall (``onboarding_category`` / ``onboarding_popular``); users the model
  does not know (cold) get the same by popularity (``popular_in_category`` / ``popular``);
* filters: in stock only; never an item the user already bought (except ``repurchase_categories``);
  frequency cap -- never an item sent to that user in any of the last ``cap_last`` exports.

The file is written to a hidden temporary name, fsynced, recorded in the export ledger, then renamed
into place, so a killed export never leaves a complete-looking file. The scoring working set is
bounded by the chunk size (``memory_mb``), not by the number of users; rows stream to disk.

The ranking pieces (:func:`top_k_rows`, :func:`merge_ranked`, :func:`popularity_keys`,
:func:`winback_picks`, :func:`item_fresh_since`) are pure numpy and tested on tiny inputs.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import itertools
import json
import logging
import math
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recsvc.core.artifact import Artifact, ArtifactError, list_versions, read_artifact, resolve
from recsvc.core.bundles import BundleCatalog, BundleRules, assemble_bundle
from recsvc.core.config import Config
from recsvc.core.contract import PURCHASE
from recsvc.core.ids import IdMap
from recsvc.core.ranking import mask_positions
from recsvc.storage.connection import connect_admin
from recsvc.storage.embedded import ensure_redis
from recsvc.storage.versions import current_version
from training.segments import (
    DORMANT,
    NEW,
    NO_TIME,
    SEGMENT_CHOICES,
    SEGMENTS,
    EventsLike,
    SegmentTable,
    SegmentThresholds,
    compute_segments,
)

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "personalized",
    "winback_new",
    "winback_back_in_stock",
    "onboarding_category",
    "onboarding_popular",
    "popular_in_category",
    "popular",
)
(
    PERSONALIZED,
    WINBACK_NEW,
    WINBACK_BACK_IN_STOCK,
    ONBOARDING_CATEGORY,
    ONBOARDING_POPULAR,
    POPULAR_IN_CATEGORY,
    POPULAR,
) = range(len(REASONS))

COLUMNS: tuple[str, ...] = (
    "user_id",
    "segment",
    "rank",
    "item_id",
    "title",
    "price",
    "score",
    "reason",
    "model_version",
    "export_id",
)
BUNDLE_COLUMNS: tuple[str, ...] = ("bundle_item_ids", "bundle_price")
FORMATS: tuple[str, ...] = ("csv", "jsonl")

MAX_N = 100
MAX_CAP_LAST = 50
LEDGER_KEEP = 50  # ledger records kept; bounds --cap-last
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 16_384
# Bytes per scored (user, item) cell while a chunk is ranked: the float32 score, the bool
# threshold mask, and the onboarding/category temporaries. Sizing chunks from it keeps the peak
# within --memory-mb whatever the catalogue size.
BYTES_PER_CELL = 12
WRITE_AHEAD = 2  # chunks of rows queued for the writer thread
MAX_THREADS = 64


# ------------------------------------------------------------------------------------------------
# Pure numpy: ranking
# ------------------------------------------------------------------------------------------------


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest finite scores of every row, best first.

    Exact, and faster than a row-wise ``argpartition`` on wide rows: the k-th largest of the
    per-block maxima is a threshold that at least ``k`` cells of the row reach (each of those
    blocks holds one), so only the few cells at or above it are sorted.

    Parameters
    ----------
    scores : ndarray, shape (rows, columns)
        float32 (or float64) scores; ``-inf`` marks a filtered cell, which is never returned.
    k : int
        How many to keep per row.

    Returns
    -------
    indices : ndarray of int32, shape (rows, k)
        Column indices, best first; ties go to the lower column; ``-1`` pads rows with fewer than
        ``k`` finite cells.
    values : ndarray, shape (rows, k)
        The scores of those cells; ``-inf`` where padded.
    """
    scores = np.ascontiguousarray(scores)
    n_rows, n_cols = scores.shape
    indices = np.full((n_rows, k), -1, dtype=np.int32)
    values = np.full((n_rows, k), -np.inf, dtype=scores.dtype)
    kk = min(k, n_cols)
    if n_rows == 0 or kk <= 0:
        return indices, values
    blocks = min(n_cols // 2, 8 * kk)
    if blocks >= kk and n_cols >= 64:
        # Strided blocks (column j belongs to block j % blocks) reduce along contiguous memory.
        block_len = n_cols // blocks
        head = block_len * blocks
        maxima = scores[:, :head].reshape(n_rows, block_len, blocks).max(axis=1)
        if head < n_cols:
            maxima = np.concatenate([maxima, scores[:, head:].max(axis=1, keepdims=True)], axis=1)
        threshold = np.partition(maxima, maxima.shape[1] - kk, axis=1)[:, maxima.shape[1] - kk]
    else:
        threshold = np.partition(scores, n_cols - kk, axis=1)[:, n_cols - kk]
    # A row with fewer than k finite cells has a -inf threshold; never let -inf cells through.
    threshold = np.maximum(threshold, np.finfo(scores.dtype).min)
    flat = np.flatnonzero(scores >= threshold[:, None])
    rows, cols = np.divmod(flat, n_cols)
    vals = scores.ravel()[flat]
    rows, cols, vals = (a[_order_rows_best_first(rows, cols, vals)] for a in (rows, cols, vals))
    row_start = np.searchsorted(rows, np.arange(n_rows))
    position = np.arange(len(rows)) - row_start[rows]
    keep = position < k
    indices[rows[keep], position[keep]] = cols[keep]
    values[rows[keep], position[keep]] = vals[keep]
    return indices, values


def _order_rows_best_first(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Order of candidates by row, then score descending, then column (ascending)."""
    if vals.dtype != np.float32:
        return np.lexsort((cols, -vals, rows))
    # One stable sort of a uint64 key is ~10x faster than a three-key lexsort: the row in the high
    # half, the float32 bits made order-preserving and inverted (descending) in the low half; ties
    # keep their column order because candidates arrive row-major and the sort is stable.
    bits = (vals + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0: equal scores tie
    flip = np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    descending = ~(bits ^ flip)
    key = (rows.astype(np.uint64) << np.uint64(32)) | descending.astype(np.uint64)
    return np.argsort(key, kind="stable")


def block_cells(scores: np.ndarray, blocked: sp.csr_matrix) -> None:
    """Set ``scores[u, i] = -inf`` in place for every stored cell of ``blocked`` (same shape)."""
    if blocked.nnz:
        rows = np.repeat(np.arange(blocked.shape[0]), np.diff(blocked.indptr))
        scores[rows, blocked.indices] = -np.inf


def merge_ranked(first: np.ndarray, second: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the valid entries of ``first``, then those of ``second`` not already taken; first k.

    Parameters
    ----------
    first, second : ndarray of int, shapes (rows, a) and (rows, b)
        Ranked column indices with ``-1`` padding.
    k : int

    Returns
    -------
    merged : ndarray of int32, shape (rows, k)
        ``-1`` padded.
    from_first : ndarray of bool, shape (rows, k)
        True where the entry came from ``first``.
    """
    n_rows = first.shape[0]
    second = second.copy()
    if first.shape[1] and second.shape[1]:
        duplicate = (second[:, :, None] == first[:, None, :]).any(axis=2)
        second[duplicate] = -1
    combined = np.concatenate([first, second], axis=1).astype(np.int32)
    source = np.concatenate(
        [np.ones(first.shape, dtype=bool), np.zeros(second.shape, dtype=bool)],
        axis=1,
    )
    order = np.argsort(combined < 0, axis=1, kind="stable")[:, :k]
    merged = np.take_along_axis(combined, order, axis=1)
    from_first = np.take_along_axis(source, order, axis=1) & (merged >= 0)
    if merged.shape[1] < k:
        pad = k - merged.shape[1]
        merged = np.concatenate([merged, np.full((n_rows, pad), -1, np.int32)], axis=1)
        from_first = np.concatenate([from_first, np.zeros((n_rows, pad), bool)], axis=1)
    return merged, from_first


def popularity_keys(
    user_categories: np.ndarray, item_category: np.ndarray, popularity_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Onboarding ranking keys: items of the user's categories first, each group by popularity.

    Parameters
    ----------
    user_categories : ndarray of bool, shape (rows, n_categories + 1)
        True where the user touched a category; the last column stands for "no category" and is
        always False.
    item_category : ndarray of int, shape (items,)
        Category code per item, ``n_categories`` for items without one.
    popularity_score : ndarray of float32, shape (items,)
        Popularity scaled into [0, 1].

    Returns
    -------
    keys : ndarray of float32, shape (rows, items)
        ``popularity_score + 2 * in_category``: ranks in-category items above every other one.
    in_category : ndarray of bool, shape (rows, items)
    """
    in_category = user_categories[:, item_category]
    keys = in_category.astype(np.float32)
    keys *= 2.0
    keys += popularity_score[None, :]
    return keys, in_category


def item_fresh_since(
    first_seen: np.ndarray,
    history: Sequence[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """When each item last became new or came back in stock, as far as the evidence shows.

    Parameters
    ----------
    first_seen : ndarray of int64, shape (items,)
        First event on the item (unix seconds), :data:`~training.segments.NO_TIME` when none: before
        it, nobody had seen the item, so to anyone gone by then it is new.
    history : sequence of ``(snapshot_time, present, available)``
        Earlier catalogue snapshots (older model artifacts; the model's own catalogue when a fresher
        one is given), each with bool arrays over the current items: was the item in that catalogue,
        and was it in stock. An item missing or out of stock at ``snapshot_time`` that is in stock
        now is new / back in stock since then.

    Returns
    -------
    fresh_since : ndarray of int64
        The latest moment the item was not yet (or no longer) available; an item is new to a
        user whose last visit is earlier than this. ``NO_TIME`` when there is no evidence.
    back_in_stock : ndarray of bool
        True when that latest evidence is an out-of-stock snapshot (the item existed before).
    """
    fresh_since = np.asarray(first_seen, dtype=np.int64).copy()
    back_in_stock = np.zeros(len(fresh_since), dtype=bool)
    for snapshot_time, present, available in sorted(history, key=lambda h: h[0]):
        missing = ~(present & available)
        later = missing & (snapshot_time > fresh_since)
        fresh_since[later] = snapshot_time
        back_in_stock[later] = present[later]
    return fresh_since, back_in_stock


def winback_picks(
    scores: np.ndarray,
    last_seen: np.ndarray,
    user_categories: np.ndarray,
    item_category: np.ndarray,
    fresh_since: np.ndarray,
    slots: int,
) -> np.ndarray:
    """Up to ``slots`` items per user that are new to them and in one of their categories.

    Parameters
    ----------
    scores : ndarray, shape (rows, items)
        Filtered ranking scores (``-inf`` = not allowed); win-back picks are ordered by them.
    last_seen : ndarray of int64, shape (rows,)
        Each user's last event.
    user_categories : ndarray of bool, shape (rows, n_categories + 1)
    item_category : ndarray of int, shape (items,)
        ``n_categories`` for items without a category.
    fresh_since : ndarray of int64, shape (items,)
        From :func:`item_fresh_since`.
    slots : int

    Returns
    -------
    ndarray of int32, shape (rows, slots)
        Item columns, best first, ``-1`` padded.
    """
    n_rows = scores.shape[0]
    none = np.full((n_rows, slots), -1, dtype=np.int32)
    if n_rows == 0 or slots <= 0:
        return none
    no_category = user_categories.shape[1] - 1
    candidates = np.flatnonzero((fresh_since > last_seen.min()) & (item_category != no_category))
    if not len(candidates):
        return none
    sub = scores[:, candidates]
    allowed = (fresh_since[candidates][None, :] > last_seen[:, None]) & user_categories[
        :, item_category[candidates]
    ]
    sub[~allowed] = -np.inf
    picks, _ = top_k_rows(sub, slots)
    return np.where(picks >= 0, candidates[np.maximum(picks, 0)], -1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# The frequency-cap ledger
# ------------------------------------------------------------------------------------------------


class ExportLedger:
    """Durable record of what every export sent, for frequency capping across runs.

    One Parquet file per export under ``<var_dir>/exports/ledger/<export_id>.parquet`` with the
    columns ``user_id, item_id`` and the export's metadata in the schema. Files: a batch job's
    record belongs next to the files it wrote, needs no server, survives a Redis flush, and a
    dictionary-encoded Parquet of 1.6M pairs is a few MB (in the serving Redis it would cost
    ~100 MB of the memory the storefront needs). Writes are temp + fsync + rename.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / "ledger"

    def records(self) -> list[Path]:
        """Committed records, oldest first (export ids sort by time)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.parquet") if not p.name.startswith("."))

    def recent(self, count: int) -> list[Path]:
        return self.records()[-count:] if count > 0 else []

    def sent_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(user_ids, item_ids)`` sent by the last ``count`` exports (object arrays)."""
        import pyarrow.parquet as pq

        users, items = [], []
        for path in self.recent(count):
            table = pq.read_table(path, columns=["user_id", "item_id"])
            users.append(table.column("user_id").combine_chunks().cast(pa.string()))
            items.append(table.column("item_id").combine_chunks().cast(pa.string()))
        if not users:
            return np.zeros(0, dtype=object), np.zeros(0, dtype=object)
        return (
            pa.concat_arrays(users).to_numpy(zero_copy_only=False),
            pa.concat_arrays(items).to_numpy(zero_copy_only=False),
        )

    def metadata(self, path: Path) -> dict[str, Any]:
        import pyarrow.parquet as pq

        raw = pq.ParquetFile(path).metadata.metadata or {}
        return json.loads(raw.get(b"recsvc_export", b"{}"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the exclusive export lock; raise :class:`ExportLocked` if another export holds it.

        A cap is only a cap if two exports never read the ledger at the same time. ``flock`` is
        released by the kernel when the process dies, so a killed export never leaves it stuck.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ExportLocked(
                    f"another export is running ({holder}); lock {self.root / '.lock'}"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {_now_iso()}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def writer(self, export_id: str) -> LedgerWriter:
        return LedgerWriter(self, export_id)

    def prune(self, keep: int = LEDGER_KEEP) -> list[str]:
        doomed = self.records()[:-keep] if keep > 0 else self.records()
        for path in doomed:
            path.unlink(missing_ok=True)
        return [p.stem for p in doomed]


class LedgerWriter:
    """Streams one export's ``(user_id, item_id)`` pairs to a temp file; :meth:`commit` publishes."""

    SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string())])

    def __init__(self, ledger: ExportLedger, export_id: str):
        import pyarrow.parquet as pq

        ledger.dir.mkdir(parents=True, exist_ok=True)
        self.final = ledger.dir / f"{export_id}.parquet"
        self.tmp = ledger.dir / f".{export_id}.parquet.part"
        self._writer = pq.ParquetWriter(self.tmp, self.SCHEMA, compression="zstd", use_dictionary=True)
        self._closed = False

    def write(self, user_ids: pa.Array, item_ids: pa.Array) -> None:
        self._writer.write_table(pa.table([user_ids, item_ids], schema=self.SCHEMA))

    def close(self, metadata: dict[str, Any]) -> None:
        # Metadata is known only at the end; Parquet keeps it in the footer, written on close.
        self._writer.add_key_value_metadata({"recsvc_export": json.dumps(metadata)})
        self._writer.close()
        self._closed = True
        _fsync_path(self.tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        if not self._closed:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - already failing; the temp file is removed below
                pass
        self.tmp.unlink(missing_ok=True)


class ExportLocked(RuntimeError):
    """Another export holds the ledger lock."""


class ExportInputError(ValueError):
    """Bad input for an export (unknown segment, bad option, missing model...)."""


# ------------------------------------------------------------------------------------------------
# Row writers: a hidden temp file, renamed into place only when complete
# ------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def temp_path_for(out: Path, export_id: str) -> Path:
    """Where an export is written before the rename: hidden, and named so it never looks final."""
    return out.with_name(f".{out.name}.{export_id}.part")


class RowWriter:
    """Writes row tables as CSV (pyarrow) or JSON lines to a temp file beside ``out``."""

    def __init__(self, out: Path, export_id: str, fmt: str, schema: pa.Schema):
        if fmt not in FORMATS:
            raise ExportInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.out, self.fmt, self.schema = out, fmt, schema
        self.tmp = temp_path_for(out, export_id)
        self._file = open(self.tmp, "wb")
        self._csv = None
        if fmt == "csv":
            from pyarrow import csv as pacsv

            self._csv = pacsv.CSVWriter(
                self._file,
                schema,
                write_options=pacsv.WriteOptions(include_header=True, quoting_style="needed"),
            )
        self._json_keys = [json.dumps(name) for name in schema.names]

    def write(self, table: pa.Table) -> None:
        if self._csv is not None:
            self._csv.write_table(table)
            return
        # JSON lines built column-wise by pyarrow: one json.dumps per row would cost more than
        # the ranking. Strings are pre-escaped (see ``_json_string``); numbers print as-is.
        parts: list[Any] = []
        for position, (name, column) in enumerate(zip(self._json_keys, table.columns, strict=True)):
            parts.append(("{" if position == 0 else ",") + name + ":")
            parts.append(_json_column(column.combine_chunks()))
        parts.append("}\n")
        lines = pc.binary_join_element_wise(*parts, "")
        whole = pc.binary_join(pa.ListArray.from_arrays([0, len(lines)], lines), "")
        self._file.write(whole[0].as_buffer())

    def commit(self) -> Path:
        self.close()
        _fsync_path(self.tmp)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        return self.out

    def close(self) -> None:
        if self._file.closed:
            return
        if self._csv is not None:
            self._csv.close()
        self._file.flush()
        self._file.close()

    def abort(self) -> None:
        try:
            self.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _json_column(column: pa.Array) -> pa.Array:
    if pa.types.is_string(column.type):
        # Ids, names and versions need no escaping (id alphabet); titles are escaped once per
        # item before the take (see run_export).
        return pc.if_else(pc.is_null(column), "null", pc.binary_join_element_wise('"', column, '"', ""))
    text = pc.cast(column, pa.string())
    return pc.if_else(pc.is_null(text), "null", text)


def _json_string(value: str) -> str:
    """The inside of a JSON string literal (no surrounding quotes)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def clean_stale_parts(out: Path, max_age_s: float = 0.0) -> list[Path]:
    """Remove temp files of earlier killed exports to the same ``out`` (none is ever complete)."""
    removed = []
    for path in out.parent.glob(f".{out.name}.*.part"):
        if time.time() - path.stat().st_mtime >= max_age_s:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------
# Preparing an export: who, what they may get, what is fresh
# ------------------------------------------------------------------------------------------------


class CatalogLike(Protocol):
    """A current catalogue: per-item arrays (what ``training.events.load_catalog`` returns)."""

    item_id: np.ndarray
    title: np.ndarray
    price: np.ndarray
    available: np.ndarray


def snapshot_time(manifest: dict[str, Any]) -> int | None:
    """The moment an artifact's catalogue describes: ``trained_until``, else ``created_at``."""
    if manifest.get("trained_until") is not None:
        return int(manifest["trained_until"])
    created = manifest.get("created_at")
    if created:
        try:
            return int(_dt.datetime.fromisoformat(str(created)).timestamp())
        except ValueError:
            return None
    return None


@dataclass
class ExportSummary:
    """What an export did; printed as one JSON line by the CLI."""

    export_id: str
    segment: str
    out: str
    format: str
    model_version: str
    users: int
    rows: int
    users_without_picks: int
    n: int
    cap_last: int
    capped_pairs: int
    reasons: dict[str, int]
    segment_sizes: dict[str, int]
    as_of: int
    seconds: float = 0.0
    users_per_s: float = 0.0
    with_bundles: bool = False
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        out = asdict(self)
        out.update(out.pop("extra"))
        return json.dumps(out, sort_keys=True)


def new_export_id(now: _dt.datetime | None = None) -> str:
    """Unique, and sorting by name sorts by time (the ledger's "last K" relies on it).

    ``20261122T193000.123456Z-3f9a1c``: microseconds, because two exports can finish within one
    second (the ledger lock serialises them, so they never share a microsecond).
    """
    now = now or _dt.datetime.now(_dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(3)}"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class _Plan:
    """Everything chunked ranking needs, indexed by export position (users) and column (items)."""

    user_ids: np.ndarray  # export order: warm users, then cold users
    segment: np.ndarray  # int8 segment code per export user
    model_row: np.ndarray  # user row in the model, -1 = cold or onboarding
    last_seen: np.ndarray
    n_warm: int
    columns: np.ndarray  # model item index of every rankable (in stock) item
    item_category: np.ndarray  # per column; n_categories = none
    popularity_score: np.ndarray  # per column, [0, 1]
    fresh_since: np.ndarray  # per column
    back_in_stock: np.ndarray  # per column
    user_categories: sp.csr_matrix  # (users, n_categories + 1) bool
    blocked: sp.csr_matrix  # (users, columns): bought or capped
    capped_pairs: int


def _prepare(
    artifact: Artifact,
    events: EventsLike,
    table: SegmentTable,
    segment: str,
    available: np.ndarray,
    history: Sequence[tuple[int, np.ndarray, np.ndarray]],
    sent: tuple[np.ndarray, np.ndarray],
    config: Config,
) -> _Plan:
    n_categories = len(artifact.categories)
    members = np.flatnonzero(table.mask(segment))
    user_ids = table.user_ids[members]
    segment_code = table.segment[members]
    model_row = artifact.user_index().positions(user_ids)
    # New users get onboarding picks even when the model knows them (spec), so they rank as cold.
    model_row[segment_code == NEW] = -1
    order = np.lexsort((np.arange(len(members)), model_row < 0))  # warm first, id order within
    members, user_ids, segment_code, model_row = (
        members[order],
        user_ids[order],
        segment_code[order],
        model_row[order],
    )
    n_users = len(members)
    position_of_table_row = np.full(len(table), -1, dtype=np.int64)
    position_of_table_row[members] = np.arange(n_users)

    columns = np.flatnonzero(available).astype(np.int64)
    column_of_item = np.full(artifact.n_items, -1, dtype=np.int64)
    column_of_item[columns] = np.arange(len(columns))
    item_category = np.where(artifact.category >= 0, artifact.category, n_categories).astype(np.int64)

    # Events mapped once: export position of the user (-1: not exported), model index of the item.
    event_user = np.where(table.event_user >= 0, position_of_table_row[table.event_user], -1)
    event_item = artifact.item_index().positions(np.asarray(events.item_id, dtype=object))
    timestamp = np.asarray(events.timestamp, dtype=np.int64)
    known_item = event_item >= 0

    # First event per item: before it nobody had seen the item.
    first_seen = np.full(artifact.n_items, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_seen, event_item[known_item], timestamp[known_item])
    first_seen[first_seen == np.iinfo(np.int64).max] = NO_TIME
    fresh_since, back_in_stock = item_fresh_since(first_seen, history)

    # Categories each user touched (any event up to as_of): win-back and onboarding both use them.
    # (event_user is -1 after as_of, so the future never leaks into "their categories".)
    touched = (event_user >= 0) & known_item
    touched[touched] = item_category[event_item[touched]] < n_categories
    user_categories = sp.csr_matrix(
        (np.ones(int(touched.sum()), dtype=bool), (event_user[touched], item_category[event_item[touched]])),
        shape=(n_users, n_categories + 1),
        dtype=bool,
    )

    # Already bought: purchases in the events (any time: never re-sell what was bought after
    # as_of either) and in the model's purchase matrix; repurchase categories are exempt.

    repurchasable = np.zeros(n_categories + 1, dtype=bool)
    for name in config.serving.repurchase_categories:
        if name in artifact.categories:
            repurchasable[artifact.categories.index(name)] = True
    event_user_any_time = _user_positions(table, user_ids, events, event_user)
    bought = (event_user_any_time >= 0) & known_item & (np.asarray(events.event) == PURCHASE)
    rows = [event_user_any_time[bought]]
    cols = [event_item[bought]]
    warm = np.flatnonzero(model_row >= 0)
    if len(warm):
        model_purchases = artifact.purchases[model_row[warm]].tocoo()
        rows.append(warm[model_purchases.row])
        cols.append(model_purchases.col.astype(np.int64))
    rows_all, items_all = np.concatenate(rows), np.concatenate(cols)
    keep = ~repurchasable[item_category[items_all]]
    rows_all, items_all = rows_all[keep], items_all[keep]

    # Frequency cap: what the last K exports sent to these users.
    sent_users, sent_items = sent
    capped_pairs = 0
    if len(sent_users):
        sent_user_pos = IdMap(user_ids).positions(sent_users)
        sent_item = artifact.item_index().positions(sent_items)
        ok = (sent_user_pos >= 0) & (sent_item >= 0)
        capped_pairs = int(ok.sum())
        rows_all = np.concatenate([rows_all, sent_user_pos[ok]])
        items_all = np.concatenate([items_all, sent_item[ok]])
    blocked_cols = column_of_item[items_all]
    rankable = blocked_cols >= 0
    blocked = sp.csr_matrix(
        (np.ones(int(rankable.sum()), dtype=np.float32), (rows_all[rankable], blocked_cols[rankable])),
        shape=(n_users, len(columns)),
    )
    blocked.sum_duplicates()

    pop = artifact.popularity[columns].astype(np.float32)
    top = float(pop.max()) if len(pop) else 0.0
    popularity_score = pop / top if top > 0 else np.zeros_like(pop)

    return _Plan(
        user_ids=user_ids,
        segment=segment_code,
        model_row=model_row,
        last_seen=table.last_seen[members],
        n_warm=int((model_row >= 0).sum()),
        columns=columns,
        item_category=item_category[columns],
        popularity_score=popularity_score,
        fresh_since=fresh_since[columns],
        back_in_stock=back_in_stock[columns],
        user_categories=user_categories,
        blocked=blocked,
        capped_pairs=capped_pairs,
    )


def _user_positions(table: SegmentTable, user_ids: np.ndarray, events: EventsLike, event_user: np.ndarray):
    """Export position of every event's user, including events after ``as_of``."""
    late = table.event_user < 0
    if not late.any():
        return event_user
    out = event_user.copy()
    out[late] = IdMap(user_ids).positions(np.asarray(events.user_id, dtype=object)[late])
    return out


def default_threads() -> int:
    """Ranking threads: the CPU cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@contextmanager
def _single_threaded_blas(enabled: bool) -> Iterator[None]:
    """One BLAS thread per ranking thread: parallel chunks, not threads fighting over cores."""
    if not enabled:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        yield


def chunk_rows(n_columns: int, memory_mb: int) -> int:
    """Users per chunk so that one chunk's working set (``n_columns`` cells a user) fits ``memory_mb``."""
    budget = memory_mb * (1 << 20)
    return int(max(16, min(65_536, budget // max(1, n_columns * BYTES_PER_CELL))))


def _rank_chunk(
    plan: _Plan, item_factors: np.ndarray, user_factors: np.ndarray, lo: int, hi: int, n: int, slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Picks for export users ``lo:hi`` (all warm or all cold): columns, scores, reason codes."""
    warm = lo < plan.n_warm
    rows = hi - lo
    if len(plan.columns) == 0:  # nothing in stock: nobody gets a pick
        return np.full((rows, n), -1, np.int32), np.zeros((rows, n)), np.zeros((rows, n), np.int8)
    blocked = plan.blocked[lo:hi]
    dormant = np.flatnonzero(plan.segment[lo:hi] == DORMANT)
    # Categories are only needed for onboarding (cold) and win-back (dormant) users.
    need_categories = not warm or (len(dormant) and slots > 0)
    categories = plan.user_categories[lo:hi].toarray() if need_categories else None
    in_category = None
    if warm:
        scores = user_factors[plan.model_row[lo:hi]] @ item_factors.T
    else:
        assert categories is not None  # need_categories is true for cold users
        scores, in_category = popularity_keys(categories, plan.item_category, plan.popularity_score)
    block_cells(scores, blocked)

    top, _ = top_k_rows(scores, n)
    picks, from_winback = top, np.zeros(top.shape, dtype=bool)
    if len(dormant) and slots > 0:
        assert categories is not None  # need_categories is true when win-back runs
        wb = winback_picks(
            scores[dormant],
            plan.last_seen[lo:hi][dormant],
            categories[dormant],
            plan.item_category,
            plan.fresh_since,
            slots,
        )
        merged, from_first = merge_ranked(wb, top[dormant], n)
        picks = top.copy()
        picks[dormant] = merged
        from_winback[dormant] = from_first

    valid = picks >= 0
    safe = np.where(valid, picks, 0)
    row_index = np.broadcast_to(np.arange(rows)[:, None], picks.shape)
    if warm:
        pick_scores = scores[row_index, safe]
        reason = np.full(picks.shape, PERSONALIZED, dtype=np.int8)
    else:
        pick_scores = plan.popularity_score[safe]
        assert in_category is not None  # set for cold users above
        hit = in_category[row_index, safe]
        is_new = (plan.segment[lo:hi] == NEW)[:, None]
        reason = np.where(
            is_new,
            np.where(hit, ONBOARDING_CATEGORY, ONBOARDING_POPULAR),
            np.where(hit, POPULAR_IN_CATEGORY, POPULAR),
        ).astype(np.int8)
    reason = np.where(
        from_winback, np.where(plan.back_in_stock[safe], WINBACK_BACK_IN_STOCK, WINBACK_NEW), reason
    ).astype(np.int8)
    return picks, pick_scores.astype(np.float64), reason


class AnchorBundles:
    """Bundles per anchor item, assembled by :mod:`recsvc.core.bundles` (the storefront's own rules).

    An email bundle is the offer ``GET /v1/items/<item>/bundle`` shows for the same item: same
    companions (co-purchase, then similarity, then popular pairings; in stock; category rules), same
    price (``bundle_discount_rule`` / ``bundle_discount_pct``). Computed once per distinct picked
    item and cached, so a campaign of a million rows assembles at most one bundle per item.
    """

    def __init__(
        self, artifact: Artifact, available: np.ndarray, price: np.ndarray, titles: list[str], config: Config
    ):

        self.catalog = BundleCatalog(
            item_ids=artifact.item_ids,
            item_factors=artifact.item_factors,
            price=price.astype(np.float32),
            available=available,
            category=artifact.category,
            popularity=artifact.popularity,
            bundles=artifact.bundles,
            categories=artifact.categories,
            titles=titles,
        )
        self.rules = BundleRules.from_config(config)
        self._ids: dict[int, str | None] = {}
        self._price: dict[int, float] = {}

    def columns(self, items: np.ndarray, item_ids: list[str]) -> tuple[pa.Array, pa.Array]:
        """``bundle_item_ids`` (``|``-separated companions; null: no bundle) and ``bundle_price``."""

        for item in np.unique(items).tolist():
            if item in self._ids:
                continue
            bundle = assemble_bundle(self.catalog, item, self.rules)
            companions = bundle.companions if bundle is not None else []
            self._ids[item] = "|".join(item_ids[c] for c in companions) if companions else None
            offer = bundle.offer.bundle_price if bundle is not None and companions else None
            self._price[item] = math.nan if offer is None else float(offer)
        ids = pa.array([self._ids[i] for i in items.tolist()], type=pa.string())
        prices = pa.array(
            np.fromiter((self._price[i] for i in items.tolist()), np.float64, len(items)), from_pandas=True
        )
        return ids, prices


def _row_table(
    plan: _Plan,
    artifact: Artifact,
    lo: int,
    picks: np.ndarray,
    scores: np.ndarray,
    reason: np.ndarray,
    strings: dict[str, pa.Array],
    price: np.ndarray,
    bundles: AnchorBundles | None,
) -> tuple[pa.Table, pa.Array, pa.Array]:
    valid = picks >= 0
    row, rank0 = mask_positions(valid)
    item = plan.columns[picks[row, rank0]]
    user_pos = lo + row
    take = pa.array(user_pos)
    user_ids = strings["user_ids"].take(take)
    item_take = pa.array(item)
    item_ids = strings["item_ids"].take(item_take)
    constant = pa.array(np.zeros(len(row), dtype=np.int8))
    arrays = [
        user_ids,
        strings["segments"].take(pa.array(plan.segment[user_pos])),
        pa.array((rank0 + 1).astype(np.int16)),
        item_ids,
        strings["titles"].take(item_take),
        pa.array(np.round(price[item].astype(np.float64), 4), from_pandas=True),
        pa.array(np.round(scores[row, rank0], 6)),
        strings["reasons"].take(pa.array(reason[row, rank0])),
        strings["model_version"].take(constant),
        strings["export_id"].take(constant),
    ]
    names = list(COLUMNS)
    if bundles is not None:
        arrays += list(bundles.columns(item, artifact.item_ids))
        names += list(BUNDLE_COLUMNS)
    return pa.table(arrays, names=names), user_ids, item_ids


def _write_chunk(
    writer: RowWriter,
    ledger_writer: LedgerWriter | None,
    rows: pa.Table,
    user_ids: pa.Array,
    item_ids: pa.Array,
) -> None:
    if rows.num_rows:
        writer.write(rows)
        if ledger_writer is not None:
            ledger_writer.write(user_ids, item_ids)


def _schema(with_bundles: bool) -> pa.Schema:
    fields = [
        ("user_id", pa.string()),
        ("segment", pa.string()),
        ("rank", pa.int16()),
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("price", pa.float64()),
        ("score", pa.float64()),
        ("reason", pa.string()),
        ("model_version", pa.string()),
        ("export_id", pa.string()),
    ]
    if with_bundles:
        fields += [("bundle_item_ids", pa.string()), ("bundle_price", pa.float64())]
    return pa.schema(fields)


def current_availability(
    artifact: Artifact, catalog: CatalogLike | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(available, price, titles)`` per model item: the fresher catalogue's when given.

    An item the model knows but the catalogue no longer lists cannot be sold: unavailable.
    """
    if catalog is None:
        return artifact.available.astype(bool), artifact.price.astype(np.float64), list(artifact.titles)
    position = IdMap(catalog.item_id).positions(artifact.item_ids)
    listed = position >= 0
    safe = np.maximum(position, 0)
    available = listed & np.asarray(catalog.available, dtype=bool)[safe]
    price = np.where(listed, np.asarray(catalog.price, dtype=np.float64)[safe], np.nan)
    catalog_titles = np.asarray(catalog.title, dtype=object)
    titles = [
        str(catalog_titles[p]) if p >= 0 and catalog_titles[p] not in (None, "") else artifact.titles[i]
        for i, p in enumerate(position)
    ]
    return available, price, titles


def catalogue_history(
    artifact: Artifact, previous: Sequence[Artifact], catalog_given: bool
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Snapshots for :func:`item_fresh_since` over the current model's items."""
    history = []
    index = np.asarray(artifact.item_ids, dtype=object)
    for old in previous:
        when = snapshot_time(old.manifest)
        if when is None:
            continue
        position = old.item_index().positions(index)
        present = position >= 0
        available = present & old.available[np.maximum(position, 0)]
        history.append((when, present, available))
    if catalog_given:
        when = snapshot_time(artifact.manifest)
        if when is not None:
            history.append((when, np.ones(artifact.n_items, bool), artifact.available.astype(bool)))
    return history


def run_export(
    artifact: Artifact,
    events: EventsLike,
    out: str | os.PathLike,
    *,
    segment: str = "all",
    n: int = 8,
    fmt: str = "csv",
    with_bundles: bool = False,
    thresholds: SegmentThresholds | None = None,
    as_of: int | None = None,
    catalog: CatalogLike | None = None,
    previous: Sequence[Artifact] = (),
    ledger: ExportLedger | None = None,
    cap_last: int = 2,
    config: Config | None = None,
    memory_mb: int = 256,
    winback_slots: int | None = None,
    progress: bool | None = None,
    export_id: str | None = None,
    catalog_prices: dict[str, float] | None = None,
    threads: int | None = None,
) -> ExportSummary:
    """Rank, filter and write the picks of every user of ``segment``; record them in ``ledger``.

    Parameters
    ----------
    artifact : Artifact
        The model (normally the live version).
    events : EventsLike
        Purchase/visit history: segments, last visits, categories, already-bought items.
    out : path
        Final file; written as a hidden ``.part`` sibling and renamed when complete.
    segment : str
        One of :data:`~training.segments.SEGMENT_CHOICES`.
    n : int
        Picks per user, 1..100.
    fmt : {"csv", "jsonl"}
    with_bundles : bool
        Add ``bundle_item_ids`` (``|``-separated) and ``bundle_price`` for each pick.
    thresholds, as_of :
        Segmentation rules (:func:`training.segments.compute_segments`).
    catalog : CatalogLike, optional
        Current catalogue: stock, prices and titles fresher than the model's.
    previous : sequence of Artifact
        Older versions, for "new / back in stock since the last visit".
    ledger : ExportLedger, optional
        Frequency cap and record; ``None`` disables both (tests, benchmarks).
    cap_last : int
        Items sent in any of the last ``cap_last`` exports are not sent again (0 = no cap).
    config : Config
        ``repurchase_categories``, bundle size and discount.
    memory_mb : int
        Working-set budget for one chunk of users.
    winback_slots : int, optional
        Most win-back picks per dormant user; default ``ceil(n / 2)``.
    progress : bool, optional
        tqdm bar on stderr; ``None`` = only on a terminal.
    export_id : str, optional
        Default: a new sortable id.
    catalog_prices : dict, optional
        ``item_id -> price`` for purchases without a price (segmentation's monetary value).
    threads : int, optional
        Chunks ranked in parallel (default: CPU cores, at most 8); ``memory_mb`` is shared by them.

    Returns
    -------
    ExportSummary
    """
    from tqdm import tqdm

    started = time.perf_counter()
    config = config or Config()
    if segment not in SEGMENT_CHOICES:
        raise ExportInputError(f"unknown segment {segment!r}; choose one of {', '.join(SEGMENT_CHOICES)}")
    if not 1 <= n <= MAX_N:
        raise ExportInputError(f"--n must be 1..{MAX_N}, got {n}")
    if not 0 <= cap_last <= MAX_CAP_LAST:
        raise ExportInputError(f"--cap-last must be 0..{MAX_CAP_LAST}, got {cap_last}")
    if not MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB:
        raise ExportInputError(f"--memory-mb must be {MIN_MEMORY_MB}..{MAX_MEMORY_MB}, got {memory_mb}")
    if fmt not in FORMATS:
        raise ExportInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    slots = math.ceil(n / 2) if winback_slots is None else int(winback_slots)
    if not 0 <= slots <= n:
        raise ExportInputError(f"--winback-slots must be 0..{n}, got {slots}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportInputError(f"--out {out}: folder {out.parent} does not exist")
    export_id = export_id or new_export_id()

    table = compute_segments(events, as_of, thresholds, catalog_prices)
    available, price, titles = current_availability(artifact, catalog)
    history = catalogue_history(artifact, previous, catalog is not None)
    sent = ledger.sent_pairs(cap_last) if ledger is not None else (np.zeros(0, object), np.zeros(0, object))
    plan = _prepare(artifact, events, table, segment, available, history, sent, config)
    bundles = AnchorBundles(artifact, available, price, titles, config) if with_bundles else None

    item_factors = np.ascontiguousarray(artifact.item_factors[plan.columns])
    strings = {
        "user_ids": pa.array(plan.user_ids, type=pa.string()),
        "item_ids": pa.array(artifact.item_ids, type=pa.string()),
        "titles": pa.array(titles if fmt == "csv" else [_json_string(t) for t in titles], type=pa.string()),
        "segments": pa.array(SEGMENTS, type=pa.string()),
        "reasons": pa.array(REASONS, type=pa.string()),
        "model_version": pa.array([artifact.version], type=pa.string()),
        "export_id": pa.array([export_id], type=pa.string()),
    }
    schema = _schema(with_bundles)
    # A chunk holds a score row per user plus a dense row of category flags (onboarding, win-back);
    # `threads` chunks are ranked at once, so each gets its share of the budget.
    threads = default_threads() if threads is None else threads
    if not 1 <= threads <= MAX_THREADS:
        raise ExportInputError(f"--threads must be 1..{MAX_THREADS}, got {threads}")
    step = chunk_rows(len(plan.columns) + plan.user_categories.shape[1], max(1, memory_mb // threads))
    n_users = len(plan.user_ids)
    reasons = np.zeros(len(REASONS), dtype=np.int64)
    rows_written = 0
    users_without = 0

    if ledger is not None:  # the ledger lock is held: no other export can be writing these
        clean_stale_parts(out)
    writer = RowWriter(out, export_id, fmt, schema)
    ledger_writer = ledger.writer(export_id) if ledger is not None else None
    try:
        # disable=None: tqdm shows the bar only when stderr is a terminal (not under cron).
        disable = None if progress is None else not progress
        bar = tqdm(total=n_users, unit="user", disable=disable, file=sys.stderr)
        # Ranking runs on `threads` worker threads, each on its own chunk with a single-threaded
        # BLAS (numpy releases the GIL in matmul, reductions, comparisons and sorts), the way
        # implicit parallelises; chunks are consumed in order. Writing (pyarrow, GIL released)
        # overlaps both; at most WRITE_AHEAD chunks wait for the writer, so memory stays bounded.
        ranges = [
            (lo, min(group_hi, lo + step))
            for group_lo, group_hi in ((0, plan.n_warm), (plan.n_warm, n_users))
            for lo in range(group_lo, group_hi, step)
        ]

        def rank(lo: int, hi: int) -> tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
            return lo, hi, _rank_chunk(plan, item_factors, artifact.user_factors, lo, hi, n, slots)

        pending: deque[Future] = deque()
        ranking: deque[Future] = deque()
        upcoming = iter(ranges)
        with (
            bar,
            _single_threaded_blas(threads > 1),
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="export-rank") as rankers,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer") as writers,
        ):
            for lo, hi in itertools.islice(upcoming, threads):
                ranking.append(rankers.submit(rank, lo, hi))
            while ranking:
                lo, hi, (picks, scores, reason) = ranking.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    ranking.append(rankers.submit(rank, *following))
                users_without += int((picks[:, 0] < 0).sum())
                rows, user_col, item_col = _row_table(
                    plan, artifact, lo, picks, scores, reason, strings, price, bundles
                )
                pending.append(writers.submit(_write_chunk, writer, ledger_writer, rows, user_col, item_col))
                while len(pending) > WRITE_AHEAD:
                    pending.popleft().result()
                reasons += np.bincount(reason[picks >= 0], minlength=len(REASONS))
                rows_written += rows.num_rows
                bar.update(hi - lo)
            while pending:
                pending.popleft().result()
        summary = ExportSummary(
            export_id=export_id,
            segment=segment,
            out=str(out),
            format=fmt,
            model_version=artifact.version,
            users=n_users,
            rows=rows_written,
            users_without_picks=users_without,
            n=n,
            cap_last=cap_last if ledger is not None else 0,
            capped_pairs=plan.capped_pairs,
            reasons={name: int(reasons[code]) for code, name in enumerate(REASONS)},
            segment_sizes=table.sizes(),
            as_of=table.as_of,
            with_bundles=with_bundles,
        )
        writer.close()
        if ledger_writer is not None:
            meta = {k: v for k, v in asdict(summary).items() if k not in ("extra", "seconds", "users_per_s")}
            meta["created_at"] = _now_iso()
            ledger_writer.close(meta)
            # Record first, then publish the file: a crash in between caps items that were never
            # sent (harmless) rather than leaving a sent file unrecorded (a user mailed twice).
            ledger_writer.commit()
        writer.commit()
    except BaseException:
        writer.abort()
        if ledger_writer is not None:
            ledger_writer.abort()
        raise
    if ledger is not None:
        ledger.prune(max(LEDGER_KEEP, cap_last))
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.users_per_s = round(n_users / summary.seconds, 1) if summary.seconds > 0 else 0.0
    return summary


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def resolve_model(config: Config, ref: str) -> Path:
    """``live`` (the version Redis serves), ``latest``, a version name or a folder -> version folder."""

    if ref != "live":
        return resolve(config.models_dir, ref)

    client = connect_admin(ensure_redis(config))
    try:
        version = current_version(client)
    finally:
        client.close()
    if not version:
        raise ExportInputError(
            "no live model version in Redis: publish one, or pass --model latest|VERSION|PATH"
        )
    return resolve(config.models_dir, version)


def previous_artifacts(models_dir: Path, current: Path, keep: int) -> list[Artifact]:
    """Up to ``keep`` versions older than ``current`` in ``models_dir`` (for restock detection)."""

    older = [p for p in list_versions(models_dir) if p.name < current.name][-keep:] if keep > 0 else []
    out = []
    for path in older:
        try:
            out.append(read_artifact(path, verify=False))
        except ArtifactError as e:  # a damaged old version only costs restock evidence
            log.warning("skipping %s for restock detection: %s", path, e)
    return out
