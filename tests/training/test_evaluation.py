"""Metrics against hand-computed values, top-k selection, the time split, and ALS vs popularity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core.eventfiles import load_catalog, load_events
from recsvc.core.events import EventTable
from training.als import TrainParams
from training.evaluation import (
    coverage_at_k,
    evaluate,
    format_table,
    hit_matrix,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    time_split,
    top_k,
    tune,
)
from training.synth import write_shop

# User 0 is shown [1, 2, 3] and bought {2, 5}; user 1 is shown [4, 0] (one slot empty) and bought {0}.
RECOMMENDED = np.array([[1, 2, 3], [4, 0, -1]])
RELEVANT = sp.csr_matrix((np.ones(3), ([0, 0, 1], [2, 5, 0])), shape=(2, 6))
N_RELEVANT = np.array([2.0, 1.0])
L2, L3 = math.log2(2), math.log2(3)


def test_hit_matrix():
    assert hit_matrix(RECOMMENDED, RELEVANT).tolist() == [[False, True, False], [False, True, False]]


def test_metrics_by_hand():
    hits = hit_matrix(RECOMMENDED, RELEVANT)
    assert precision_at_k(hits, N_RELEVANT, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert recall_at_k(hits, N_RELEVANT, 2) == pytest.approx((1 / 2 + 1 / 1) / 2)
    ndcg_user0 = (1 / L3) / (1 / L2 + 1 / L3)  # hit at rank 2 of 2 relevant
    ndcg_user1 = (1 / L3) / (1 / L2)  # hit at rank 2 of 1 relevant
    assert ndcg_at_k(hits, N_RELEVANT, 2) == pytest.approx((ndcg_user0 + ndcg_user1) / 2)
    # AP: precision at the hit rank (1/2) over min(k, |relevant|): 0.5/2 and 0.5/1
    assert map_at_k(hits, N_RELEVANT, 2) == pytest.approx((0.25 + 0.5) / 2)
    assert hit_rate_at_k(hits, N_RELEVANT, 1) == 0.0
    assert hit_rate_at_k(hits, N_RELEVANT, 2) == 1.0
    assert coverage_at_k(RECOMMENDED, 6, 2) == pytest.approx(4 / 6)
    assert coverage_at_k(RECOMMENDED, 6, 3) == pytest.approx(5 / 6)  # the -1 pad is not an item
    metrics = ranking_metrics(RECOMMENDED, RELEVANT, n_items=6, ks=(2, 3))
    assert metrics["precision@3"] == pytest.approx(1 / 3)
    assert metrics["ndcg@3"] == pytest.approx(metrics["ndcg@2"])
    assert set(metrics) == {
        f"{m}@{k}" for m in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage") for k in (2, 3)
    }


def test_perfect_and_empty_rankings():
    perfect = np.array([[2, 5, 1], [0, 1, 2]])
    metrics = ranking_metrics(perfect, RELEVANT, n_items=6, ks=(2,))
    assert metrics["ndcg@2"] == pytest.approx(1.0) and metrics["map@2"] == pytest.approx(1.0)
    assert metrics["recall@2"] == pytest.approx(1.0)
    nothing = np.full((2, 3), -1)
    assert ranking_metrics(nothing, RELEVANT, n_items=6, ks=(3,))["ndcg@3"] == 0.0


def test_top_k_excludes_breaks_ties_by_index_and_pads():
    scores = np.array([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    assert top_k(scores, 3, exclude).tolist() == [[2, 3, 1], [0, 1, 2]]
    assert top_k(scores, 6).tolist() == [[0, 2, 3, 1, -1, -1], [0, 1, 2, 3, -1, -1]]
    everything = sp.csr_matrix(np.ones((2, 4)))
    assert top_k(scores, 2, everything).tolist() == [[-1, -1], [-1, -1]]


def test_time_split_trains_on_the_past_and_tests_on_later_purchases():
    day = 86_400
    t0 = 1_700_000_000
    table = EventTable.from_records(
        [
            {"user_id": "u1", "item_id": "a", "event": "view", "timestamp": t0},
            {"user_id": "u1", "item_id": "a", "event": "purchase", "timestamp": t0 + 1 * day},
            {"user_id": "u1", "item_id": "b", "event": "view", "timestamp": t0 + 4 * day},
            {"user_id": "u1", "item_id": "b", "event": "purchase", "timestamp": t0 + 5 * day},
            {"user_id": "u2", "item_id": "c", "event": "purchase", "timestamp": t0 + 10 * day},
        ]
    )
    train, test = time_split(table, 6)  # cutoff = newest - 6 days = t0 + 4 days (+1 s)
    assert train.timestamp.tolist() == [t0, t0 + day, t0 + 4 * day]
    assert test.timestamp.tolist() == [t0 + 5 * day, t0 + 10 * day]
    assert (test.event == 2).all()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    events_path, catalog_path = write_shop(
        tmp_path_factory.mktemp("shop"), seed=11, n_users=1500, n_items=400
    )
    events, _ = load_events(events_path)
    catalog, _ = load_catalog(catalog_path)
    return events, catalog


def test_als_clearly_beats_popularity_on_synthetic_data(shop):
    events, catalog = shop
    metrics = evaluate(events, catalog, TrainParams(), seed=1)
    split = metrics["split"]
    assert split["test_users"] > 100 and split["exclude_purchased"]
    for k in (10, 20):
        assert metrics["als"][f"ndcg@{k}"] > 1.5 * metrics["popularity"][f"ndcg@{k}"]
        assert metrics["als"][f"ndcg@{k}"] > 1.5 * metrics["recent_popularity"][f"ndcg@{k}"]
        assert metrics["als"][f"recall@{k}"] > metrics["popularity"][f"recall@{k}"]
    assert metrics["item_knn"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    table = format_table(metrics)
    assert table.splitlines()[1].split()[:3] == ["method", "precision@10", "recall@10"]
    assert "als ndcg@10 vs popularity" in table
    # The same seed gives the same numbers.
    assert evaluate(events, catalog, TrainParams(), seed=1, methods=("als",))["als"] == metrics["als"]


def test_tuning_is_bounded_and_never_worse_than_the_start(shop):
    events, catalog = shop
    start = TrainParams(factors=16, iterations=5)
    result = tune(events, catalog, start, trials=3, seed=0)
    assert 1 <= len(result.trials) <= 3
    first = next(t for t in result.trials if t["trial"] == 0)
    assert result.best_score >= first["score"]
    assert result.trials[0]["score"] == result.best_score
    # The validation split lives strictly before the evaluation window.
    evaluation = evaluate(events, catalog, start, methods=("popularity",))
    assert result.split["cutoff"] < evaluation["split"]["cutoff"]
    assert result.to_dict()["chosen"]["factors"] == result.best.factors


def test_no_test_user_is_reported_not_crashed():
    t0 = 1_700_000_000
    table = EventTable.from_records(
        [
            {"user_id": "u1", "item_id": "a", "event": "view", "timestamp": t0},
            {"user_id": "u2", "item_id": "b", "event": "purchase", "timestamp": t0 + 10 * 86_400},
        ]
    )
    metrics = evaluate(table, None, TrainParams(factors=2), split_days=2)
    assert "als" not in metrics and "no test user" in metrics["note"]
    assert metrics["split"]["cold_test_users"] == 1
    assert "no test user" in format_table(metrics)
