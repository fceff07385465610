"""Confidence weighting on tiny inputs with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsvc.core.events import EventTable
from recsvc.core.weighting import (
    WeightingParams,
    bm25_manifest_params,
    confidence_matrix,
    event_contributions,
    id_maps,
    popularity_scores,
    purchase_counts,
    raw_matrix,
)

NOW = 1_700_000_000
DAY = 86_400


def events(rows):
    return EventTable.from_records(
        {
            "user_id": u,
            "item_id": i,
            "event": e,
            "timestamp": t,
            **({"order_id": "o"} if e == "purchase" else {}),
        }
        for u, i, e, t in rows
    )


TINY = events(
    [
        ("u1", "i1", "view", NOW),
        ("u1", "i1", "cart", NOW),
        ("u1", "i2", "purchase", NOW),
        ("u2", "i2", "view", NOW),
        ("u2", "i3", "impression", NOW),
        ("u3", "i3", "impression", NOW),
        ("u9", "i1", "view", NOW),  # not in the index below: ignored
    ]
)
USERS = ["u1", "u2"]
ITEMS = ["i1", "i2", "i3"]


def dense(matrix):
    return matrix.toarray().astype(np.float64)


def test_linear_sums_event_weights_per_pair_and_drops_impressions():
    conf = confidence_matrix(TINY, USERS, ITEMS, WeightingParams(scaling="linear"), now=NOW)
    assert conf.dtype == np.float32 and conf.shape == (2, 3)
    # view 1 + cart 4 = 5; purchase 10; view 1; impression 0 -> no entry at all
    assert dense(conf).tolist() == [[5.0, 10.0, 0.0], [0.0, 1.0, 0.0]]
    assert conf.nnz == 3


def test_log_scaling():
    conf = confidence_matrix(TINY, USERS, ITEMS, WeightingParams(scaling="log"), now=NOW)
    expected = [[math.log(1 + 5), math.log(1 + 10), 0.0], [0.0, math.log(2), 0.0]]
    np.testing.assert_allclose(dense(conf), expected, rtol=1e-6)


def test_bm25_scaling_by_hand():
    params = WeightingParams(scaling="bm25", bm25_k1=1.2, bm25_b=0.75)
    conf = confidence_matrix(TINY, USERS, ITEMS, params, now=NOW)
    # N = 2 users; row sums L = 15 (u1), 1 (u2); mean 8. df: i1 = 1, i2 = 2.
    idf_i1 = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))  # = log 2
    idf_i2 = math.log(1 + (2 - 2 + 0.5) / (2 + 0.5))  # = log 1.2
    norm_u1 = 1.2 * (1 - 0.75 + 0.75 * 15 / 8)
    norm_u2 = 1.2 * (1 - 0.75 + 0.75 * 1 / 8)
    expected = [
        [5 * 2.2 / (5 + norm_u1) * idf_i1, 10 * 2.2 / (10 + norm_u1) * idf_i2, 0.0],
        [0.0, 1 * 2.2 / (1 + norm_u2) * idf_i2, 0.0],
    ]
    np.testing.assert_allclose(dense(conf), expected, rtol=1e-6)
    # What fold-in needs besides the interactions matrix (whose column counts are df).
    raw = raw_matrix(TINY, USERS, ITEMS, params, now=NOW)
    assert bm25_manifest_params(raw, params) == {"bm25_n_users": 2, "bm25_avg_length": 8.0}
    assert np.bincount(conf.indices, minlength=3).tolist() == [1, 2, 0]
    assert bm25_manifest_params(raw, WeightingParams(scaling="log")) == {}


def test_time_decay_halves_per_half_life_and_clips_future_events():
    table = events(
        [("u1", "i1", "view", NOW - 2 * DAY), ("u1", "i2", "purchase", NOW), ("u1", "i3", "cart", NOW + DAY)]
    )
    params = WeightingParams(scaling="linear", half_life_days=1.0)
    np.testing.assert_allclose(
        event_contributions(table.event, table.timestamp, params, NOW), [0.25, 10.0, 4.0]
    )
    conf = confidence_matrix(table, ["u1"], ITEMS, params, now=NOW)
    np.testing.assert_allclose(dense(conf), [[0.25, 10.0, 4.0]])
    # Without decay the age does not matter; with now=None the newest event is "now".
    assert event_contributions(table.event, table.timestamp, WeightingParams(), None).tolist() == [
        1.0,
        10.0,
        4.0,
    ]
    np.testing.assert_allclose(
        event_contributions(table.event, table.timestamp, params, None), [0.125, 5.0, 4.0]
    )


def test_custom_weights_and_mapping_index_agree_with_sequence_index():
    params = WeightingParams(scaling="linear", event_weights={"view": 2.0, "purchase": 3.0})
    by_list = confidence_matrix(TINY, USERS, ITEMS, params, now=NOW)
    by_map = confidence_matrix(TINY, {"u2": 1, "u1": 0}, {"i3": 2, "i1": 0, "i2": 1}, params, now=NOW)
    assert dense(by_list).tolist() == [[2.0 + 4.0, 3.0, 0.0], [0.0, 2.0, 0.0]]
    assert dense(by_map).tolist() == dense(by_list).tolist()


def test_id_maps_order_users_with_weight_and_catalog_items_first():
    users, items = id_maps(TINY, WeightingParams(), catalog_item_ids=np.array(["i9", "i1"], dtype=object))
    assert users.tolist() == ["u1", "u2", "u9"]  # u3 only had impressions (weight 0)
    assert items.tolist() == ["i9", "i1", "i2", "i3"]
    users, items = id_maps(TINY, WeightingParams(event_weights={"impression": 0.5}))
    assert users.tolist() == ["u1", "u2", "u3", "u9"]
    assert items.tolist() == ["i1", "i2", "i3"]


def test_popularity_is_purchase_weighted_and_recency_aware():
    pop = popularity_scores(TINY, ITEMS, WeightingParams(), now=NOW)
    # i1: view 0.1 + cart 0.4 + view (u9) 0.1; i2: purchase 1 + view 0.1; i3: impressions 0
    np.testing.assert_allclose(pop, [0.6, 1.1, 0.0], rtol=1e-6)
    old = events([("u1", "i1", "purchase", NOW - 14 * DAY), ("u1", "i2", "purchase", NOW)])
    np.testing.assert_allclose(popularity_scores(old, ["i1", "i2"], WeightingParams(), now=NOW), [0.5, 1.0])


def test_purchase_counts():
    table = events(
        [("u1", "i1", "purchase", NOW), ("u1", "i1", "purchase", NOW + 5), ("u2", "i2", "view", NOW)]
    )
    counts = purchase_counts(table, USERS, ITEMS)
    assert dense(counts).tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"event_weights": {"like": 1.0}}, "unknown event type"),
        ({"event_weights": {"view": -1.0}}, "finite number >= 0"),
        ({"scaling": "sqrt"}, "scaling must be one of"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"half_life_days": -3.0}, "half_life_days"),
        ({"bm25_b": 2.0}, "bm25_b"),
        (
            {"event_weights": {"view": 0, "cart": 0, "purchase": 0, "click": 0, "impression": 0}},
            "at least one event type",
        ),
    ],
)
def test_invalid_weighting_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightingParams(**kwargs)
