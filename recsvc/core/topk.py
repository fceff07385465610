"""Top-K selection over score matrices: the best ``k`` items per user, exact and deterministic.

Pure numpy. Publishing scores every user against every item in chunks and keeps the ``k`` best
(:func:`topk_for_users`); ties are broken by the lower item index so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from recsvc.core.ranking import mask_positions

# Users scored per matrix product at publish: bounds memory to chunk x n_items float32.
SCORE_CHUNK_ELEMENTS = 16_000_000


def _top_columns(scores: np.ndarray, wide: int) -> np.ndarray:
    """Column indices of the ``wide`` highest scores of each row (unordered), shape ``(rows, wide)``.

    ``argpartition`` over the whole catalog is the cost of publishing; most rows are served by a
    cheaper route: a threshold taken from every ``stride``-th column is a lower bound on the
    ``wide``-th best score whenever at least ``wide`` scores reach it (checked per row), so only the
    columns at or above it are partitioned. Rows where the sample was unlucky take the exact route.
    """
    rows, n = scores.shape
    out = np.empty((rows, wide), dtype=np.int64)
    stride = min(8, n // (4 * wide))
    ok = np.zeros(rows, dtype=bool)
    if stride >= 2:
        sample = scores[:, ::stride]
        n_sample = sample.shape[1]
        # Aim for ~1.5x wide candidates so that almost every row has enough.
        kth = min(n_sample - 1, int(1.5 * wide / stride) + 4)
        threshold = np.partition(sample, n_sample - kth, axis=1)[:, n_sample - kth]
        mask = scores >= threshold[:, None]
        counts = mask.sum(axis=1)
        ok = counts >= wide
        if ok.any():
            sub_mask, sub_scores, sub_counts = mask[ok], scores[ok], counts[ok]
            r, c = mask_positions(sub_mask)
            starts = np.concatenate(([0], np.cumsum(sub_counts)[:-1]))
            pos = np.arange(len(c)) - np.repeat(starts, sub_counts)
            width = int(sub_counts.max())
            cand = np.zeros((len(sub_counts), width), dtype=np.int64)
            vals = np.full((len(sub_counts), width), -np.inf, dtype=np.float32)
            cand[r, pos] = c
            vals[r, pos] = sub_scores[r, c]
            sel = np.argpartition(vals, width - wide, axis=1)[:, width - wide :]
            out[ok] = np.take_along_axis(cand, sel, axis=1)
    exact = ~ok
    if exact.any():
        out[exact] = np.argpartition(scores[exact], n - wide, axis=1)[:, n - wide :]
    return out


def topk_for_users(
    user_factors: np.ndarray, item_factors: np.ndarray, k: int, chunk_rows: int | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first_row, indices, scores)`` of the top ``k`` items per user, in chunks of users.

    Scores are ``user_factors @ item_factors.T``; each chunk is one matrix product, then only the
    best columns are kept (:func:`_top_columns`) and sorted. Equal scores are ordered by the lower
    item index, so the result is deterministic and equals a full stable sort of each row.

    Parameters
    ----------
    user_factors : np.ndarray
        float32 ``(n_users, f)``.
    item_factors : np.ndarray
        float32 ``(n_items, f)``.
    k : int
        Items kept per user; clipped to ``n_items``.
    chunk_rows : int, optional
        Users per matrix product; by default ``SCORE_CHUNK_ELEMENTS // n_items``.
    """
    n_users, n_items = user_factors.shape[0], item_factors.shape[0]
    k = min(k, n_items)
    # A few extra columns beyond k let ties at the k-th score be resolved by item index; rows
    # where even those are all tied are sorted in full (exact, and rare: duplicate item vectors).
    wide = min(n_items, k + 16)
    chunk_rows = chunk_rows or max(1, SCORE_CHUNK_ELEMENTS // max(1, n_items))
    item_t = np.ascontiguousarray(item_factors.T)
    for start in range(0, n_users, chunk_rows):
        scores = user_factors[start : start + chunk_rows] @ item_t
        if wide < n_items:
            part = _top_columns(scores, wide)
        else:
            part = np.broadcast_to(np.arange(n_items), scores.shape)
        # Sort the kept columns by index first, then stably by score: equal scores stay in index
        # order, so the result is deterministic.
        part = np.sort(part, axis=1)
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)[:, :k].astype(np.int32)
        if wide < n_items:
            top = np.take_along_axis(part_scores, order, axis=1)
            for row in np.flatnonzero(top[:, k - 1] == top[:, -1]):
                # Every column reaching the k-th score, ordered by score then index: the same
                # k as a full stable sort of the row, without sorting the row (duplicate item
                # vectors make such ties common in some catalogues).
                cols = np.flatnonzero(scores[row] >= top[row, k - 1])
                idx[row] = cols[np.lexsort((cols, -scores[row, cols]))][:k]
        yield start, idx, np.take_along_axis(scores, idx, axis=1).astype(np.float32)
