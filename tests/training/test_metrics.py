"""Ranking metrics against hand-computed values, and their intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from training.metrics import (
    bootstrap_interval,
    bucket_of,
    coverage_at_k,
    hit_matrix,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    ratio_interval,
    recall_at_k,
)

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


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_users():
    rng = np.random.default_rng(0)
    small = rng.random(50)
    large = rng.random(5000)
    for values in (small, large):
        low, high = bootstrap_interval(values, seed=1)
        assert low < values.mean() < high
    assert np.subtract(*bootstrap_interval(large, 1))[()] > np.subtract(*bootstrap_interval(small, 1))[()]
    assert bootstrap_interval(np.full(10, 0.3), seed=1) == pytest.approx((0.3, 0.3))
    assert bootstrap_interval(np.zeros(0)) == (0.0, 0.0)
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)  # seeded


def test_ratio_interval_is_paired():
    rng = np.random.default_rng(0)
    theirs = rng.random(400)
    # Twice as good for every user: the paired interval is exactly 2, however noisy the users are.
    assert ratio_interval(2 * theirs, theirs, seed=0) == pytest.approx((2.0, 2.0))
    low, high = ratio_interval(theirs + rng.normal(0, 0.05, 400), theirs, seed=0)
    assert low < 1.0 < high
    assert ratio_interval(theirs, np.zeros(400)) is None


def test_activity_buckets():
    assert bucket_of(np.array([1, 2, 3, 9, 10, 500])).tolist() == [0, 0, 1, 1, 2, 2]
