"""Fitting and evaluating the repurchase model: occasions by hand, a simulated replenishment shop."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from recsvc.core import repurchase as rebuy
from recsvc.core.artifact import ArtifactError, read_artifact, write_artifact
from recsvc.core.contract import PURCHASE, VIEW
from recsvc.core.events import Catalog, EventTable
from recsvc.core.repurchase import MIN_GAP_S, RANKER_FEATURES, RECENT_DAYS
from tests.factories import repurchase_artifact
from tests.shops import CYCLES, DAY, T, replenishment_shop
from training.repurchase import (
    DISPERSIONS,
    IDENTITY_RANKER,
    RepurchaseSettings,
    _conditional_logit,
    choose_dispersion,
    evaluate_repurchase,
    fit_params,
    fit_ranker,
    fit_repurchase,
    format_report,
    pair_stats,
    purchase_lines,
)


def test_pair_stats_counts_occasions_and_intervals():
    # user 0 / item 1: two lines of one order 20 h apart (one occasion), then 10 and 30 days later;
    # user 0 / item 2: two orders 2 h apart (one occasion); user 1 / item 1: once.
    user = np.array([0, 0, 0, 0, 0, 0, 1])
    item = np.array([1, 1, 1, 1, 2, 2, 1])
    ts = np.array([T, T + 20 * 3600, T + 10 * DAY, T + 40 * DAY, T, T + 7200, T + DAY])
    order = np.array([5, 5, 6, 7, 8, 9, -1])
    stats = pair_stats(user, item, ts, order)
    assert stats.user.tolist() == [0, 0, 1] and stats.item.tolist() == [1, 2, 1]
    assert stats.count.tolist() == [3, 1, 1]
    assert stats.last.tolist() == [T + 40 * DAY, T, T + DAY]
    assert stats.log_sum[0] == pytest.approx(math.log(10) + math.log(30))
    assert stats.log_sumsq[0] == pytest.approx(math.log(10) ** 2 + math.log(30) ** 2)
    assert stats.log_mean.tolist() == pytest.approx([(math.log(10) + math.log(30)) / 2, 0.0, 0.0])
    # Occasions weighted by their age at the last one: 1 + e^(-30/RECENT_DAYS) + e^(-40/RECENT_DAYS).
    assert stats.recent.tolist() == pytest.approx(
        [1 + math.exp(-30 / RECENT_DAYS) + math.exp(-40 / RECENT_DAYS), 1.0, 1.0]
    )
    # Without order ids the 20-hour gap starts a new occasion; 12 hours or less never does.
    assert pair_stats(user, item, ts).count.tolist() == [4, 1, 1]
    assert MIN_GAP_S == 12 * 3600


def test_purchase_lines_reads_purchases_only():
    table = EventTable(
        user_id=np.array(["a", "a", "b", "zz"], dtype=object),
        item_id=np.array(["x", "x", "y", "x"], dtype=object),
        event=np.array([PURCHASE, VIEW, PURCHASE, PURCHASE], np.int8),
        timestamp=np.array([T, T + 1, T + 2, T + 3]),
        order_id=np.array(["o1", "", "", "o2"], dtype=object),
    )
    from recsvc.core.ids import IdMap

    user, item, ts, order = purchase_lines(table, IdMap(["a", "b"]), IdMap(["x", "y"]), until=T + 3)
    assert user.tolist() == [0, 1] and item.tolist() == [0, 1] and ts.tolist() == [T, T + 2]
    assert order[0] >= 0 and order[1] == -1


@pytest.fixture(scope="module")
def shop():
    return replenishment_shop(seed=3)


def _catalog(categories: dict[str, str]) -> Catalog:
    ids = np.array(sorted(categories), dtype=object)
    return Catalog(
        item_id=ids,
        title=np.array([""] * len(ids), dtype=object),
        category=np.array([categories[i] for i in ids], dtype=object),
        price=np.full(len(ids), np.nan, np.float32),
        available=np.ones(len(ids), bool),
    )


def test_fit_recovers_cycles_and_who_buys_again(shop):
    events, categories = shop
    item_ids = np.array(sorted(categories), dtype=object)
    codes = np.array([0 if categories[i] == "consumables" else 1 for i in item_ids])
    users = np.unique(events.user_id)
    model, report = fit_repurchase(events, users, item_ids, codes, int(events.timestamp.max()))
    rate, typical = model.params.rate, np.exp(model.params.log_interval)
    for j, item in enumerate(item_ids.tolist()):
        number = int(item[1:])
        if number < 20:
            # The simulated continuation is 0.9 after every purchase; the cycle within 10%.
            assert 0.8 < rate[j] < 0.97, item
            assert typical[j] == pytest.approx(CYCLES[number % 5], rel=0.1), item
        else:
            assert rate[j] < 0.05, item  # durables: never bought twice
    assert report["dispersion"] in DISPERSIONS and report["pairs"] == len(model.history.items)
    assert model.history.n_users == len(users) and np.isfinite(model.history.pace).all()


def test_shrinkage_pulls_thin_items_towards_their_category():
    # Category 0: item 1 bought by 30 customers every 10 days, until 5 days before the end; item 0
    # bought once by one customer. Category 1: item 2 bought once by 30 customers, long ago.
    end = T + 100 * DAY
    u1 = np.repeat(np.arange(30), 10)
    t1 = end - 5 * DAY - np.tile(np.arange(10) * 10, 30) * DAY
    user = np.r_[u1, [30], np.arange(31, 61)]
    item = np.r_[np.ones(len(u1), int), [0], np.full(30, 2)]
    ts = np.r_[t1, [end - 40 * DAY], np.full(30, T)]
    fitted = fit_params(pair_stats(user, item, ts), 3, np.array([0, 0, 1]), end)
    rate = fitted.params.rate
    assert rate[1] > 0.8 and rate[2] < 0.2
    # The thin item borrows its category's rate and interval.
    assert rate[0] > 0.5
    assert math.exp(fitted.params.log_interval[0]) == pytest.approx(10.0, rel=0.2)


def test_recent_buyers_are_censored_not_counted_as_non_repeaters():
    # Twenty buyers, none bought again: two days before the end of the log (too early to tell),
    # or a hundred days before it (they would have by now).
    end = T + 100 * DAY
    recent = pair_stats(np.arange(20), np.zeros(20, int), np.full(20, end - 2 * DAY))
    old = pair_stats(np.arange(20), np.zeros(20, int), np.full(20, T))
    r_recent = fit_params(recent, 1, np.array([0]), end).params.rate[0]
    r_old = fit_params(old, 1, np.array([0]), end).params.rate[0]
    assert r_old < 0.25 < 0.4 < r_recent


def test_choose_dispersion_tries_each_factor(shop):
    events, categories = shop
    from recsvc.core.ids import IdMap

    items = IdMap(np.array(sorted(categories), dtype=object))
    lines = purchase_lines(events, IdMap(np.unique(events.user_id)), items)
    factor, tried = choose_dispersion(
        *lines, len(items), np.zeros(len(items), int), int(events.timestamp.max())
    )
    assert factor in DISPERSIONS and sorted(float(k) for k in tried) == sorted(DISPERSIONS)
    assert tried[str(factor)] == max(tried.values())


def test_due_list_beats_frequency_and_recency_on_a_replenishment_shop(shop):
    events, categories = shop
    result = evaluate_repurchase(events, _catalog(categories), horizon_days=7.0)
    assert result["users_with_rebuys"] > 100
    for base in ("frequency", "recency"):
        low, _high = result["ci95"][f"ratio_vs_{base}_ndcg@10"]
        assert low > 1.05, (base, result[f"ratio_vs_{base}_ndcg@10"])
    cal = result["calibration"]
    assert cal["pairs"] > 100
    assert cal["repurchase_mae_days"] < cal["item_interval_mae_days"]
    text = format_report(result)
    assert "repurchase ndcg@10 vs frequency" in text and "median absolute error" in text
    json.dumps(result)  # the CLI writes it with --json-out


def test_evaluate_needs_purchases_before_the_cutoff():
    table = EventTable(
        user_id=np.array(["a"], dtype=object),
        item_id=np.array(["x"], dtype=object),
        event=np.array([PURCHASE], np.int8),
        timestamp=np.array([T]),
    )
    with pytest.raises(ValueError, match="before the cutoff"):
        evaluate_repurchase(table)


def test_artifact_round_trip_and_validation(tmp_path):
    a = repurchase_artifact()
    path = write_artifact(a, tmp_path)
    back = read_artifact(path)
    assert back.repurchase is not None
    assert np.array_equal(back.repurchase.params.rate, a.repurchase.params.rate)
    assert np.array_equal(back.repurchase.history.last, a.repurchase.history.last)
    assert back.repurchase.params.within_var == 0.1 and back.manifest["counts"]["repurchase_pairs"] == 8
    assert back.repurchasable(0.4).sum() == 10
    assert back.repurchasable(0.4, ["hats"])[2] and not back.repurchasable(0.4)[20]

    from dataclasses import replace

    bad = repurchase_artifact()
    bad.repurchase = replace(
        bad.repurchase, params=replace(bad.repurchase.params, rate=np.full(50, 1.5, np.float32))
    )
    with pytest.raises(ArtifactError, match="repurchase.npz: rate outside"):
        bad.validate()
    short = repurchase_artifact()
    history = replace(short.repurchase.history, pace=np.zeros(3, np.float32))
    short.repurchase = replace(short.repurchase, history=history)
    with pytest.raises(ArtifactError, match="pace shape"):
        short.validate()


def test_conditional_logit_weighs_a_separating_feature_positive():
    # 300 customers of 5 items each, exactly one bought again: the one with the highest feature 0.
    # Feature 1 is noise, feature 2 the same for all of a customer's items.
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(300), 5)
    x = np.column_stack((rng.normal(size=1500), rng.normal(size=1500), np.repeat(rng.normal(size=300), 5)))
    best = np.argmax(x[:, 0].reshape(300, 5), axis=1) + np.arange(300) * 5
    y = np.zeros(1500)
    y[best] = 1.0
    beta = _conditional_logit(x, y, group, l2=1.0)
    assert beta[0] > 2.0 and abs(beta[1]) < 0.5 and abs(beta[2]) < 1e-6


def _habit_history(customers: int):
    """Every customer buys one staple every 3 days for 60 days, and three one-off items (bought
    once each, never again) spread over the same days. Items 0-4: staples; 10+: one-offs."""
    rng = np.random.default_rng(1)
    end = T + 60 * DAY
    user, item, ts = [], [], []
    for u in range(customers):
        staple = u % 5
        start = rng.uniform(0, 3)
        for day in np.arange(start, 60, 3.0):
            user.append(u), item.append(staple), ts.append(T + int(day * DAY))
        for one_off in rng.choice(np.arange(10, 40), 3, replace=False):
            user.append(u), item.append(int(one_off)), ts.append(T + int(rng.uniform(30, 60) * DAY))
    order = np.full(len(user), -1)
    return np.array(user), np.array(item), np.array(ts), order, end


def test_fit_ranker_learns_on_held_out_windows_and_ranks_the_rebought_items_first():
    user, item, ts, order, end = _habit_history(300)
    category = np.zeros(40, int)
    coefficients, report = fit_ranker(user, item, ts, order, 40, category, end, 7.0)
    assert report["ranker"] == "learned" and report["ranker_windows"] == 4
    assert report["ranker_customers"] >= 1000 and report["ranker_positives"] >= 1000
    assert coefficients is not None and len(coefficients) == len(RANKER_FEATURES)
    assert list(report["ranker_coefficients"]) == list(RANKER_FEATURES)
    # Ranked at the end of the log with those coefficients: each customer's staple first.
    stats = pair_stats(user, item, ts, order)
    fitted = fit_params(stats, 40, category, end)
    estimate = rebuy.due(
        fitted.params, stats.item, stats.last, stats.count, stats.log_mean, end, 7.0, fitted.pace[stats.user]
    )
    params = replace(fitted.params, ranker=coefficients)
    top = np.zeros(300)
    np.maximum.at(top, stats.user, stats.count.astype(float))
    key = rebuy.rank_key(
        params, estimate.probability, stats.item, stats.count, (end - stats.last) / DAY,
        estimate.interval_days, stats.recent, top[stats.user],
    )  # fmt: skip
    for u in range(300):
        mine = np.flatnonzero(stats.user == u)
        assert stats.item[mine[np.argmax(key[mine])]] == u % 5


def test_fit_ranker_keeps_the_probability_order_without_enough_held_out_customers():
    user, item, ts, order, end = _habit_history(30)
    coefficients, report = fit_ranker(user, item, ts, order, 40, np.zeros(40, int), end, 7.0)
    assert coefficients == IDENTITY_RANKER and report["ranker"].startswith("identity")
    assert report["ranker_customers"] < 200
    off, why = fit_ranker(
        user, item, ts, order, 40, np.zeros(40, int), end, 7.0, RepurchaseSettings(ranker=False)
    )
    assert off is None and why == {"ranker": "off"}


def test_fit_repurchase_records_the_ranker_in_its_report(shop):
    events, categories = shop
    item_ids = np.array(sorted(categories), dtype=object)
    model, report = fit_repurchase(
        events, np.unique(events.user_id), item_ids, np.zeros(len(item_ids), int), int(events.timestamp.max())
    )
    assert report["ranker"] in (
        "learned",
        "identity (too few customers bought again in the held-out windows)",
    )
    assert model.params.ranker == tuple(report["ranker_coefficients"].values())
    assert model.history.recent is not None and len(model.history.recent) == len(model.history.items)
    json.dumps(report)


def test_an_artifact_with_a_ranker_round_trips_and_one_without_loads_as_before(tmp_path):
    old = read_artifact(write_artifact(repurchase_artifact(), tmp_path / "old"))
    assert old.repurchase is not None
    assert old.repurchase.params.ranker is None and old.repurchase.history.recent is None
    ranked = repurchase_artifact(seed=2, ranker=(0.5,) * len(RANKER_FEATURES))
    back = read_artifact(write_artifact(ranked, tmp_path / "new"))
    assert back.repurchase is not None and back.repurchase.params.ranker == (0.5,) * len(RANKER_FEATURES)
    assert back.repurchase.history.recent is not None
    assert back.repurchase.history.recent.tolist() == ranked.repurchase.history.recent.tolist()
    wrong = repurchase_artifact(seed=3, ranker=(0.5, 0.5))
    with pytest.raises(ArtifactError, match="2 ranker coefficients"):
        wrong.validate()
