"""Fit every part of a model on one set of events: ALS, item-kNN and the popularity prior.

:func:`fit_model` is what training, the evaluation split and the tuner all call, so a model is
built the same way wherever it is scored. The parts and how they are blended are described in
:mod:`recsvc.core.scoring`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.ids import IdMap
from recsvc.core.scoring import ModelSpec, Scorer, popularity_prior
from recsvc.core.weighting import (
    WeightingParams,
    bm25_manifest_params,
    purchase_counts,
    raw_matrix,
    scale,
    to_float32,
)
from training.als import TrainParams, fit_als

#: BM25 weighting of the item-kNN similarity (implicit's defaults; within noise of others tried).
KNN_K1, KNN_B = 1.2, 0.75


@dataclass
class ModelMatrices:
    """What the parts of a model are fitted on, built from the events (which can go afterwards)."""

    params: TrainParams  # regularization resolved for this catalogue
    raw: sp.csr_matrix  # users x items, summed event weights (float32)
    confidence: sp.csr_matrix  # users x items, scaled as ALS sees it (float32)
    purchases: sp.csr_matrix  # users x items, purchase counts
    extra_params: dict[str, Any] = field(default_factory=dict)  # BM25 statistics for fold-in


@dataclass(kw_only=True)
class FittedModel(ModelMatrices):
    """A fitted model: its parts, the matrices they were fitted on, and the resolved parameters."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    similarity: sp.csr_matrix | None
    prior: np.ndarray

    @property
    def spec(self) -> ModelSpec:
        return self.params.model

    def scorer(self, spec: ModelSpec | None = None) -> Scorer:
        """The blend of these parts with this model's weights (or ``spec``'s)."""
        return Scorer(spec or self.spec, self.item_factors, self.similarity, self.prior)

    def manifest_params(self, seed: int) -> dict[str, Any]:
        return self.params.to_manifest(seed) | self.extra_params


def fit_similarity(raw: sp.csr_matrix, neighbours: int, threads: int = 0) -> sp.csr_matrix:
    """Item-kNN similarity: implicit's BM25 item-item model, the ``neighbours`` best per item.

    Row ``i`` holds the items most similar to ``i`` (itself included: implicit keeps the
    self-similarity, which is what lets item-kNN re-find the items a shopper looked at).
    """
    from implicit.nearest_neighbours import BM25Recommender
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        # implicit converts its own BM25-weighted COO matrix and warns about it; nothing to act on.
        warnings.simplefilter("ignore", category=Warning)
        model = BM25Recommender(K=int(neighbours), K1=KNN_K1, B=KNN_B, num_threads=threads)
        model.fit(sp.csr_matrix(raw, dtype=np.float32), show_progress=False)
    return sp.csr_matrix(model.similarity, dtype=np.float32)


def model_matrices(
    events: Any, user_ids: np.ndarray, item_ids: np.ndarray, params: TrainParams, *, now: int
) -> ModelMatrices:
    """The matrices of :func:`fit_model`, in the given row/column orders (``now``: the decay's
    reference time)."""
    params = params.resolved(len(item_ids))
    weighting: WeightingParams = params.weighting()
    users, items = IdMap(user_ids), IdMap(item_ids)
    raw = raw_matrix(events, users, items, weighting, now=now)
    confidence = to_float32(scale(raw, weighting))
    extra = bm25_manifest_params(raw, weighting)
    raw32 = sp.csr_matrix(raw, dtype=np.float32)
    del raw
    return ModelMatrices(params, raw32, confidence, purchase_counts(events, users, items), extra)


def fit_parts(
    matrices: ModelMatrices,
    *,
    seed: int,
    threads: int = 0,
    device: str = "auto",
    show_progress: bool = False,
) -> FittedModel:
    """Fit ALS, item-kNN and the popularity prior on ``matrices`` (:func:`model_matrices`)."""
    params, confidence = matrices.params, matrices.confidence
    user_factors, item_factors = fit_als(
        confidence, params, seed=seed, threads=threads, show_progress=show_progress, device=device
    )
    spec = params.model
    similarity = fit_similarity(matrices.raw, spec.knn_neighbours, threads) if spec.needs_similarity else None
    buyers = np.diff(matrices.purchases.tocsc().indptr)  # distinct buyers per item
    interested = np.diff(confidence.tocsc().indptr)
    return FittedModel(
        params=params,
        raw=matrices.raw,
        confidence=confidence,
        purchases=matrices.purchases,
        user_factors=user_factors,
        item_factors=item_factors,
        similarity=similarity,
        prior=popularity_prior(buyers, interested),
        extra_params=matrices.extra_params,
    )


def fit_model(
    events: Any,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    params: TrainParams,
    *,
    now: int,
    seed: int,
    threads: int = 0,
    device: str = "auto",
    show_progress: bool = False,
) -> FittedModel:
    """Fit ALS, item-kNN and the popularity prior on ``events`` in the given row/column orders.

    Parameters
    ----------
    events : EventTable
        The events to learn from.
    user_ids, item_ids : numpy.ndarray
        Row and column orders (:func:`recsvc.core.weighting.id_maps`).
    params : TrainParams
        Its regularization is resolved for ``len(item_ids)`` items.
    now : int
        Reference time of the decay (the newest event trained on).
    seed, threads, device, show_progress
        As for :func:`training.als.fit_als`.
    """
    matrices = model_matrices(events, user_ids, item_ids, params, now=now)
    return fit_parts(matrices, seed=seed, threads=threads, device=device, show_progress=show_progress)
