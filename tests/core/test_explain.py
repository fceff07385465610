"""Explanations on hand-made factors and similarities whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core.explain import (
    Code,
    Explanation,
    FactorStats,
    History,
    als_attribution,
    describe,
    explain_items,
    explain_popular,
)
from recsvc.core.foldin import fold_in, gramian
from recsvc.core.scoring import PLAIN_ALS, ModelSpec, Scorer, popularity_prior

ONLY_KNN = ModelSpec(als=0, knn=1, popularity=0, popularity_boost=0, seen=0)
# 5 items. Item 0's neighbour is 2 (1.0); item 1's are 3 (1.0) and 2 (0.1); item 4 has none.
S = sp.csr_matrix(
    np.array(
        [
            [0, 0, 1.0, 0, 0],
            [0, 0, 0.1, 1.0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
)
TITLES = ["Red hat", "Blue scarf", "Hat pin", "", "Socks"]
IDS = [f"sku-{i}" for i in range(5)]


def history(items, raw, **masks):
    return History(np.asarray(items), np.asarray(raw, dtype=np.float64), **masks)


def test_item_knn_names_the_history_item_whose_neighbour_it_is():
    scorer = Scorer(ONLY_KNN, None, similarity=S)
    found = explain_items(scorer, history([0, 1], [1.0, 1.0]), None, np.array([2, 3]))
    assert [(e.code, e.anchors) for e in found] == [(Code.VIEWED, (0, 1)), (Code.VIEWED, (1,))]
    # Item 2 gets 1.0 from item 0 and 0.1 from item 1: both named, the stronger first.


def test_the_strength_of_the_history_decides_the_anchor():
    scorer = Scorer(ONLY_KNN, None, similarity=S)
    # Item 1 viewed 20 times: 20 x 0.1 = 2.0 beats item 0's 1 x 1.0 for item 2.
    (found,) = explain_items(scorer, history([0, 1], [1.0, 20.0]), None, np.array([2]))
    assert found.anchors == (1, 0)


def test_bought_and_real_time_anchors_have_their_own_codes():
    scorer = Scorer(ONLY_KNN, None, similarity=S)
    masks = {"recent": np.array([True, False]), "bought": np.array([False, True])}
    found = explain_items(scorer, history([0, 1], [1.0, 1.0], **masks), None, np.array([2, 3]))
    assert [e.code for e in found] == [Code.JUST_VIEWED, Code.BOUGHT]


def test_an_item_without_any_personal_contribution_is_explained_by_popularity():
    spec = ModelSpec(als=0, knn=1, popularity=1, popularity_boost=0, seen=0)
    scorer = Scorer(spec, None, similarity=S, prior=popularity_prior(np.array([1, 1, 1, 1, 1000])))
    found = explain_items(scorer, history([0], [1.0]), None, np.array([2, 4]))
    assert found[0].code is Code.VIEWED and found[0].anchors == (0,)
    # Item 4: no neighbour of the history, the best seller.
    assert found[1].code is Code.POPULAR and found[1].anchors == ()
    assert found[1].parts["popularity"] > found[1].parts["item_knn"]


def test_a_seen_item_is_explained_as_seen():
    spec = ModelSpec(als=0, knn=1, popularity=0, popularity_boost=0, seen=100)
    scorer = Scorer(spec, None, similarity=S)
    found = explain_items(scorer, history([0, 1], [1.0, 3.0]), None, np.array([1, 2]))
    assert found[0].code is Code.SEEN and found[0].parts["seen"] == pytest.approx(100.0)
    assert found[1].code is Code.VIEWED


def test_als_attribution_sums_to_the_folded_in_score():
    # implicit's explain: for a fold-in vector the per-item parts add up to y_i . x_u exactly.
    rng = np.random.default_rng(7)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    indices, conf, alpha, reg = np.array([1, 4, 6]), np.array([1.0, 3.0, 0.5]), 5.0, 0.1
    x = fold_in(y, indices, conf, reg, alpha, yty=gramian(y))
    h = History(indices, conf, effective=alpha * conf, regularization=reg)
    parts = als_attribution(y, h, np.arange(8), gramian(y))
    assert parts.sum(axis=1) == pytest.approx((y @ x).astype(np.float64), abs=1e-4)


def test_plain_als_names_the_history_item_pointing_the_same_way():
    # Items 0 and 2 point along the first factor, 1 and 3 along the second.
    y = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.05], [0.05, 0.9]], dtype=np.float32)
    indices, conf, alpha, reg = np.array([0, 1]), np.array([1.0, 1.0]), 10.0, 0.1
    x = fold_in(y, indices, conf, reg, alpha, yty=gramian(y))
    h = History(indices, conf, effective=alpha * conf, regularization=reg)
    found = explain_items(Scorer(PLAIN_ALS, y), h, x, np.array([2, 3]), stats=FactorStats.of(y))
    assert [(e.code, e.anchors[0]) for e in found] == [(Code.VIEWED, 0), (Code.VIEWED, 1)]
    assert found[0].parts["als"] == pytest.approx(float(y[2] @ x), abs=1e-4)


def test_parts_add_up_to_the_scorers_score_up_to_a_per_user_constant():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(5, 4)).astype(np.float32)
    spec = ModelSpec(als=1, knn=2, popularity=0.25, popularity_boost=3, seen=100)
    scorer = Scorer(spec, y, similarity=S, prior=popularity_prior(np.array([5, 1, 0, 9, 30])))
    raw, x = np.array([2.0, 1.0]), rng.normal(size=4).astype(np.float32)
    scores = scorer.score_one(np.array([0, 1]), raw, x).astype(np.float64)
    items = np.arange(5)
    for stats in (None, FactorStats.of(y)):  # the ALS row whole, or its mean and spread from Y^T Y
        found = explain_items(scorer, history([0, 1], raw), x, items, stats=stats)
        summed = np.array([sum(e.parts.values()) for e in found])
        assert scores - summed == pytest.approx(np.full(5, (scores - summed)[0]), abs=1e-3)


def test_factor_stats_give_the_rows_mean_and_spread_without_the_row():
    rng = np.random.default_rng(5)
    y, x = rng.normal(size=(300, 8)), rng.normal(size=8)
    mean, std = FactorStats.of(y).row_z(x)
    assert (mean, std) == pytest.approx((float((y @ x).mean()), float((y @ x).std())), rel=1e-9)


def test_an_empty_history_explains_by_popularity():
    spec = ModelSpec(als=0, knn=1, popularity=1, popularity_boost=0, seen=0)
    scorer = Scorer(spec, None, similarity=S, prior=popularity_prior(np.arange(5)))
    found = explain_items(scorer, History.empty(), None, np.array([4, 3]))
    assert [e.code for e in found] == [Code.POPULAR, Code.POPULAR]


def test_popular_lists_are_trending():
    assert [e.code for e in explain_popular(3)] == [Code.TRENDING] * 3


@pytest.mark.parametrize(
    ("explanation", "category", "text"),
    [
        (Explanation(Code.VIEWED, (0,)), None, "Because you viewed Red hat"),
        (Explanation(Code.VIEWED, (0, 3)), None, "Because you viewed Red hat and sku-3"),
        (Explanation(Code.BOUGHT, (1,)), None, "Because you bought Blue scarf"),
        (Explanation(Code.JUST_VIEWED, (4,)), None, "Because you just viewed Socks"),
        (Explanation(Code.SEEN), None, "You looked at this before"),
        (Explanation(Code.POPULAR), "hats", "Popular in hats"),
        (Explanation(Code.POPULAR), None, "Popular with shoppers"),
        (Explanation(Code.TRENDING), "hats", "Trending in hats"),
        (Explanation(Code.TRENDING), None, "Trending now"),
        (Explanation(Code.BOUGHT_TOGETHER, (0,)), None, "Often bought together with Red hat"),
    ],
)
def test_describe_names_anchors_by_title_else_id(explanation, category, text):
    assert describe(explanation, 2, TITLES, IDS, category) == text
