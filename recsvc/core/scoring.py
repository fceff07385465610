"""How a model scores items for a user: ALS, item-kNN and popularity, blended. Pure numpy/scipy.

The default model is a blend, chosen on evidence across the public data sets and both evaluation
protocols (docs/quality.md): each part alone is beaten somewhere -- ALS by item-kNN on browse data,
item-kNN by popularity for newcomers to a movie catalogue, popularity by both on long histories --
and the blend follows the strongest part where they disagree. For one user with raw confidence row
``c_u`` (event weights summed per item, before scaling), ALS vector ``x_u`` and ``n_u`` distinct
items in their history::

    score(u, i) = w_als * z(Y x_u)_i                       ALS (item factors Y)
                + w_knn * z(c_u S)_i                       item-kNN (S: top-K similar items per item)
                + w_pop(u) * z(log1p(buyers))_i            popularity prior
                + w_seen * log1p(c_ui) / max_j log1p(c_uj)  the user's own items, strongest first
    w_pop(u)    = w_pop + w_pop_boost * h / (h + n_u)      more popularity for short histories

``z`` is a z-score over all items of the row. With ``w_seen`` large, items the user interacted with
but did not buy come first (shoppers buy what they looked at); :attr:`ModelSpec.exclude` says
whether those are excluded instead (catalogues where nobody consumes twice, e.g. films).

The same :class:`Scorer` ranks at every place a list is made: the evaluation, publishing (cached
top-K per user), real-time fold-in, batch ``recommend`` and the email export.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.topk import block_cells, top_k_rows

#: ``auto``: training measures which of the two the shop needs (``training.splits.exclusion_rule``).
EXCLUDES = ("auto", "purchased", "interacted")


@dataclass(frozen=True)
class ModelSpec:
    """The blend's weights, recorded in ``manifest["model"]`` (see the module docstring).

    A plain ALS model is ``ModelSpec(knn=0, popularity=0, popularity_boost=0, seen=0)``.
    """

    als: float = 1.0
    knn: float = 2.0
    popularity: float = 0.25
    popularity_boost: float = 3.0
    boost_half: float = 5.0
    seen: float = 100.0
    exclude: str = "auto"
    knn_neighbours: int = 100

    def __post_init__(self) -> None:
        for name in ("als", "knn", "popularity", "popularity_boost", "seen"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
                raise ValueError(f"model.{name} must be a finite number >= 0, got {value!r}")
        if not self.boost_half > 0:
            raise ValueError(f"model.boost_half must be > 0, got {self.boost_half!r}")
        if self.exclude not in EXCLUDES:
            raise ValueError(f"model.exclude must be one of {', '.join(EXCLUDES)}, got {self.exclude!r}")
        if not 1 <= int(self.knn_neighbours) <= 10_000:
            raise ValueError(f"model.knn_neighbours must be in 1..10000, got {self.knn_neighbours!r}")
        if self.als == 0 and self.knn == 0 and self.popularity == 0 and self.popularity_boost == 0:
            raise ValueError("model: at least one of als, knn, popularity must have a weight > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, source: str = "model") -> ModelSpec:
        """Read a recorded spec; keys it lacks take the defaults; an absent spec is plain ALS.

        Manifests written before blends existed have no ``model`` key: their cached lists and
        fold-in are ALS alone, so that is what they keep serving.
        """
        if values is None:
            return PLAIN_ALS
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r}")
        try:
            return cls(**dict(values))
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    @property
    def excludes_interacted(self) -> bool:
        """Whether every item the user interacted with is left out (not only purchases)."""
        return self.exclude == "interacted"

    @property
    def needs_similarity(self) -> bool:
        return self.knn > 0

    @property
    def is_plain_als(self) -> bool:
        return self.knn == 0 and self.popularity == 0 and self.popularity_boost == 0 and self.seen == 0


#: What models trained before the blend serve (and ``--model als``).
PLAIN_ALS = ModelSpec(knn=0.0, popularity=0.0, popularity_boost=0.0, seen=0.0, exclude="purchased")


def popularity_prior(buyers: np.ndarray, interested: np.ndarray | None = None) -> np.ndarray:
    """The blend's popularity part: ``log1p(distinct buyers)``, ties broken by interested users."""
    prior = np.log1p(np.asarray(buyers, dtype=np.float64))
    if interested is not None:
        prior = prior + 1e-3 * np.log1p(np.asarray(interested, dtype=np.float64))
    return prior.astype(np.float32)


