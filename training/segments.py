"""Customer segments from purchase history (RFM), for email campaigns and reporting.

Every user seen in the events gets exactly one segment, decided in this order:

``new``
    never purchased (views, carts, clicks only), or first purchase at most ``new_days`` before
    ``as_of``.
``dormant``
    purchased before, but the last purchase is more than ``dormant_days`` before ``as_of``.
``high_value``
    not new, not dormant, and monetary value (sum of ``price * quantity`` over purchases) in the
    top ``1 - high_value_quantile`` of all purchasing users.
``active``
    everyone else: purchased within ``dormant_days``, first purchase older than ``new_days``.

``all`` is the union. The segments are a partition (sizes add up to ``all``) so a campaign that
targets several segments never mails one person twice. Events after ``as_of`` are ignored, so a
segmentation can be recomputed as it stood on any past day; ``as_of`` defaults to the newest event.

The pure part (:func:`compute_segments`) is numpy only; :func:`segments` is the ``recsvc segments``
command.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from recsvc.core.contract import PURCHASE
from recsvc.core.eventfiles import BadInputError, load_catalog, load_events

SEGMENTS: tuple[str, ...] = ("new", "active", "high_value", "dormant")
SEGMENT_CODE: dict[str, int] = {name: code for code, name in enumerate(SEGMENTS)}
SEGMENT_CHOICES: tuple[str, ...] = (*SEGMENTS, "all")
NEW, ACTIVE, HIGH_VALUE, DORMANT = range(len(SEGMENTS))
DAY = 86_400
NO_TIME = np.iinfo(np.int64).min  # "never" in per-user timestamp arrays


def encode_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted unique strings, code per value)`` -- ``np.unique(..., return_inverse=True)``, fast.

    pyarrow's hash table encodes millions of strings in C++; only the distinct values are then
    sorted in Python, where ``np.unique`` on an object array would compare every value.
    """
    encoded = pa.array(values, type=pa.string()).dictionary_encode()
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    return _sorted_codes(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), uniques)


