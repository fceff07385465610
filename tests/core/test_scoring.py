"""The blend's scores on hand-made parts whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core.scoring import PLAIN_ALS, ModelSpec, Scorer, popularity_prior, zscore_rows

# 4 items. Item factors: items 0 and 1 point one way, 2 the other, 3 both ways.
Y = np.array([[1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
# Item-kNN: item 0's neighbours are 1 (0.5) and 3 (1.0); item 2's neighbour is 3 (2.0).
S = sp.csr_matrix(np.array([[0, 0.5, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 2.0], [0, 0, 0, 0]], dtype=np.float32))
BUYERS = np.array([0, 10, 100, 1000])
ONLY_KNN = ModelSpec(als=0, knn=1, popularity=0, popularity_boost=0, seen=0)
ONLY_POP = ModelSpec(als=0, knn=0, popularity=1, popularity_boost=0, seen=0)


def rows(*entries_per_user):
    """``rows({item: raw weight}, ...)`` -> (users, 4) CSR of raw confidences."""
    data, indices, indptr = [], [], [0]
    for entries in entries_per_user:
        for item, weight in sorted(entries.items()):
            indices.append(item)
            data.append(weight)
        indptr.append(len(indices))
    return sp.csr_matrix((np.array(data, np.float32), indices, indptr), shape=(len(entries_per_user), 4))


def test_plain_als_is_the_dot_product():
    scorer = Scorer(PLAIN_ALS, Y)
    x = np.array([[2.0, 1.0]], dtype=np.float32)
    assert scorer.score(rows({}), x)[0].tolist() == pytest.approx((Y @ x[0]).tolist())


def test_item_knn_is_the_history_times_the_neighbours():
    scorer = Scorer(ONLY_KNN, None, similarity=S)
    scores = scorer.score(rows({0: 2.0}, {0: 1.0, 2: 1.0}), None)
    # User 0: 2 x row 0 = [0, 1, 0, 2]; user 1: row 0 + row 2 = [0, 0.5, 0, 3]; then z-scored.
    assert scores[0] == pytest.approx(zscore_rows(np.array([[0, 1.0, 0, 2.0]]))[0])
    assert scores[1] == pytest.approx(zscore_rows(np.array([[0, 0.5, 0, 3.0]]))[0])
    assert np.argsort(-scores[1], kind="stable").tolist()[:2] == [3, 1]


def test_popularity_weighs_most_for_short_histories():
    spec = ModelSpec(als=0, knn=0, popularity=0.5, popularity_boost=10, boost_half=5, seen=0)
    scorer = Scorer(spec, None, prior=popularity_prior(BUYERS))
    assert scorer.popularity_weight(np.array([0, 5, 45])) == pytest.approx([10.5, 5.5, 1.5])
    newcomer, regular = scorer.score(rows({}, {i: 1.0 for i in range(4)}), None)
    assert np.argsort(-newcomer).tolist() == [3, 2, 1, 0]  # the best sellers first
    assert newcomer.std() > regular.std()  # the same order, weighed more
    assert np.argsort(-regular).tolist() == [3, 2, 1, 0]


def test_seen_items_come_first_strongest_first():
    spec = ModelSpec(als=0, knn=0, popularity=1, popularity_boost=0, seen=100)
    scorer = Scorer(spec, None, prior=popularity_prior(BUYERS))
    scores = scorer.score(rows({0: 1.0, 1: 8.0}), None)[0]
    # Viewed items 1 (8 views) then 0 (1 view) before the best sellers 3 and 2.
    assert np.argsort(-scores).tolist() == [1, 0, 3, 2]
    prior = zscore_rows(popularity_prior(BUYERS)[None, :].astype(np.float64))[0]
    seen_gap = 100 * (1 - np.log1p(1.0) / np.log1p(8.0))
    assert scores[1] - scores[0] == pytest.approx(seen_gap + prior[1] - prior[0], rel=1e-5)


def test_the_blend_follows_the_parts_where_they_agree_and_score_one_matches():
    spec = ModelSpec(als=1, knn=1, popularity=0.5, popularity_boost=10, seen=0)
    scorer = Scorer(spec, Y, similarity=S, prior=popularity_prior(BUYERS))
    history = rows({0: 3.0})
    x = np.array([[1.0, 0.0]], dtype=np.float32)
    scores = scorer.score(history, x)[0]
    expected = (
        zscore_rows((x @ Y.T).astype(np.float64))[0]
        + zscore_rows((history @ S).toarray().astype(np.float64))[0]
        + scorer.popularity_weight(np.array([1]))[0] * zscore_rows(popularity_prior(BUYERS)[None, :])[0]
    )
    assert scores == pytest.approx(expected, rel=1e-5)
    assert scorer.score_one(np.array([0]), np.array([3.0]), x[0]) == pytest.approx(scores)


def test_top_k_leaves_out_blocked_cells_and_items():
    scorer = Scorer(ONLY_POP, None, prior=popularity_prior(BUYERS))
    blocked = sp.csr_matrix(np.array([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=np.float32))
    items, _ = scorer.top_k(rows({}, {}), None, 3, blocked=blocked, blocked_items=np.array([2]))
    assert items.tolist() == [[1, 0, -1], [3, 1, 0]]


def test_specs_are_checked_and_read_back():
    with pytest.raises(ValueError, match="model.knn must be a finite number >= 0"):
        ModelSpec(knn=-1)
    with pytest.raises(ValueError, match="model.exclude must be one of"):
        ModelSpec(exclude="everything")
    with pytest.raises(ValueError, match="at least one of"):
        ModelSpec(als=0, knn=0, popularity=0, popularity_boost=0)
    assert ModelSpec.from_mapping(None) == PLAIN_ALS  # versions from before blends
    assert ModelSpec.from_mapping(ModelSpec(knn=2).to_dict()) == ModelSpec(knn=2)
    with pytest.raises(ValueError, match="unknown key 'weights'"):
        ModelSpec.from_mapping({"weights": 1})
    with pytest.raises(ValueError, match="no similarity matrix"):
        Scorer(ModelSpec(), Y, prior=popularity_prior(BUYERS))
    assert PLAIN_ALS.is_plain_als and not ModelSpec().is_plain_als
