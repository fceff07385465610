"""Ranking: score, filter and pick the top items. Pure numpy: no Flask, no Redis.

Every function takes the model as any object with the per-item arrays of
:class:`recsvc.serving.model.ServingModel` (``item_factors``, ``available``, ``category``, ``price``,
``popularity``, ``popular``, ``popular_by_category``, ``n_items``), so tests build one from a tiny
artifact and check answers by hand.

The order of work for a known user (``recommend_from_cache``):

1. the user's cached top-K list (precomputed at publish), filtered at request time;
2. if fewer than ``n`` survive and the cache did not cover every item, full scoring of all items with
   the user's factors (``recommend_for_vector``);
3. without a user vector (unknown user, fallback), the popularity order, filtered the same way.

Ties are broken by the lower item index everywhere, so answers are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: No items (int32, read-only): the shared default for exclusions, purchases and empty answers.
EMPTY_ITEMS = np.zeros(0, dtype=np.int32)
EMPTY_ITEMS.flags.writeable = False
_EMPTY_F32 = np.zeros(0, dtype=np.float32)


class RankingModel(Protocol):
    """What ranking needs from a model (``recsvc.serving.model.ServingModel`` satisfies it)."""

    item_factors: np.ndarray
    available: np.ndarray
    category: np.ndarray
    price: np.ndarray
    popularity: np.ndarray
    popular: np.ndarray
    popular_by_category: dict[int, np.ndarray]

    @property
    def n_items(self) -> int: ...


@dataclass(frozen=True)
class Filters:
    """Request-time filters, all in item-index / category-code space.

    Attributes
    ----------
    in_stock_only : bool
        Drop items whose ``available`` flag is false (default).
    categories : np.ndarray or None
        int32 category codes an item must have one of; None means any category. An empty array
        means no item qualifies (e.g. only unknown category names were asked for).
    min_price, max_price : float or None
        Inclusive price bounds; items with an unknown (NaN) price fail a price bound.
    exclude : np.ndarray
        int32 item indices never to return (``?exclude=``, the cart, the anchor item...).
    purchased : np.ndarray
        int32 indices of items the user already bought.
    exclude_purchased : bool
        Drop ``purchased`` items (default), except those in ``repurchase_categories``.
    repurchase_categories : np.ndarray
        int32 category codes of consumables people buy again (never excluded as "already bought").
    repurchasable : np.ndarray or None
        Bool mask over items exempt from "already bought"
        (:func:`recsvc.core.repurchase.repurchasable_items`: the learned repurchase rate, and the
        operator's categories); None: only ``repurchase_categories`` are exempt.
    """

    in_stock_only: bool = True
    categories: np.ndarray | None = None
    min_price: float | None = None
    max_price: float | None = None
    exclude: np.ndarray = field(default_factory=lambda: EMPTY_ITEMS)
    purchased: np.ndarray = field(default_factory=lambda: EMPTY_ITEMS)
    exclude_purchased: bool = True
    repurchase_categories: np.ndarray = field(default_factory=lambda: EMPTY_ITEMS)
    repurchasable: np.ndarray | None = None

    def with_exclusions(self, items: np.ndarray | None) -> Filters:
        """A copy that also excludes ``items`` (int item indices)."""
        if items is None or len(items) == 0:
            return self
        extra = np.asarray(items, dtype=np.int32)
        return _replace(self, exclude=np.concatenate((self.exclude, extra)) if len(self.exclude) else extra)


def _replace(filters: Filters, **changes: Any) -> Filters:
    from dataclasses import replace

    return replace(filters, **changes)


def mask_positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D boolean mask: (rows, cols) in row-major order.

    One flat scan and a division: ~6x faster than ``np.nonzero`` on wide masks such as
    (users or anchors) x items, where the 2-D scan dominated top-K selection.
    """
    flat = np.flatnonzero(mask)
    width = mask.shape[1]
    if width == 0:
        return flat, flat
    rows = flat // width
    return rows, flat - rows * width


def excluded_items(model: RankingModel, filters: Filters) -> np.ndarray:
    """int32 indices removed by ``exclude`` and by "already purchased" (minus repurchase categories)."""
    parts = [filters.exclude]
    if filters.exclude_purchased and len(filters.purchased):
        bought = np.asarray(filters.purchased, dtype=np.int32)
        if filters.repurchasable is not None:
            bought = bought[~filters.repurchasable[bought]]
        if len(filters.repurchase_categories):
            bought = bought[~np.isin(model.category[bought], filters.repurchase_categories)]
        parts.append(bought)
    parts = [p for p in parts if len(p)]
    if not parts:
        return EMPTY_ITEMS
    if len(parts) == 1:  # duplicates are harmless to np.isin and mask[...] = False
        return np.asarray(parts[0], dtype=np.int32)
    return np.unique(np.concatenate(parts)).astype(np.int32)


def _member(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``np.isin(values, members)`` for the small arrays of a request, without isin's sorting cost."""
    if len(members) <= 8:
        hit = np.zeros(len(values), dtype=bool)
        for m in members.tolist():
            hit |= values == m
        return hit
    return np.isin(values, members)


def allowed(
    model: RankingModel, filters: Filters, items: np.ndarray, excluded: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask over ``items`` (item indices): which pass every filter.

    ``excluded`` may be passed when already computed by :func:`excluded_items`.
    """
    items = np.asarray(items)
    if len(items) == 0:
        return np.ones(0, dtype=bool)
    ok = model.available[items] if filters.in_stock_only else np.ones(len(items), dtype=bool)
    if filters.categories is not None:
        ok &= _member(model.category[items], filters.categories)
    if filters.min_price is not None or filters.max_price is not None:
        price = model.price[items]
        with np.errstate(invalid="ignore"):
            if filters.min_price is not None:
                ok &= price >= filters.min_price
            if filters.max_price is not None:
                ok &= price <= filters.max_price
    excluded = excluded_items(model, filters) if excluded is None else excluded
    if len(excluded):
        ok &= ~_member(items, excluded)
    return ok


def allowed_mask(model: RankingModel, filters: Filters, excluded: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over every item: which pass every filter."""
    mask = (
        np.array(model.available, dtype=bool) if filters.in_stock_only else np.ones(model.n_items, dtype=bool)
    )
    if filters.categories is not None:
        mask &= np.isin(model.category, filters.categories)
    if filters.min_price is not None or filters.max_price is not None:
        with np.errstate(invalid="ignore"):
            if filters.min_price is not None:
                mask &= model.price >= filters.min_price
            if filters.max_price is not None:
                mask &= model.price <= filters.max_price
    excluded = excluded_items(model, filters) if excluded is None else excluded
    if len(excluded):
        mask[excluded] = False
    return mask


def score_items(item_factors: np.ndarray, user_vector: np.ndarray) -> np.ndarray:
    """float32 score of every item for one user: ``item_factors @ user_vector``."""
    return item_factors @ np.asarray(user_vector, dtype=np.float32)


def top_n_from_scores(scores: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best allowed items by score (ties: lower index first) as ``(indices, scores)``."""
    candidates = np.flatnonzero(mask)
    if len(candidates) > n:
        cand_scores = scores[candidates]
        keep = np.argpartition(-cand_scores, n - 1)[:n]
        candidates = candidates[keep]
    cand_scores = scores[candidates]
    order = np.lexsort((candidates, -cand_scores))
    return candidates[order].astype(np.int32), cand_scores[order].astype(np.float32)


def recommend_for_vector(
    model: RankingModel,
    user_vector: np.ndarray,
    filters: Filters,
    n: int,
    exclude_items: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every item for ``user_vector``, apply the filters, return the top ``n``.

    Parameters
    ----------
    model : RankingModel
        The live model (item factors and metadata).
    user_vector : np.ndarray
        float32 ``(factors,)``: trained user factors, or a folded-in vector (real time).
    filters : Filters
        Request filters (purchased items included).
    n : int
        Items wanted.
    exclude_items : np.ndarray, optional
        More int item indices to leave out (on top of ``filters.exclude``).
    scores : np.ndarray, optional
        The user's score of every item when already computed (a blended model); by default
        ``item_factors @ user_vector``.

    Returns
    -------
    (np.ndarray, np.ndarray)
        int32 item indices and float32 scores, best first. Fewer than ``n`` only when fewer items
        pass the filters; then the answer is every item that does.
    """
    filters = filters.with_exclusions(exclude_items)
    if scores is None:
        scores = score_items(model.item_factors, user_vector)
    return top_n_from_scores(scores, allowed_mask(model, filters), n)


def recommend_from_cache(
    model: RankingModel,
    cached_items: np.ndarray,
    cached_scores: np.ndarray | None,
    user_vector: np.ndarray | None,
    filters: Filters,
    n: int,
    score_all: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Top ``n`` for a known user from the cached top-K list, falling back to full scoring.

    ``cached_items`` is best first. ``cached_scores`` may be None when ``user_vector`` is given: then
    only the returned items are scored (``item_factors[items] @ user_vector``, a plain ALS model).
    ``score_all`` returns the user's score of every item when the cached list runs short (a blended
    model's :meth:`~recsvc.core.scoring.Scorer.score_one`); without it, ``item_factors @ user_vector``.

    Returns
    -------
    (np.ndarray, np.ndarray, str)
        Item indices, scores and how they were found: ``"cache"``, ``"full"`` (the cached list ran
        short, all items were scored with ``user_vector``) or ``"popular"`` (no vector; the cached
        list was topped up from popularity).
    """
    excluded = excluded_items(model, filters)
    ok = allowed(model, filters, cached_items, excluded)
    items = cached_items[ok][:n]
    if cached_scores is not None:
        scores = cached_scores[ok][:n]
    elif user_vector is not None:
        # Only the kept items are scored: the cached list is already in score order.
        scores = model.item_factors[items] @ np.asarray(user_vector, dtype=np.float32)
    else:
        raise ValueError("recommend_from_cache needs cached_scores or user_vector")
    if len(items) >= n or len(cached_items) >= model.n_items:
        # Enough survived, or the cache held every item so nothing else can pass the filters.
        return items.astype(np.int32, copy=False), scores.astype(np.float32, copy=False), "cache"
    if score_all is not None or user_vector is not None:
        if score_all is not None:
            every = score_all()
        else:
            assert user_vector is not None  # one of the two, by the condition above
            every = score_items(model.item_factors, user_vector)
        full_items, full_scores = top_n_from_scores(every, allowed_mask(model, filters, excluded), n)
        return full_items, full_scores, "full"
    items, scores = fill_from_popularity(model, filters, n, items, scores)
    return items, scores, "popular"


def _first_allowed(
    model: RankingModel, filters: Filters, excluded: np.ndarray, order: np.ndarray, n: int
) -> np.ndarray:
    """The first ``n`` items of ``order`` that pass the filters, checking growing slices only."""
    found: list[np.ndarray] = []
    got, start, step = 0, 0, max(64, 4 * n)
    while got < n and start < len(order):
        chunk = order[start : start + step]
        hits = chunk[allowed(model, filters, chunk, excluded)][: n - got]
        found.append(hits)
        got += len(hits)
        start += step
        step *= 4
    return np.concatenate(found).astype(np.int32) if found else EMPTY_ITEMS


def popular_items(
    model: RankingModel, filters: Filters, n: int, exclude_items: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most popular items passing the filters; scores are the popularity values.

    With ``filters.categories`` the per-category popularity lists are merged, so a small category
    does not require scanning the whole catalog.
    """
    filters = filters.with_exclusions(exclude_items)
    excluded = excluded_items(model, filters)
    if filters.categories is None:
        items = _first_allowed(model, filters, excluded, model.popular, n)
    else:
        lists = [
            _first_allowed(model, filters, excluded, model.popular_by_category[int(c)], n)
            for c in np.unique(filters.categories)
            if int(c) in model.popular_by_category
        ]
        items = np.concatenate(lists) if lists else EMPTY_ITEMS
        if len(lists) > 1:
            items = items[np.lexsort((items, -model.popularity[items].astype(np.float64)))][:n]
    items = items.astype(np.int32)
    return items, model.popularity[items].astype(np.float32)


def fill_from_popularity(
    model: RankingModel,
    filters: Filters,
    n: int,
    items: np.ndarray,
    scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Append popular items (passing the filters, not already in ``items``) until there are ``n``.

    The appended items carry their popularity value as score.
    """
    if len(items) >= n:
        return items[:n].astype(np.int32), scores[:n].astype(np.float32)
    extra, extra_scores = popular_items(model, filters, n - len(items), exclude_items=items)
    return (
        np.concatenate((items, extra)).astype(np.int32),
        np.concatenate((scores, extra_scores)).astype(np.float32),
    )


def similar_items(
    model: RankingModel, item: int, filters: Filters, n: int, unit_factors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Items most similar to ``item`` by cosine similarity of item factors (the item itself excluded).

    ``unit_factors`` (item factors scaled to unit length) may be passed to avoid renormalising; a
    :class:`~recsvc.serving.model.ServingModel` keeps them as ``unit_item_factors``.
    """
    if unit_factors is None:
        norms = np.linalg.norm(model.item_factors, axis=1, keepdims=True)
        unit_factors = model.item_factors / np.maximum(norms, 1e-12)
    filters = filters.with_exclusions(np.asarray([item], dtype=np.int32))
    scores = unit_factors @ unit_factors[item]
    return top_n_from_scores(scores, allowed_mask(model, filters), n)
