"""Bundle hit rate on held-out orders against popularity and raw co-occurrence, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.contract import VIEW
from tests.shops import events, orders
from training.cooccurrence import _padded_table, evaluate_bundles

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
    # Baskets (13): E 6, D 4 (three of them alone), A 3, F 3, B 2, C 2, G 1.
    train = events(
        orders(
            {"o1": "AB", "o2": "AB", "o3": "AC", "o4": "CD", "o5": "EF", "o6": "EF", "o7": "EF", "o8": "EG"}
            | {"o9": "D", "o10": "D", "o11": "D", "o12": "E", "o13": "E"}
        )
    )
    test = events(orders({"t1": "AB", "t2": "CD", "t3": "A"}, start=1_800_000_000))
    # A prior of one basket: (s + n_b / 13) / (n_a + 1), and every co-purchase beats the floor.
    result = evaluate_bundles(
        train, test, INDEX, factors(), np.full(7, -1, np.int32), size=2, params={"prior_baskets": 1.0}
    )
    # Queries: A, B (order t1), C, D (order t2); t3 has one item and is not a query.
    assert result["test_orders"] == 2 and result["queries"] == result["queries_total"] == 4
    # Popularity proposes E (D for E itself), never in a test order -> 0 hits.
    assert result["popularity_hit_rate@2"] == 0.0
    # Raw counts: A->B hit, B->A hit, C->A (tie A/D at one basket: lower index) miss, D->C hit.
    assert result["cooccurrence_hit_rate@2"] == pytest.approx(3 / 4)
    # The posterior breaks C's tie by popularity: D (1 + 4/13) / 3 beats A (1 + 3/13) / 3: 4 hits.
    assert result["hit_rate@2"] == 1.0
    assert result["lift_vs_cooccurrence"] == pytest.approx(4 / 3, abs=1e-3)
    assert result["lift_vs_popularity"] is None
    # Bootstrap intervals over the 4 queries: no hit stays no hit, all hits stay all hits.
    ci = result["ci95"]
    assert ci["popularity_hit_rate@2"] == [0.0, 0.0] and ci["hit_rate@2"] == [1.0, 1.0]
    lo, hi = ci["cooccurrence_hit_rate@2"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    assert ci["lift_vs_cooccurrence"][0] >= 1.0 and "lift_vs_popularity" not in ci


def test_queries_are_a_seeded_sample_and_the_count_is_reported():
    train = events(orders({f"o{i}": "AB" if i % 2 else "CDE" for i in range(20)}))
    test = events(orders({f"t{i}": "ABCDEFG"[i % 4 :][:3] for i in range(30)}, start=1_800_000_000))
    full = evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32), max_queries=None)
    assert full["queries"] == full["queries_total"] == 90
    some = evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32), max_queries=25, seed=3)
    assert some["queries"] == 25 and some["queries_total"] == 90 and some["seed"] == 3
    again = evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32), max_queries=25, seed=3)
    del again["seconds"], some["seconds"]
    assert again == some
    with pytest.raises(ValueError, match="max_queries"):
        evaluate_bundles(train, test, INDEX, factors(), np.full(7, -1, np.int32), max_queries=0)


def test_padded_table_fills_from_best_sellers_without_the_anchor_or_repeats():
    popular = np.array([3, 0, 5, 1, 2, 4, 6])
    # Anchor 0 has partner 5; anchor 3 none; anchor 6 partners 3 and 1 (full for k = 2).
    table = _padded_table(np.array([0, 6, 6]), np.array([5, 3, 1]), np.array([0, 3, 6]), 3, popular)
    assert table.tolist() == [[5, 3, 1], [0, 5, 1], [3, 1, 0]]


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
