"""Email personalization exports: top-N picks for every user of a segment, streamed to CSV or JSONL.

``recsvc export --segment dormant --events events.csv --n 8 --out campaign.csv``

One row per (user, pick): ``user_id, segment, rank, item_id, title, category, price, score, reason,
model_version, export_id`` (plus ``bundle_item_ids, bundle_price`` with ``--with-bundles``).

How picks are made (see docs/batch.md for the full story):

* users known to the model (not ``new``): scored in chunks of users by the model's scorer (the
  blend publishing ranks with, :mod:`recsvc.core.scoring`), filtered, top-N (reason ``personalized``);
* ``dormant`` users: items in their categories that are new or back in stock since their last visit
  are ranked first (reasons ``winback_new`` / ``winback_back_in_stock``), at most ``winback_slots``
  of them, then the personalized picks;
* ``new`` users get onboarding picks: the most popular items of the categories they looked at, then
  the most popular items overall (``onboarding_category`` / ``onboarding_popular``); users the model
  does not know (cold) get the same by popularity (``popular_in_category`` / ``popular``);
* filters: in stock only; never an item the user already bought (except items bought again:
  the learned repurchase rate, ``repurchase_categories``);
  frequency cap -- never an item sent to that user in any of the last ``cap_last`` exports.

The file is written to a hidden temporary name, fsynced, recorded in the export ledger, then renamed
into place, so a killed export never leaves a complete-looking file. The scoring working set is
bounded by the chunk size (``memory_mb``), not by the number of users; rows stream to disk.

The ranking pieces are pure numpy (:mod:`training.export.picks`); the ledger and the file writer
live in :mod:`training.export.ledger` and :mod:`training.export.files`.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recsvc.core.artifact import Artifact, ArtifactError, list_versions, read_artifact, resolve
from recsvc.core.bundles import BundleCatalog, BundleRules, assemble_bundle
from recsvc.core.config import Config
from recsvc.core.contract import PURCHASE
from recsvc.core.ids import IdMap
from recsvc.core.progress import Progress
from recsvc.core.ranking import mask_positions
from recsvc.core.topk import block_cells
from recsvc.storage.connection import connect_admin
from recsvc.storage.embedded import ensure_redis
from recsvc.storage.versions import current_version
from training.export.files import (
    BUNDLE_COLUMNS,
    COLUMNS,
    FORMATS,
    ExportInputError,
    RowWriter,
    clean_stale_parts,
    json_string,
    row_schema,
)
from training.export.ledger import LEDGER_KEEP, MAX_CAP_LAST, ExportLedger, LedgerWriter, now_iso
from training.export.picks import (
    ONBOARDING_CATEGORY,
    ONBOARDING_POPULAR,
    PERSONALIZED,
    POPULAR,
    POPULAR_IN_CATEGORY,
    REASONS,
    WINBACK_BACK_IN_STOCK,
    WINBACK_NEW,
    item_fresh_since,
    merge_ranked,
    popularity_keys,
    top_k_rows,
    winback_picks,
)
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


MAX_N = 100
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


# ------------------------------------------------------------------------------------------------
# The frequency-cap ledger
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Row writers: a hidden temp file, renamed into place only when complete
# ------------------------------------------------------------------------------------------------


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
    # as_of either) and in the model's purchase matrix; items bought again (the learned rate, the
    # operator's repurchase categories) are exempt.
    repurchasable = artifact.repurchasable(
        config.serving.repurchase_min_rate, config.serving.repurchase_categories
    )
    event_user_any_time = _user_positions(table, user_ids, events, event_user)
    bought = (event_user_any_time >= 0) & known_item & (np.asarray(events.event) == PURCHASE)
    rows = [event_user_any_time[bought]]
    cols = [event_item[bought]]
    warm = np.flatnonzero(model_row >= 0)
    if len(warm):
        never = artifact.interactions if artifact.spec().excludes_interacted else artifact.purchases
        model_purchases = never[model_row[warm]].tocoo()
        rows.append(warm[model_purchases.row])
        cols.append(model_purchases.col.astype(np.int64))
    rows_all, items_all = np.concatenate(rows), np.concatenate(cols)
    keep = ~repurchasable[items_all]
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


def _user_scoring(artifact: Artifact, columns: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Scores of the rankable ``columns`` for model users (rows of the artifact), as served."""
    scorer = artifact.scorer()
    if scorer.spec.is_plain_als:
        item_factors = np.ascontiguousarray(artifact.item_factors[columns])
        return lambda rows: artifact.user_factors[rows] @ item_factors.T
    raw = artifact.raw_interactions()
    return lambda rows: scorer.score(raw[rows], artifact.user_factors[rows])[:, columns]


