"""Evaluation splits a user can trust: a global time split, a per-user split, and their sanity checks.

* **global** (``--split global[:FRACTION]`` or ``--split days:N``): events before a cutoff train,
  purchases on or after it are the future. The default window is the last 10 % of the log's time
  span, measured from the 1 % time quantile -- not the oldest event, because one stray old
  timestamp would otherwise stretch the span (a 9-day window with 28 training events on the
  Taobao sample). Users with future purchases but no training event are *cold*: counted, not
  scored.
* **user** (``--split user[:FRACTION]``): each user's last 20 % of events by time (at least one)
  are their future; users with fewer than 3 events stay in training. No cold users by
  construction, and every user with a future counts, so even short logs give hundreds of test
  users.

The *targets* of a test user are the distinct items they purchased in the future and had not
purchased before. A split is **degenerate** (:func:`degenerate_reasons`) when it cannot choose a
model: fewer than 50 test users, more than half of the future purchasers cold, fewer than 3
training events per test user, or (global) a training period shorter than the test window.
``auto`` uses the global split unless it is degenerate, then the per-user split.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsvc.core.contract import PURCHASE
from recsvc.core.events import EventTable
from recsvc.core.weighting import SECONDS_PER_DAY

PROTOCOLS = ("auto", "global", "user", "days")
DEFAULT_GLOBAL_FRACTION = 0.1
DEFAULT_USER_FRACTION = 0.2
SPAN_QUANTILE = 0.01
MIN_USER_EVENTS = 3
MIN_TEST_USERS = 50
MAX_COLD_SHARE = 0.5
MIN_TRAIN_EVENTS_PER_TEST_USER = 3
#: Below this share of targets seen (viewed, carted) before, the shop's customers do not buy what
#: they looked at (films are watched once): every item a user interacted with is excluded.
SEEN_SHARE_THRESHOLD = 0.05
#: Fewer targets than this cannot measure the share: keep excluding purchases only.
MIN_TARGETS_FOR_SEEN_SHARE = 50


@dataclass(frozen=True)
class SplitSpec:
    """Which protocol and how big the future is (see the module docstring)."""

    protocol: str = "auto"
    fraction: float | None = None  # global: share of the time span; user: share of each user's events
    days: float | None = None  # "days": the last N days are the future

    @classmethod
    def parse(cls, text: str | None) -> SplitSpec:
        """``auto``, ``global``, ``global:0.1``, ``user``, ``user:0.2`` or ``days:7``.

        Raises
        ------
        ValueError
            The text names no protocol, or its number is out of range; the message says which.
        """
        if text is None or text == "":
            return cls()
        name, _, number = text.partition(":")
        if name not in PROTOCOLS:
            raise ValueError(f"split must be one of auto, global[:F], user[:F], days:N; got {text!r}")
        if not number:
            if name == "days":
                raise ValueError("split days:N needs a number of days")
            return cls(name)
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"split {text!r}: {number!r} is not a number") from None
        if name == "days":
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"split {text!r}: days must be > 0")
            return cls("days", days=value)
        if name == "auto" or not 0 < value < 1:
            raise ValueError(f"split {text!r}: the fraction must be in (0, 1)")
        return cls(name, fraction=value)

    def label(self) -> str:
        if self.protocol == "days":
            return f"days:{self.days:g}"
        return self.protocol if self.fraction is None else f"{self.protocol}:{self.fraction:g}"


@dataclass
class Split:
    """Events before each user's cutoff (train) and their future purchases (test)."""

    protocol: str
    train: EventTable
    test: EventTable  # future purchases only
    info: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # why it is degenerate (empty: usable)

    @property
    def degenerate(self) -> bool:
        return bool(self.reasons)


def global_cutoff(events: EventTable, fraction: float = DEFAULT_GLOBAL_FRACTION) -> int:
    """The Unix second where the future starts: the last ``fraction`` of the robust time span."""
    stamps = events.timestamp
    start = float(np.quantile(stamps, SPAN_QUANTILE)) if len(stamps) > 100 else float(stamps.min())
    return span_cutoff(start, int(stamps.max()), fraction)


