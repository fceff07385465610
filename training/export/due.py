"""Replenishment reminders: ``recsvc export --segment due_for_reorder``.

Every customer with at least one item due within the horizon (probability of a purchase within
``horizon_days`` at least ``repurchase_due_probability``, by the version's repurchase model), with
up to ``n`` such items, most due first. Customers' purchase histories come from the events given
(fresher than the model's), the item parameters and each customer's pace from the model. Items
must be in stock in the current catalogue and not sent to the customer by any of the last
``cap_last`` exports (the frequency cap, as for every segment).

Rows have the columns of every export (``reason`` = ``replenish``, ``score`` = the probability)
plus ``last_bought``, ``expected_next`` (ISO-8601 UTC), ``due_in_days``, ``times_bought`` and
``reason_text`` (the same sentence the buy-again endpoint shows). ``dry_run`` writes the file but
records nothing in the ledger, so it caps nothing later.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsvc.core import repurchase as rebuy
from recsvc.core.artifact import Artifact
from recsvc.core.config import Config
from recsvc.core.ids import IdMap
from training.export.files import (
    FORMATS,
    ExportInputError,
    RowWriter,
    clean_stale_parts,
    json_string,
    row_schema,
)
from training.export.ledger import LEDGER_KEEP, MAX_CAP_LAST, ExportLedger
from training.export.run import (
    MAX_N,
    CatalogLike,
    ExportSummary,
    abort_export,
    commit_export,
    current_availability,
    new_export_id,
)
from training.repurchase import pair_stats, purchase_lines
from training.segments import EventsLike

SEGMENT = "due_for_reorder"
REASON = "replenish"
DUE_COLUMNS: tuple[str, ...] = ("last_bought", "expected_next", "due_in_days", "times_bought", "reason_text")


@dataclass(frozen=True)
class DueExportOptions:
    """What a replenishment export writes.

    Attributes
    ----------
    n : int
        Most due items per customer, 1..100.
    fmt : {"csv", "jsonl"}
    as_of : int, optional
        The moment due-ness is computed for (default: the newest event); later events are ignored.
    horizon_days : float, optional
        Default: ``repurchase_horizon_days``.
    cap_last : int
        Items sent in any of the last ``cap_last`` exports are not sent again (0 = no cap).
    dry_run : bool
        Write the file, record nothing in the ledger.
    export_id : str, optional
    """

    n: int = 8
    fmt: str = "csv"
    as_of: int | None = None
    horizon_days: float | None = None
    cap_last: int = 2
    dry_run: bool = False
    export_id: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise ExportInputError(f"--n must be 1..{MAX_N}, got {self.n}")
        if not 0 <= self.cap_last <= MAX_CAP_LAST:
            raise ExportInputError(f"--cap-last must be 0..{MAX_CAP_LAST}, got {self.cap_last}")
        if self.fmt not in FORMATS:
            raise ExportInputError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.horizon_days is not None and not (math.isfinite(self.horizon_days) and self.horizon_days > 0):
            raise ExportInputError(f"--horizon-days must be a number > 0, got {self.horizon_days}")


@dataclass(frozen=True)
class DuePicks:
    """The due items of every customer, best first within a customer (parallel arrays)."""

    user: np.ndarray  # int64 position in ``user_ids``
    item: np.ndarray  # int64 model item index
    rank: np.ndarray  # int16, 1-based
    probability: np.ndarray
    last: np.ndarray  # int64 unix seconds
    expected_next: np.ndarray  # int64 unix seconds
    due_in_days: np.ndarray
    count: np.ndarray
    reason_text: list[str]
    user_ids: np.ndarray  # object: every customer considered
    capped_pairs: int


def due_picks(
    artifact: Artifact,
    events: EventsLike,
    n: int,
    as_of: int,
    horizon_days: float,
    config: Config,
    available: np.ndarray,
    sent: tuple[np.ndarray, np.ndarray] = (np.zeros(0, object), np.zeros(0, object)),
) -> DuePicks:
    """Up to ``n`` due items per customer at ``as_of`` (pure: no files, no ledger).

    Raises
    ------
    ExportInputError
        The version has no repurchase model (trained before it existed).
    """
    model = artifact.repurchase
    if model is None:
        raise ExportInputError(
            f"model {artifact.version} has no repurchase model: retrain it with this version of recsvc"
        )
    serving = config.serving
    before = np.asarray(events.timestamp, dtype=np.int64) <= as_of
    users = IdMap(np.unique(np.asarray(events.user_id, dtype=object)[before]))
    items = artifact.item_index()
    user, item, ts, order = purchase_lines(events, users, items, until=as_of + 1)
    stats = pair_stats(user, item, ts, order)
    model_row = artifact.user_index().positions(users.ids)
    pace_of_user = np.where(model_row >= 0, model.history.pace[np.maximum(model_row, 0)], 0.0)
    estimate = rebuy.due(
        model.params,
        stats.item,
        stats.last,
        stats.count,
        stats.log_mean,
        as_of,
        horizon_days,
        pace_of_user[stats.user] if len(stats.user) else 0.0,
    )
    top = np.zeros(len(users))
    np.maximum.at(top, stats.user, stats.count.astype(np.float64))
    # Due = the probability's threshold; most due first = the endpoint's order (the ranker's).
    key = rebuy.rank_key(
        model.params, estimate.probability, stats.item, stats.count,
        np.maximum(0.0, (as_of - stats.last) / rebuy.SECONDS_PER_DAY), estimate.interval_days,
        stats.recent, top[stats.user],
    )  # fmt: skip
    keep = available[stats.item] & (estimate.probability >= serving.repurchase_due_probability)
    capped = 0
    sent_users, sent_items = sent
    if len(sent_users):
        n_items = artifact.n_items
        su, si = users.positions(sent_users), items.positions(sent_items)
        ok = (su >= 0) & (si >= 0)
        sent_keys = np.unique(su[ok] * n_items + si[ok])
        blocked = np.isin(stats.user * n_items + stats.item, sent_keys)
        capped = int((keep & blocked).sum())
        keep &= ~blocked
    rows = np.flatnonzero(keep)
    order_rows = rows[np.lexsort((stats.item[rows], -key[rows], stats.user[rows]))]
    u = stats.user[order_rows]
    first = np.searchsorted(u, u, side="left")
    rank = np.arange(len(u)) - first
    chosen = order_rows[rank < n]
    rank = rank[rank < n] + 1
    texts = [
        rebuy.reason(
            int(stats.count[j]),
            float(estimate.interval_days[j]),
            max(0.0, (as_of - float(stats.last[j])) / rebuy.SECONDS_PER_DAY),
            float(estimate.due_in_days[j]),
            float(model.params.rate[stats.item[j]]),
        )
        for j in chosen.tolist()
    ]
    return DuePicks(
        user=stats.user[chosen],
        item=stats.item[chosen],
        rank=rank.astype(np.int16),
        probability=estimate.probability[chosen],
        last=stats.last[chosen],
        expected_next=estimate.expected_next[chosen],
        due_in_days=estimate.due_in_days[chosen],
        count=stats.count[chosen],
        reason_text=texts,
        user_ids=users.ids,
        capped_pairs=capped,
    )


def _iso(seconds: np.ndarray) -> pa.Array:
    return pa.array(
        [
            _dt.datetime.fromtimestamp(int(s), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for s in seconds.tolist()
        ],
        type=pa.string(),
    )


def due_schema() -> pa.Schema:
    base = row_schema(False)
    return pa.schema(
        [
            *base,
            ("last_bought", pa.string()),
            ("expected_next", pa.string()),
            ("due_in_days", pa.float64()),
            ("times_bought", pa.int32()),
            ("reason_text", pa.string()),
        ]
    )


def run_due_export(
    artifact: Artifact,
    events: EventsLike,
    out: str | os.PathLike,
    options: DueExportOptions | None = None,
    *,
    catalog: CatalogLike | None = None,
    ledger: ExportLedger | None = None,
    config: Config | None = None,
) -> ExportSummary:
    """Write the replenishment reminders of every customer with a due item; record them in ``ledger``.

    Parameters
    ----------
    artifact : Artifact
        The model (normally the live version); it must have a repurchase model.
    events : EventsLike
        Purchase history (only purchases up to ``as_of`` count).
    out : path
        Final file; written as a hidden ``.part`` sibling and renamed when complete.
    options : DueExportOptions
    catalog : CatalogLike, optional
        Current catalogue: stock, prices and titles fresher than the model's.
    ledger : ExportLedger, optional
        Frequency cap and record; None disables both.
    config : Config
        ``repurchase_min_rate``, ``repurchase_categories``, ``repurchase_due_probability``,
        ``repurchase_horizon_days``.
    """
    started = time.perf_counter()
    options = options or DueExportOptions()
    config = config or Config()
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportInputError(f"--out {out}: folder {out.parent} does not exist")
    timestamps = np.asarray(events.timestamp, dtype=np.int64)
    as_of = options.as_of if options.as_of is not None else int(timestamps.max()) if len(timestamps) else 0
    horizon = options.horizon_days or config.serving.repurchase_horizon_days
    export_id = options.export_id or new_export_id()
    available, price, titles = current_availability(artifact, catalog)
    sent = (
        ledger.sent_pairs(options.cap_last)
        if ledger is not None
        else (np.zeros(0, dtype=object), np.zeros(0, dtype=object))
    )
    picks = due_picks(artifact, events, options.n, as_of, horizon, config, available, sent)

    fmt = options.fmt
    count = len(picks.user)
    user_ids = pa.array(picks.user_ids[picks.user].tolist(), type=pa.string())
    item_ids = pa.array([artifact.item_ids[i] for i in picks.item.tolist()], type=pa.string())
    title_values = [titles[i] for i in picks.item.tolist()]
    text = picks.reason_text
    table = pa.table(
        [
            user_ids,
            pa.array([SEGMENT] * count, type=pa.string()),
            pa.array(picks.rank, type=pa.int16()),
            item_ids,
            pa.array(
                title_values if fmt == "csv" else [json_string(t) for t in title_values], type=pa.string()
            ),
            pa.array(
                [
                    None if code < 0 else (name if fmt == "csv" else json_string(name))
                    for code in artifact.category[picks.item].tolist()
                    for name in (artifact.categories[code] if code >= 0 else "",)
                ],
                type=pa.string(),
            ),
            pa.array(np.round(price[picks.item].astype(np.float64), 4), from_pandas=True),
            pa.array(np.round(picks.probability.astype(np.float64), 6)),
            pa.array([REASON] * count, type=pa.string()),
            pa.array([artifact.version] * count, type=pa.string()),
            pa.array([export_id] * count, type=pa.string()),
            _iso(picks.last),
            _iso(picks.expected_next),
            pa.array(np.round(picks.due_in_days.astype(np.float64), 1)),
            pa.array(picks.count.astype(np.int32)),
            pa.array(text if fmt == "csv" else [json_string(t) for t in text], type=pa.string()),
        ],
        schema=due_schema(),
    )
    customers = int(np.unique(picks.user).size)
    summary = ExportSummary(
        export_id=export_id,
        segment=SEGMENT,
        out=str(out),
        format=fmt,
        model_version=artifact.version,
        users=customers,
        rows=count,
        users_without_picks=0,
        n=options.n,
        cap_last=options.cap_last if ledger is not None else 0,
        capped_pairs=picks.capped_pairs,
        reasons={REASON: count},
        segment_sizes={SEGMENT: customers, "customers": len(picks.user_ids)},
        as_of=int(as_of),
        extra={"horizon_days": float(horizon), "dry_run": options.dry_run},
    )
    clean_stale_parts(out)
    writer = RowWriter(out, export_id, fmt, due_schema())
    ledger_writer = ledger.writer(export_id) if ledger is not None and not options.dry_run else None
    try:
        if count:
            writer.write(table)
            if ledger_writer is not None:
                ledger_writer.write(user_ids, item_ids)
        commit_export(writer, ledger_writer, summary)
    except BaseException:
        abort_export(writer, ledger_writer)
        raise
    if ledger is not None and not options.dry_run:
        ledger.prune(max(LEDGER_KEEP, options.cap_last))
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.users_per_s = round(len(picks.user_ids) / summary.seconds, 1) if summary.seconds > 0 else 0.0
    return summary
