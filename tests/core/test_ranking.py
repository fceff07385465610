"""Contract tests of recsvc.core.ranking on a 6-item catalog whose answers are computed by hand.

Item factors put item i at (5 - i, 0), so for the user vector (1, 0) the scores are 5, 4, 3, 2, 1, 0.
Categories alternate a, b; prices 10..50 and unknown for i5; i2 is out of stock; popularity grows with
the index, so the popularity order is i5, i4, i3, i2, i1, i0.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core import ranking
from recsvc.core.artifact import Artifact, BundleCandidates
from recsvc.core.ranking import Filters
from recsvc.serving.model import ServingModel

USER = np.array([1.0, 0.0], dtype=np.float32)


def tiny_model(item_factors=None, available=None) -> ServingModel:
    n = 6
    factors = np.array([[5, 0], [4, 0], [3, 0], [2, 0], [1, 0], [0, 0]], dtype=np.float32)
    empty = sp.csr_matrix((1, n), dtype=np.float32)
    artifact = Artifact(
        item_ids=[f"i{i}" for i in range(n)],
        user_ids=["u0"],
        item_factors=factors if item_factors is None else np.asarray(item_factors, dtype=np.float32),
        user_factors=np.array([[1, 0]], dtype=np.float32),
        price=np.array([10, 20, 30, 40, 50, np.nan], dtype=np.float32),
        available=np.array([True, True, False, True, True, True])
        if available is None
        else np.asarray(available),
        category=np.array([0, 1, 0, 1, 0, 1], dtype=np.int32),
        categories=["a", "b"],
        titles=[f"Item {i}" for i in range(n)],
        popularity=np.arange(1, n + 1, dtype=np.float32),
        interactions=empty,
        purchases=empty,
        bundles=BundleCandidates.empty(n),
        manifest={"version": "tiny"},
    )
    return ServingModel.from_artifact(artifact, k=3)


def ids(idx) -> list[str]:
    return [f"i{int(i)}" for i in idx]


def codes(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return tiny_model()


@pytest.mark.parametrize(
    ("filters", "n", "expected", "expected_scores"),
    [
        (Filters(), 3, ["i0", "i1", "i3"], [5, 4, 2]),  # i2 out of stock
        (Filters(in_stock_only=False), 3, ["i0", "i1", "i2"], [5, 4, 3]),
        (Filters(categories=codes(1)), 3, ["i1", "i3", "i5"], [4, 2, 0]),
        (Filters(categories=codes(0)), 10, ["i0", "i4"], [5, 1]),  # fewer than n: all that qualify
        (Filters(categories=codes()), 3, [], []),  # only unknown categories asked for
        (Filters(min_price=25), 3, ["i3", "i4"], [2, 1]),  # i5's price is unknown: fails a bound
        (Filters(max_price=20), 3, ["i0", "i1"], [5, 4]),
        (Filters(min_price=20, max_price=40), 5, ["i1", "i3"], [4, 2]),
        (Filters(exclude=codes(0, 3)), 3, ["i1", "i4", "i5"], [4, 1, 0]),
        (Filters(purchased=codes(1)), 3, ["i0", "i3", "i4"], [5, 2, 1]),
        (Filters(purchased=codes(1), exclude_purchased=False), 3, ["i0", "i1", "i3"], [5, 4, 2]),
        (Filters(purchased=codes(0, 1), repurchase_categories=codes(1)), 3, ["i1", "i3", "i4"], [4, 2, 1]),
    ],
)
def test_recommend_for_vector_filters(model, filters, n, expected, expected_scores):
    items, scores = ranking.recommend_for_vector(model, USER, filters, n)
    assert ids(items) == expected
    assert scores.tolist() == expected_scores
    assert items.dtype == np.int32 and scores.dtype == np.float32


def test_recommend_for_vector_extra_exclusions(model):
    items, _ = ranking.recommend_for_vector(model, USER, Filters(exclude=codes(0)), 2, exclude_items=codes(1))
    assert ids(items) == ["i3", "i4"]


def test_ties_are_broken_by_lower_index():
    m = tiny_model(item_factors=[[1, 0]] * 6, available=[True] * 6)
    items, scores = ranking.recommend_for_vector(m, USER, Filters(), 4)
    assert ids(items) == ["i0", "i1", "i2", "i3"]
    assert scores.tolist() == [1, 1, 1, 1]


def test_cache_is_used_when_enough_survive(model):
    cached, cached_scores = codes(0, 1, 2), np.array([5, 4, 3], np.float32)
    items, scores, how = ranking.recommend_from_cache(model, cached, cached_scores, USER, Filters(), 2)
    assert (ids(items), scores.tolist(), how) == (["i0", "i1"], [5, 4], "cache")


def test_short_cache_falls_back_to_full_scoring(model):
    # Cached top-3 is i0, i1, i2; only i1 is in category b, so the rest must come from full scoring.
    cached, cached_scores = codes(0, 1, 2), np.array([5, 4, 3], np.float32)
    items, scores, how = ranking.recommend_from_cache(
        model, cached, cached_scores, USER, Filters(categories=codes(1)), 3
    )
    assert (ids(items), scores.tolist(), how) == (["i1", "i3", "i5"], [4, 2, 0], "full")


def test_short_cache_without_vector_fills_from_popularity_without_duplicates(model):
    cached, cached_scores = codes(0, 5), np.array([5, 0], np.float32)
    items, scores, how = ranking.recommend_from_cache(model, cached, cached_scores, None, Filters(), 4)
    # i0 and i5 from the cache, then the most popular in-stock items not yet taken: i4, i3.
    assert (ids(items), scores.tolist(), how) == (["i0", "i5", "i4", "i3"], [5, 0, 5, 4], "popular")
    assert len(set(items.tolist())) == len(items)


def test_cache_covering_every_item_is_final():
    m = tiny_model()
    everything = codes(0, 1, 2, 3, 4, 5)
    scores = np.array([5, 4, 3, 2, 1, 0], np.float32)
    items, _, how = ranking.recommend_from_cache(m, everything, scores, USER, Filters(categories=codes(0)), 5)
    assert (ids(items), how) == (["i0", "i4"], "cache")


@pytest.mark.parametrize(
    ("filters", "n", "expected"),
    [
        (Filters(), 3, ["i5", "i4", "i3"]),
        (Filters(categories=codes(0)), 3, ["i4", "i0"]),  # i2 is out of stock
        (Filters(categories=codes(0, 1)), 5, ["i5", "i4", "i3", "i1", "i0"]),
        (Filters(categories=codes(1, 0)), 2, ["i5", "i4"]),  # order of the asked categories does not matter
        (Filters(max_price=30), 3, ["i1", "i0"]),
        (Filters(exclude=codes(5)), 2, ["i4", "i3"]),
    ],
)
def test_popular_items(model, filters, n, expected):
    items, scores = ranking.popular_items(model, filters, n)
    assert ids(items) == expected
    assert scores.tolist() == [float(int(i[1:]) + 1) for i in expected]  # popularity value


def test_popular_scans_past_the_first_slice():
    # 300 items, only the least popular one in stock: _first_allowed must look beyond its first slice.
    n = 300
    art_model = tiny_model()
    m = ServingModel(
        **{
            **{f: getattr(art_model, f) for f in ("version", "manifest", "bundles", "n_buckets", "n_users")},
            "item_ids": [f"i{i}" for i in range(n)],
            "item_index": {f"i{i}": i for i in range(n)},
            "item_factors": np.zeros((n, 2), np.float32),
            "price": np.ones(n, np.float32),
            "available": np.arange(n) == 0,
            "category": np.zeros(n, np.int32),
            "categories": ["a"],
            "category_index": {"a": 0},
            "titles": [""] * n,
            "popularity": np.arange(n, dtype=np.float32),
            "popular": np.arange(n - 1, -1, -1, dtype=np.int32),
            "popular_by_category": {0: np.arange(n - 1, -1, -1, dtype=np.int32)},
            "k": 3,
        }
    )
    items, _ = ranking.popular_items(m, Filters(), 5)
    assert ids(items) == ["i0"]


def test_fill_from_popularity(model):
    items, scores = ranking.fill_from_popularity(model, Filters(), 3, codes(4), np.array([9], np.float32))
    assert ids(items) == ["i4", "i5", "i3"]
    assert scores.tolist() == [9, 6, 4]


def test_similar_items_by_cosine():
    # i0 points along x; i1 at 45 degrees; i3 almost along x but long; i4 along y; i5 opposite.
    factors = [[1, 0], [1, 1], [1, 0.01], [10, 0.5], [0, 1], [-1, 0]]
    m = tiny_model(item_factors=factors)
    items, scores = ranking.similar_items(m, 0, Filters(), 3)
    # i2 (nearly parallel) is out of stock; then i3 (cos 0.9988), i1 (0.7071), i4 (0).
    assert ids(items) == ["i3", "i1", "i4"]
    np.testing.assert_allclose(scores, [10 / np.hypot(10, 0.5), 1 / np.sqrt(2), 0], rtol=1e-5)
    items, _ = ranking.similar_items(m, 0, Filters(categories=codes(1)), 3, unit_factors=m.unit_item_factors)
    assert ids(items) == ["i3", "i1", "i5"]  # never the anchor itself


def test_excluded_items_respects_repurchase(model):
    f = Filters(exclude=codes(5), purchased=codes(0, 1, 1), repurchase_categories=codes(0))
    assert ranking.excluded_items(model, f).tolist() == [1, 5]


def test_allowed_mask_and_subset_agree(model):
    f = Filters(categories=codes(1), max_price=45, purchased=codes(3))
    mask = ranking.allowed_mask(model, f)
    subset = ranking.allowed(model, f, np.arange(6))
    assert mask.tolist() == subset.tolist() == [False, True, False, False, False, False]


def test_mask_positions_is_nonzero_in_row_major_order():
    rng = np.random.default_rng(4)
    wide = rng.random((37, 1001)) < 0.05
    cases = [
        wide,
        wide[:, ::3],  # not contiguous
        wide.T,  # Fortran order
        np.zeros((5, 7), dtype=bool),
        np.ones((3, 4), dtype=bool),
        np.zeros((4, 0), dtype=bool),
        np.zeros((0, 6), dtype=bool),
    ]
    for mask in cases:
        rows, cols = ranking.mask_positions(mask)
        want_rows, want_cols = np.nonzero(mask)
        assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()
