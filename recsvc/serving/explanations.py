"""Explanations of a served list: the user's history as the model scored it, handed to the core.

:mod:`recsvc.core.explain` splits every item's score into the blend's parts and the user's history
items; this module gathers what it needs for one answer -- the row the list was scored from (the
training row from Redis for a cached list, the folded row for a real-time one), the user's vector,
which history items were bought and which came in through real-time events -- and turns each
:class:`~recsvc.core.explain.Explanation` into the API's ``explanation`` object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recsvc.core.answers import Source
from recsvc.core.explain import (
    Explanation,
    FactorStats,
    History,
    describe,
    explain_items,
    explain_popular,
)
from recsvc.core.weighting import scale_row
from recsvc.serving.realtime import foldin_state, raw_training_row


@dataclass(frozen=True)
class Basis:
    """What a personalised list was scored from.

    ``confidence`` (the stored training row) or ``raw`` (a folded row) may be None; the other one is
    derived with the version's recipe. ``recent_items`` are the real-time events' items.
    """

    indices: np.ndarray
    vector: np.ndarray | None
    raw: np.ndarray | None = None
    confidence: np.ndarray | None = None
    recent_items: np.ndarray | None = None


def user_history(model: Any, basis: Basis, purchased: np.ndarray | None) -> History:
    """The :class:`~recsvc.core.explain.History` of ``basis`` under ``model``'s recipe.

    ``purchased`` marks bought items -- unless the version excludes everything a user interacted
    with, where the record's list is not purchases and nothing is called bought.
    """
    indices = np.asarray(basis.indices, dtype=np.int64)
    params = foldin_state(model).params
    raw, confidence = basis.raw, basis.confidence
    if raw is None:
        raw = raw_training_row(model, indices, np.asarray(confidence, dtype=np.float32))
    effective, regularization = None, 0.0
    if params is not None and len(indices):
        if confidence is None:
            confidence = scale_row(indices, raw, params)
        conf, regularization = params.solve_terms(np.asarray(confidence, dtype=np.float32))
        effective = np.float64(params.alpha) * conf.astype(np.float64)
    bought = None
    if purchased is not None and len(purchased) and not model.spec.excludes_interacted:
        bought = np.isin(indices, purchased)
    recent = None
    if basis.recent_items is not None and len(basis.recent_items):
        recent = np.isin(indices, basis.recent_items)
    return History(
        indices,
        np.asarray(raw, dtype=np.float64),
        effective=effective,
        regularization=float(regularization),
        recent=recent,
        bought=bought,
    )


def explain_answer(
    model: Any, items: np.ndarray, source: Source, history: History | None, vector: np.ndarray | None
) -> list[Explanation]:
    """One explanation per item: ``trending`` for popular lists, else from the model's parts."""
    if source is Source.FALLBACK or history is None:
        return explain_popular(len(items))
    return explain_items(model.scorer, history, vector, items, stats=factor_stats(model))


def factor_stats(model: Any) -> FactorStats | None:
    """The version's :class:`~recsvc.core.explain.FactorStats` (``Y^T Y`` shared with fold-in),
    built once per version; None for a version fold-in cannot use."""

    def build() -> FactorStats | None:
        state = foldin_state(model)
        if state.params is None:
            return None
        return FactorStats.of(model.item_factors, state.yty)

    return model.memo("explain.factor_stats", build)


def rendered(model: Any, items: np.ndarray, explanations: list[Explanation]) -> list[dict[str, Any]]:
    """The API's ``explanation`` objects: ``code``, ``text`` and the history items named (``because``)."""
    titles, ids, categories = model.titles, model.item_ids, model.categories
    out = []
    for item, explanation in zip(np.asarray(items).tolist(), explanations, strict=True):
        code = int(model.category[item])
        text = describe(explanation, item, titles, ids, categories[code] if code >= 0 else None)
        out.append(
            {
                "code": explanation.code.value,
                "text": text,
                "because": [ids[a] for a in explanation.anchors],
            }
        )
    return out