def span_cutoff(start: float, end: int, fraction: float) -> int:
    """The cutoff of a global split of a log spanning ``start``..``end`` (``start``: the span's
    :data:`SPAN_QUANTILE` timestamp, for engines that compute it themselves)."""
    return int(end - math.ceil(max(1.0, (end - start) * fraction))) + 1


def days_cutoff(newest: int, days: float) -> int:
    """The cutoff of ``--split days:N``: the last ``days`` days are the future."""
    return int(newest) - int(round(days * SECONDS_PER_DAY)) + 1


def split_events(events: EventTable, spec: SplitSpec | None = None) -> Split:
    """Split ``events`` by ``spec`` (see the module docstring); ``auto`` falls back from global to user.

    Raises
    ------
    ValueError
        There are no events.
    """
    spec = spec or SplitSpec()
    if len(events) == 0:
        raise ValueError("no events to split")
    # Encoded once here, the dictionaries are shared by both halves (take() keeps them).
    events.codes("user_id")
    events.codes("item_id")
    if spec.protocol == "user":
        return _user_split(events, spec.fraction or DEFAULT_USER_FRACTION)
    if spec.protocol == "days":
        assert spec.days is not None  # parse() requires it
        return _global_split(events, days_cutoff(int(events.timestamp.max()), spec.days), "days")
    split = _global_split(events, global_cutoff(events, spec.fraction or DEFAULT_GLOBAL_FRACTION), "global")
    if spec.protocol == "auto" and split.degenerate:
        fallback = _user_split(events, DEFAULT_USER_FRACTION)
        fallback.info["fallback_from_global"] = list(split.reasons)
        return fallback
    return split


def _global_split(events: EventTable, cutoff: int, protocol: str) -> Split:
    before = events.timestamp < cutoff
    train = events.take(before)
    test = events.take(~before & (events.event == PURCHASE))
    span_days = (int(events.timestamp.max()) - cutoff + 1) / SECONDS_PER_DAY
    train_days = (cutoff - int(events.timestamp.min())) / SECONDS_PER_DAY if len(train) else 0.0
    info = {
        "protocol": protocol,
        "cutoff": int(cutoff),
        "cutoff_utc": _dt.datetime.fromtimestamp(cutoff, _dt.UTC).isoformat(timespec="seconds"),
        "test_days": round(span_days, 3),
        "train_days": round(train_days, 3),
    }
    split = Split(protocol, train, test, info)
    _describe(split)
    if train_days < span_days:
        split.reasons.append(
            f"the training period ({train_days:.1f} days) is shorter than the test window ({span_days:.1f})"
        )
    return split


