"""Ranking metrics per user, their means with bootstrap intervals, and per-activity breakdowns.

Pure numpy. For each test user: ``hits[u, r]`` says whether the item at rank ``r`` is one of their
targets. Precision@k = hits/k; Recall@k = hits/|targets|; nDCG@k with binary gains
``1/log2(rank+1)`` over the ideal ranking of ``min(k, |targets|)`` hits; MAP@k = sum of precision
at each hit rank / ``min(k, |targets|)``; HitRate@k = at least one hit; Coverage@k = distinct
recommended items / catalogue size. Means come with a bootstrap 95 % interval over test users.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
DEFAULT_K = (10, 20)
#: Activity buckets: the user's training events.
BUCKETS: tuple[tuple[str, int, int], ...] = (("1-2", 1, 2), ("3-9", 3, 9), ("10+", 10, 2**62))
BOOTSTRAP_SAMPLES = 500


def hit_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """``hits[u, r]`` is True when the item at rank ``r`` of user ``u`` is relevant to them.

    Parameters
    ----------
    recommended : numpy.ndarray
        ``(n_users, K)`` item indices, best first; ``-1`` pads short lists.
    relevant : scipy.sparse.csr_matrix
        ``(n_users, n_columns)``; a stored entry marks a relevant item.
    """
    recommended = np.asarray(recommended, dtype=np.int64)
    n_users = recommended.shape[0]
    if relevant.shape[0] != n_users:
        raise ValueError(f"recommended has {n_users} rows, relevant has {relevant.shape[0]}")
    n_cols = relevant.shape[1]
    rel = relevant.tocsr()
    rel_rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(rel.indptr))
    rel_keys = np.unique(rel_rows * n_cols + rel.indices)
    keys = np.arange(n_users, dtype=np.int64)[:, None] * n_cols + recommended
    found = np.searchsorted(rel_keys, keys)
    found = np.minimum(found, max(len(rel_keys) - 1, 0))
    hits = (rel_keys[found] == keys) if len(rel_keys) else np.zeros(keys.shape, dtype=bool)
    return hits & (recommended >= 0) & (recommended < n_cols)


def relevant_counts(relevant: sp.csr_matrix) -> np.ndarray:
    """Targets per user (float64)."""
    rel = relevant.tocsr().copy()
    rel.sum_duplicates()
    return np.diff(rel.indptr).astype(np.float64)


def per_user(hits: np.ndarray, n_relevant: np.ndarray, metric: str, k: int) -> np.ndarray:
    """One value per user of ``metric@k`` (coverage is not per user: see :func:`coverage_at_k`)."""
    top = hits[:, :k]
    if metric == "precision":
        return np.asarray(top.sum(axis=1) / k, dtype=np.float64)
    if metric == "recall":
        return np.asarray(top.sum(axis=1) / np.maximum(n_relevant, 1), dtype=np.float64)
    if metric == "hit_rate":
        return np.asarray(top.any(axis=1), dtype=np.float64)
    if metric == "ndcg":
        discount = 1.0 / np.log2(np.arange(2, k + 2))
        dcg = (top * discount[: top.shape[1]]).sum(axis=1)
        ideal_cumulative = np.concatenate(([0.0], np.cumsum(discount)))
        ideal = ideal_cumulative[np.minimum(n_relevant, k).astype(np.int64)]
        return np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0)
    if metric == "map":
        t = top.astype(np.float64)
        precision_at_rank = np.cumsum(t, axis=1) / np.arange(1, t.shape[1] + 1)
        return (precision_at_rank * t).sum(axis=1) / np.maximum(np.minimum(n_relevant, k), 1)
    raise ValueError(f"unknown metric {metric!r}")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0


def precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of ``hits in top k / k``."""
    return _mean(per_user(hits, n_relevant, "precision", k))


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of ``hits in top k / |relevant|``."""
    return _mean(per_user(hits, n_relevant, "recall", k))


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of DCG@k / ideal DCG@k (binary gains, ``1/log2(rank + 1)`` discounts)."""
    return _mean(per_user(hits, n_relevant, "ndcg", k))


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of AP@k."""
    return _mean(per_user(hits, n_relevant, "map", k))


def hit_rate_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Share of users with at least one relevant item in their top k."""
    return _mean(per_user(hits, n_relevant, "hit_rate", k))


def coverage_at_k(recommended: np.ndarray, n_items: int, k: int) -> float:
    """Distinct items recommended in anyone's top k, over the catalog size."""
    top = np.asarray(recommended)[:, :k]
    distinct = np.unique(top[top >= 0])
    return float(len(distinct) / n_items) if n_items else 0.0


def ranking_metrics(
    recommended: np.ndarray, relevant: sp.csr_matrix, n_items: int, ks: Sequence[int] = DEFAULT_K
) -> dict[str, float]:
    """All metrics for every k, keyed ``"<metric>@<k>"`` (e.g. ``"ndcg@10"``)."""
    hits = hit_matrix(recommended, relevant)
    n_rel = relevant_counts(relevant)
    out: dict[str, float] = {}
    for k in ks:
        for metric in METRICS:
            if metric == "coverage":
                out[f"coverage@{k}"] = coverage_at_k(recommended, n_items, k)
            else:
                out[f"{metric}@{k}"] = _mean(per_user(hits, n_rel, metric, k))
    return out


def bootstrap_interval(
    values: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def ratio_interval(
    ours: np.ndarray, theirs: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float] | None:
    """95 % paired bootstrap interval of ``mean(ours) / mean(theirs)`` over the same users."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if len(ours) == 0 or theirs.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ours), (samples, len(ours)))
    denominator = theirs[pick].mean(axis=1)
    ratios = ours[pick].mean(axis=1) / np.where(denominator > 0, denominator, np.nan)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def bucket_of(activity: np.ndarray) -> np.ndarray:
    """Index into :data:`BUCKETS` of each user's training activity."""
    out = np.zeros(len(activity), dtype=np.int64)
    for b, (_, low, high) in enumerate(BUCKETS):
        out[(activity >= low) & (activity <= high)] = b
    return out
