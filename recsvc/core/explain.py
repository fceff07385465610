"""Why an item is recommended: the parts of its score that drove it, and the history behind them.

A blended model ranks with (:mod:`recsvc.core.scoring`)::

    score(u, i) = w_als z(Y x_u)_i + w_knn z(c_u S)_i + w_pop(u) z(prior)_i + w_seen seen_ui

Each term is a number per item, so an item's score splits into the weighted contribution of every
part (:func:`explain_items`). The two personal parts split further into the user's history items:

* item-kNN: ``(c_u S)_i = sum_h c_uh S[h, i]``, so history item ``h`` adds
  ``w_knn * c_uh * S[h, i] / std`` (the z-score's mean is the same for every ``h``);
* ALS: a user vector solved against fixed item factors is ``x_u = A^-1 sum_h e_h y_h`` with
  ``A = Y^T Y + Y_h^T (E - I) Y_h + lambda I`` and ``e_h`` the row's confidences times alpha
  (implicit's ``explain``), so ``h`` adds ``w_als * e_h * y_i^T A^-1 y_h / std``. For a fold-in
  vector this is exact; for a trained vector it is the same solve the training sweep converged to.

The strongest part names the reason (:class:`Code`): an item the user already interacted with and
the own-items term lifted is ``seen``; one the popularity prior lifted more than the personal parts
is ``popular``; otherwise the history item adding most is the anchor ("because you viewed X",
"...bought X", "...just viewed X" when it came in through real-time events). Answers that are
popular lists (fallbacks) are ``trending`` (:func:`explain_popular`). Pure numpy: the serving layer
gathers the history and the text is made by :func:`describe`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from recsvc.core.scoring import Scorer

#: History items named per explanation at most ("because you viewed X and Y").
MAX_ANCHORS = 2


class Code(StrEnum):
    """A reason code: what drove an item into the list (the API's ``explanation.code``)."""

    VIEWED = "viewed"  # a history item the user looked at made it score high
    BOUGHT = "bought"  # ... one the user bought
    JUST_VIEWED = "just_viewed"  # ... one of the user's real-time events (newer than the model)
    SEEN = "seen"  # the user already looked at this item (the own-items term)
    POPULAR = "popular"  # the popularity prior outweighed the personal parts
    TRENDING = "trending"  # a popular list: unknown user, degraded service, popular variant
    BOUGHT_TOGETHER = "bought_together"  # a bundle companion, from co-purchases
    BUY_AGAIN = "buy_again"  # the user buys this item again and is due for it (include_due)


@dataclass(frozen=True)
class History:
    """A user's history as the model scores it.

    Attributes
    ----------
    indices : numpy.ndarray
        Unique item indices of the row (int).
    raw : numpy.ndarray
        Raw summed event weights per item (before scaling): the item-kNN and own-items input.
    effective : numpy.ndarray, optional
        ALS confidences times alpha per item (what the user's solve weighs); None: no ALS split.
    regularization : float
        The ALS solve's regularization for this row.
    recent, bought : numpy.ndarray, optional
        bool per item: came in through real-time events; the user bought it.
    """

    indices: np.ndarray
    raw: np.ndarray
    effective: np.ndarray | None = None
    regularization: float = 0.0
    recent: np.ndarray | None = None
    bought: np.ndarray | None = None

    @classmethod
    def empty(cls) -> History:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64))

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Explanation:
    """Why one item is in a list.

    ``anchors`` are history item indices, strongest first; ``parts`` the weighted contribution of
    each part of the score (``als``, ``item_knn``, ``popularity``, ``seen``) to this item, relative
    to the user's average item (z-scored parts are 0 on average).
    """

    code: Code
    anchors: tuple[int, ...] = ()
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FactorStats:
    """What the ALS row's mean and spread need, per model version: ``Y^T Y`` and the mean item
    vector. Then ``mean(Y x) = mean_y . x`` and ``mean((Y x)^2) = x^T (Y^T Y / n) x``: a request
    costs ``O(factors^2)``, not a product with every item."""

    gramian: np.ndarray  # float64 (factors, factors)
    mean: np.ndarray  # float64 (factors,)
    n_items: int

    @classmethod
    def of(cls, item_factors: np.ndarray, gramian: np.ndarray | None = None) -> FactorStats:
        y = np.asarray(item_factors)
        if gramian is None:
            gramian = y.T.astype(np.float64) @ y.astype(np.float64)
        return cls(np.asarray(gramian, dtype=np.float64), y.mean(axis=0, dtype=np.float64), int(y.shape[0]))

    def row_z(self, vector: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation of ``Y x`` over every item (std 1 when 0)."""
        x = np.asarray(vector, dtype=np.float64)
        mean = float(self.mean @ x)
        variance = float(x @ self.gramian @ x) / max(self.n_items, 1) - mean * mean
        std = float(np.sqrt(variance)) if variance > 1e-12 * max(mean * mean, 1.0) else 0.0
        return mean, std if std > 0 else 1.0


def _z(values: np.ndarray, n: int | None = None) -> tuple[float, float]:
    """Mean and std of a row of ``n`` items whose values outside ``values`` are 0 (std 1 when 0)."""
    n = len(values) if n is None else n
    if n == 0:
        return 0.0, 1.0
    mean = float(values.sum()) / n
    variance = float((values * values).sum()) / n - mean * mean
    std = float(np.sqrt(variance)) if variance > 1e-12 * max(mean * mean, 1.0) else 0.0
    return mean, std if std > 0 else 1.0


def als_attribution(
    item_factors: np.ndarray,
    history: History,
    items: np.ndarray,
    yty: np.ndarray,
) -> np.ndarray:
    """``(len(items), len(history))``: what each history item adds to ``y_i . x_u`` (see module).

    ``A = Y^T Y + lambda I + Y_h^T (|E| - I) Y_h`` is the user's fold-in system; a history item
    with a confidence <= 0 adds nothing (as in the solve's right-hand side). Only the rows of the
    history and of ``items`` are read (in float64), never the whole factor matrix.
    """
    if history.effective is None or not len(history):
        return np.zeros((len(items), len(history)))
    y_h = np.asarray(item_factors[np.asarray(history.indices, dtype=np.intp)], dtype=np.float64)
    e = np.asarray(history.effective, dtype=np.float64)
    a = np.asarray(yty, dtype=np.float64) + history.regularization * np.eye(y_h.shape[1])
    a += (y_h.T * (np.abs(e) - 1.0)) @ y_h
    y_i = np.asarray(item_factors[np.asarray(items, dtype=np.intp)], dtype=np.float64)
    # A is symmetric, so y_i A^-1 y_h^T = (A^-1 y_i^T)^T y_h^T: one right-hand side per listed
    # item, however long the history.
    try:
        z = np.linalg.solve(a, y_i.T)
    except np.linalg.LinAlgError:
        z = np.linalg.lstsq(a, y_i.T, rcond=None)[0]
    return (z.T @ y_h.T) * np.where(e > 0, e, 0.0)[None, :]


def _history_rows(similarity: Any, history: History) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The similarity rows of the history items as flat arrays: ``(owner, column, value)``, where
    ``owner`` is the position in ``history`` (no sparse matrix is built: a request-path cost)."""
    indptr = similarity.indptr
    h = np.asarray(history.indices, dtype=np.intp)
    starts, lengths = indptr[h], indptr[h + 1] - indptr[h]
    owner = np.repeat(np.arange(len(h)), lengths)
    first = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))
    return owner, similarity.indices[positions], similarity.data[positions].astype(np.float64)