def _row_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row (float64; a constant row gets std 1)."""
    n = scores.shape[1]
    mean = scores.sum(axis=1, dtype=np.float64) / n
    square = np.einsum("ij,ij->i", scores, scores, dtype=np.float64) / n
    std = np.sqrt(np.maximum(square - mean * mean, 0.0))
    return mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation (a constant row becomes zeros)."""
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    return (scores - mean) / np.where(std > 0, std, 1.0)


def _popularity_weight(spec: ModelSpec, n_items_of_user: np.ndarray) -> np.ndarray:
    n = np.asarray(n_items_of_user, dtype=np.float64)
    weight = spec.popularity + spec.popularity_boost * spec.boost_half / (spec.boost_half + n)
    return weight.astype(np.float32)


@dataclass(frozen=True)
class ScoreParts:
    """The unweighted parts of a block of users' scores (:meth:`Scorer.parts`).

    ``als`` and ``knn`` are the raw ``(n_users, n_items)`` float32 scores with each row's mean and
    standard deviation (``als_stats``, ``knn_stats``: two ``(n_users,)`` arrays), so that
    :meth:`Scorer.combine` z-scores while it weighs, in one pass; ``history`` is each user's number
    of distinct items; ``seen`` holds ``log1p(c_ui) / max_j log1p(c_uj)`` for the items of each
    user's history.
    """

    als: np.ndarray | None
    knn: np.ndarray | None
    history: np.ndarray
    seen: sp.csr_matrix | None
    als_stats: tuple[np.ndarray, np.ndarray] | None = None
    knn_stats: tuple[np.ndarray, np.ndarray] | None = None


