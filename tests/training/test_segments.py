"""RFM segments: hand-computed answers on a tiny shop, and the `recsvc segments` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.cli.segments import segments
from recsvc.core.events import EventTable
from training.segments import NO_TIME, SegmentThresholds, compute_segments

T = 1_700_000_000  # as_of
DAY = 86_400


def ev(user, item, event, days_ago, **extra):
    return {"user_id": user, "item_id": item, "event": event, "timestamp": T - days_ago * DAY, **extra}


def shop() -> EventTable:
    return EventTable.from_records(
        [
            ev("a", "x1", "view", 5),
            ev("b", "x1", "purchase", 10, price=50, order_id="o1"),
            ev("b", "x2", "view", 2),
            ev("c", "x1", "purchase", 200, price=30, order_id="o2"),
            ev("c", "x2", "purchase", 100, price=20, order_id="o3"),
            ev("c", "x3", "purchase", -1, price=999, order_id="o9"),  # after as_of: ignored
            ev("d", "x1", "purchase", 60, price=400, quantity=2, order_id="o4"),
            ev("d", "x2", "purchase", 60, price=200, order_id="o4"),
            ev("d", "x3", "purchase", 40, price=50),  # two lines, same second, no order id:
            ev("d", "x4", "purchase", 40, price=50),  # ...one checkout
            ev("e", "x1", "purchase", 60, price=5, order_id="o5"),
            ev("e", "x1", "purchase", 20, price=5, order_id="o6"),
            ev("f", "x9", "purchase", 45),  # no price in the event; the catalog says 70
            ev("g", "x1", "view", -1),  # only after as_of: not a user yet
        ]
    )


def by_user(table, values):
    return dict(zip(table.user_ids.tolist(), np.asarray(values).tolist(), strict=True))


def test_rfm_segments_hand_computed():
    table = compute_segments(shop(), as_of=T, catalog_prices={"x9": 70.0})
    assert table.user_ids.tolist() == ["a", "b", "c", "d", "e", "f"]
    assert by_user(table, table.segment_names()) == {
        "a": "new",  # views only
        "b": "new",  # first purchase 10 days ago
        "c": "dormant",  # last purchase 100 > 90 days ago
        "d": "high_value",
        "e": "active",
        "f": "active",
    }
    assert table.sizes() == {"new": 2, "active": 2, "high_value": 1, "dormant": 1, "all": 6}
    # monetary: d = 400*2 + 200 + 50 + 50; f from the catalog price
    assert by_user(table, table.monetary) == {"a": 0, "b": 50, "c": 50, "d": 1100, "e": 10, "f": 70}
    # quantile 0.8 of [10, 50, 50, 70, 1100] (purchasers only) = 70 + 0.2 * 1030
    assert table.high_value_threshold == pytest.approx(276.0)
    assert table.monetary_unit == "price"
    # orders, not lines: d has order o4 plus one id-less checkout; c's future order is ignored
    assert by_user(table, table.frequency) == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 2, "f": 1}
    assert by_user(table, table.last_seen)["b"] == T - 2 * DAY
    assert by_user(table, table.last_purchase)["c"] == T - 100 * DAY
    assert by_user(table, table.first_purchase)["a"] == NO_TIME
    assert table.mask("dormant").tolist() == [False, False, True, False, False, False]
    assert table.mask("all").all()


def test_event_user_maps_each_input_event_and_marks_future_ones():
    events = shop()
    table = compute_segments(events, as_of=T)
    future = events.timestamp > T
    assert (table.event_user[future] == -1).all()
    kept = ~future
    assert (table.user_ids[table.event_user[kept]] == events.user_id[kept]).all()


def test_without_catalog_unknown_prices_count_zero():
    table = compute_segments(shop(), as_of=T)
    assert by_user(table, table.monetary)["f"] == 0
    # quantile 0.8 of [0, 10, 50, 50, 1100] = 50 + 0.2 * 1050
    assert table.high_value_threshold == pytest.approx(260.0)


def test_thresholds_are_configurable():
    table = compute_segments(shop(), as_of=T, thresholds=SegmentThresholds(new_days=5, dormant_days=50))
    names = by_user(table, table.segment_names())
    assert names["b"] == "active"  # first purchase 10 days ago is no longer "new"
    assert names["e"] == "active"  # last purchase 20 days ago
    assert names["f"] == "active"  # 45 days: still within 50
    assert names["a"] == "new"  # never bought: always new
    table = compute_segments(shop(), as_of=T, thresholds=SegmentThresholds(dormant_days=30))
    assert by_user(table, table.segment_names())["f"] == "dormant"


def test_rule_boundaries():
    events = EventTable.from_records(
        [ev("p", "x", "purchase", 30, price=1), ev("q", "x", "purchase", 90, price=1)]
    )
    names = by_user(compute_segments(events, as_of=T), compute_segments(events, as_of=T).segment_names())
    assert names["p"] == "new"  # exactly new_days ago: still new (<=)
    assert names["q"] == "high_value"  # exactly dormant_days ago: not yet dormant (>), ties at the quantile


def test_default_as_of_is_newest_event_and_units_without_prices():
    events = EventTable.from_records(
        [ev("u1", "x", "purchase", 100, quantity=3), ev("u2", "x", "purchase", 50), ev("u2", "x", "view", 0)]
    )
    table = compute_segments(events)
    assert table.as_of == T
    assert table.monetary_unit == "units"
    assert by_user(table, table.monetary) == {"u1": 3.0, "u2": 1.0}


def test_empty_events():
    events = EventTable.from_records([])
    table = compute_segments(events, as_of=T)
    assert len(table) == 0
    assert table.sizes() == {"new": 0, "active": 0, "high_value": 0, "dormant": 0, "all": 0}


@pytest.mark.parametrize(
    "kwargs",
    [{"new_days": -1}, {"dormant_days": 0}, {"high_value_quantile": 1.0}, {"high_value_quantile": 0}],
)
def test_bad_thresholds_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SegmentThresholds(**kwargs)


def test_unknown_segment_name():
    with pytest.raises(ValueError, match="unknown segment"):
        compute_segments(shop(), as_of=T).mask("vip")


def write_events_csv(path, rows):
    lines = ["user_id,item_id,event,timestamp,order_id,quantity,price"]
    lines += [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_segments_command_prints_sizes(tmp_path):
    events = tmp_path / "events.csv"
    write_events_csv(
        events,
        [
            ("a", "x1", "view", T - 5 * DAY, "", "", ""),
            ("c", "x1", "purchase", T - 200 * DAY, "o1", 1, 30),
            ("e", "x1", "purchase", T - 60 * DAY, "o2", 1, 5),
            ("e", "x1", "purchase", T - 20 * DAY, "o3", 1, 5),
        ],
    )
    runner = CliRunner()
    result = runner.invoke(segments, ["--events", str(events), "--as-of", str(T), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    # purchasers c (30) and e (10): the 0.8 quantile is 26, so c is high value but dormant wins
    assert out["sizes"] == {"new": 1, "active": 1, "high_value": 0, "dormant": 1, "all": 3}
    assert out["as_of"] == T
    result = runner.invoke(
        segments, ["--events", str(events), "--dormant-days", "250", "--as-of", "2023-11-14"]
    )
    assert result.exit_code == 0, result.output
    assert "dormant" in result.output and "high_value" in result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines()[2:]}
    assert lines["dormant"] == "0" and lines["all"] == "3"


def test_segments_command_bad_input(tmp_path):
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,event\na,b,view\n")  # no timestamp column
    result = CliRunner().invoke(segments, ["--events", str(events)])
    assert result.exit_code == 2
    assert "events.csv" in result.output and "timestamp" in result.output
    result = CliRunner().invoke(segments, ["--events", str(events), "--as-of", "yesterday"])
    assert result.exit_code == 2
    assert "--as-of" in result.output