def knn_attribution(
    similarity: Any,
    history: History,
    items: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``(len(items), len(history))``: ``c_uh * S[h, i]``, what each history item adds to ``(c_u S)_i``.

    ``rows``: the history's similarity rows when already flattened (:func:`_history_rows`).
    """
    items = np.asarray(items, dtype=np.intp)
    out = np.zeros((len(items), len(history)))
    if not len(history) or not len(items):
        return out
    owner, column, value = rows if rows is not None else _history_rows(similarity, history)
    order = np.argsort(items, kind="stable")
    at = np.minimum(np.searchsorted(items[order], column), len(items) - 1)
    keep = items[order][at] == column
    raw = np.asarray(history.raw, dtype=np.float64)
    np.add.at(out, (order[at[keep]], owner[keep]), value[keep] * raw[owner[keep]])
    return out


def explain_items(
    scorer: Scorer,
    history: History,
    vector: np.ndarray | None,
    items: np.ndarray,
    stats: FactorStats | None = None,
) -> list[Explanation]:
    """One :class:`Explanation` per item of a personalised list (see the module docstring).

    The cost does not grow with the catalogue: the ALS row's mean and spread come from ``stats``,
    the item-kNN row's from the history's similarity rows; only the list's items are scored.

    Parameters
    ----------
    scorer : Scorer
        The model's scorer (its spec, item factors, similarity and prior).
    history : History
        The user's row the list was scored from (empty for a user without one).
    vector : numpy.ndarray or None
        The ALS user vector the list was scored with.
    items : numpy.ndarray
        The list's item indices.
    stats : FactorStats, optional
        Of the item factors (cached per version); without it the ALS row is computed whole and
        ALS is not split by history item.
    """
    items = np.asarray(items, dtype=np.intp)
    spec = scorer.spec
    n_hist = len(history)
    parts: dict[str, np.ndarray] = {}
    attribution = np.zeros((len(items), n_hist))
    use_als = spec.als > 0 and vector is not None and scorer.item_factors is not None
    if use_als:
        assert scorer.item_factors is not None
        x = np.asarray(vector, dtype=np.float64)
        if spec.is_plain_als:  # alone, ALS keeps its own scale
            mean, std, weight = 0.0, 1.0, 1.0
        elif stats is not None:
            (mean, std), weight = stats.row_z(x), spec.als
        else:
            (mean, std), weight = _z(scorer.item_factors @ x), spec.als
        own = np.asarray(scorer.item_factors[items], dtype=np.float64) @ x
        parts["als"] = weight * (own - mean) / std
        if stats is not None:
            attribution += weight / std * als_attribution(scorer.item_factors, history, items, stats.gramian)
    if spec.knn > 0 and scorer.similarity is not None:
        # (c_u S) is non-zero only on the history's neighbours; summed into a dense row, it gives the
        # row's mean and spread over every item.
        rows = None
        if n_hist:
            rows = owner, column, value = _history_rows(scorer.similarity, history)
            raw = np.asarray(history.raw, dtype=np.float64)
            # The whole row, dense: one pass over the catalogue costs less than sorting the
            # history's neighbours to add them up.
            sums = np.bincount(column, weights=value * raw[owner], minlength=scorer.n_items)
            mean, std = _z(sums)
            own = sums[items]
        else:  # an all-zero row: mean 0, and _z's std of a constant row
            mean, std, own = 0.0, 1.0, np.zeros(len(items))
        parts["item_knn"] = spec.knn * (own - mean) / std
        if n_hist:
            attribution += spec.knn / std * knn_attribution(scorer.similarity, history, items, rows)
    if scorer.prior_z is not None and (spec.popularity > 0 or spec.popularity_boost > 0):
        weight = float(scorer.popularity_weight(np.asarray([n_hist]))[0])
        parts["popularity"] = weight * scorer.prior_z[items].astype(np.float64)
    seen = np.zeros(len(items))
    if spec.seen > 0 and n_hist:
        logged = np.log1p(np.maximum(np.asarray(history.raw, dtype=np.float64), 0))
        top = logged.max()
        if top > 0:
            indices = np.asarray(history.indices)
            order = np.argsort(indices, kind="stable")
            found = np.searchsorted(indices[order], items)
            found = np.minimum(found, len(indices) - 1)
            hit = indices[order][found] == items
            seen[hit] = spec.seen * logged[order][found[hit]] / top
        parts["seen"] = seen
    zeros = np.zeros(len(items))
    personal = parts.get("als", zeros) + parts.get("item_knn", zeros)
    popularity = parts.get("popularity", zeros)
    anchors = _anchors(attribution, history, items)
    names = list(parts)
    table = np.round(np.column_stack([parts[n] for n in names]), 4).tolist() if names else [[]] * len(items)
    out = []
    for row in range(len(items)):
        shares = dict(zip(names, table[row], strict=True))
        if seen[row] > 0 and seen[row] >= max(personal[row], popularity[row]):
            out.append(Explanation(Code.SEEN, (), shares))
            continue
        if (popularity[row] > 0 and popularity[row] > personal[row]) or not anchors[row]:
            out.append(Explanation(Code.POPULAR, (), shares))
            continue
        first = anchors[row][0]
        code = Code.VIEWED
        if history.recent is not None and history.recent[first]:
            code = Code.JUST_VIEWED
        elif history.bought is not None and history.bought[first]:
            code = Code.BOUGHT
        out.append(Explanation(code, tuple(int(history.indices[k]) for k in anchors[row]), shares))
    return out


def _anchors(attribution: np.ndarray, history: History, items: np.ndarray) -> list[list[int]]:
    """Per item, positions in ``history`` of the items adding most (> 0), strongest first, ties by
    item index, never the item itself; at most :data:`MAX_ANCHORS`."""
    if not len(history) or not len(items):
        return [[] for _ in range(len(items))]
    indices = np.asarray(history.indices)
    by_index = np.argsort(indices, kind="stable")
    scores = attribution[:, by_index]
    scores = np.where(indices[by_index][None, :] == np.asarray(items)[:, None], -np.inf, scores)
    # The best MAX_ANCHORS per row by repeated argmax (the first maximum: ties go to the lower item
    # index), as a stable descending sort would order them, without sorting whole rows.
    rows = np.arange(len(scores))
    picks, values_list = [], []
    for _ in range(min(MAX_ANCHORS, scores.shape[1])):
        best = scores.argmax(axis=1)
        picks.append(best)
        values_list.append(scores[rows, best].copy())
        scores[rows, best] = -np.inf
    top = np.column_stack(picks)
    values = np.column_stack(values_list)
    positions = by_index[top]
    return [
        [int(p) for p, v in zip(row_positions, row_values, strict=True) if v > 0]
        for row_positions, row_values in zip(positions.tolist(), values.tolist(), strict=True)
    ]


def explain_popular(n_items: int) -> list[Explanation]:
    """Explanations of a popular list (a fallback answer): every item is ``trending``."""
    return [Explanation(Code.TRENDING) for _ in range(n_items)]


def describe(
    explanation: Explanation,
    item: int,
    titles: Sequence[str],
    item_ids: Sequence[str],
    category_name: str | None,
) -> str:
    """The explanation in words, for a shopper or a merchandiser.

    ``item`` is the explained item's index; anchors are named by title (their id when untitled).
    """

    def name(index: int) -> str:
        title = titles[index] if index < len(titles) else ""
        return title or item_ids[index]

    anchors = " and ".join(name(a) for a in explanation.anchors)
    code = explanation.code
    if code is Code.VIEWED:
        return f"Because you viewed {anchors}"
    if code is Code.BOUGHT:
        return f"Because you bought {anchors}"
    if code is Code.JUST_VIEWED:
        return f"Because you just viewed {anchors}"
    if code is Code.SEEN:
        return "You looked at this before"
    if code is Code.POPULAR:
        return f"Popular in {category_name}" if category_name else "Popular with shoppers"
    if code is Code.TRENDING:
        return f"Trending in {category_name}" if category_name else "Trending now"
    if code is Code.BOUGHT_TOGETHER:
        return f"Often bought together with {anchors}" if anchors else "Often bought together"
    if code is Code.BUY_AGAIN:
        return "Time to buy this again"
    raise ValueError(f"no text for reason code {code!r}")  # pragma: no cover - every code is above
