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
import scipy.linalg

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


def _z(values: np.ndarray) -> tuple[float, float]:
    mean = float(values.mean()) if len(values) else 0.0
    std = float(values.std()) if len(values) else 0.0
    return mean, std if std > 0 else 1.0


def als_attribution(
    item_factors: np.ndarray,
    history: History,
    items: np.ndarray,
    yty: np.ndarray,
) -> np.ndarray:
    """``(len(items), len(history))``: what each history item adds to ``y_i . x_u`` (see module).

    ``A = Y^T Y + lambda I + Y_h^T (|E| - I) Y_h`` is the user's fold-in system; a history item
    with a confidence <= 0 adds nothing (as in the solve's right-hand side).
    """
    if history.effective is None or not len(history):
        return np.zeros((len(items), len(history)))
    y = np.asarray(item_factors, dtype=np.float64)
    y_h = y[np.asarray(history.indices, dtype=np.intp)]
    e = np.asarray(history.effective, dtype=np.float64)
    a = np.asarray(yty, dtype=np.float64) + history.regularization * np.eye(y.shape[1])
    a += (y_h.T * (np.abs(e) - 1.0)) @ y_h
    try:
        z = scipy.linalg.solve(a, y_h.T, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        z = np.linalg.lstsq(a, y_h.T, rcond=None)[0]
    return (y[np.asarray(items, dtype=np.intp)] @ z) * np.where(e > 0, e, 0.0)[None, :]


def knn_attribution(similarity: Any, history: History, items: np.ndarray) -> np.ndarray:
    """``(len(items), len(history))``: ``c_uh * S[h, i]``, what each history item adds to ``(c_u S)_i``."""
    if not len(history):
        return np.zeros((len(items), 0))
    rows = similarity[np.asarray(history.indices, dtype=np.intp)]
    block = rows[:, np.asarray(items, dtype=np.intp)].toarray().astype(np.float64)
    return (block * np.asarray(history.raw, dtype=np.float64)[:, None]).T


def explain_items(
    scorer: Scorer,
    history: History,
    vector: np.ndarray | None,
    items: np.ndarray,
    yty: np.ndarray | None = None,
) -> list[Explanation]:
    """One :class:`Explanation` per item of a personalised list (see the module docstring).

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
    yty : numpy.ndarray, optional
        ``Y^T Y`` of the item factors (cached per version); without it ALS is not split by history.
    """
    items = np.asarray(items, dtype=np.intp)
    spec = scorer.spec
    n_hist = len(history)
    parts: dict[str, np.ndarray] = {}
    attribution = np.zeros((len(items), n_hist))
    use_als = spec.als > 0 and vector is not None and scorer.item_factors is not None
    if use_als:
        assert scorer.item_factors is not None
        full = np.asarray(scorer.item_factors, dtype=np.float64) @ np.asarray(vector, dtype=np.float64)
        if spec.is_plain_als:  # alone, ALS keeps its own scale
            mean, std, weight = 0.0, 1.0, 1.0
        else:
            (mean, std), weight = _z(full), spec.als
        parts["als"] = weight * (full[items] - mean) / std
        if yty is not None:
            attribution += weight / std * als_attribution(scorer.item_factors, history, items, yty)
    if spec.knn > 0 and scorer.similarity is not None:
        full = np.zeros(scorer.n_items)
        if n_hist:
            rows = scorer.similarity[np.asarray(history.indices, dtype=np.intp)]
            full = np.asarray(rows.T @ np.asarray(history.raw, dtype=np.float64)).ravel()
        mean, std = _z(full)
        parts["item_knn"] = spec.knn * (full[items] - mean) / std
        if n_hist:
            attribution += spec.knn / std * knn_attribution(scorer.similarity, history, items)
    if scorer.prior_z is not None and (spec.popularity > 0 or spec.popularity_boost > 0):
        weight = float(scorer.popularity_weight(np.asarray([n_hist]))[0])
        parts["popularity"] = weight * scorer.prior_z[items].astype(np.float64)
    seen = np.zeros(len(items))
    if spec.seen > 0 and n_hist:
        logged = np.log1p(np.maximum(np.asarray(history.raw, dtype=np.float64), 0))
        top = logged.max()
        if top > 0:
            position = {int(h): k for k, h in enumerate(np.asarray(history.indices).tolist())}
            for row, item in enumerate(items.tolist()):
                k = position.get(item)
                if k is not None:
                    seen[row] = spec.seen * logged[k] / top
        parts["seen"] = seen
    personal = parts.get("als", np.zeros(len(items))) + parts.get("item_knn", np.zeros(len(items)))
    popularity = parts.get("popularity", np.zeros(len(items)))
    out = []
    for row in range(len(items)):
        shares = {name: round(float(values[row]), 4) for name, values in parts.items()}
        if seen[row] > 0 and seen[row] >= max(personal[row], popularity[row]):
            out.append(Explanation(Code.SEEN, (), shares))
            continue
        anchors = _anchors(attribution[row], history, exclude=int(items[row]))
        if (popularity[row] > 0 and popularity[row] > personal[row]) or not anchors:
            out.append(Explanation(Code.POPULAR, (), shares))
            continue
        first = anchors[0]
        code = Code.VIEWED
        if history.recent is not None and history.recent[first]:
            code = Code.JUST_VIEWED
        elif history.bought is not None and history.bought[first]:
            code = Code.BOUGHT
        out.append(Explanation(code, tuple(int(history.indices[k]) for k in anchors), shares))
    return out


def _anchors(contribution: np.ndarray, history: History, exclude: int) -> list[int]:
    """Positions in ``history`` of the items adding most (> 0), strongest first, ties by index."""
    if not len(contribution):
        return []
    indices = np.asarray(history.indices)
    order = np.lexsort((indices, -contribution))
    return [int(k) for k in order if contribution[k] > 0 and int(indices[k]) != exclude][:MAX_ANCHORS]


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
    raise ValueError(f"no text for reason code {code!r}")  # pragma: no cover - every code is above