def _user_split(events: EventTable, fraction: float) -> Split:
    codes = events.codes("user_id")[0]
    order = np.lexsort((np.arange(len(events)), events.timestamp, codes))
    users = codes[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    n_future = np.where(counts >= MIN_USER_EVENTS, np.maximum(1, np.floor(counts * fraction)), 0).astype(int)
    position = np.arange(len(users)) - np.repeat(starts, counts)
    future_sorted = position >= np.repeat(counts - n_future, counts)
    future = np.zeros(len(events), dtype=bool)
    future[order] = future_sorted
    train = events.take(~future)
    test = events.take(future & (events.event == PURCHASE))
    split = Split("user", train, test, {"protocol": "user", "fraction": fraction})
    _describe(split)
    return split


def _pairs(split: Split) -> dict[str, np.ndarray]:
    """The split as int64 (user, item) keys: training interactions, training purchases, targets.

    Vectorised over dictionary codes (a Python set of id pairs costs seconds on millions of
    events). Train and test come from one table, so they share its dictionaries; tables that do
    not are mapped onto the training dictionaries.
    """
    train, test = split.train, split.test
    users, user_values = train.codes("user_id")
    items, item_values = train.codes("item_id")
    test_users, test_user_values = test.codes("user_id")
    test_items, test_item_values = test.codes("item_id")
    test_users = _onto(test_users, test_user_values, user_values)
    test_items = _onto(test_items, test_item_values, item_values)
    # One extra column per user for items the training dictionary lacks (tables built apart).
    unknown_item = len(item_values)
    width = np.int64(unknown_item + 1)
    known_user = np.zeros(len(user_values) + 1, dtype=bool)
    known_user[users] = True
    test_known = test_users >= 0
    test_known[test_known] = known_user[test_users[test_known]]
    interacted = np.unique(users.astype(np.int64) * width + items)
    purchased = train.event == PURCHASE
    bought = np.unique(users[purchased].astype(np.int64) * width + items[purchased])
    future = np.unique(
        test_users[test_known].astype(np.int64) * width
        + np.where(test_items[test_known] >= 0, test_items[test_known], unknown_item)
    )
    targets = future[~_sorted_member(future, bought)]
    return {
        "interacted": interacted,
        "targets": targets,
        "target_users": np.unique(targets // width),
        "purchasers": np.unique(test_users[test_known]),
        "cold_purchasers": int(len(np.unique(test.codes("user_id")[0][~test_known]))),
    }


def _onto(codes: np.ndarray, values: np.ndarray, dictionary: np.ndarray) -> np.ndarray:
    """``codes`` over ``values`` re-expressed over ``dictionary`` (-1 where a value is missing)."""
    if values is dictionary:
        return codes.astype(np.int64)
    from recsvc.core.ids import IdMap

    return (
        IdMap(dictionary).positions(values)[codes].astype(np.int64) if len(codes) else codes.astype(np.int64)
    )


def _sorted_member(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_keys)`` for a sorted unique ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return sorted_keys[at] == values


def _describe(split: Split) -> None:
    """Test users (warm, with a new purchase), cold purchasers, and the degenerate checks."""
    train, test = split.train, split.test
    pairs = _pairs(split)
    n_test_users = len(pairs["target_users"])
    n_cold = pairs["cold_purchasers"]
    n_purchasers = len(pairs["purchasers"]) + n_cold
    split.info.update(
        train_events=len(train),
        test_purchases=len(test),
        test_users=n_test_users,
        targets=len(pairs["targets"]),
        cold_test_users=n_cold,
        cold_share=round(n_cold / n_purchasers, 4) if n_purchasers else 0.0,
    )
    if n_test_users < MIN_TEST_USERS:
        split.reasons.append(f"only {n_test_users} test users (< {MIN_TEST_USERS})")
    if n_purchasers and n_cold / n_purchasers > MAX_COLD_SHARE:
        split.reasons.append(f"{n_cold / n_purchasers:.0%} of future purchasers are cold (> 50%)")
    if n_test_users and len(train) < MIN_TRAIN_EVENTS_PER_TEST_USER * n_test_users:
        split.reasons.append(
            f"{len(train)} training events for {n_test_users} test users "
            f"(< {MIN_TRAIN_EVENTS_PER_TEST_USER} per test user)"
        )
    split.info["degenerate"] = list(split.reasons)


def degenerate_reasons(split: Split) -> list[str]:
    """Why ``split`` cannot be trusted to choose or gate a model (empty when it can)."""
    return list(split.reasons)


def seen_share(split: Split) -> tuple[float | None, int]:
    """Share of the split's targets the user had interacted with (viewed, carted...) before.

    Returns ``(share, targets)``; share is None without targets.
    """
    pairs = _pairs(split)
    targets = pairs["targets"]
    if len(targets) == 0:
        return None, 0
    return float(_sorted_member(targets, pairs["interacted"]).mean()), len(targets)


def exclusion_rule(events: EventTable) -> dict[str, Any]:
    """What the model excludes: every interacted item, or purchased items only (see the constants).

    Measured on a per-user split of ``events`` (a count, no model): when customers rarely buy
    what they looked at before (< 5 % of new purchases), recommending it wastes the slot.
    """
    share, targets = seen_share(_user_split(events, DEFAULT_USER_FRACTION)) if len(events) else (None, 0)
    exclude = "purchased"
    if share is not None and targets >= MIN_TARGETS_FOR_SEEN_SHARE and share < SEEN_SHARE_THRESHOLD:
        exclude = "interacted"
    return {
        "exclude": exclude,
        "seen_share": None if share is None else round(share, 4),
        "targets": targets,
        "threshold": SEEN_SHARE_THRESHOLD,
    }
