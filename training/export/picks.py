"""Pure numpy ranking pieces of the email export: exact top-k per row, merging, win-back, popularity.

Tested on tiny inputs whose answers are known (tests/training/test_export_ranking.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsvc.core.topk import top_k_rows

REASONS: tuple[str, ...] = (
    "personalized",
    "winback_new",
    "winback_back_in_stock",
    "onboarding_category",
    "onboarding_popular",
    "popular_in_category",
    "popular",
)
(
    PERSONALIZED,
    WINBACK_NEW,
    WINBACK_BACK_IN_STOCK,
    ONBOARDING_CATEGORY,
    ONBOARDING_POPULAR,
    POPULAR_IN_CATEGORY,
    POPULAR,
) = range(len(REASONS))


def merge_ranked(first: np.ndarray, second: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the valid entries of ``first``, then those of ``second`` not already taken; first k.

    Parameters
    ----------
    first, second : ndarray of int, shapes (rows, a) and (rows, b)
        Ranked column indices with ``-1`` padding.
    k : int

    Returns
    -------
    merged : ndarray of int32, shape (rows, k)
        ``-1`` padded.
    from_first : ndarray of bool, shape (rows, k)
        True where the entry came from ``first``.
    """
    n_rows = first.shape[0]
    second = second.copy()
    if first.shape[1] and second.shape[1]:
        duplicate = (second[:, :, None] == first[:, None, :]).any(axis=2)
        second[duplicate] = -1
    combined = np.concatenate([first, second], axis=1).astype(np.int32)
    source = np.concatenate(
        [np.ones(first.shape, dtype=bool), np.zeros(second.shape, dtype=bool)],
        axis=1,
    )
    order = np.argsort(combined < 0, axis=1, kind="stable")[:, :k]
    merged = np.take_along_axis(combined, order, axis=1)
    from_first = np.take_along_axis(source, order, axis=1) & (merged >= 0)
    if merged.shape[1] < k:
        pad = k - merged.shape[1]
        merged = np.concatenate([merged, np.full((n_rows, pad), -1, np.int32)], axis=1)
        from_first = np.concatenate([from_first, np.zeros((n_rows, pad), bool)], axis=1)
    return merged, from_first


def popularity_keys(
    user_categories: np.ndarray, item_category: np.ndarray, popularity_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Onboarding ranking keys: items of the user's categories first, each group by popularity.

    Parameters
    ----------
    user_categories : ndarray of bool, shape (rows, n_categories + 1)
        True where the user touched a category; the last column stands for "no category" and is
        always False.
    item_category : ndarray of int, shape (items,)
        Category code per item, ``n_categories`` for items without one.
    popularity_score : ndarray of float32, shape (items,)
        Popularity scaled into [0, 1].

    Returns
    -------
    keys : ndarray of float32, shape (rows, items)
        ``popularity_score + 2 * in_category``: ranks in-category items above every other one.
    in_category : ndarray of bool, shape (rows, items)
    """
    in_category = user_categories[:, item_category]
    keys = in_category.astype(np.float32)
    keys *= 2.0
    keys += popularity_score[None, :]
    return keys, in_category


def item_fresh_since(
    first_seen: np.ndarray,
    history: Sequence[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """When each item last became new or came back in stock, as far as the evidence shows.

    Parameters
    ----------
    first_seen : ndarray of int64, shape (items,)
        First event on the item (unix seconds), :data:`~training.segments.NO_TIME` when none: before
        it, nobody had seen the item, so to anyone gone by then it is new.
    history : sequence of ``(snapshot_time, present, available)``
        Earlier catalogue snapshots (older model artifacts; the model's own catalogue when a fresher
        one is given), each with bool arrays over the current items: was the item in that catalogue,
        and was it in stock. An item missing or out of stock at ``snapshot_time`` that is in stock
        now is new / back in stock since then.

    Returns
    -------
    fresh_since : ndarray of int64
        The latest moment the item was not yet (or no longer) available; an item is new to a
        user whose last visit is earlier than this. ``NO_TIME`` when there is no evidence.
    back_in_stock : ndarray of bool
        True when that latest evidence is an out-of-stock snapshot (the item existed before).
    """
    fresh_since = np.asarray(first_seen, dtype=np.int64).copy()
    back_in_stock = np.zeros(len(fresh_since), dtype=bool)
    for snapshot_time, present, available in sorted(history, key=lambda h: h[0]):
        missing = ~(present & available)
        later = missing & (snapshot_time > fresh_since)
        fresh_since[later] = snapshot_time
        back_in_stock[later] = present[later]
    return fresh_since, back_in_stock


def winback_picks(
    scores: np.ndarray,
    last_seen: np.ndarray,
    user_categories: np.ndarray,
    item_category: np.ndarray,
    fresh_since: np.ndarray,
    slots: int,
) -> np.ndarray:
    """Up to ``slots`` items per user that are new to them and in one of their categories.

    Parameters
    ----------
    scores : ndarray, shape (rows, items)
        Filtered ranking scores (``-inf`` = not allowed); win-back picks are ordered by them.
    last_seen : ndarray of int64, shape (rows,)
        Each user's last event.
    user_categories : ndarray of bool, shape (rows, n_categories + 1)
    item_category : ndarray of int, shape (items,)
        ``n_categories`` for items without a category.
    fresh_since : ndarray of int64, shape (items,)
        From :func:`item_fresh_since`.
    slots : int

    Returns
    -------
    ndarray of int32, shape (rows, slots)
        Item columns, best first, ``-1`` padded.
    """
    n_rows = scores.shape[0]
    none = np.full((n_rows, slots), -1, dtype=np.int32)
    if n_rows == 0 or slots <= 0:
        return none
    no_category = user_categories.shape[1] - 1
    candidates = np.flatnonzero((fresh_since > last_seen.min()) & (item_category != no_category))
    if not len(candidates):
        return none
    sub = scores[:, candidates]
    allowed = (fresh_since[candidates][None, :] > last_seen[:, None]) & user_categories[
        :, item_category[candidates]
    ]
    sub[~allowed] = -np.inf
    picks, _ = top_k_rows(sub, slots)
    return np.where(picks >= 0, candidates[np.maximum(picks, 0)], -1).astype(np.int32)
