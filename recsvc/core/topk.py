"""Top-K selection over score matrices: the best ``k`` items per row, exact and deterministic.

Pure numpy. :func:`top_k_rows` keeps the ``k`` best cells of every row of a score block (what
evaluation, publishing, batch recommend and the export rank with); :func:`topk_for_users` scores
users against item factors in chunks. Ties go to the lower item index, so results reproduce.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

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


def block_cells(scores: np.ndarray, blocked: sp.csr_matrix) -> None:
    """Set ``scores[u, i] = -inf`` in place for every stored cell of ``blocked`` (same shape)."""
    if blocked.nnz:
        rows = np.repeat(np.arange(blocked.shape[0]), np.diff(blocked.indptr))
        scores[rows, blocked.indices] = -np.inf


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest finite scores of every row, best first.

    Exact, and faster than a row-wise ``argpartition`` on wide rows: the k-th largest of the
    per-block maxima is a threshold that at least ``k`` cells of the row reach (each of those
    blocks holds one), so only the few cells at or above it are sorted.

    Parameters
    ----------
    scores : ndarray, shape (rows, columns)
        float32 (or float64) scores; ``-inf`` marks a filtered cell, which is never returned.
    k : int
        How many to keep per row.

    Returns
    -------
    indices : ndarray of int32, shape (rows, k)
        Column indices, best first; ties go to the lower column; ``-1`` pads rows with fewer than
        ``k`` finite cells.
    values : ndarray, shape (rows, k)
        The scores of those cells; ``-inf`` where padded.
    """
    scores = np.ascontiguousarray(scores)
    n_rows, n_cols = scores.shape
    indices = np.full((n_rows, k), -1, dtype=np.int32)
    values = np.full((n_rows, k), -np.inf, dtype=scores.dtype)
    kk = min(k, n_cols)
    if n_rows == 0 or kk <= 0:
        return indices, values
    blocks = min(n_cols // 2, 8 * kk)
    if blocks >= kk and n_cols >= 64:
        # Strided blocks (column j belongs to block j % blocks) reduce along contiguous memory.
        block_len = n_cols // blocks
        head = block_len * blocks
        maxima = scores[:, :head].reshape(n_rows, block_len, blocks).max(axis=1)
        if head < n_cols:
            maxima = np.concatenate([maxima, scores[:, head:].max(axis=1, keepdims=True)], axis=1)
        threshold = np.partition(maxima, maxima.shape[1] - kk, axis=1)[:, maxima.shape[1] - kk]
    else:
        threshold = np.partition(scores, n_cols - kk, axis=1)[:, n_cols - kk]
    # A row with fewer than k finite cells has a -inf threshold; never let -inf cells through.
    threshold = np.maximum(threshold, np.finfo(scores.dtype).min)
    flat = np.flatnonzero(scores >= threshold[:, None])
    rows, cols = np.divmod(flat, n_cols)
    vals = scores.ravel()[flat]
    rows, cols, vals = (a[_order_rows_best_first(rows, cols, vals)] for a in (rows, cols, vals))
    row_start = np.searchsorted(rows, np.arange(n_rows))
    position = np.arange(len(rows)) - row_start[rows]
    keep = position < k
    indices[rows[keep], position[keep]] = cols[keep]
    values[rows[keep], position[keep]] = vals[keep]
    return indices, values


def _order_rows_best_first(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Order of candidates by row, then score descending, then column (ascending)."""
    if vals.dtype != np.float32:
        return np.lexsort((cols, -vals, rows))
    # One stable sort of a uint64 key is ~10x faster than a three-key lexsort: the row in the high
    # half, the float32 bits made order-preserving and inverted (descending) in the low half; ties
    # keep their column order because candidates arrive row-major and the sort is stable.
    bits = (vals + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0: equal scores tie
    flip = np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    descending = ~(bits ^ flip)
    key = (rows.astype(np.uint64) << np.uint64(32)) | descending.astype(np.uint64)
    return np.argsort(key, kind="stable")