def _rank_chunk(
    plan: _Plan, score_users: Callable[[np.ndarray], np.ndarray], lo: int, hi: int, n: int, slots: int
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
        scores = score_users(plan.model_row[lo:hi])
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
        strings["categories"].take(item_take),
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


def commit_export(writer: RowWriter, ledger_writer: LedgerWriter | None, summary: ExportSummary) -> None:
    """Close the file, record the export in the ledger (when recorded), then publish the file."""
    writer.close()
    if ledger_writer is not None:
        meta = {k: v for k, v in asdict(summary).items() if k not in ("extra", "seconds", "users_per_s")}
        meta["created_at"] = now_iso()
        ledger_writer.close(meta)
        # Record first, then publish the file: a crash in between caps items that were never
        # sent (harmless) rather than leaving a sent file unrecorded (a user mailed twice).
        ledger_writer.commit()
    writer.commit()


def abort_export(writer: RowWriter, ledger_writer: LedgerWriter | None) -> None:
    """Remove what a failed export wrote: its file and its ledger record."""
    writer.abort()
    if ledger_writer is not None:
        ledger_writer.abort()


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


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes: who, how many picks, which format, and its resource budget.

    Attributes
    ----------
    segment : str
        One of :data:`~training.segments.SEGMENT_CHOICES`.
    n : int
        Picks per user, 1..100.
    fmt : {"csv", "jsonl"}
    with_bundles : bool
        Add ``bundle_item_ids`` (``|``-separated) and ``bundle_price`` for each pick.
    thresholds, as_of :
        Segmentation rules (:func:`training.segments.compute_segments`).
    cap_last : int
        Items sent in any of the last ``cap_last`` exports are not sent again (0 = no cap).
    memory_mb : int
        Working-set budget for the chunks of users ranked at once.
    winback_slots : int, optional
        Most win-back picks per dormant user; default ``ceil(n / 2)``.
    threads : int, optional
        Chunks ranked in parallel (default: CPU cores, at most 8); ``memory_mb`` is shared by them.
    progress : bool, optional
        False: no progress; else :mod:`recsvc.core.progress` (a bar on a terminal, log lines otherwise).
    export_id : str, optional
        Default: a new sortable id.
    dry_run : bool
        Write the file but record nothing in the ledger (the cap still applies to it).

    Raises
    ------
    ExportInputError
        An option is out of range (the message names it as the command line does).
    """

    segment: str = "all"
    n: int = 8
    fmt: str = "csv"
    with_bundles: bool = False
    thresholds: SegmentThresholds | None = None
    as_of: int | None = None
    cap_last: int = 2
    memory_mb: int = 256
    winback_slots: int | None = None
    threads: int | None = None
    progress: bool | None = None
    export_id: str | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.segment not in SEGMENT_CHOICES:
            raise ExportInputError(
                f"unknown segment {self.segment!r}; choose one of {', '.join(SEGMENT_CHOICES)}"
            )
        if not 1 <= self.n <= MAX_N:
            raise ExportInputError(f"--n must be 1..{MAX_N}, got {self.n}")
        if not 0 <= self.cap_last <= MAX_CAP_LAST:
            raise ExportInputError(f"--cap-last must be 0..{MAX_CAP_LAST}, got {self.cap_last}")
        if not MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB:
            raise ExportInputError(
                f"--memory-mb must be {MIN_MEMORY_MB}..{MAX_MEMORY_MB}, got {self.memory_mb}"
            )
        if self.fmt not in FORMATS:
            raise ExportInputError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if not 0 <= self.slots <= self.n:
            raise ExportInputError(f"--winback-slots must be 0..{self.n}, got {self.slots}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ExportInputError(f"--threads must be 1..{MAX_THREADS}, got {self.threads}")

    @property
    def slots(self) -> int:
        """Win-back picks per dormant user."""
        return math.ceil(self.n / 2) if self.winback_slots is None else int(self.winback_slots)


def run_export(
    artifact: Artifact,
    events: EventsLike,
    out: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    catalog: CatalogLike | None = None,
    previous: Sequence[Artifact] = (),
    ledger: ExportLedger | None = None,
    config: Config | None = None,
    catalog_prices: dict[str, float] | None = None,
) -> ExportSummary:
    """Rank, filter and write the picks of every user of a segment; record them in ``ledger``.

    Parameters
    ----------
    artifact : Artifact
        The model (normally the live version).
    events : EventsLike
        Purchase/visit history: segments, last visits, categories, already-bought items.
    out : path
        Final file; written as a hidden ``.part`` sibling and renamed when complete.
    options : ExportOptions
        Segment, picks, format, cap, budget (defaults: every user, 8 picks, CSV).
    catalog : CatalogLike, optional
        Current catalogue: stock, prices and titles fresher than the model's.
    previous : sequence of Artifact
        Older versions, for "new / back in stock since the last visit".
    ledger : ExportLedger, optional
        Frequency cap and record; ``None`` disables both (tests, benchmarks).
    config : Config
        ``repurchase_categories``, bundle size and discount.
    catalog_prices : dict, optional
        ``item_id -> price`` for purchases without a price (segmentation's monetary value).

    Returns
    -------
    ExportSummary
    """
    started = time.perf_counter()
    options = options or ExportOptions()
    config = config or Config()
    segment, n, fmt, with_bundles = options.segment, options.n, options.fmt, options.with_bundles
    cap_last, slots, memory_mb = options.cap_last, options.slots, options.memory_mb
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportInputError(f"--out {out}: folder {out.parent} does not exist")
    export_id = options.export_id or new_export_id()

    table = compute_segments(events, options.as_of, options.thresholds, catalog_prices)
    available, price, titles = current_availability(artifact, catalog)
    history = catalogue_history(artifact, previous, catalog is not None)
    sent = ledger.sent_pairs(cap_last) if ledger is not None else (np.zeros(0, object), np.zeros(0, object))
    plan = _prepare(artifact, events, table, segment, available, history, sent, config)
    bundles = AnchorBundles(artifact, available, price, titles, config) if with_bundles else None

    score_users = _user_scoring(artifact, plan.columns)
    strings = {
        "user_ids": pa.array(plan.user_ids, type=pa.string()),
        "item_ids": pa.array(artifact.item_ids, type=pa.string()),
        "titles": pa.array(titles if fmt == "csv" else [json_string(t) for t in titles], type=pa.string()),
        "categories": pa.array(
            [
                None if code < 0 else (name if fmt == "csv" else json_string(name))
                for code in artifact.category.tolist()
                for name in (artifact.categories[code] if code >= 0 else "",)
            ],
            type=pa.string(),
        ),
        "segments": pa.array(SEGMENTS, type=pa.string()),
        "reasons": pa.array(REASONS, type=pa.string()),
        "model_version": pa.array([artifact.version], type=pa.string()),
        "export_id": pa.array([export_id], type=pa.string()),
    }
    schema = row_schema(with_bundles)
    # A chunk holds a score row per user plus a dense row of category flags (onboarding, win-back);
    # `threads` chunks are ranked at once, so each gets its share of the budget.
    threads = default_threads() if options.threads is None else options.threads
    # (a blend scores every item of the catalogue before keeping the rankable columns)
    step = chunk_rows(artifact.n_items + plan.user_categories.shape[1], max(1, memory_mb // threads))
    n_users = len(plan.user_ids)
    reasons = np.zeros(len(REASONS), dtype=np.int64)
    rows_written = 0
    users_without = 0

    clean_stale_parts(out)  # temp files of exports that died (a running one's are locked)
    writer = RowWriter(out, export_id, fmt, schema)
    ledger_writer = ledger.writer(export_id) if ledger is not None and not options.dry_run else None
    try:
        # A bar on a terminal, a log line every few seconds under cron; progress=False: nothing.
        bar = Progress(
            f"export {options.segment}", total=n_users, unit="users", enabled=options.progress is not False
        )
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
            return lo, hi, _rank_chunk(plan, score_users, lo, hi, n, slots)

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
            extra={"dry_run": True} if options.dry_run else {},
        )
        commit_export(writer, ledger_writer, summary)
    except BaseException:
        abort_export(writer, ledger_writer)
        raise
    if ledger is not None and not options.dry_run:
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
