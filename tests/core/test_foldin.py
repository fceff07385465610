"""Fold-in math: hand-computed answers, implicit's own solver, and training's confidence recipe."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core.contract import EVENT_CODE
from recsvc.core.foldin import fold_in, gramian
from recsvc.core.weighting import (
    DEFAULT_EVENT_WEIGHTS,
    RowRecipe,
    add_raw_rows,
    raw_user_row,
    scale_row,
    unscale_row,
    user_confidence_row,
)

T0 = 1_700_000_000
DAY = 86_400


def _implicit_als(factors: int, regularization: float, alpha: float, **kwargs):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, num_threads=1, **kwargs
        )


# ------------------------------------------------------------------------------------------------
# The solve
# ------------------------------------------------------------------------------------------------


def test_fold_in_one_factor_by_hand():
    # Y = [1, 2, 3]; the user has item 0 with c = 1.5 and item 2 with c = 0.5; alpha 2, reg 0.1.
    # C = alpha * c = [3, 1];  A = YtY + reg + (3-1)*1*1 + (1-1)*3*3 = 14 + 0.1 + 2 = 16.1
    # b = 3*1 + 1*3 = 6  ->  x = 6 / 16.1
    y = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    x = fold_in(y, np.array([0, 2]), np.array([1.5, 0.5]), regularization=0.1, alpha=2.0)
    assert x.dtype == np.float32 and x.shape == (1,)
    assert x[0] == pytest.approx(6 / 16.1, rel=1e-6)


def test_fold_in_two_factors_by_hand():
    # Y rows: i0 = (1, 0), i1 = (0, 1), i2 = (1, 1); YtY = [[2, 1], [1, 2]]; reg 0.5, alpha 1.
    # User: i0 with c = 3.  A = [[2.5, 1], [1, 2.5]] + 2 * e0 e0^T = [[4.5, 1], [1, 2.5]]; b = (3, 0)
    # x = A^-1 b = (1 / (4.5*2.5 - 1)) * (2.5*3, -1*3) = (7.5, -3) / 10.25
    y = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    x = fold_in(y, np.array([0]), np.array([3.0]), regularization=0.5, alpha=1.0)
    np.testing.assert_allclose(x, np.array([7.5, -3.0]) / 10.25, rtol=1e-6)


def test_fold_in_empty_row_is_zero_vector():
    y = np.ones((4, 3), dtype=np.float32)
    x = fold_in(y, np.zeros(0, np.int64), np.zeros(0), regularization=0.1, alpha=5.0)
    np.testing.assert_array_equal(x, np.zeros(3, np.float32))


@pytest.mark.parametrize(
    "indices, conf, match",
    [
        (np.array([0, 9]), np.array([1.0, 1.0]), "out of range"),
        (np.array([0, 0]), np.array([1.0, 1.0]), "repeat"),
        (np.array([0]), np.array([np.nan]), "finite"),
        (np.array([0, 1]), np.array([1.0]), "shape"),
    ],
)
def test_fold_in_rejects_bad_rows(indices, conf, match):
    with pytest.raises(ValueError, match=match):
        fold_in(np.ones((3, 2), np.float32), indices, conf, regularization=0.1, alpha=1.0)


@pytest.mark.parametrize("alpha, regularization", [(1.0, 0.01), (20.0, 0.05), (40.0, 1.0)])
def test_fold_in_equals_implicit_recalculate_user(alpha, regularization):
    rng = np.random.default_rng(3)
    n_items, factors = 200, 16
    model = _implicit_als(factors, regularization, alpha)
    model.item_factors = rng.standard_normal((n_items, factors)).astype(np.float32) * 0.3
    yty = gramian(model.item_factors)
    for user in range(5):
        k = 1 + 7 * user
        indices = np.sort(rng.choice(n_items, size=k, replace=False))
        conf = rng.uniform(0.1, 3.0, size=k).astype(np.float32)
        row = sp.csr_matrix((conf, (np.zeros(k, int), indices)), shape=(1, n_items))
        expected = model.recalculate_user(0, row)
        got = fold_in(model.item_factors, indices, conf, regularization, alpha, yty=yty)
        # implicit solves in float32, fold_in in float64: agree to float32 precision.
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


def test_fold_in_reproduces_factors_of_a_model_trained_with_implicit():
    # Exact (Cholesky) ALS: the last sweep solves each user against the item factors of the sweep
    # before, so after convergence fold-in on the final item factors lands on the stored vectors.
    rng = np.random.default_rng(11)
    n_users, n_items, factors, alpha, reg = 60, 80, 8, 10.0, 0.1
    dense = (rng.random((n_users, n_items)) < 0.08) * rng.integers(1, 4, size=(n_users, n_items))
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1  # nobody empty
    matrix = sp.csr_matrix(np.log1p(dense).astype(np.float32))
    model = _implicit_als(factors, reg, alpha, use_cg=False, iterations=60, random_state=1)
    model.fit(matrix, show_progress=False)
    yty = gramian(model.item_factors)
    scores_trained = model.user_factors @ model.item_factors.T
    for user in range(n_users):
        lo, hi = matrix.indptr[user], matrix.indptr[user + 1]
        x = fold_in(model.item_factors, matrix.indices[lo:hi], matrix.data[lo:hi], reg, alpha, yty=yty)
        np.testing.assert_allclose(x, model.user_factors[user], rtol=0.05, atol=0.02)
        top_trained = set(np.argsort(-scores_trained[user])[:10])
        top_folded = set(np.argsort(-(model.item_factors @ x))[:10])
        assert len(top_trained & top_folded) >= 9


def test_gramian_is_float64_yty():
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(gramian(y), np.array([[20.0, 26.0], [26.0, 35.0]]))


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


def test_params_from_manifest_reads_every_key():
    p = RowRecipe.from_manifest(
        {
            "factors": 8,
            "regularization": 0.2,
            "alpha": 5,
            "iterations": 3,
            "seed": 1,
            "event_weights": {"view": 2, "purchase": 7},
            "scaling": "linear",
            "half_life_days": 30,
            "bm25_k1": 1.0,
            "bm25_b": 0.5,
        }
    )
    assert (p.regularization, p.alpha, p.scaling, p.weighting.half_life_days) == (0.2, 5.0, "linear", 30.0)
    assert p.weighting.weight_table()[EVENT_CODE["view"]] == 2.0
    assert p.weighting.weight_table()[EVENT_CODE["purchase"]] == 7.0
    assert p.weighting.weight_table()[EVENT_CODE["cart"]] == DEFAULT_EVENT_WEIGHTS["cart"]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"alpha": 0}, "params.alpha"),
        ({"regularization": -1}, "params.regularization"),
        ({"event_weights": {"like": 1}}, "unknown event type"),
        ({"event_weights": {"view": -1}}, "event_weights.view"),
        ({"scaling": "sqrt"}, "params.scaling"),
        ({"scaling": "bm25"}, "bm25_n_users"),
        ({"half_life_days": "soon"}, "half_life_days"),
    ],
)
def test_params_from_manifest_rejects_bad_values(params, match):
    with pytest.raises(ValueError, match=match):
        RowRecipe.from_manifest(params)


# ------------------------------------------------------------------------------------------------
# Confidence rows agree with training.weighting
# ------------------------------------------------------------------------------------------------


def _random_events(rng: np.random.Generator, n_users: int, n_items: int, n_events: int):
    from recsvc.core.events import EventTable

    return EventTable(
        user_id=np.array([f"u{u}" for u in rng.integers(0, n_users, n_events)], dtype=object),
        item_id=np.array([f"i{i}" for i in rng.integers(0, n_items + 3, n_events)], dtype=object),
        event=rng.integers(0, 5, n_events).astype(np.int8),
        timestamp=(T0 + rng.integers(0, 40 * DAY, n_events)).astype(np.int64),
    )


@pytest.mark.parametrize(
    "scaling, half_life, weights",
    [
        ("linear", None, None),
        ("log", None, None),
        ("log", 7.0, {"view": 0.5, "impression": 0.25}),
        ("bm25", None, None),
        ("bm25", 14.0, {"click": 0.0}),
    ],
)
def test_user_row_agrees_with_training_confidence_matrix(scaling, half_life, weights):
    from recsvc.core.weighting import WeightingParams, bm25_manifest_params, confidence_matrix, raw_matrix

    rng = np.random.default_rng(5)
    n_users, n_items = 30, 25
    events = _random_events(rng, n_users, n_items, 1500)
    users = [f"u{u}" for u in range(n_users)]
    items = [f"i{i}" for i in range(n_items)]  # i25..i27 appear in events only: ignored by both
    wp = WeightingParams(event_weights=weights or {}, scaling=scaling, half_life_days=half_life)
    now = T0 + 35 * DAY  # some events are "in the future" of now: age 0 for both
    expected = confidence_matrix(events, users, items, wp, now=now)

    manifest_params = wp.to_dict() | {"regularization": 0.05}
    raw = raw_matrix(events, users, items, wp, now=now)
    manifest_params |= bm25_manifest_params(raw, wp)
    params = RowRecipe.from_manifest(manifest_params)
    params = params.with_document_frequency(np.bincount(expected.indices, minlength=n_items))

    item_index = {item: i for i, item in enumerate(items)}
    for u, user in enumerate(users):
        mine = events.take(events.user_id == user)
        as_dicts = [
            {"item_id": i, "event": int(e), "timestamp": int(t)}
            for i, e, t in zip(mine.item_id, mine.event, mine.timestamp, strict=True)
        ]
        for source in (mine, as_dicts):
            indices, conf = user_confidence_row(source, item_index, params, now)
            lo, hi = expected.indptr[u], expected.indptr[u + 1]
            np.testing.assert_array_equal(indices, expected.indices[lo:hi])
            np.testing.assert_allclose(conf, expected.data[lo:hi], rtol=1e-6)
            assert conf.dtype == np.float32 and indices.dtype == np.int32


def test_user_row_by_hand():
    # view (1) + view (1) + cart (4) on i0 -> r = 6; purchase (10) on i1 a half-life ago -> 5;
    # impression on i2 weighs 0 -> dropped; an unknown item is ignored. log scaling: log1p(r).
    params = RowRecipe.from_manifest({"half_life_days": 1, "scaling": "log"})
    now = T0 + DAY
    events = [
        {"item_id": "a", "event": "view", "timestamp": now},
        {"item_id": "a", "event": "view", "timestamp": now + 50},  # after now: age 0
        {"item_id": "a", "event": "cart", "timestamp": now},
        {"item_id": "b", "event": "purchase", "timestamp": T0},
        {"item_id": "c", "event": "impression", "timestamp": now},
        {"item_id": "zzz", "event": "purchase", "timestamp": now},
    ]
    indices, conf = user_confidence_row(events, {"a": 0, "b": 1, "c": 2}, params, now)
    np.testing.assert_array_equal(indices, [0, 1])
    np.testing.assert_allclose(conf, np.log1p([6.0, 5.0]).astype(np.float32), rtol=1e-7)


def test_raw_row_sums_and_drops():
    params = RowRecipe.from_manifest({})
    indices, raw = raw_user_row(
        np.array([3, -1, 3, 1, 2]),
        np.array([EVENT_CODE["view"], EVENT_CODE["purchase"], EVENT_CODE["cart"], 4, 3]),
        np.full(5, T0),
        params,
        None,
    )
    np.testing.assert_array_equal(indices, [1, 3])  # item 2: impression only; -1: unknown item
    np.testing.assert_array_equal(raw, [2.0, 5.0])


@pytest.mark.parametrize("scaling, b", [("linear", 0.75), ("log", 0.75), ("bm25", 0.75), ("bm25", 0.0)])
def test_unscale_inverts_scale(scaling, b):
    rng = np.random.default_rng(2)
    params = RowRecipe.from_manifest(
        {"scaling": scaling, "bm25_b": b, "bm25_n_users": 100, "bm25_avg_length": 12.0}
    ).with_document_frequency(rng.integers(0, 100, 40))
    indices = np.sort(rng.choice(40, 9, replace=False))
    raw = rng.uniform(0.5, 30.0, 9)
    conf = scale_row(indices, raw, params)
    np.testing.assert_allclose(unscale_row(indices, conf, params), raw, rtol=1e-4)


def test_bm25_with_b_one_keeps_relative_weights():
    # b = 1 forgets the magnitude of a row; unscaling picks L = L_avg, and scaling again must give
    # back the same confidences (which is all fold-in needs).
    params = RowRecipe.from_manifest(
        {"scaling": "bm25", "bm25_b": 1.0, "bm25_n_users": 50, "bm25_avg_length": 8.0}
    ).with_document_frequency(np.arange(10))
    indices = np.array([1, 4, 7])
    conf = scale_row(indices, np.array([1.0, 3.0, 9.0]), params)
    again = scale_row(indices, unscale_row(indices, conf, params), params)
    np.testing.assert_allclose(again, conf, rtol=1e-5)


def test_add_raw_rows_merges_by_item():
    indices, raw = add_raw_rows(np.array([1, 5]), np.array([1.0, 2.0]), np.array([5, 0]), np.array([3.0, 4]))
    np.testing.assert_array_equal(indices, [0, 1, 5])
    np.testing.assert_array_equal(raw, [4.0, 1.0, 5.0])
