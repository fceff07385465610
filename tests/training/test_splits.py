"""Evaluation splits: what trains, what is the future, and when a split cannot be trusted."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.events import EventTable
from training.splits import SplitSpec, exclusion_rule, global_cutoff, seen_share, split_events

DAY = 86_400
T0 = 1_700_000_000


def table(rows):
    return EventTable.from_records(
        [{"user_id": u, "item_id": i, "event": e, "timestamp": t} for u, i, e, t in rows]
    )


def test_parse():
    assert SplitSpec.parse(None) == SplitSpec("auto")
    assert SplitSpec.parse("user:0.3") == SplitSpec("user", fraction=0.3)
    assert SplitSpec.parse("days:7") == SplitSpec("days", days=7.0)
    assert SplitSpec.parse("global").label() == "global"
    for bad, words in [("weekly", "must be one of"), ("user:1.5", "(0, 1)"), ("days", "number of days")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            SplitSpec.parse(bad)


def test_days_split_trains_on_the_past_and_tests_on_later_new_purchases():
    events = table(
        [
            ("u1", "a", "view", T0),
            ("u1", "a", "purchase", T0 + 1 * DAY),
            ("u1", "b", "view", T0 + 4 * DAY),
            ("u1", "b", "purchase", T0 + 5 * DAY),
            ("u1", "a", "purchase", T0 + 6 * DAY),  # a repurchase: not a target
            ("u2", "c", "purchase", T0 + 10 * DAY),  # u2 has no past: cold
        ]
    )
    split = split_events(events, SplitSpec.parse("days:6"))  # cutoff = newest - 6 days + 1 s
    assert split.train.timestamp.tolist() == [T0, T0 + DAY, T0 + 4 * DAY]
    assert split.test.timestamp.tolist() == [T0 + 5 * DAY, T0 + 6 * DAY, T0 + 10 * DAY]
    assert split.info["test_users"] == 1 and split.info["targets"] == 1
    assert split.info["cold_test_users"] == 1 and split.info["cold_share"] == 0.5
    assert "only 1 test users" in " ".join(split.reasons)


def test_one_stray_old_event_does_not_stretch_the_global_window():
    rng = np.random.default_rng(0)
    rows = [
        (f"u{u}", f"i{rng.integers(50)}", "view", T0 + int(rng.integers(0, 30 * DAY))) for u in range(300)
    ]
    rows.append(("u0", "i0", "view", T0 - 3000 * DAY))  # years before everything else
    events = table(rows)
    cutoff = global_cutoff(events, 0.1)
    assert T0 + 26 * DAY < cutoff < T0 + 28 * DAY  # 10 % of ~30 days, not of 8 years


def test_user_split_holds_out_each_users_last_events():
    rows = []
    for u in range(60):
        rows += [(f"u{u}", f"i{k}", "view", T0 + k * DAY) for k in range(8)]
        rows.append((f"u{u}", "i99", "purchase", T0 + 9 * DAY))
        rows.append((f"u{u}", "i98", "purchase", T0 + 10 * DAY))
    rows += [("short", "i1", "view", T0), ("short", "i2", "purchase", T0 + DAY)]  # < 3 events: train only
    split = split_events(table(rows), SplitSpec.parse("user:0.2"))
    assert split.protocol == "user" and not split.reasons
    # 10 events per user, 20 % -> the last 2 (both purchases) are the future.
    assert len(split.test) == 120
    assert set(split.test.item_id.tolist()) == {"i98", "i99"}
    assert split.info["test_users"] == 60 and split.info["cold_test_users"] == 0
    assert "short" in set(split.train.user_id.tolist())


def test_auto_falls_back_to_the_user_split_when_the_global_one_is_degenerate():
    rows = []
    for u in range(80):
        rows += [(f"u{u}", f"i{k}", "view", T0 + (u % 5) * DAY + k) for k in range(5)]
        rows.append((f"u{u}", "i9", "purchase", T0 + (u % 5) * DAY + 100))
    # The last 10 % of time holds only newcomers: most future purchasers are cold.
    rows += [(f"new{u}", "i1", "purchase", T0 + 30 * DAY) for u in range(100)]
    events = table(rows)
    strict = split_events(events, SplitSpec.parse("global"))
    assert strict.degenerate and any("cold" in r for r in strict.reasons)
    auto = split_events(events, SplitSpec.parse("auto"))
    assert auto.protocol == "user" and auto.info["fallback_from_global"] == strict.reasons


def test_exclusion_rule_measures_whether_shoppers_buy_what_they_looked_at():
    looked_then_bought, watched_once = [], []
    for u in range(100):
        # Each user's last event (20 % of 5) is the future purchase.
        looked_then_bought += [(f"u{u}", f"i{u % 7}", "view", T0 + k) for k in range(3)]
        looked_then_bought += [(f"u{u}", "x", "view", T0 + 5), (f"u{u}", f"i{u % 7}", "purchase", T0 + 10)]
        watched_once += [(f"u{u}", f"m{u % 7 + k}", "view", T0 + k) for k in range(4)]
        watched_once.append((f"u{u}", f"m{u % 7 + 20}", "purchase", T0 + 10))
    shop = exclusion_rule(table(looked_then_bought))
    assert shop["exclude"] == "purchased" and shop["seen_share"] == 1.0 and shop["targets"] == 100
    films = exclusion_rule(table(watched_once))
    assert films["exclude"] == "interacted" and films["seen_share"] == 0.0
    # Too few new purchases to measure: keep the safe rule.
    assert exclusion_rule(table(watched_once[:50]))["exclude"] == "purchased"


def test_seen_share_counts_targets_once():
    events = table(
        [
            ("u1", "a", "view", T0),
            ("u1", "b", "view", T0 + 1),
            ("u1", "c", "view", T0 + 2),
            ("u1", "a", "purchase", T0 + 10),
            ("u1", "a", "purchase", T0 + 11),
            ("u1", "z", "purchase", T0 + 12),
        ]
    )
    split = split_events(events, SplitSpec.parse("days:0.0001"))  # the last 8.6 s: the 3 purchases
    assert seen_share(split) == (0.5, 2)
