"""The pure numpy pieces of the export: hand-computed answers, no files, no Redis."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.topk import block_cells, top_k_rows
from training.export.picks import (
    item_fresh_since,
    merge_ranked,
    popularity_keys,
    winback_picks,
)
from training.export.run import chunk_rows
from training.segments import NO_TIME

NEG = -np.inf


def test_top_k_rows_hand_example():
    scores = np.array(
        [
            [0.1, 0.9, 0.5, NEG, 0.7],
            [NEG, NEG, 0.3, NEG, NEG],  # one finite cell: padded
            [0.2, 0.2, 0.2, 0.1, 0.2],  # ties: lower column first
        ],
        dtype=np.float32,
    )
    idx, val = top_k_rows(scores, 3)
    assert idx.tolist() == [[1, 4, 2], [2, -1, -1], [0, 1, 2]]
    assert val[0].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert val[1, 1] == NEG and idx.dtype == np.int32


def test_top_k_rows_k_larger_than_columns_and_empty():
    idx, _ = top_k_rows(np.array([[1.0, 2.0]], np.float32), 4)
    assert idx.tolist() == [[1, 0, -1, -1]]
    idx, val = top_k_rows(np.zeros((0, 5), np.float32), 3)
    assert idx.shape == (0, 3) and val.shape == (0, 3)


def brute_force(scores, k):
    out = np.full((scores.shape[0], k), -1)
    for r, row in enumerate(scores):
        finite = [c for c in range(len(row)) if np.isfinite(row[c])]
        best = sorted(finite, key=lambda c: (-row[c], c))[:k]
        out[r, : len(best)] = best
    return out


@pytest.mark.parametrize("seed", range(5))
def test_top_k_rows_matches_brute_force_on_wide_rows(seed):
    # Wide rows take the block-maxima path; rounding makes ties, -inf makes gaps.
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal((7, 500)), 1).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = NEG
    scores[3, :] = NEG
    scores[4, 5:] = NEG
    idx, val = top_k_rows(scores, 20)
    assert (idx == brute_force(scores, 20)).all()
    assert np.isneginf(val[idx < 0]).all() and np.isfinite(val[idx >= 0]).all()


def test_block_cells():
    import scipy.sparse as sp

    scores = np.ones((2, 3), np.float32)
    block_cells(scores, sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 1]], np.float32)))
    assert np.isneginf(scores).tolist() == [[False, True, False], [True, False, True]]


def test_merge_ranked_puts_first_first_and_drops_duplicates():
    first = np.array([[7, -1], [-1, -1], [3, 4]])
    second = np.array([[1, 7, 2], [5, 6, -1], [4, 9, 8]])
    merged, from_first = merge_ranked(first, second, 3)
    assert merged.tolist() == [[7, 1, 2], [5, 6, -1], [3, 4, 9]]
    assert from_first.tolist() == [[True, False, False], [False, False, False], [True, True, False]]


def test_popularity_keys_rank_own_categories_first():
    # 2 categories + the "none" column; items: cat 0, cat 1, none, cat 1
    user_categories = np.array([[False, True, False], [False, False, False]])
    item_category = np.array([0, 1, 2, 1])
    popularity = np.array([1.0, 0.2, 0.9, 0.5], np.float32)
    keys, in_category = popularity_keys(user_categories, item_category, popularity)
    assert in_category.tolist() == [[False, True, False, True], [False, False, False, False]]
    idx, _ = top_k_rows(keys, 4)
    assert idx.tolist() == [[3, 1, 0, 2], [0, 2, 3, 1]]


def test_item_fresh_since_from_first_events_and_snapshots():
    first_seen = np.array([100, 500, NO_TIME, 50], dtype=np.int64)
    history = [
        # t=300: item 1 not listed yet, item 2 out of stock
        (300, np.array([True, False, True, True]), np.array([True, False, False, True])),
        # t=200: item 3 out of stock (older than its first event? no: first event 50)
        (200, np.array([True, True, True, True]), np.array([True, True, True, False])),
    ]
    fresh, back = item_fresh_since(first_seen, history)
    assert fresh.tolist() == [100, 500, 300, 200]
    assert back.tolist() == [False, False, True, True]


def test_winback_picks_new_items_in_own_categories_since_last_visit():
    scores = np.array([[0.1, 0.9, 0.5, 0.8, 0.7], [0.1, 0.9, 0.5, 0.8, 0.7]], np.float32)
    scores[1, 4] = NEG  # already bought by user 1
    last_seen = np.array([150, 250])
    # categories 0, 1; items: cat 0, cat 1, cat 0, cat 0, cat 0
    user_categories = np.array([[True, False, False], [True, True, False]])
    item_category = np.array([0, 1, 0, 0, 0])
    fresh_since = np.array([NO_TIME, 300, 200, 100, 400])
    picks = winback_picks(scores, last_seen, user_categories, item_category, fresh_since, 2)
    # user 0 (last seen 150): fresh 2 (200), 4 (400) in cat 0; item 1 is fresh but not their category
    # user 1 (last seen 250): item 1 (cat 1, 300) and item 4 (blocked) -> just item 1
    assert picks.tolist() == [[4, 2], [1, -1]]


def test_winback_picks_nothing_fresh():
    picks = winback_picks(
        np.ones((1, 2), np.float32),
        np.array([500]),
        np.array([[True, False]]),
        np.array([0, 0]),
        np.array([1, 2]),
        3,
    )
    assert picks.tolist() == [[-1, -1, -1]]


def test_chunk_rows_bounded_by_memory():
    assert chunk_rows(1_000_000, 256) == 22  # 256 MiB / (1M cells * 12 B)
    assert chunk_rows(10, 16) == 65_536  # capped
    assert chunk_rows(10**9, 16) == 16  # floor


def test_top_k_rows_negative_zero_ties_with_zero():
    scores = np.array([[-0.0, 0.0, -1.0] + [-5.0] * 100], dtype=np.float32)
    idx, _ = top_k_rows(scores, 2)
    assert idx.tolist() == [[0, 1]]
