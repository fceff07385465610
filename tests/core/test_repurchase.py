"""The repurchase maths: due probabilities against a hand-written formula, exemptions, merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsvc.core import repurchase as rebuy
from tests.factories import DAY, REPURCHASE_NOW, repurchase_model


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _hand_probability(q_item, strength, count, prior_mu, own_mu, within, between, elapsed, horizon):
    """The cure-model probability, written out once more from the docs' formula."""
    k = count - 1
    precision = 1 / between + k / within
    mu = (prior_mu / between + k * own_mu / within) / precision
    sd = math.sqrt(within + 1 / precision)
    q = (strength * q_item + k) / (strength + k)

    def survival(t):
        return 1.0 if t <= 0 else 1.0 - _phi((math.log(t) - mu) / sd)

    return q * (survival(elapsed) - survival(elapsed + horizon)) / (1 - q + q * survival(elapsed))


@pytest.fixture
def model():
    return repurchase_model(n_users=20, n_items=50)


def test_due_probability_matches_the_formula(model):
    row = model.history.row(1)
    est = rebuy.due(model.params, row.items, row.last, row.count, row.log_interval, REPURCHASE_NOW, 7.0)
    for j, (item, count, ago, own) in enumerate([(3, 5, 9.0, 10.0), (6, 1, 2.0, 0.0), (20, 1, 10.0, 0.0)]):
        want = _hand_probability(
            0.8 if item < 10 else 0.05,
            2.0,
            count,
            math.log(10),
            math.log(own) if own else 0.0,
            0.1,
            0.1,
            ago,
            7.0,
        )
        assert est.probability[j] == pytest.approx(want, rel=1e-5)
    # Item 3 (bought 5 times every 10 days, last 9 days ago) is the most due.
    assert int(rebuy.rank_due(est.probability)[0]) == 0
    assert est.probability[0] == pytest.approx(0.770, abs=0.002)


def test_timing_shapes_the_probability(model):
    p = model.params
    items, count, own = np.full(4, 3), np.full(4, 5), np.full(4, math.log(10.0), np.float32)
    ago = np.array([1.0, 9.0, 30.0, 120.0])
    est = rebuy.due(p, items, REPURCHASE_NOW - ago * DAY, count, own, REPURCHASE_NOW, 7.0)
    # Just bought: not due yet; at the usual interval: most due; long overdue: probably lapsed.
    assert (
        est.probability[1] > est.probability[0]
        and est.probability[1] > est.probability[2] > est.probability[3]
    )
    assert est.overdue_days[2] == pytest.approx(20.0, abs=0.5) and est.overdue_days[1] == 0
    # A longer horizon can only add purchases.
    longer = rebuy.due(p, items, REPURCHASE_NOW - ago * DAY, count, own, REPURCHASE_NOW, 30.0)
    assert (longer.probability >= est.probability).all()
    assert (est.due_in_days >= 0).all()
    assert (est.expected_next == (REPURCHASE_NOW + est.due_in_days * DAY).astype(np.int64)).all()


def test_an_item_nobody_buys_again_is_never_due(model):
    p = model.params
    never = rebuy.RepurchaseParams(
        rate=np.zeros_like(p.rate),
        log_interval=p.log_interval,
        buyers=p.buyers,
        repeat_buyers=p.repeat_buyers,
        within_var=0.1,
        between_var=0.1,
        strength=2.0,
    )
    est = rebuy.due(
        never,
        np.array([20]),
        np.array([REPURCHASE_NOW - 10 * DAY]),
        np.array([1]),
        np.zeros(1),
        REPURCHASE_NOW,
    )
    assert est.probability[0] == 0.0


def test_pace_moves_the_typical_interval(model):
    p = model.params
    args = (
        np.array([3]),
        np.array([REPURCHASE_NOW - 5 * DAY]),
        np.array([1]),
        np.zeros(1),
        REPURCHASE_NOW,
        7.0,
    )
    faster = rebuy.due(p, *args, pace=math.log(0.5))
    plain = rebuy.due(p, *args)
    assert faster.interval_days[0] == pytest.approx(5.0, rel=1e-4) and plain.interval_days[
        0
    ] == pytest.approx(10.0)
    assert faster.probability[0] > plain.probability[0]


def test_dispersion_widens_the_probability_but_not_the_due_date(model):
    from dataclasses import replace

    row = model.history.row(1)
    wide = replace(model.params, dispersion=3.0)
    a = rebuy.due(model.params, row.items, row.last, row.count, row.log_interval, REPURCHASE_NOW)
    b = rebuy.due(wide, row.items, row.last, row.count, row.log_interval, REPURCHASE_NOW)
    assert not np.allclose(a.probability, b.probability)
    assert np.allclose(a.due_in_days, b.due_in_days)


