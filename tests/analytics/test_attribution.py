"""Attribution and statistics on tiny inputs whose every number is computed by hand (pure numpy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recsvc.analytics import attribution as at
from recsvc.analytics.recids import new_rec_id
from recsvc.core.contract import CART, CLICK, PURCHASE
from tests.shops import DAY, RA1, RO, RX, T, attribution_shop


def metrics(report, model):
    return {m.variant: m for m in report.results[model].variants}


def test_hand_computed_metrics_under_both_models():
    report = at.build_report(attribution_shop(), "exp", variants=["A", "B"], catalog_prices={"i7": 6.0})
    last, linear = metrics(report, "last_click"), metrics(report, "linear")
    for m in (last, linear):
        assert (m["A"].users, m["A"].impressions, m["A"].clicks) == (3, 4, 3)  # u1, u4, u6
        assert (m["B"].users, m["B"].impressions, m["B"].clicks) == (3, 3, 3)  # u2, u3, u5
        assert m["A"].ctr == pytest.approx(0.75) and m["B"].ctr == pytest.approx(1.0)
    # last-click: u1's purchase goes to the later untagged click; u4's direct purchase counts.
    assert (last["A"].purchases, last["A"].converters, last["A"].revenue) == (1, 1, 5)
    assert last["A"].conversion_rate == pytest.approx(1 / 3) and last["A"].revenue_per_user == pytest.approx(
        5 / 3
    )
    # linear: u1's purchase (2 x 10) is split between RA1 and RX (distinct recs, not clicks).
    assert (linear["A"].purchases, linear["A"].converters, linear["A"].revenue) == (1.5, 2, 15)
    # B: u3 (cart + purchase of i4 at 4) and u5 (cart + purchase of i7 at the catalog's 6).
    for m in (last, linear):
        assert (m["B"].add_to_carts, m["B"].purchases, m["B"].converters, m["B"].revenue) == (2, 2, 2, 10)
    assert report.data["purchases_without_price"] == 0
    assert report.data["experiment_rec_ids"] == 6
    assert report.control == "A" and report.variants == ["A", "B"]
    # Three users per group is far too little for a verdict.
    assert [c.verdict for c in report.results["last_click"].comparisons] == ["insufficient_data"]
    assert report.winner is None


def test_window_and_missing_prices():
    report = at.build_report(attribution_shop(), "exp", window_days=9)
    b = metrics(report, "last_click")["B"]
    assert (b.purchases, b.converters, b.revenue) == (3, 3, 7 + 4)  # u2 now counts; u5's price unknown
    assert report.data["purchases_without_price"] == 1
    assert any("no price" in w for w in report.warnings)
    # The window also bounds rec -> conversion: with 0 days even u4's purchase that carries the rec
    # id is not credited (served at T, bought at T + 50); with 50 seconds it is.
    zero = metrics(at.build_report(attribution_shop(), "exp", window_days=0), "last_click")
    assert (zero["A"].purchases, zero["B"].purchases) == (0, 0)
    fifty = metrics(at.build_report(attribution_shop(), "exp", window_days=50 / DAY), "last_click")
    assert (fifty["A"].purchases, fifty["B"].purchases) == (1, 0)


def test_start_bounds_served_log_and_variants_from_data():
    served = {
        "user_id": np.array(["u9", "u1"], dtype=object),
        "rec_id": np.array([new_rec_id("exp", "A", T), new_rec_id("exp", "A", T)], dtype=object),
    }
    report = at.build_report(attribution_shop(), "exp", served=served, start=T - DAY)
    a = metrics(report, "last_click")["A"]
    assert a.users == 3  # u1, u4 and u9 (served, no event); u6's rec predates the start
    assert report.variants == ["A", "B"]  # from the data, sorted
    assert any("outside" in w for w in report.warnings)
    with pytest.raises(ValueError, match="no rec id"):
        at.build_report(attribution_shop(), "missing")
    with pytest.raises(ValueError, match="control"):
        at.build_report(attribution_shop(), "exp", control="Z")


def test_report_serialises_to_json_and_a_table():
    report = at.build_report(attribution_shop(), "exp", variants=["A", "B"])
    body = json.loads(json.dumps(report.to_dict()))
    assert body["winner"] is None and body["primary_attribution"] == "last_click"
    assert set(body["attribution"]) == {"last_click", "linear"}
    row = body["attribution"]["linear"]["variants"][0]
    assert set(row) >= {
        "users",
        "impressions",
        "clicks",
        "ctr",
        "add_to_carts",
        "purchases",
        "conversion_rate",
    }
    table = report.format_table()
    assert "Attribution: last-click  (primary)" in table and "not enough data for a verdict" in table
    assert "A *" in table  # the control is marked


def test_attribute_ties_prefer_the_conversion_own_rec_and_count_distinct_recs():
    # user 0, item 0: click rec 0 at t=10, click rec 1 at t=20, purchase with rec 1 at t=20,
    # click rec 0 again at t=15 (a second click from the same rec).
    user = np.zeros(4, np.int64)
    item = np.zeros(4, np.int64)
    event = np.array([CLICK, CLICK, PURCHASE, CLICK], np.int8)
    ts = np.array([10, 20, 20, 15], np.int64)
    rec = np.array([0, 1, 1, 0], np.int64)
    credits = at.attribute(user, item, event, ts, rec, np.array([-1, -1]), window_s=100)
    assert credits["last_click"].rec.tolist() == [1] and credits["last_click"].row.tolist() == [2]
    linear = sorted(zip(credits["linear"].rec.tolist(), credits["linear"].credit.tolist(), strict=True))
    assert linear == [(0, 0.5), (1, 0.5)]
    # A cart is credited like a purchase; nothing is credited without a touchpoint.
    none = at.attribute(
        user, item, np.array([CART] * 4, np.int8), ts, np.full(4, -1), np.array([-1]), window_s=100
    )
    assert len(none["linear"].row) == 0


def test_parse_rec_ids_vectorised_agrees_with_scalar():
    from recsvc.analytics.recids import parse_rec_id

    values = np.array([RA1, RX, RO, "storefront-1", "a.b.c"], dtype=object)
    parsed = at.parse_rec_ids(values)
    for i, v in enumerate(values):
        info = parse_rec_id(v)
        assert parsed.experiment[i] == (info.experiment or "" if info else "")
        assert parsed.served_at[i] == (info.served_at if info else -1)


def test_two_proportion_ztest_hand_computed():
    # 50/1000 vs 80/1000: pooled p = 0.065, z = 0.03 / sqrt(0.065 * 0.935 * 0.002) = 2.7211;
    # CI = 0.03 +- 1.95996 * sqrt(0.05 * 0.95 / 1000 + 0.08 * 0.92 / 1000) = [0.00843, 0.05157].
    t = at.two_proportion_ztest(50, 1000, 80, 1000, alpha=0.05)
    assert t.diff == pytest.approx(0.03)
    assert t.z == pytest.approx(2.72110, abs=1e-4)
    assert t.p_value == pytest.approx(0.006507, abs=1e-5)
    assert (t.ci_low, t.ci_high) == (pytest.approx(0.008431, abs=1e-5), pytest.approx(0.051569, abs=1e-5))
    assert t.relative_lift == pytest.approx(0.6) and t.significant and t.sufficient_data
    # At alpha 0.005 the same data is not significant.
    assert not at.two_proportion_ztest(50, 1000, 80, 1000, alpha=0.005).significant
    # Identical rates: z = 0, p = 1.
    same = at.two_proportion_ztest(30, 600, 30, 600)
    assert same.z == 0 and same.p_value == pytest.approx(1.0) and not same.significant
    # Too few expected converters: no verdict even with a big observed difference.
    small = at.two_proportion_ztest(0, 40, 4, 40)
    assert not small.sufficient_data and not small.significant
    with pytest.raises(ValueError):
        at.two_proportion_ztest(5, 4, 1, 10)
    empty = at.two_proportion_ztest(0, 0, 1, 10)
    assert math.isnan(empty.diff) and not empty.sufficient_data


def test_welch_difference_hand_computed():
    control, treatment = np.array([0.0, 0.0, 10.0, 10.0]), np.array([0.0, 10.0, 10.0, 20.0])
    d = at.welch_difference(control, treatment, alpha=0.05)
    # means 5 and 10; variances 33.33 and 66.67 -> se = sqrt(8.333 + 16.667) = 5; df = 625 / 92.59 = 6.75
    assert d.diff == pytest.approx(5.0)
    half = 5.0 * float(
        __import__("scipy.stats", fromlist=["t"]).t.isf(0.025, 625 / (8.3333333**2 / 3 + 16.6666667**2 / 3))
    )
    assert d.ci_high - d.diff == pytest.approx(half, rel=1e-4)
    assert math.isnan(at.welch_difference(np.array([1.0]), treatment).diff)


def test_bonferroni_and_winner_rules():
    def comparison(name, verdict, diff):
        t = at.ProportionTest(
            0.1, 0.1 + diff, diff, 0, 0, 0.95, None, 0, 0, verdict in ("better", "worse"), True
        )
        return at.Comparison(name, "A", t, at.MeanDifference(0, 0, 0, 0.95, 1), verdict)

    assert at._winner([comparison("B", "better", 0.01), comparison("C", "better", 0.02)], "A") == "C"
    assert at._winner([comparison("B", "worse", -0.01), comparison("C", "worse", -0.02)], "A") == "A"
    assert (
        at._winner([comparison("B", "worse", -0.01), comparison("C", "no_significant_difference", 0)], "A")
        is None
    )