class Scorer:
    """Scores of every item for users, from one model's parts (see the module docstring).

    Parameters
    ----------
    spec : ModelSpec
    item_factors : numpy.ndarray
        float32 ``(n_items, factors)``; needed when ``spec.als > 0``.
    similarity : scipy.sparse.csr_matrix, optional
        ``(n_items, n_items)`` item-kNN similarity, row ``i`` = the neighbours of item ``i``;
        needed when ``spec.knn > 0``.
    prior : numpy.ndarray, optional
        :func:`popularity_prior` per item; needed when popularity has a weight.
    """

    def __init__(
        self,
        spec: ModelSpec,
        item_factors: np.ndarray | None,
        similarity: sp.csr_matrix | None = None,
        prior: np.ndarray | None = None,
    ):
        self.spec = spec
        self.item_factors = item_factors
        n_items = None
        if item_factors is not None:
            n_items = item_factors.shape[0]
        if spec.als > 0 and item_factors is None:
            raise ValueError("the model has an ALS weight but no item factors")
        if spec.knn > 0:
            if similarity is None:
                raise ValueError("the model has an item-kNN weight but no similarity matrix")
            similarity = sp.csr_matrix(similarity, dtype=np.float32)
            n_items = n_items or similarity.shape[0]
            if similarity.shape != (n_items, n_items):
                raise ValueError(f"similarity is {similarity.shape}, expected ({n_items}, {n_items})")
        self.similarity = similarity
        uses_prior = spec.popularity > 0 or spec.popularity_boost > 0
        if uses_prior:
            if prior is None:
                raise ValueError("the model has a popularity weight but no popularity prior")
            n_items = n_items or len(prior)
            self.prior_z = zscore_rows(np.asarray(prior, dtype=np.float64)[None, :])[0].astype(np.float32)
        else:
            self.prior_z = None
        if n_items is None:
            raise ValueError("a scorer needs item factors, a similarity matrix or a popularity prior")
        self.n_items = int(n_items)

    def popularity_weight(self, n_items_of_user: np.ndarray) -> np.ndarray:
        """``w_pop(u)`` for users with these history lengths (distinct items)."""
        return _popularity_weight(self.spec, n_items_of_user)

    def score(self, rows: sp.csr_matrix, vectors: np.ndarray | None) -> np.ndarray:
        """Scores ``(n_users, n_items)`` float32 for users with raw rows ``rows`` and ALS ``vectors``.

        Parameters
        ----------
        rows : scipy.sparse.csr_matrix
            ``(n_users, n_items)`` raw confidences (summed event weights, before scaling); stored
            entries are the users' histories.
        vectors : numpy.ndarray or None
            ``(n_users, factors)`` ALS user vectors (trained or folded in); None without ALS.
        """
        return self.combine(self.parts(rows, vectors))

    def parts(self, rows: sp.csr_matrix, vectors: np.ndarray | None) -> ScoreParts:
        """The parts of the score of these users, unweighted: the expensive half of :meth:`score`.

        Model selection computes them once per block of users and re-weighs them for every
        candidate (:meth:`combine`); the parts a spec gives no weight are not computed.
        """
        rows = sp.csr_matrix(rows, dtype=np.float32)
        spec = self.spec
        als = knn = seen = None
        if spec.als > 0:
            if vectors is None:
                raise ValueError("the model has an ALS weight: pass the users' vectors")
            assert self.item_factors is not None  # checked at construction
            als = np.asarray(vectors, dtype=np.float32) @ self.item_factors.T
        if spec.knn > 0:
            assert self.similarity is not None  # checked at construction
            knn = (rows @ self.similarity).toarray()
        if spec.seen > 0 and rows.nnz:
            seen = rows.copy()
            seen.data = np.log1p(np.maximum(seen.data, 0))
            row_max = np.asarray(seen.max(axis=1).toarray()).ravel()
            seen = sp.csr_matrix(sp.diags(1.0 / np.where(row_max > 0, row_max, 1.0)) @ seen)
        plain = spec.is_plain_als  # alone, ALS keeps its own scale (the order is the same)
        return ScoreParts(
            als,
            knn,
            np.diff(rows.indptr),
            seen,
            None if als is None or plain else _row_stats(als),
            None if knn is None else _row_stats(knn),
        )

    def combine(self, parts: ScoreParts, spec: ModelSpec | None = None) -> np.ndarray:
        """The weighted sum of ``parts`` under ``spec`` (default: this scorer's).

        ``spec`` may weigh the parts differently but needs no part this scorer left out (e.g.
        an item-kNN weight when this scorer's spec has none).
        """
        spec = spec or self.spec
        n_users = len(parts.history)
        if spec.is_plain_als and parts.als is not None:
            return parts.als
        # sum_p w_p (x_p - mean_p) / std_p = sum_p (w_p / std_p) x_p - sum_p w_p mean_p / std_p: the
        # z-scores are never materialised (one pass per part instead of four).
        total: np.ndarray | None = None
        offset = np.zeros(n_users)
        for weight, part, stats, name in (
            (spec.als, parts.als, parts.als_stats, "ALS"),
            (spec.knn, parts.knn, parts.knn_stats, "item-kNN"),
        ):
            if weight > 0:
                if part is None or stats is None:
                    raise ValueError(f"these parts have no {name} part")
                mean, std = stats
                scale = (weight / std).astype(np.float32)[:, None]
                if total is None:
                    total = part * scale
                else:
                    total += part * scale
                offset += weight * mean / std
        if total is None:
            total = np.zeros((n_users, self.n_items), dtype=np.float32)
        total -= offset.astype(np.float32)[:, None]
        if spec.popularity > 0 or spec.popularity_boost > 0:
            if self.prior_z is None:
                raise ValueError("this scorer has no popularity prior")
            per_user = _popularity_weight(spec, parts.history)
            total += per_user[:, None] * self.prior_z[None, :]
        if spec.seen > 0 and parts.seen is not None:
            seen = parts.seen
            user_of = np.repeat(np.arange(n_users), np.diff(seen.indptr))
            total[user_of, seen.indices] += np.float32(spec.seen) * seen.data.astype(np.float32)
        return total

    def top_k(
        self,
        rows: sp.csr_matrix,
        vectors: np.ndarray | None,
        k: int,
        blocked: sp.csr_matrix | None = None,
        blocked_items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per user, best first: :meth:`score` without ``blocked`` cells (per
        user) and ``blocked_items`` (item indices no user may get).

        Returns ``(indices, scores)`` as :func:`recsvc.core.topk.top_k_rows` (``-1`` pads rows with
        fewer than ``k`` unblocked items).
        """
        scores = self.score(rows, vectors)
        if blocked is not None:
            block_cells(scores, sp.csr_matrix(blocked))
        if blocked_items is not None and len(blocked_items):
            scores[:, blocked_items] = -np.inf
        return top_k_rows(scores, min(k, self.n_items))

    def score_one(self, indices: np.ndarray, raw: np.ndarray, vector: np.ndarray | None) -> np.ndarray:
        """Scores of every item (float32 ``(n_items,)``) for one user's history and ALS vector."""
        row = sp.csr_matrix(
            (np.asarray(raw, dtype=np.float32), np.asarray(indices, dtype=np.int64), [0, len(indices)]),
            shape=(1, self.n_items),
        )
        return self.score(row, None if vector is None else np.asarray(vector)[None, :])[0]