def test_repurchasable_items_by_rate_and_override():
    rate = np.array([0.1, 0.5, 0.39, 0.4], np.float32)
    category = np.array([0, 1, 2, 2], np.int32)
    assert rebuy.repurchasable_items(rate, 0.4).tolist() == [False, True, False, True]
    assert rebuy.repurchasable_items(rate, 0.4, category, np.array([0])).tolist() == [True, True, False, True]
    assert rebuy.repurchasable_items(rate, 1.01).tolist() == [False] * 4
    assert rebuy.repurchasable_items(None, 0.4, category, np.array([2])).tolist() == [
        False,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError):
        rebuy.repurchasable_items(None, 0.4)


def test_merge_purchases_adds_occasions_and_intervals():
    h = rebuy.UserHistory(
        np.array([3, 6], np.int32),
        np.array([REPURCHASE_NOW - 20 * DAY, REPURCHASE_NOW - 2 * DAY], np.int64),
        np.array([3, 1], np.int32),
        np.array([math.log(10.0), 0.0], np.float32),
        pace=0.25,
    )
    merged = rebuy.merge_purchases(
        h,
        np.array([3, 6, 9, 3]),
        np.array(
            [REPURCHASE_NOW, REPURCHASE_NOW - 2 * DAY + 3600, REPURCHASE_NOW - DAY, REPURCHASE_NOW - 30 * DAY]
        ),
    )
    assert merged.items.tolist() == [3, 6, 9]
    # Item 3: a fourth occasion 20 days after the third; the mean log interval takes it in.
    assert merged.count[0] == 4 and merged.last[0] == REPURCHASE_NOW
    assert merged.log_interval[0] == pytest.approx((2 * math.log(10.0) + math.log(20.0)) / 3, rel=1e-6)
    # Item 6: an hour after the last purchase is the same occasion; item 9 is new.
    assert merged.count[1] == 1 and merged.last[1] == REPURCHASE_NOW - 2 * DAY
    assert merged.count[2] == 1 and merged.last[2] == REPURCHASE_NOW - DAY
    assert merged.pace == 0.25
    assert rebuy.merge_purchases(h, np.zeros(0, int), np.zeros(0, int)) is h


def test_newest_keeps_the_most_recent_items():
    h = rebuy.UserHistory(
        np.arange(5, dtype=np.int32),
        np.array([5, 1, 4, 2, 3], np.int64),
        np.ones(5, np.int32),
        np.zeros(5, np.float32),
    )
    assert rebuy.newest(h, 3).items.tolist() == [0, 2, 4]
    assert rebuy.newest(h, 10) is h


def test_reason_in_words():
    assert (
        rebuy.reason(5, 10.2, 9.0, 2.4, 0.8)
        == "bought 5 times, about every 10 days; last bought 9 days ago, due in 2 days"
    )
    assert rebuy.reason(1, 30.0, 45.0, 3.0, 0.62) == (
        "62% of its purchases are repeated, typically after 30 days; "
        "last bought 45 days ago, 15 days later than usual"
    )
    assert rebuy.reason(2, 7.0, 0.2, 0.3, 0.5).endswith("last bought today, due now")


def test_every_already_bought_rule_uses_the_exemption_mask():
    from recsvc.core.bundles import already_bought
    from recsvc.core.ranking import Filters, excluded_items
    from recsvc.serving.model import ServingModel
    from tests.factories import repurchase_artifact

    artifact = repurchase_artifact()
    model = ServingModel.from_artifact(artifact)
    exempt = artifact.repurchasable(0.4)  # items 0-9
    bought = np.array([3, 15, 15, 22], np.int32)
    assert set(excluded_items(model, Filters(purchased=bought, repurchasable=exempt)).tolist()) == {15, 22}
    assert set(excluded_items(model, Filters(purchased=bought)).tolist()) == {3, 15, 22}
    assert already_bought(bought, artifact.category, (), exempt).tolist() == [15, 22]
    # The operator's categories add to the learned rule (15 % 3 == 0: shoes).
    assert already_bought(bought, artifact.category, (), artifact.repurchasable(0.4, ["shoes"])).tolist() == [
        22
    ]


#: A ranker that weighs every feature (its values mean nothing; the paths must agree on them).
SOME_RANKER = (0.7, -0.1, 0.1, 0.05, -0.06, -0.14, -0.26, 0.21, 0.98)