def _sorted_codes(codes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-code ``values[codes]`` against the sorted distinct values actually used."""
    used = (
        np.flatnonzero(np.bincount(codes, minlength=len(values)) > 0) if len(codes) else np.zeros(0, np.int64)
    )
    used_values = np.asarray(values, dtype=object)[used]
    order = np.argsort(used_values, kind="stable")
    rank = np.full(len(values), -1, dtype=np.int64)
    rank[used[order]] = np.arange(len(order))
    return used_values[order], rank[codes]


class EventsLike(Protocol):
    """The columns of ``training.events.EventTable`` that segmentation reads."""

    user_id: np.ndarray
    item_id: np.ndarray
    event: np.ndarray
    timestamp: np.ndarray
    order_id: np.ndarray
    quantity: np.ndarray
    price: np.ndarray


@dataclass(frozen=True)
class SegmentThresholds:
    """The knobs of the RFM rules (see the module docstring)."""

    new_days: float = 30.0
    dormant_days: float = 90.0
    high_value_quantile: float = 0.8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.new_days) and self.new_days >= 0):
            raise ValueError(f"new_days must be >= 0, got {self.new_days}")
        if not (math.isfinite(self.dormant_days) and self.dormant_days > 0):
            raise ValueError(f"dormant_days must be > 0, got {self.dormant_days}")
        if not 0.0 < self.high_value_quantile < 1.0:
            raise ValueError(f"high_value_quantile must be in (0, 1), got {self.high_value_quantile}")


@dataclass
class SegmentTable:
    """One row per user (sorted by ``user_ids``) with the RFM figures and the segment.

    Attributes
    ----------
    user_ids : ndarray of str (object)
        Sorted unique user ids.
    segment : ndarray of int8
        Index into :data:`SEGMENTS`.
    last_seen, first_purchase, last_purchase : ndarray of int64
        Unix seconds; :data:`NO_TIME` where the user never purchased.
    frequency : ndarray of int32
        Distinct orders (``order_id``, or the purchase second when there is none).
    monetary : ndarray of float64
        Sum of ``price * quantity`` over purchases (units when no purchase has a known price).
    as_of : int
        The moment the segmentation describes (unix seconds).
    thresholds : SegmentThresholds
    high_value_threshold : float
        The monetary value at ``high_value_quantile`` among purchasing users (inf when none).
    monetary_unit : str
        ``"price"`` or ``"units"`` (no price known for any purchase).
    event_user : ndarray of int64
        For every input event, its user's row here; ``-1`` for events after ``as_of``.
    """

    user_ids: np.ndarray
    segment: np.ndarray
    last_seen: np.ndarray
    first_purchase: np.ndarray
    last_purchase: np.ndarray
    frequency: np.ndarray
    monetary: np.ndarray
    as_of: int
    thresholds: SegmentThresholds
    high_value_threshold: float
    monetary_unit: str
    event_user: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of the users in segment ``name`` (one of :data:`SEGMENT_CHOICES`)."""
        if name == "all":
            return np.ones(len(self), dtype=bool)
        if name not in SEGMENT_CODE:
            raise ValueError(f"unknown segment {name!r}; choose one of {', '.join(SEGMENT_CHOICES)}")
        return self.segment == SEGMENT_CODE[name]

    def sizes(self) -> dict[str, int]:
        """Users per segment, plus ``all``."""
        counts = np.bincount(self.segment, minlength=len(SEGMENTS))
        out = {name: int(counts[code]) for code, name in enumerate(SEGMENTS)}
        out["all"] = len(self)
        return out

    def segment_names(self) -> np.ndarray:
        """The segment name of every user (object array), in ``user_ids`` order."""
        return np.asarray(SEGMENTS, dtype=object)[self.segment]


def compute_segments(
    events: EventsLike,
    as_of: int | None = None,
    thresholds: SegmentThresholds | None = None,
    catalog_prices: dict[str, float] | None = None,
) -> SegmentTable:
    """Segment every user of ``events`` by recency, frequency and monetary value.

    Parameters
    ----------
    events : EventsLike
        An ``EventTable`` (or anything with its columns).
    as_of : int, optional
        Unix seconds; events after it are ignored. Default: the newest event.
    thresholds : SegmentThresholds, optional
        Rule parameters; defaults are 30 / 90 days and the 0.8 quantile.
    catalog_prices : dict, optional
        ``item_id -> price`` used for purchases that carry no price of their own.

    Returns
    -------
    SegmentTable
        One row per user, sorted by user id. Users whose only events are after ``as_of`` are absent.
    """
    thresholds = thresholds or SegmentThresholds()
    timestamp = np.asarray(events.timestamp, dtype=np.int64)
    if as_of is None:
        as_of = int(timestamp.max()) if len(timestamp) else 0
    keep = timestamp <= as_of

    def column(name: str, dtype: Any = None) -> np.ndarray:
        return np.asarray(getattr(events, name), dtype=dtype)[keep]

    if hasattr(events, "codes"):  # EventTable caches the dictionary encoding of its id columns
        raw_codes, raw_values = events.codes("user_id")
        user_ids, user = _sorted_codes(np.asarray(raw_codes, dtype=np.int64)[keep], raw_values)
    else:
        user_ids, user = encode_sorted(column("user_id", object))
    n_users = len(user_ids)
    event_user = np.full(len(keep), -1, dtype=np.int64)
    event_user[keep] = user
    timestamp = timestamp[keep]
    purchase = column("event") == PURCHASE
    purchase_users, purchase_times = user[purchase], timestamp[purchase]

    last_seen = np.full(n_users, NO_TIME, dtype=np.int64)
    np.maximum.at(last_seen, user, timestamp)
    first_purchase = np.full(n_users, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_purchase, purchase_users, purchase_times)
    last_purchase = np.full(n_users, NO_TIME, dtype=np.int64)
    np.maximum.at(last_purchase, purchase_users, purchase_times)
    bought = last_purchase != NO_TIME
    first_purchase[~bought] = NO_TIME

    # Frequency counts orders, not lines: a basket of five items is one visit to the till. Lines
    # without an order id are grouped by their purchase second, which is how one checkout looks.
    orders = column("order_id", object)[purchase]
    frequency = np.zeros(n_users, dtype=np.int32)
    if len(orders):
        # One int64 key per order line: the order id's code (>= 0), or -1 - purchase second for
        # lines without one; then count distinct (user, key) pairs per user.
        encoded = pa.array(orders, type=pa.string()).dictionary_encode()
        code = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        has_id = orders != ""
        key = np.where(has_id, code, -1 - purchase_times)
        order = np.lexsort((key, purchase_users))
        users_sorted, keys_sorted = purchase_users[order], key[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (users_sorted[1:] != users_sorted[:-1]) | (keys_sorted[1:] != keys_sorted[:-1])
        frequency = np.bincount(users_sorted[first], minlength=n_users).astype(np.int32)

    quantity = column("quantity", np.float64)[purchase]
    quantity = np.where(np.isfinite(quantity), quantity, 1.0)
    price = column("price", np.float64)[purchase]
    if catalog_prices:
        missing = np.flatnonzero(~np.isfinite(price))
        items = column("item_id", object)[purchase][missing]
        price[missing] = [catalog_prices.get(item, math.nan) for item in items]
    known = np.isfinite(price)
    if known.any():
        monetary_unit = "price"
        spend = np.where(known, price * quantity, 0.0)
    else:
        # No price anywhere: rank by units bought so "high value" still means "buys the most".
        monetary_unit = "units"
        spend = quantity
    monetary = np.bincount(purchase_users, weights=spend, minlength=n_users).astype(np.float64)

    if bought.any():
        high_value_threshold = float(np.quantile(monetary[bought], thresholds.high_value_quantile))
    else:
        high_value_threshold = math.inf

    segment = np.full(n_users, ACTIVE, dtype=np.int8)
    high = bought & (monetary >= high_value_threshold) & (monetary > 0)
    segment[high] = HIGH_VALUE
    dormant = bought & (as_of - last_purchase > thresholds.dormant_days * DAY)
    segment[dormant] = DORMANT
    new = ~bought | (as_of - first_purchase <= thresholds.new_days * DAY)
    segment[new] = NEW  # last, so it wins: the order of the rules in the module docstring

    return SegmentTable(
        user_ids=user_ids,
        segment=segment,
        last_seen=last_seen,
        first_purchase=first_purchase,
        last_purchase=last_purchase,
        frequency=frequency,
        monetary=monetary,
        as_of=int(as_of),
        thresholds=thresholds,
        high_value_threshold=high_value_threshold,
        monetary_unit=monetary_unit,
        event_user=event_user,
    )


def format_sizes(table: SegmentTable) -> str:
    """A human table of segment sizes and the rules that produced them."""
    sizes = table.sizes()
    total = max(1, sizes["all"])
    t = table.thresholds
    import datetime as _dt

    as_of = _dt.datetime.fromtimestamp(table.as_of, _dt.UTC).isoformat(timespec="seconds")
    hv = "n/a" if math.isinf(table.high_value_threshold) else f"{table.high_value_threshold:,.2f}"
    rules = {
        "new": f"no purchase, or first purchase <= {t.new_days:g} days ago",
        "active": "bought recently, not new, not high value",
        "high_value": (f"spent >= {hv}" if table.monetary_unit == "price" else f"units bought >= {hv}")
        + f" (quantile {t.high_value_quantile:g} of buyers)",
        "dormant": f"bought before, last purchase > {t.dormant_days:g} days ago",
        "all": "every user with an event",
    }
    lines = [f"segments as of {as_of}", f"{'segment':<12}{'users':>12}{'share':>9}  rule"]
    for name in SEGMENT_CHOICES:
        lines.append(f"{name:<12}{sizes[name]:>12,}{sizes[name] / total:>9.1%}  {rules[name]}")
    return "\n".join(lines)


EVENT_FILE_SUFFIXES = (".csv", ".csv.gz", ".parquet")


def expand_event_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its ``*.csv``, ``*.csv.gz`` and ``*.parquet`` files.

    Handy for the folder ``recsvc retrain --dump-stream`` fills (``<var_dir>/events``): passing the
    folder includes every dump so far, and an empty folder is no error. Hidden files (temporary
    names) are skipped; files sort by name, which for dumps is by time.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if p.is_file()
                    and not p.name.startswith(".")
                    and p.name.lower().endswith(EVENT_FILE_SUFFIXES)
                )
            )
        else:
            out.append(path)
    return out


