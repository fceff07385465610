"""Offline evaluation: a time split, ranking metrics, ALS against baselines, and a bounded tuner.

Protocol (the same for every method, in one run):

* **Split**: events before ``cutoff = newest event - split_days`` train; *purchases* on or after
  it are the test set. Users unknown at the cutoff (cold) cannot be personalised and are
  counted but not scored.
* **Relevant items** of a test user: the distinct items they purchased in the test period. With
  ``exclude_purchased`` (the default, as in serving) items they had already bought before the
  cutoff are removed from both the relevant set and every method's recommendations, so the
  metrics measure discovery, not "buy again".
* **Methods**: ``als`` (this project's model, same parameters as training), ``popularity``
  (distinct buyers per item over the training period), ``recent_popularity`` (the recency-aware
  popularity the service falls back to), ``item_knn`` (implicit's ``BM25Recommender`` on the same
  confidence matrix, padded with popularity when a user has fewer than k neighbours' items).
* **Metrics** for each k: Precision@k = hits/k; Recall@k = hits/|relevant|; nDCG@k with binary
  gains ``1/log2(rank+1)`` normalised by the ideal ranking of ``min(k, |relevant|)`` hits;
  MAP@k = sum of precision at each hit rank / ``min(k, |relevant|)``; HitRate@k = share of users
  with at least one hit; Coverage@k = distinct recommended items / catalog size. All but coverage
  are means over test users.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.contract import PURCHASE
from recsvc.core.ids import IdMap
from recsvc.core.progress import Progress
from recsvc.core.weighting import (
    SECONDS_PER_DAY,
    confidence_matrix,
    id_maps,
    index_positions,
    popularity_scores,
    purchase_counts,
)
from training.als import TrainParams, fit_als
from training.cooccurrence import evaluate_bundles

METHODS = ("als", "popularity", "recent_popularity", "item_knn")
METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
DEFAULT_K = (10, 20)
# Dense score blocks are bounded to this many floats (memory stays flat whatever the catalog size).
_BLOCK_FLOATS = 1 << 23


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def auto_split_days(events: Any) -> float:
    """Default test window: 10% of the log's time span, at least 1 and at most 14 days."""
    if len(events.timestamp) == 0:
        return 1.0
    return split_days_for_span(int(events.timestamp.min()), int(events.timestamp.max()))


def split_days_for_span(oldest: int, newest: int) -> float:
    """:func:`auto_split_days` of a log whose events span ``oldest`` .. ``newest`` (Unix seconds)."""
    span_days = (newest - oldest) / SECONDS_PER_DAY
    return float(min(14, max(1, math.ceil(span_days * 0.1))))


def split_cutoff(events: Any, split_days: float | None) -> int:
    """Unix second where the test period starts: newest event minus ``split_days`` days."""
    if split_days is None:
        split_days = auto_split_days(events)
    return cutoff_before(int(events.timestamp.max()), split_days)


def cutoff_before(newest: int, split_days: float) -> int:
    """:func:`split_cutoff` given the newest event's time."""
    if not split_days > 0:
        raise ValueError(f"split_days must be > 0, got {split_days!r}")
    return newest - int(round(split_days * SECONDS_PER_DAY)) + 1


def time_split(events: Any, split_days: float | None) -> tuple[Any, Any]:
    """Split by time: ``(train, test)`` = (all events before the cutoff, purchases on/after it).

    Parameters
    ----------
    events : EventTable
        The whole log.
    split_days : float or None
        Length of the test period in days; ``None`` picks :func:`auto_split_days`.

    Returns
    -------
    (EventTable, EventTable)
    """
    if len(events) == 0:
        raise ValueError("no events to split")
    cutoff = split_cutoff(events, split_days)
    before = events.timestamp < cutoff
    return events.take(before), events.take(~before & (events.event == PURCHASE))


# --------------------------------------------------------------------------------------------
# Metrics (pure numpy)
# --------------------------------------------------------------------------------------------


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
    n_users, depth = recommended.shape
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


def _relevant_counts(relevant: sp.csr_matrix) -> np.ndarray:
    rel = relevant.tocsr().copy()
    rel.sum_duplicates()
    return np.diff(rel.indptr).astype(np.float64)


def precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of ``hits in top k / k``."""
    if len(hits) == 0:
        return 0.0
    return float(hits[:, :k].sum(axis=1).mean() / k)


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of ``hits in top k / |relevant|`` (users need ``|relevant| > 0``)."""
    if len(hits) == 0:
        return 0.0
    return float((hits[:, :k].sum(axis=1) / np.maximum(n_relevant, 1)).mean())


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of DCG@k / ideal DCG@k with binary gains and ``1/log2(rank + 1)`` discounts."""
    if len(hits) == 0:
        return 0.0
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    top = hits[:, :k]
    dcg = (top * discount[: top.shape[1]]).sum(axis=1)
    ideal_cumulative = np.concatenate(([0.0], np.cumsum(discount)))
    ideal = ideal_cumulative[np.minimum(n_relevant, k).astype(np.int64)]
    return float(np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0).mean())


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over users of AP@k = sum of precision@rank at each hit / ``min(k, |relevant|)``."""
    if len(hits) == 0:
        return 0.0
    top = hits[:, :k].astype(np.float64)
    precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision_at_rank * top).sum(axis=1) / np.maximum(np.minimum(n_relevant, k), 1)
    return float(ap.mean())


def hit_rate_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Share of users with at least one relevant item in their top k."""
    if len(hits) == 0:
        return 0.0
    return float(hits[:, :k].any(axis=1).mean())


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
    n_rel = _relevant_counts(relevant)
    out: dict[str, float] = {}
    for k in ks:
        out[f"precision@{k}"] = precision_at_k(hits, n_rel, k)
        out[f"recall@{k}"] = recall_at_k(hits, n_rel, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, n_rel, k)
        out[f"map@{k}"] = map_at_k(hits, n_rel, k)
        out[f"hit_rate@{k}"] = hit_rate_at_k(hits, n_rel, k)
        out[f"coverage@{k}"] = coverage_at_k(recommended, n_items, k)
    return out


def top_k(scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """Indices of the ``k`` best scores per row, best first (ties: lower index first).

    Excluded entries (stored entries of ``exclude``, same shape) never appear; rows with fewer
    than ``k`` candidates are padded with ``-1``.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    n, m = scores.shape
    if exclude is not None and exclude.nnz:
        ex = exclude.tocsr()
        rows = np.repeat(np.arange(n), np.diff(ex.indptr))
        scores[rows, ex.indices] = -np.inf
    # A tie-break far below any meaningful score difference (lower index first) makes the
    # selection deterministic: argpartition alone picks arbitrarily among equal scores.
    finite = scores[np.isfinite(scores)]
    scale = float(np.abs(finite).max()) + 1.0 if finite.size else 1.0
    scores -= np.arange(m, dtype=np.float64) * (scale * 1e-12 / max(m, 1))
    k_eff = min(k, m)
    if k_eff < m:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.tile(np.arange(m), (n, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    best_scores = np.take_along_axis(part_scores, order, axis=1)
    best = np.where(np.isneginf(best_scores), -1, best)
    if k_eff < k:
        best = np.hstack([best, np.full((n, k - k_eff), -1, dtype=best.dtype)])
    return best.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A split turned into matrices: train confidence, exclusions, relevant sets of test users."""

    train: Any
    test: Any
    cutoff: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    confidence: sp.csr_matrix
    purchased: sp.csr_matrix
    test_users: np.ndarray  # row indices into confidence
    relevant: sp.csr_matrix  # (n_test_users, n_items + 1); column n_items = "not in the model"
    info: dict[str, Any] = field(default_factory=dict)


def _prepare(
    train: Any,
    test: Any,
    cutoff: int,
    catalog_item_ids: np.ndarray | None,
    params: TrainParams,
    exclude_purchased: bool,
) -> _Prepared:
    weighting = params.weighting()
    user_ids, item_ids = id_maps(train, weighting, catalog_item_ids)
    confidence = confidence_matrix(train, user_ids, item_ids, weighting, now=cutoff - 1)
    purchased = purchase_counts(train, user_ids, item_ids)
    prep = prepare_split(
        user_ids,
        item_ids,
        confidence,
        purchased,
        np.asarray(test.user_id, dtype=object),
        np.asarray(test.item_id, dtype=object),
        cutoff,
        exclude_purchased,
        train_events=len(train),
    )
    prep.train, prep.test = train, test
    return prep


def prepare_split(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    confidence: sp.csr_matrix,
    purchased: sp.csr_matrix,
    test_user_ids: np.ndarray,
    test_item_ids: np.ndarray,
    cutoff: int,
    exclude_purchased: bool,
    train_events: int,
) -> _Prepared:
    """A split from the training period's matrices and the test period's purchases (user, item ids).

    The engine that built the matrices does not matter (the Spark engine builds them distributed).
    """
    n_users, n_items = len(user_ids), len(item_ids)
    rows = index_positions(test_user_ids, user_ids)
    cols = index_positions(test_item_ids, item_ids)
    known = rows >= 0
    cols = np.where(cols >= 0, cols, n_items)  # an item the model never saw: relevant, unreachable
    rel = sp.csr_matrix(
        (np.ones(int(known.sum()), dtype=np.float32), (rows[known], cols[known])),
        shape=(n_users, n_items + 1),
    )
    rel.sum_duplicates()
    rel.data[:] = 1.0
    if exclude_purchased and purchased.nnz:
        bought = sp.hstack([purchased, sp.csr_matrix((n_users, 1), dtype=np.float32)]).tocsr()
        bought.data[:] = 1.0
        rel = (rel - rel.multiply(bought)).tocsr()
        rel.eliminate_zeros()
    test_users = np.flatnonzero(np.diff(rel.indptr) > 0)
    cold_users = len(np.unique(np.asarray(test_user_ids, dtype=object)[~known])) if len(test_user_ids) else 0
    info = {
        "cutoff": int(cutoff),
        "cutoff_utc": _dt.datetime.fromtimestamp(cutoff, _dt.UTC).isoformat(timespec="seconds"),
        "train_events": int(train_events),
        "test_purchases": len(test_user_ids),
        "test_users": int(len(test_users)),
        "cold_test_users": int(cold_users),
        "users": n_users,
        "items": n_items,
        "exclude_purchased": bool(exclude_purchased),
    }
    return _Prepared(
        None, None, cutoff, user_ids, item_ids, confidence, purchased, test_users, rel[test_users], info
    )


def _ranked(prep: _Prepared, score_block: Any, k: int, exclude_purchased: bool) -> np.ndarray:
    """Top-k per test user from ``score_block(user_rows) -> dense scores``, in bounded blocks."""
    n_items = len(prep.item_ids)
    block = max(1, _BLOCK_FLOATS // max(n_items, 1))
    out = np.empty((len(prep.test_users), k), dtype=np.int64)
    for lo in range(0, len(prep.test_users), block):
        users = prep.test_users[lo : lo + block]
        scores = score_block(users)
        exclude = prep.purchased[users] if exclude_purchased else None
        out[lo : lo + block] = top_k(scores, k, exclude)
    return out


def popularity_baseline(prep: _Prepared) -> np.ndarray:
    """Distinct buyers per item, ties broken by total confidence (so view-only items still rank)."""
    bought = prep.purchased.copy()
    bought.data[:] = 1.0
    buyers = np.asarray(bought.sum(axis=0)).ravel()
    interest = np.asarray(prep.confidence.sum(axis=0)).ravel()
    return buyers + interest / (interest.max() + 1.0) * 0.5


def _evaluate_als(
    prep: _Prepared,
    params: TrainParams,
    ks: Sequence[int],
    seed: int,
    threads: int,
    exclude_purchased: bool,
    show_progress: bool = False,
    device: str = "auto",
) -> tuple[dict[str, float], np.ndarray]:
    user_factors, item_factors = fit_als(
        prep.confidence, params, seed=seed, threads=threads, show_progress=show_progress, device=device
    )
    return factor_metrics(prep, user_factors, item_factors, ks, exclude_purchased), item_factors


def factor_metrics(
    prep: _Prepared,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    ks: Sequence[int],
    exclude_purchased: bool,
) -> dict[str, float]:
    """Ranking metrics of a factor model (any engine's) on a prepared split."""
    recs = _ranked(prep, lambda users: user_factors[users] @ item_factors.T, max(ks), exclude_purchased)
    return ranking_metrics(recs, prep.relevant, len(prep.item_ids), ks)


def popularity_metrics(
    prep: _Prepared, scores: np.ndarray, ks: Sequence[int], exclude_purchased: bool
) -> dict[str, float]:
    """Ranking metrics of one global item order (a popularity baseline) on a prepared split."""
    n_items = len(prep.item_ids)
    recs = _ranked(
        prep, lambda users: np.broadcast_to(scores, (len(users), n_items)), max(ks), exclude_purchased
    )
    return ranking_metrics(recs, prep.relevant, n_items, ks)


def evaluate(
    events: Any,
    catalog: Any,
    params: TrainParams | None = None,
    k: Sequence[int] = DEFAULT_K,
    split_days: float | None = None,
    *,
    seed: int = 42,
    threads: int = 0,
    exclude_purchased: bool = True,
    knn_neighbours: int = 100,
    show_progress: bool = False,
    device: str = "auto",
    methods: Sequence[str] = METHODS,
    bundles: bool = True,
) -> dict[str, Any]:
    """Evaluate ALS and the baselines on a time split of ``events``.

    Parameters
    ----------
    events : EventTable
        The whole log; it is split with :func:`time_split`.
    catalog : Catalog or None
        Catalog items join the model's item set (they can be recommended and count for coverage).
    params : TrainParams, optional
        Model parameters (defaults if None).
    k : sequence of int
        Cut-offs, default ``(10, 20)``.
    split_days : float, optional
        Test window in days (default :func:`auto_split_days`).
    seed, threads, device
        Passed to :func:`training.als.fit_als`.
    exclude_purchased : bool, default True
        Remove items bought before the cutoff from recommendations and relevant sets.
    knn_neighbours : int
        K of the item-kNN baseline.
    methods : sequence of str
        Subset of :data:`METHODS` to run.
    bundles : bool, default True
        Also score bundles with ``training.cooccurrence.evaluate_bundles``.

    Returns
    -------
    dict
        ``{"als": {"ndcg@10": ...}, "popularity": {...}, ..., "split": {...}}`` and, with
        ``bundles``, ``"bundles"``. When the test period
        has no scorable user, only ``"split"`` and ``"note"`` are present.
    """
    params = params or TrainParams()
    ks = tuple(sorted({int(x) for x in k}))
    if not ks or ks[0] < 1:
        raise ValueError("k must hold positive cut-offs")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    train, test = time_split(events, split_days)
    if len(train) == 0:
        raise ValueError("the split leaves no training events: use a shorter split_days")
    cutoff = split_cutoff(events, split_days)
    catalog_ids = None if catalog is None else catalog.item_id
    prep = _prepare(train, test, cutoff, catalog_ids, params, exclude_purchased)
    used_days = split_days if split_days is not None else auto_split_days(events)
    metrics: dict[str, Any] = {"split": {**prep.info, "split_days": float(used_days), "k": list(ks)}}
    if len(prep.test_users) == 0:
        metrics["note"] = "no test user: nobody known before the cutoff purchased a new item after it"
        return metrics
    timings: dict[str, float] = {}
    item_factors = None
    chosen = [m for m in METHODS if m in methods]
    # One line every few seconds while a method runs (ALS and item-kNN fits take the longest).
    with Progress("evaluate", total=len(chosen), unit="methods") as progress:
        for method in chosen:
            progress.step(method)
            start = time.perf_counter()
            if method == "als":
                metrics["als"], item_factors = _evaluate_als(
                    prep, params, ks, seed, threads, exclude_purchased, show_progress, device
                )
            elif method == "popularity":
                metrics["popularity"] = popularity_metrics(
                    prep, popularity_baseline(prep), ks, exclude_purchased
                )
            elif method == "recent_popularity":
                pop = popularity_scores(train, prep.item_ids, params.weighting(), now=cutoff - 1)
                metrics["recent_popularity"] = popularity_metrics(
                    prep, pop.astype(np.float64), ks, exclude_purchased
                )
            elif method == "item_knn":
                metrics["item_knn"] = _evaluate_knn(prep, ks, knn_neighbours, threads, exclude_purchased)
            timings[method] = round(time.perf_counter() - start, 3)
    metrics["split"]["seconds"] = timings
    if bundles and item_factors is not None:
        start = time.perf_counter()
        metrics["bundles"] = _evaluate_bundles(prep, item_factors, catalog)
        timings["bundles"] = round(time.perf_counter() - start, 3)
    return metrics


def _evaluate_knn(
    prep: _Prepared, ks: Sequence[int], neighbours: int, threads: int, exclude_purchased: bool
) -> dict[str, float]:
    from implicit.nearest_neighbours import BM25Recommender
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        # implicit converts its own BM25-weighted COO matrix and warns about it; nothing to act on.
        warnings.simplefilter("ignore", category=Warning)
        model = BM25Recommender(K=neighbours, num_threads=threads)
        model.fit(prep.confidence, show_progress=False)
    similarity = model.similarity.tocsr()
    pop = popularity_baseline(prep)
    # Items no neighbour points to score below every similar item, in popularity order.
    padding = -1.0 + pop / (pop.max() + 1.0)

    def scores(users: np.ndarray) -> np.ndarray:
        sim = np.asarray((prep.confidence[users] @ similarity).todense(), dtype=np.float64)
        return np.where(sim > 0, sim, padding)

    recs = _ranked(prep, scores, max(ks), exclude_purchased)
    return ranking_metrics(recs, prep.relevant, len(prep.item_ids), ks)


def _evaluate_bundles(prep: _Prepared, item_factors: np.ndarray, catalog: Any) -> dict[str, Any]:
    """Bundle hit rate on the held-out orders against its two baselines (see training.cooccurrence)."""

    item_index = IdMap(prep.item_ids)
    category = category_codes(prep.item_ids, catalog)[0]
    return dict(evaluate_bundles(prep.train, prep.test, item_index, item_factors, category))


def category_codes(item_ids: np.ndarray, catalog: Any) -> tuple[np.ndarray, list[str]]:
    """int32 category code per item (-1 unknown) and the sorted category names."""
    codes = np.full(len(item_ids), -1, dtype=np.int32)
    if catalog is None or len(catalog) == 0:
        return codes, []
    names = sorted({c for c in catalog.category if c})
    lookup = {name: i for i, name in enumerate(names)}
    per_catalog_row = np.array([lookup.get(c, -1) for c in catalog.category], dtype=np.int32)
    pos = index_positions(catalog.item_id, item_ids)
    ok = pos >= 0
    codes[pos[ok]] = per_catalog_row[ok]
    return codes, names


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per method, one column per metric@k; split facts on top."""

    def is_method(name: str) -> bool:
        values = metrics.get(name)
        return isinstance(values, dict) and name not in ("split", "bundles") and any("@" in k for k in values)

    methods = [m for m in (*METHODS, *sorted(set(metrics) - set(METHODS))) if is_method(m)]
    split = metrics.get("split", {})
    lines = []
    if split:
        lines.append(
            f"time split at {split.get('cutoff_utc', '?')} ({split.get('split_days', '?')} days): "
            f"{split.get('train_events', 0):,} training events, "
            f"{split.get('test_purchases', 0):,} test purchases, "
            f"{split.get('test_users', 0):,} test users "
            f"({split.get('cold_test_users', 0):,} cold users skipped), "
            f"{split.get('items', 0):,} items"
        )
    if metrics.get("note"):
        lines.append(str(metrics["note"]))
    if not methods:
        return "\n".join(lines)
    ks = split.get("k") or sorted(
        {int(key.split("@")[1]) for m in methods for key in metrics[m] if "@" in key}
    )
    columns = [f"{metric}@{k}" for k in ks for metric in METRICS]
    width = max(len(c) for c in columns) + 1
    header = "method".ljust(18) + "".join(c.rjust(width) for c in columns)
    lines.append(header)
    lines.append("-" * len(header))
    for m in methods:
        values = metrics[m]
        lines.append(m.ljust(18) + "".join(_fmt(values.get(c)).rjust(width) for c in columns))
    if "als" in metrics and "popularity" in metrics:
        base = metrics["popularity"].get(f"ndcg@{ks[0]}", 0.0)
        als = metrics["als"].get(f"ndcg@{ks[0]}", 0.0)
        ratio = f"{als / base:.2f}x" if base > 0 else "n/a"
        lines.append(f"als ndcg@{ks[0]} vs popularity: {ratio}")
    if isinstance(metrics.get("bundles"), dict):
        flat = ", ".join(
            f"{key}={_fmt(v) if isinstance(v, float) else v}" for key, v in metrics["bundles"].items()
        )
        lines.append(f"bundles: {flat}"[:400])
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------

#: The bounded search space of ``recsvc train --tune``.
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "factors": (32, 64, 128),
    "regularization": (0.01, 0.05, 0.1, 0.5),
    "alpha": (1.0, 5.0, 10.0, 20.0, 40.0),
    "iterations": (10, 15, 25),
    "scaling": ("linear", "log", "bm25"),
    "half_life_days": (None, 30.0, 90.0),
    "event_weights": (
        {"view": 1.0, "cart": 4.0, "purchase": 10.0},
        {"view": 1.0, "cart": 2.0, "purchase": 5.0},
        {"view": 1.0, "cart": 5.0, "purchase": 20.0},
        {"view": 0.5, "cart": 3.0, "purchase": 10.0},
    ),
    "bm25_k1": (0.8, 1.2, 2.0),
    "bm25_b": (0.5, 0.75, 0.9),
}


@dataclass
class TuneResult:
    """Outcome of :func:`tune`: the chosen parameters and every trial, best first."""

    best: TrainParams
    best_score: float
    metric: str
    trials: list[dict[str, Any]]
    split: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best_score": self.best_score,
            "chosen": {k: v for k, v in self.best.to_manifest(seed=0).items() if k != "seed"},
            "trials": self.trials,
            "validation_split": self.split,
        }


def _sample_params(rng: np.random.Generator, base: TrainParams) -> TrainParams:
    change: dict[str, Any] = {}
    for name, choices in SEARCH_SPACE.items():
        change[name] = choices[int(rng.integers(len(choices)))]
    return base.replace(**change)


def tune(
    events: Any,
    catalog: Any,
    base: TrainParams | None = None,
    *,
    split_days: float | None = None,
    trials: int = 12,
    time_budget_s: float = 600.0,
    seed: int = 42,
    threads: int = 0,
    metric: str = "ndcg@10",
    exclude_purchased: bool = True,
    device: str = "auto",
    log: Any = None,
) -> TuneResult:
    """Bounded random search on a validation split carved from the *training* period.

    The evaluation test window (the last ``split_days``) is never looked at: the training
    period before it is split again with the same window length, trials are fitted on the first
    part and scored (``metric`` of ALS) on purchases of the second. The first trial is ``base``,
    so the result is never worse than the starting point on validation.

    Parameters
    ----------
    events : EventTable
        The whole log.
    catalog : Catalog or None
        As for :func:`evaluate`.
    base : TrainParams, optional
        Starting parameters (trial 0).
    split_days : float, optional
        Window length (default :func:`auto_split_days` of ``events``).
    trials : int
        Maximum number of parameter sets tried (1..200).
    time_budget_s : float
        Stop starting new trials after this many seconds.
    seed, threads, device
        Search and fitting seed, ALS threads, device.
    metric : str
        Metric of ``metrics["als"]`` to maximise.
    log : callable, optional
        Called with one line of text per trial.

    Returns
    -------
    TuneResult
    """
    base = base or TrainParams()
    trials = int(min(max(trials, 1), 200))
    days = split_days if split_days is not None else auto_split_days(events)
    training_period, _ = time_split(events, days)
    fit_part, validation = time_split(training_period, days)
    if len(fit_part) == 0:
        raise ValueError("not enough history before the evaluation window to carve a validation split")
    cutoff = split_cutoff(training_period, days)
    catalog_ids = None if catalog is None else catalog.item_id
    k = int(metric.split("@")[1]) if "@" in metric else 10
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    results: list[tuple[float, TrainParams, dict[str, Any]]] = []
    split_info: dict[str, Any] = {}
    seen: set[str] = set()
    # Trials stop at the time budget: the total is an upper bound.
    with Progress("tune", total=trials, unit="trials") as progress:
        for trial in range(trials):
            if trial and time.perf_counter() - start > time_budget_s:
                break
            params = base if trial == 0 else _sample_params(rng, base)
            key = repr(params.to_manifest(seed))
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            prep = _prepare(fit_part, validation, cutoff, catalog_ids, params, exclude_purchased)
            split_info = prep.info
            if len(prep.test_users) == 0:
                raise ValueError(
                    "the validation split has no test user: use a longer history or a different split_days"
                )
            values, _ = _evaluate_als(prep, params, (k,), seed, threads, exclude_purchased, device=device)
            score = float(values.get(metric, 0.0))
            record = {
                "trial": trial,
                "score": score,
                "seconds": round(time.perf_counter() - t0, 2),
                "params": params.to_manifest(seed),
            }
            results.append((score, params, record))
            progress.update(1)
            if log is not None:
                log(
                    f"trial {trial}: {metric}={score:.4f} factors={params.factors} "
                    f"reg={params.regularization} alpha={params.alpha} it={params.iterations} "
                    f"scaling={params.scaling} "
                    f"half_life={params.half_life_days} weights={params.event_weights}"
                )
    results.sort(key=lambda r: -r[0])
    best_score, best, _ = results[0]
    return TuneResult(best, best_score, metric, [r[2] for r in results], split_info)