@pytest.mark.parametrize("ranker", [None, SOME_RANKER], ids=["probability", "ranker"])
@pytest.mark.parametrize(
    "size",
    [
        1,
        5,
        rebuy.SMALL_HISTORY_RANKED,
        rebuy.SMALL_HISTORY_RANKED + 1,
        rebuy.SMALL_HISTORY,
        rebuy.SMALL_HISTORY + 1,
        200,
    ],
)
def test_ranking_a_history_agrees_with_the_batch_formulas(model, size, ranker):
    from dataclasses import replace

    rng = np.random.default_rng(size)
    count = rng.integers(1, 9, size).astype(np.int32)
    history = rebuy.UserHistory(
        rng.choice(50, size, replace=size > 50).astype(np.int32),
        (REPURCHASE_NOW - rng.uniform(0, 90, size) * DAY).astype(np.int64),
        count,
        np.log(rng.uniform(3, 40, size)).astype(np.float32),
        pace=0.2,
        recent=None if ranker is None else (count * rng.uniform(0.2, 1.0, size)).astype(np.float32),
    )
    params = replace(model.params, dispersion=2.0, ranker=ranker)
    allowed = rng.random(size) < 0.8
    ranked = rebuy.rank_history(params, history, REPURCHASE_NOW, 7.0, 10, allowed, min_probability=0.05)
    batch = rebuy.due(
        params, history.items, history.last, history.count, history.log_interval, REPURCHASE_NOW, 7.0, 0.2
    )
    keep = allowed & (batch.probability >= 0.05)
    elapsed = (REPURCHASE_NOW - history.last) / DAY
    key = rebuy.rank_key(
        params, batch.probability, history.items, history.count, elapsed, batch.interval_days,
        history.recent, float(count.max()),
    )  # fmt: skip
    want = rebuy.rank_due(key, keep)[:10]
    assert ranked.order.tolist() == want.tolist()
    # The probability shown stays the cure model's, whatever orders the items.
    assert ranked.probability == pytest.approx(batch.probability[want], rel=1e-6, abs=1e-12)
    assert ranked.due_in_days == pytest.approx(batch.due_in_days[want], rel=1e-5, abs=1e-6)
    assert ranked.interval_days == pytest.approx(batch.interval_days[want], rel=1e-6)


def test_without_a_ranker_items_are_ordered_by_their_probability(model):
    from dataclasses import replace

    probability = np.array([0.2, 0.5, 0.1])
    args = (np.array([3, 4, 5]), np.array([1, 2, 3]), np.array([5.0, 9.0, 1.0]), np.full(3, 10.0), None, 3.0)
    assert rebuy.rank_key(model.params, probability, *args).tolist() == probability.tolist()
    # The identity ranker (what training keeps without enough held-out customers): the log-odds.
    identity = replace(model.params, ranker=(1.0,) + (0.0,) * (len(rebuy.RANKER_FEATURES) - 1))
    key = rebuy.rank_key(identity, probability, *args)
    assert key == pytest.approx(np.log(probability / (1 - probability)))


def test_ranker_features_by_hand():
    x = rebuy.ranker_features(
        np.array([0.25]), np.array([4]), np.array([30.0]), np.array([9.0]), np.array([0.5]),
        np.array([2.0]), np.array([8.0]),
    )[0]  # fmt: skip
    assert dict(zip(rebuy.RANKER_FEATURES, x.tolist(), strict=True)) == pytest.approx(
        {
            "probability_log_odds": math.log(1 / 3),
            "log1p_occasions": math.log(5),
            "log1p_days_since": math.log(31),
            "rate_log_odds": 0.0,
            "log_overdue": math.log(31) - math.log(10),
            "log_odds_x_occasions": math.log(1 / 3) * math.log(5),
            "bought_once": 0.0,
            "occasions_share_of_top": 0.5,
            # Weighted occasions 2 at the last purchase, 30 days (one RECENT_DAYS) ago.
            "log1p_recent": math.log1p(2.0 / math.e),
        }
    )


def test_merge_purchases_ages_the_recency_weighted_occasions():
    history = rebuy.UserHistory(
        np.array([3], np.int32),
        np.array([REPURCHASE_NOW - 30 * DAY], np.int64),
        np.array([2], np.int32),
        np.array([math.log(10.0)], np.float32),
        recent=np.array([1.5], np.float32),
    )
    merged = rebuy.merge_purchases(history, np.array([3, 8]), np.array([REPURCHASE_NOW, REPURCHASE_NOW]))
    assert merged.recent is not None
    # 1.5 aged by one RECENT_DAYS, plus the new occasion; a new item starts at one occasion.
    assert merged.recent.tolist() == pytest.approx([1.5 / math.e + 1.0, 1.0], rel=1e-6)
    # A customer new since the model: their repeated purchases are weighted too.
    new = rebuy.merge_purchases(
        rebuy.UserHistory.empty(), np.array([5, 5]), np.array([REPURCHASE_NOW - DAY, REPURCHASE_NOW])
    )
    assert new.recent is not None and new.recent.tolist() == pytest.approx([math.exp(-1 / 30) + 1.0])
    # A history from a version without a ranker stays without the column.
    old = rebuy.UserHistory(history.items, history.last, history.count, history.log_interval)
    assert rebuy.merge_purchases(old, np.array([3]), np.array([REPURCHASE_NOW])).recent is None