def load_inputs(event_paths: Sequence[str | os.PathLike], catalog_path: str | os.PathLike | None):
    """Load events (and the catalog) with ``training.events``: ``(EventTable, LoadReport, Catalog | None)``.

    ``event_paths`` may name folders (:func:`expand_event_paths`).

    Raises
    ------
    training.events.BadInputError
        A file is unusable (the message names file, line and column), or no events file was found.
    """

    files = expand_event_paths(event_paths)
    if not files:
        raise BadInputError(
            f"no events file (*.csv, *.csv.gz, *.parquet) in {', '.join(map(str, event_paths))}"
        )
    table, report = load_events(files)
    catalog = load_catalog(catalog_path)[0] if catalog_path else None
    return table, report, catalog


def catalog_price_map(catalog: Any) -> dict[str, float] | None:
    """``item_id -> price`` from a loaded catalog (whatever ``load_catalog`` returns), or None."""
    if catalog is None:
        return None
    item_ids = getattr(catalog, "item_id", None)
    prices = getattr(catalog, "price", None)
    if item_ids is None or prices is None:
        return None
    return {item: float(p) for item, p in zip(item_ids, prices, strict=True) if np.isfinite(p)}


def segments_document(table: SegmentTable, user_ids: Sequence[str]) -> bytes:
    """``segments.npz`` of a model version: the segment code per user of its ``user_ids`` (-1 for a
    user the table does not have) and the segment names, as the console reads it."""
    position = {u: k for k, u in enumerate(table.user_ids.tolist())}
    codes = np.fromiter(
        (table.segment[position[u]] if u in position else -1 for u in user_ids),
        dtype=np.int8,
        count=len(user_ids),
    )
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes, names=np.asarray(SEGMENTS), as_of=np.asarray(table.as_of, dtype=np.int64))
    return buffer.getvalue()
