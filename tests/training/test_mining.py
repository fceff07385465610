"""Bundle mining on tiny hand-made baskets: counts, significance, blend and ordering, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from recsvc.core.artifact import BundleCandidates, read_artifact, write_artifact
from recsvc.core.contract import PURCHASE, VIEW
from tests.factories import make_artifact
from tests.shops import events, orders
from training.cooccurrence import (
    MiningParams,
    als_neighbours,
    build_baskets,
    count_pairs,
    mine_bundles,
    mine_bundles_report,
    rerank_for_coverage,
    significance,
)
from training.cooccurrence import _top_per_row as top_per_row

ITEMS = ["A", "B", "C", "D", "E", "F", "G", "H"]
INDEX = {item: i for i, item in enumerate(ITEMS)}
A, B, C, D, E, F, G, H = range(8)


# o1..o6 plus a single-item order; user s9 has no order ids: E,F within the window, G later.
SHOP = orders({"o1": "ABC", "o2": "AB", "o3": "AC", "o4": "BD", "o5": "D", "o6": "AB"}) + [
    ("s9", "E", PURCHASE, 1_700_000_000, ""),
    ("s9", "F", PURCHASE, 1_700_000_100, ""),
    ("s9", "G", PURCHASE, 1_700_010_000, ""),
    ("s9", "H", VIEW, 1_700_000_050, ""),  # a view is not a purchase: never in a basket
    ("s9", "unknown-item", PURCHASE, 1_700_000_060, ""),
]

NO_BLEND = {"als_neighbours": 0, "coverage_positions": 0}
# The confidence measure as it was scored before the posterior: lift > 1 required, no floor.
CONFIDENCE = {"measure": "confidence", "min_lift": 1.0, "best_seller_floor": False}


def dense(baskets) -> np.ndarray:
    return baskets.matrix.toarray()


def test_baskets_from_order_ids_and_user_windows():
    b = build_baskets(events(SHOP), INDEX)
    assert (b.from_orders, b.from_sessions, b.n_baskets) == (6, 2, 8)
    assert b.unknown_items == 1 and b.capped == 0
    rows = {frozenset(ITEMS[i] for i in np.flatnonzero(r)) for r in dense(b)}
    assert rows == {
        frozenset("ABC"), frozenset("AB"), frozenset("AC"), frozenset("BD"), frozenset("D"),
        frozenset("EF"), frozenset("G"),
    }  # fmt: skip
    # The window decides: with 50 s, E and F (100 s apart) are separate baskets.
    b = build_baskets(events(SHOP), INDEX, MiningParams(basket_window_s=50))
    assert b.from_sessions == 3


def test_repeated_item_counts_once_and_basket_size_is_capped():
    rows = orders({"o1": "AABCDE"})
    b = build_baskets(events(rows), INDEX)
    assert dense(b).tolist()[0] == [1, 1, 1, 1, 1, 0, 0, 0]
    capped = build_baskets(events(rows), INDEX, MiningParams(max_basket_items=3))
    # The first three distinct items in event order are kept.
    assert dense(capped).tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0] and capped.capped == 1


def test_baskets_numbered_the_same_from_the_tables_codes_or_from_the_id_columns():
    # A loaded table brings its dictionary encoding (order ids seen first on a view, a taken
    # subset with unused values); the baskets must not depend on it: rows numbered by each order's
    # first purchase, then sessions by user in order of first loose purchase.
    rng = np.random.default_rng(5)
    rows = []
    for _ in range(400):
        order = f"o{rng.integers(40)}" if rng.random() < 0.7 else ""
        kind = PURCHASE if rng.random() < 0.8 else VIEW
        item = ITEMS[rng.integers(len(ITEMS))] if rng.random() < 0.95 else "unknown-item"
        rows.append((f"u{rng.integers(12)}", item, kind, 1_700_000_000 + int(rng.integers(0, 20_000)), order))
    table = events(rows)
    table.codes("order_id"), table.codes("user_id"), table.codes("item_id")
    table = table.take(np.flatnonzero(np.arange(len(table)) % 7 != 3))  # dictionaries keep unused values
    plain = SimpleNamespace(
        user_id=table.user_id, item_id=table.item_id, event=table.event, timestamp=table.timestamp,
        order_id=table.order_id,
    )  # fmt: skip
    coded, by_ids = build_baskets(table, INDEX), build_baskets(plain, INDEX)
    assert (coded.from_orders, coded.from_sessions, coded.unknown_items) == (
        by_ids.from_orders, by_ids.from_sessions, by_ids.unknown_items,
    )  # fmt: skip
    assert coded.from_orders > 10 and coded.from_sessions > 10 and coded.unknown_items > 0
    assert (coded.matrix != by_ids.matrix).nnz == 0
    # The first basket is the order of the first purchase that has one.
    first = next(r for r in rows_of(table) if r[2] == PURCHASE and r[4] and r[1] in INDEX)
    assert coded.matrix[0, INDEX[first[1]]] == 1


def rows_of(table):
    return zip(table.user_id, table.item_id, table.event, table.timestamp, table.order_id, strict=True)


def test_pair_counts_and_confidence_strength_by_hand():
    # 8 baskets; A in 4, B in 4, C in 2; AB together 3 times, AC 2, BC 1, BD 1, EF 1.
    params = MiningParams(min_support=2, shrinkage=2.0, **CONFIDENCE, **NO_BLEND)
    pairs = count_pairs(build_baskets(events(SHOP), INDEX), params)
    assert pairs.n_baskets == 8
    assert pairs.item_baskets.tolist() == [4, 4, 2, 2, 1, 1, 1, 0]
    got = {
        (ITEMS[r], ITEMS[c]): (s, round(x, 6))
        for r, c, s, x in zip(pairs.rows, pairs.cols, pairs.support, pairs.strength, strict=True)
    }
    # Row A: B (conf 3/4) is the best -> 1.0 * 3/(3+2); C (conf 2/4) -> (0.5/0.75) * 2/(2+2).
    assert got == {
        ("A", "B"): (3, 0.6),
        ("A", "C"): (2, round(2 / 3 * 0.5, 6)),
        ("B", "A"): (3, 0.6),
        ("C", "A"): (2, 0.5),
    }
    assert pairs.pairs_counted == 10  # AB AC BC BD EF, both directions


def test_posterior_and_best_seller_floor_by_hand():
    # 8 baskets; A in 4, B in 4, C in 2, D in 2, E F G in 1. AB 3, AC 2, BC 1, BD 1, EF 1.
    # Posterior (m = 10): (s + 10 n_b / 8) / (n_a + 10).
    baskets = build_baskets(events(SHOP), INDEX)
    loose = count_pairs(baskets, MiningParams(best_seller_floor=False, **NO_BLEND))
    got = {(ITEMS[r], ITEMS[c]): (int(s), round(x, 9)) for r, c, s, x in zip(*_arrays(loose), strict=True)}
    assert got == {
        key: (s, round(x, 9))
        for key, (s, x) in {
            ("A", "B"): (3, 8 / 14), ("A", "C"): (2, 4.5 / 14),
            ("B", "A"): (3, 8 / 14), ("B", "C"): (1, 3.5 / 14), ("B", "D"): (1, 3.5 / 14),
            ("C", "A"): (2, 7 / 12), ("C", "B"): (1, 6 / 12), ("D", "B"): (1, 6 / 12),
            ("E", "F"): (1, 2.25 / 11), ("F", "E"): (1, 2.25 / 11),
        }.items()
    }  # fmt: skip
    # Every pair bought together counts, even at lift 1 (C with B: 1 * 8 / (2 * 4)); with
    # min_lift=1 it would not.
    strict = count_pairs(baskets, MiningParams(best_seller_floor=False, min_lift=1.0, **NO_BLEND))
    assert ("C", "B") not in {(ITEMS[r], ITEMS[c]) for r, c in zip(strict.rows, strict.cols, strict=True)}
    # The floor: s + 10 n_b / 8 must beat 10 n_top / 8, n_top the baskets of the best seller that is
    # neither of the pair (A and B: 4 each, then C: 2). AC: 2 + 2.5 < 5 (B); BC, BD: 3.5 < 5 (A);
    # EF: 2.25 < 5; CA: 2 + 5 > 5 (B); CB, DB: 1 + 5 > 5 (A); AB: 8 > 2.5 (C).
    floored = count_pairs(baskets, MiningParams(**NO_BLEND))
    kept = [(ITEMS[r], ITEMS[c]) for r, c in zip(floored.rows, floored.cols, strict=True)]
    assert kept == [("A", "B"), ("B", "A"), ("C", "A"), ("C", "B"), ("D", "B")]  # best first per row


def _arrays(pairs):
    return pairs.rows, pairs.cols, pairs.support, pairs.strength


def test_top_per_row_equals_a_full_sort():
    rng = np.random.default_rng(4)
    rows = np.sort(rng.integers(0, 40, 3000))
    cols = np.concatenate([rng.permutation(500)[: int((rows == r).sum())] for r in np.unique(rows)])
    score = rng.integers(0, 6, len(rows)).astype(np.float64)  # many ties: the column decides
    support = np.arange(len(rows))
    for keep in (1, 2, 3, 8, 9, 50, 200):
        order = np.lexsort((cols, -score, rows))
        rank = np.zeros(len(rows), np.int64)
        for r in np.unique(rows):
            at = np.flatnonzero(rows[order] == r)
            rank[at] = np.arange(len(at))
        want = order[rank < keep]
        got = top_per_row(rows, cols, score, keep, support)
        assert got[3].tolist() == want.tolist()  # the extra array travels with its entries
        assert got[0].tolist() == rows[want].tolist() and got[1].tolist() == cols[want].tolist()
    # Rows out of order are sorted in full.
    shuffled = rng.permutation(len(rows))
    got = top_per_row(rows[shuffled], cols[shuffled], score[shuffled], 9, support[shuffled])
    assert got[3].tolist() == top_per_row(rows, cols, score, 9, support)[3].tolist()


def test_counting_some_anchors_gives_their_rows_of_the_full_count():
    rng = np.random.default_rng(5)
    rows = []
    for o in range(400):
        for item in rng.choice(8, size=rng.integers(2, 6), replace=False):
            rows.append((f"u{o}", ITEMS[item], PURCHASE, 1_700_000_000 + o, f"o{o}"))
    baskets = build_baskets(events(rows), INDEX)
    params = MiningParams(max_pairs_per_block=1000)
    full = count_pairs(baskets, params)
    some = count_pairs(baskets, params, anchors=np.array([6, 1, 6, 3]), threads=2)
    mine = np.isin(full.rows, [1, 3, 6])
    assert some.rows.tolist() == full.rows[mine].tolist() and some.cols.tolist() == full.cols[mine].tolist()
    assert some.strength.tolist() == full.strength[mine].tolist()


def test_significance_measures_by_hand():
    support, n_a, n_b, total = np.array([3, 1]), np.array([4, 4]), np.array([4, 8]), 8
    # lift = s N / (n_a n_b): 1.5 and 0.25 (negatively associated -> 0 whatever the measure)
    assert significance(support, n_a, n_b, total, "confidence").tolist() == [0.75, 0.0]
    assert significance(support, n_a, n_b, total, "lift") == pytest.approx([1 - 1 / 1.5, 0.0])
    assert significance(support, n_a, n_b, total, "cosine") == pytest.approx([3 / 4, 0.0])
    npmi = np.log(1.5) / -np.log(3 / 8)
    assert significance(support, n_a, n_b, total, "npmi") == pytest.approx([npmi, 0.0])
    assert significance(support, n_a, n_b, total, "damped", gamma=1.0) == pytest.approx([0.75 * 1.5, 0.0])
    with pytest.raises(ValueError, match="measure"):
        significance(support, n_a, n_b, total, "jaccard")


def test_mine_bundles_blends_and_orders_best_first():
    params = MiningParams(min_support=2, evidence_baskets=10.0, **CONFIDENCE, **NO_BLEND)
    factors = np.eye(8, dtype=np.float32)
    b = mine_bundles(events(SHOP), INDEX, factors, np.full(8, -1, np.int32), params)
    assert isinstance(b, BundleCandidates) and b.n_items == 8
    items, score, support = b.row(A)
    assert [ITEMS[i] for i in items] == ["B", "C"]
    # evidence(A) = 4 / (4 + 10)
    assert score.tolist() == pytest.approx([4 / 14 * 0.6, 4 / 14 * (2 / 3 * 0.5)], rel=1e-6)
    assert support.tolist() == [3, 2] and score.dtype == np.float32 and support.dtype == np.int32
    assert [ITEMS[i] for i in b.row(C)[0]] == ["A"] and b.row(C)[1][0] == pytest.approx(2 / 12 * 0.5)
    assert len(b.row(D)[0]) == 0  # BD bought together once: below min_support


def test_items_with_few_orders_get_als_candidates():
    # H was never bought; its factors are close to G's, which is close to F's.
    factors = np.zeros((8, 3), dtype=np.float32)
    factors[:, 0] = 1.0
    factors[F] = [0.0, 1.0, 0.2]
    factors[G] = [0.0, 1.0, 0.5]
    factors[H] = [0.0, 0.9, 0.6]
    params = MiningParams(als_neighbours=2, als_weight=0.5, coverage_positions=0)
    b = mine_bundles(events(SHOP), INDEX, factors, np.full(8, -1, np.int32), params)
    items, score, support = b.row(H)
    assert [ITEMS[i] for i in items] == ["G", "F"]
    unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
    assert score.tolist() == pytest.approx([0.5 * unit[H] @ unit[G], 0.5 * unit[H] @ unit[F]], rel=1e-5)
    assert support.tolist() == [0, 0]
    # A well-sold item keeps its co-purchase partners first.
    assert ITEMS[b.row(A)[0][0]] == "B" and b.row(A)[2][0] == 3


def test_coverage_rerank_prefers_companions_from_other_baskets():
    # B and C are bought with A in the same 3 baskets (redundant); D in 2 other baskets of A.
    # (EF baskets make A's partners positively associated: lift > 1.)
    shop = orders(
        {f"p{i}": "ABC" for i in range(3)}
        | {f"r{i}": "AD" for i in range(2)}
        | {f"x{i}": "EF" for i in range(5)}
    )
    params = MiningParams(
        min_support=1, coverage_positions=3, coverage_min_baskets=5, als_neighbours=0, best_seller_floor=False
    )
    baskets = build_baskets(events(shop), INDEX, params)
    plain = mine_bundles(
        events(shop),
        INDEX,
        np.eye(8, dtype=np.float32),
        np.full(8, -1, np.int32),
        {**params.as_dict(), "coverage_positions": 0},
    )
    assert [ITEMS[i] for i in plain.row(A)[0]] == ["B", "C", "D"]
    reranked = rerank_for_coverage(plain, baskets, params)
    assert [ITEMS[i] for i in reranked.row(A)[0]] == ["B", "D", "C"]
    # Scores stay non-increasing along the row, support travels with its item.
    assert np.all(np.diff(reranked.row(A)[1]) <= 0)
    assert reranked.row(A)[2].tolist() == [3, 2, 3]


def test_coverage_rerank_is_the_same_for_any_block_size_and_thread_count():
    # Every item is an anchor with a redundant pair (always bought together with it) and a
    # companion from other baskets, as in the test above, plus random baskets as noise.
    rng = np.random.default_rng(8)
    baskets_of = []
    for a in range(8):
        baskets_of += [[a, (a + 1) % 8, (a + 2) % 8]] * 3 + [[a, (a + 3) % 8]] * 2
    baskets_of += [rng.choice(8, size=rng.integers(2, 5), replace=False).tolist() for _ in range(40)]
    rows = [
        (f"u{o}", ITEMS[item], PURCHASE, 1_700_000_000 + o, f"o{o}")
        for o, basket in enumerate(baskets_of)
        for item in basket
    ]
    params = MiningParams(min_support=1, coverage_positions=3, coverage_min_baskets=5, als_neighbours=0)
    baskets = build_baskets(events(rows), INDEX, params)
    plain = mine_bundles(
        events(rows), INDEX, np.eye(8, dtype=np.float32), np.full(8, -1, np.int32),
        {**params.as_dict(), "coverage_positions": 0},
    )  # fmt: skip
    one = rerank_for_coverage(plain, baskets, params)
    assert one.indices.tolist() != plain.indices.tolist()  # the re-rank did change something
    small = MiningParams(**{**params.as_dict(), "max_pairs_per_block": 1000})
    for other in (
        rerank_for_coverage(plain, baskets, small),
        rerank_for_coverage(plain, baskets, small, threads=3),
        rerank_for_coverage(plain, baskets, params, threads=2),
    ):
        for name in ("indptr", "indices", "score", "support"):
            assert getattr(one, name).tolist() == getattr(other, name).tolist()


def test_block_size_and_threads_do_not_change_the_result():
    rng = np.random.default_rng(3)
    rows = []
    for o in range(600):
        for item in rng.choice(8, size=rng.integers(2, 6), replace=False, p=np.linspace(2, 1, 8) / 12):
            rows.append((f"u{o}", ITEMS[item], PURCHASE, 1_700_000_000 + o, f"o{o}"))
    ev = events(rows)
    baskets = build_baskets(ev, INDEX)
    one = count_pairs(baskets, MiningParams(max_pairs_per_block=10_000_000))
    for other in (
        count_pairs(baskets, MiningParams(max_pairs_per_block=1000)),
        count_pairs(baskets, MiningParams(max_pairs_per_block=1000), threads=3),
        count_pairs(baskets, threads=2),  # threads alone split the rows into blocks
    ):
        for name in ("rows", "cols", "support"):
            assert getattr(one, name).tolist() == getattr(other, name).tolist()
        assert one.strength == pytest.approx(other.strength)
        assert one.pairs_counted == other.pairs_counted


def test_als_neighbours_by_hand_and_independent_of_blocks_and_threads():
    # Items 0 and 1 point the same way, 2 is orthogonal to both, 3 opposite to 0, 4 never seen.
    factors = np.array([[1, 0], [2, 0.1], [0, 1], [-1, 0], [0, 0]], dtype=np.float32)
    rows, cols, cos = als_neighbours(factors, k=2)
    got = {(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}
    # Only positive cosines count; the unseen item 4 has no neighbours and is nobody's.
    assert got == {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert cos[(rows == 0) & (cols == 1)][0] == pytest.approx(2 / np.hypot(2, 0.1))
    rng = np.random.default_rng(11)
    many = rng.standard_normal((300, 8)).astype(np.float32)
    anchors = rng.choice(300, 120, replace=False)
    serial = als_neighbours(many, 7, anchors, block_rows=512, threads=1)
    for block_rows, threads in ((16, 1), (16, 2), (7, 3)):
        other = als_neighbours(many, 7, anchors, block_rows=block_rows, threads=threads)
        for a, b in zip(serial, other, strict=True):
            assert a.tolist() == b.tolist()
    assert len(serial[0]) == 120 * 7 and set(serial[0].tolist()) == set(anchors.tolist())
    # Exactly the brute-force top 7 of every anchor.
    unit = many / np.linalg.norm(many, axis=1, keepdims=True)
    for a in anchors[:20].tolist():
        cos = unit @ unit[a]
        cos[a] = -np.inf
        best = np.sort(cos)[::-1][:7]
        assert serial[2][serial[0] == a] == pytest.approx(best, abs=1e-5)


def test_als_neighbours_break_ties_by_index_and_skip_items_without_factors():
    # Items 0, 3, 6, ... point along x, 1, 4, 7, ... along y, 2, 5, 8, ... along z: all cosines
    # are exactly 1 or 0. Items 9 and 10 have no factors.
    factors = np.eye(3, dtype=np.float32)[np.arange(12) % 3] * 2.0
    factors[[9, 10]] = 0.0
    rows, cols, cos = als_neighbours(factors, k=2, anchors=np.array([0, 4, 9]))
    got = {int(r): [int(c) for c in cols[rows == r]] for r in np.unique(rows)}
    assert got == {0: [3, 6], 4: [1, 7]}  # lowest indices among the ties; 9 has no neighbours
    assert cos.tolist() == [1.0] * 4


def test_mined_candidates_fit_the_artifact(tmp_path):
    artifact = make_artifact(n_items=8)
    artifact.item_ids = ITEMS
    artifact.bundles, report = mine_bundles_report(
        events(SHOP), INDEX, artifact.item_factors, artifact.category, {"min_support": 1}
    )
    artifact.validate()  # shapes, ranges, monotone indptr
    assert report["baskets"] == 8 and report["baskets_from_sessions"] == 2 and report["unknown_items"] == 1
    assert report["candidates"] == len(artifact.bundles.indices) and report["params"]["min_support"] == 1
    # Written and read back unchanged (the artifact stores them without pickle).
    written = read_artifact(write_artifact(artifact, tmp_path))
    assert written.bundles.indices.tolist() == artifact.bundles.indices.tolist()
    assert written.bundles.support.tolist() == artifact.bundles.support.tolist()


def test_empty_and_bad_inputs():
    none = events([("u", "A", VIEW, 1_700_000_000, "")])
    b = mine_bundles(
        none, INDEX, np.ones((8, 2), np.float32), np.full(8, -1, np.int32), {"als_neighbours": 0}
    )
    assert len(b.indices) == 0 and b.n_items == 8
    assert mine_bundles(none, {}, np.zeros((0, 2), np.float32), np.zeros(0, np.int32)).n_items == 0
    with pytest.raises(ValueError, match="item_factors"):
        mine_bundles(none, INDEX, np.ones((7, 2), np.float32), np.full(8, -1, np.int32))
    with pytest.raises(ValueError, match="unknown bundle mining parameter 'min_suport'"):
        mine_bundles(none, INDEX, np.ones((8, 2), np.float32), np.full(8, -1, np.int32), {"min_suport": 2})
    with pytest.raises(ValueError, match="min_support"):
        MiningParams(min_support=0)
    with pytest.raises(ValueError, match="measure"):
        MiningParams(measure="jaccard")


@pytest.mark.parametrize("basket_items", [3, 40])  # short baskets: expansion; long: sparse lookups
def test_pool_membership_matches_a_dense_check(basket_items):
    import scipy.sparse as sp

    from training.cooccurrence import _pool_membership

    rng = np.random.default_rng(basket_items)
    n_items, n_baskets, pool = 60, 200, 5
    dense = np.zeros((n_baskets, n_items), dtype=bool)
    for b in range(n_baskets):
        dense[b, rng.choice(n_items, basket_items, replace=False)] = True
    multi = sp.csr_matrix(dense.astype(np.int8))
    table = rng.integers(-1, n_items, size=(4, pool))  # 4 anchors' candidate slots, -1 = padding
    row = rng.integers(0, 4, size=300)
    basket = rng.integers(0, n_baskets, size=300)
    member = _pool_membership(multi, row, basket, table)
    expected = (table[row] >= 0) & dense[basket[:, None], np.maximum(table[row], 0)]
    assert member.any() and np.array_equal(member, expected)
