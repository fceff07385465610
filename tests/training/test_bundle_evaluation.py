"""Bundle hit rate on held-out orders against popularity and raw co-occurrence, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.contract import VIEW
from tests.shops import events, orders
from training.cooccurrence import evaluate_bundles

ITEMS = ["A", "B", "C", "D", "E", "F", "G"]
INDEX = {item: i for i, item in enumerate(ITEMS)}


def factors() -> np.ndarray:
    f = np.zeros((7, 3), dtype=np.float32)
    f[0] = [1.0, 0.0, 0.0]  # A
    f[1] = [0.9, 0.3, 0.0]  # B
    f[2] = [0.0, 1.0, 0.0]  # C
    f[3] = [0.0, 0.8, 0.6]  # D: C's nearest (cosine 0.8), and C is D's
    f[4] = [0.0, 0.0, 1.0]  # E
    f[5] = [0.1, 0.0, 1.0]  # F
    f[6] = [0.0, 0.1, 1.0]  # G
    return f


def test_hit_rate_against_both_baselines_by_hand():
    # Popularity (baskets): E 4, A 3, F 3, B 2, C 2, D 1, G 1.
    train = events(
        orders(
            {"o1": "AB", "o2": "AB", "o3": "AC", "o4": "CD", "o5": "EF", "o6": "EF", "o7": "EF", "o8": "EG"}
        )
    )
    test = events(orders({"t1": "AB", "t2": "CD", "t3": "A"}, start=1_800_000_000))
    result = evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32), size=2)
    # Queries: A, B (order t1), C, D (order t2); t3 has one item and is not a query.
    assert result["test_orders"] == 2 and result["queries"] == 4
    # Popularity proposes E (the anchor aside), never in a test order -> 0 hits.
    assert result["popularity_hit_rate@2"] == 0.0
    # Raw counts: A->B hit, B->A hit, C->A (tie A/D, lower index) miss, D->C hit.
    assert result["cooccurrence_hit_rate@2"] == pytest.approx(3 / 4)
    # Mined: AB is significant (support 2, lift 8*2/(3*2) > 1); C and D have no pair with
    # support >= 2, so ALS similarity pairs them with each other: 4 hits.
    assert result["hit_rate@2"] == 1.0
    assert result["lift_vs_cooccurrence"] == pytest.approx(4 / 3, abs=1e-3)
    assert result["lift_vs_popularity"] is None


def test_no_multi_item_test_order_gives_no_rates():
    train = events(orders({"o1": "AB", "o2": "AB"}))
    test = events(orders({"t1": "A"}, start=1_800_000_000))
    result = evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32))
    assert result["queries"] == 0 and result["hit_rate@3"] is None


def test_size_must_leave_room_for_a_companion():
    train = events(orders({"o1": "AB"}))
    with pytest.raises(ValueError, match="size"):
        evaluate_bundles(train, train, INDEX, factors(), np.full(7, -1, np.int32), size=1)


def test_viewed_items_are_not_orders():
    rows = orders({"o1": "AB", "o2": "AB"})
    test_rows = [(u, i, VIEW, t + 10**8, o) for u, i, _, t, o in orders({"t1": "AB"})]
    result = evaluate_bundles(events(rows), events(test_rows), INDEX, factors(), np.full(7, -1, np.int32))
    assert result["queries"] == 0
