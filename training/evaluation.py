"""Offline evaluation: the model against the strongest simple baselines on a trustworthy split.

Protocol (the same for every method, in one run; splits and targets in :mod:`training.splits`):

* **Methods**: ``model`` (the blend this project trains, :mod:`recsvc.core.scoring`, fitted on the
  training part with the same parameters as training), and the baselines a shop would try
  first: ``popularity`` (distinct buyers), ``item_knn`` (implicit's BM25 item-item model, K=100),
  ``implicit_als`` (implicit's ALS with its own defaults: 100 factors, regularization 0.01, alpha
  1, on the event-weighted matrix) and ``recent_popularity`` (the service's fallback). Extra
  configurations (``compare=``) are fitted and scored on the same split: the retrain gate uses
  that to compare the live model's configuration with a candidate's.
* **Exclusions**: every method leaves out what the model leaves out -- the user's purchases, or
  every item they interacted with when the shop's customers rarely buy what they looked at
  (:func:`training.splits.exclusion_rule`). Ties are broken by popularity.
* **Metrics** (:mod:`training.metrics`) over at most ``max_test_users`` test users (a seeded
  sample, so evaluation stops growing with the catalogue; the sample size is reported): means
  with bootstrap 95 % intervals, nDCG@10 per activity bucket (1-2, 3-9, 10+ training events), and
  the model's ratio to the best baseline with a paired interval. A degenerate split, or a model
  that loses to a baseline, is reported in ``warnings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.ids import IdMap
from recsvc.core.progress import Progress
from recsvc.core.scoring import PLAIN_ALS, ModelSpec, Scorer
from recsvc.core.topk import top_k_rows
from recsvc.core.weighting import id_maps, popularity_scores, purchase_counts, raw_matrix
from training.als import TrainParams, fit_als
from training.cooccurrence import evaluate_bundles
from training.metrics import (
    BUCKETS,
    DEFAULT_K,
    METRICS,
    bootstrap_interval,
    bucket_of,
    coverage_at_k,
    hit_matrix,
    per_user,
    ratio_interval,
    relevant_counts,
)
from training.model import fit_model, fit_similarity
from training.splits import Split, SplitSpec, exclusion_rule, split_events

METHODS = ("model", "popularity", "recent_popularity", "item_knn", "implicit_als")
#: The baselines the model must beat (the strongest of them is "the best baseline").
BASELINES = ("popularity", "item_knn", "implicit_als")
#: implicit's own ALS defaults, on the event-weighted (linear) matrix a user would build.
IMPLICIT_DEFAULTS = TrainParams(
    factors=100, regularization=0.01, alpha=1.0, iterations=15, scaling="linear", model=PLAIN_ALS
)
KNN_ONLY = ModelSpec(als=0.0, knn=1.0, popularity=0.0, popularity_boost=0.0, seen=0.0)
DEFAULT_MAX_TEST_USERS = 5000
_KNN_BASELINE_K = 100  # neighbours of the item_knn baseline
PRIMARY = "ndcg@10"
# Dense score blocks are bounded to this many floats (memory stays flat whatever the catalogue).
_BLOCK_FLOATS = 1 << 23


@dataclass
class Prepared:
    """A split as matrices: the training part, the (sampled) test users and their targets."""

    test_pairs: tuple[np.ndarray, np.ndarray]  # (user ids, item ids) of every future purchase
    user_ids: np.ndarray
    item_ids: np.ndarray
    test_rows: np.ndarray  # rows of the training matrices, one per scored test user
    relevant: sp.csr_matrix  # (n_test, n_items + 1); column n_items = "an item the model never saw"
    excluded: sp.csr_matrix  # (n_users, n_items): what no method may recommend
    activity: np.ndarray  # training events per scored test user
    prior: np.ndarray  # popularity (distinct buyers, ties by interest): the tie-break of every method
    exclusion: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def prepare(
    split: Split,
    catalog_item_ids: np.ndarray | None,
    params: TrainParams,
    *,
    max_test_users: int | None = DEFAULT_MAX_TEST_USERS,
    seed: int = 42,
    exclude: str | None = None,
) -> Prepared:
    """Id maps, targets and exclusions of ``split`` (test users sampled to ``max_test_users``)."""
    train, test = split.train, split.test
    weighting = params.weighting()
    user_ids, item_ids = id_maps(train, weighting, catalog_item_ids)
    users, items = IdMap(user_ids), IdMap(item_ids)
    exclude = exclude or (None if params.model.exclude == "auto" else params.model.exclude)
    rule = exclusion_rule(train) if exclude is None else {"exclude": exclude, "given": True}
    return prepare_matrices(
        split.info,
        user_ids,
        item_ids,
        purchase_counts(train, users, items),
        raw_matrix(train, users, items, weighting),
        np.bincount(users.positions(train.user_id), minlength=len(user_ids)),
        (np.asarray(test.user_id, dtype=object), np.asarray(test.item_id, dtype=object)),
        rule,
        max_test_users=max_test_users,
        seed=seed,
    )


def prepare_matrices(
    split_info: dict[str, Any],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    purchased: sp.csr_matrix,
    interacted: sp.csr_matrix,
    events_per_user: np.ndarray,
    test_pairs: tuple[np.ndarray, np.ndarray],
    rule: dict[str, Any],
    *,
    max_test_users: int | None = DEFAULT_MAX_TEST_USERS,
    seed: int = 42,
) -> Prepared:
    """:func:`prepare` from matrices already built (by any engine) in ``user_ids x item_ids`` order.

    ``purchased``/``interacted`` are the training part's purchase and interaction matrices,
    ``events_per_user`` its events per user (the activity buckets), ``test_pairs`` the future
    purchases as (user ids, item ids), ``rule`` what no method may recommend
    (:func:`training.splits.exclusion_rule`).
    """
    users, items = IdMap(user_ids), IdMap(item_ids)
    n_users, n_items = len(user_ids), len(item_ids)
    purchased, interacted = sp.csr_matrix(purchased), sp.csr_matrix(interacted)
    excluded = (interacted if rule["exclude"] == "interacted" else purchased).astype(np.float32).tocsr()
    excluded.data[:] = 1.0

    rows, cols = users.positions(test_pairs[0]), items.positions(test_pairs[1])
    known = rows >= 0
    cols = np.where(cols >= 0, cols, n_items)  # an item the model never saw: relevant, unreachable
    rel = sp.csr_matrix(
        (np.ones(int(known.sum()), dtype=np.float32), (rows[known], cols[known])),
        shape=(n_users, n_items + 1),
    )
    rel.sum_duplicates()
    rel.data[:] = 1.0
    if purchased.nnz:  # targets are new purchases: not bought before the split
        bought = sp.hstack([purchased, sp.csr_matrix((n_users, 1), dtype=np.float32)]).tocsr()
        bought.data[:] = 1.0
        rel = (rel - rel.multiply(bought)).tocsr()
        rel.eliminate_zeros()
    test_rows = np.flatnonzero(np.diff(rel.indptr) > 0)
    eligible = len(test_rows)
    if max_test_users is not None and eligible > max_test_users:
        rng = np.random.default_rng(seed)
        test_rows = np.sort(rng.choice(test_rows, size=max_test_users, replace=False))
    activity = np.asarray(events_per_user)[test_rows]
    bought_any = purchased.copy()
    bought_any.data[:] = 1.0
    buyers = np.asarray(bought_any.sum(axis=0)).ravel()
    interest = np.diff(interacted.tocsc().indptr)
    prior = (np.log1p(buyers) + 1e-3 * np.log1p(interest)).astype(np.float64)
    cold = len(np.unique(np.asarray(test_pairs[0], dtype=object)[~known])) if len(known) else 0
    info = {
        "test_users": int(eligible),
        "cold_test_users": int(cold),
        **split_info,
        "users": n_users,
        "items": n_items,
        "eligible_test_users": int(eligible),
        "scored_test_users": int(len(test_rows)),
        "sampled": bool(len(test_rows) < eligible),
        "exclude": rule["exclude"],
    }
    return Prepared(
        test_pairs, user_ids, item_ids, test_rows, rel[test_rows], excluded, activity, prior, rule, info
    )


def rank_lists(prep: Prepared, score_block: Callable[[np.ndarray], np.ndarray], depth: int) -> np.ndarray:
    """Top ``depth`` items per test user from ``score_block(rows) -> dense scores``, in blocks.

    Excluded items never appear; ties are broken by popularity, then by the lower item index.
    """
    out = np.full((len(prep.test_rows), depth), -1, dtype=np.int64)
    for lo, rows in user_blocks(prep):
        out[lo : lo + len(rows)] = top_of_block(prep, rows, score_block(rows), depth)
    return out


def user_blocks(prep: Prepared) -> Iterator[tuple[int, np.ndarray]]:
    """``(first position, training rows)`` of the test users in blocks of bounded dense size."""
    block = max(1, _BLOCK_FLOATS // max(len(prep.item_ids), 1))
    for lo in range(0, len(prep.test_rows), block):
        yield lo, prep.test_rows[lo : lo + block]


def top_of_block(prep: Prepared, rows: np.ndarray, scores: np.ndarray, depth: int) -> np.ndarray:
    """The ``depth`` best items of each row of ``scores`` (users ``rows``), as :func:`rank_lists`.

    ``scores`` is used as scratch space when it is a float32 array (the caller's scores are
    then overwritten); anything else is copied.
    """
    if not (isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.flags.writeable):
        scores = np.array(scores, dtype=np.float32)
    if scores.size:
        # A popularity nudge far below any real score difference: it only orders exact ties.
        scale = np.maximum(1.0, np.maximum(scores.max(axis=1), -scores.min(axis=1)))[:, None]
        scores += (_tie_break(prep)[None, :] * scale).astype(np.float32)
    ex = prep.excluded[rows]
    scores[np.repeat(np.arange(len(rows)), np.diff(ex.indptr)), ex.indices] = -np.inf
    return top_k_rows(scores, depth)[0]


def _tie_break(prep: Prepared) -> np.ndarray:
    return (prep.prior / (prep.prior.max() + 1.0) * 1e-5).astype(np.float32)


def summarise(prep: Prepared, recommended: np.ndarray, ks: Sequence[int], seed: int) -> dict[str, Any]:
    """Means, bootstrap intervals and per-bucket nDCG of one method's lists."""
    hits = hit_matrix(recommended, prep.relevant)
    n_rel = relevant_counts(prep.relevant)
    out: dict[str, Any] = {}
    per: dict[str, np.ndarray] = {}
    for k in ks:
        for metric in METRICS:
            key = f"{metric}@{k}"
            if metric == "coverage":
                out[key] = coverage_at_k(recommended, len(prep.item_ids), k)
                continue
            values = per_user(hits, n_rel, metric, k)
            per[key] = values
            out[key] = float(values.mean()) if len(values) else 0.0
            if metric in ("ndcg", "recall"):
                out[f"{key}_ci"] = list(bootstrap_interval(values, seed))
    primary = per.get(PRIMARY)
    if primary is not None:
        which = bucket_of(prep.activity)
        out["buckets"] = {
            name: {"users": int((which == b).sum()), PRIMARY: float(primary[which == b].mean())}
            for b, (name, _, _) in enumerate(BUCKETS)
            if (which == b).any()
        }
    out["_per_user"] = per  # removed before the metrics are stored
    return out


def evaluate(
    events: Any,
    catalog: Any,
    params: TrainParams | None = None,
    k: Sequence[int] = DEFAULT_K,
    split: SplitSpec | str | None = None,
    *,
    seed: int = 42,
    threads: int = 0,
    device: str = "auto",
    methods: Sequence[str] = METHODS,
    bundles: bool = True,
    max_test_users: int | None = DEFAULT_MAX_TEST_USERS,
    compare: Mapping[str, TrainParams] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the model and the baselines on one split of ``events``.

    Parameters
    ----------
    events : EventTable
        The whole log; it is split with :func:`training.splits.split_events`.
    catalog : Catalog or None
        Catalogue items join the model's item set (they can be recommended and count for coverage).
    params : TrainParams, optional
        The model's parameters (defaults if None).
    k : sequence of int
        Cut-offs, default ``(10, 20)``.
    split : SplitSpec or str, optional
        ``auto`` (default), ``global[:F]``, ``user[:F]`` or ``days:N``.
    seed, threads, device
        Fits are seeded; the test-user sample and the bootstrap use ``seed`` too.
    methods : sequence of str
        Subset of :data:`METHODS`.
    bundles : bool
        Also score bundles on the held-out orders (:func:`training.cooccurrence.evaluate_bundles`).
    max_test_users : int or None
        Score at most this many test users (seeded sample); None scores them all.
    compare : mapping of name -> TrainParams, optional
        More configurations fitted and scored on the same split (e.g. ``{"live": ...}``).
    progress : callable, optional
        Receives one line per stage.

    Returns
    -------
    dict
        ``{"model": {"ndcg@10": ..., "ndcg@10_ci": [lo, hi], ..., "buckets": {...}},
        "popularity": {...}, ..., "split": {...}, "comparison": {...}, "warnings": [...]}``
        (plus ``"bundles"``). Without a scorable test user, only ``split``, ``note`` and
        ``warnings``.
    """
    params = params or TrainParams()
    say = progress or (lambda line: None)
    ks = tuple(sorted({int(x) for x in k}))
    if not ks or ks[0] < 1:
        raise ValueError("k must hold positive cut-offs")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    spec = split if isinstance(split, SplitSpec) else SplitSpec.parse(split)
    the_split = split_events(events, spec)
    if len(the_split.train) == 0:
        raise ValueError("the split leaves no training events: use a shorter window")
    catalog_ids = None if catalog is None else catalog.item_id
    prep = prepare(the_split, catalog_ids, params, max_test_users=max_test_users, seed=seed)
    warnings = [f"degenerate split: {reason}" for reason in the_split.reasons]
    if the_split.info.get("fallback_from_global"):
        warnings.append(
            "the global split was degenerate ("
            + "; ".join(the_split.info["fallback_from_global"])
            + "): evaluated on the per-user split"
        )
    metrics: dict[str, Any] = {"split": {**prep.info, "k": list(ks)}, "exclusion": prep.exclusion}
    say(
        f"split {the_split.protocol}: {prep.info['train_events']:,} training events, "
        f"{prep.info['scored_test_users']:,} test users scored"
    )
    if len(prep.test_rows) == 0:
        metrics["note"] = "no test user: nobody known before the split purchased a new item after it"
        metrics["warnings"] = [*warnings, metrics["note"]]
        return metrics

    depth = max(ks)
    timings: dict[str, float] = {}
    train = the_split.train
    cutoff = int(train.timestamp.max()) if len(train) else 0
    fitted = None
    configurations: dict[str, TrainParams] = {}
    if "model" in methods:
        configurations["model"] = params
    configurations.update(compare or {})
    baselines = [m for m in ("popularity", "recent_popularity", "item_knn", "implicit_als") if m in methods]
    with Progress("evaluate", total=len(configurations) + len(baselines), unit="methods") as bar:
        for name, config in configurations.items():
            bar.step(name)
            if name != "model" and "model" in configurations and config == params:
                # The same configuration on the same split scores the same (fits are seeded).
                metrics[name] = {**metrics["model"], "same_as": "model"}
                continue
            start = time.perf_counter()
            say(f"fitting {name} on the training part")
            model = fit_model(
                train,
                prep.user_ids,
                prep.item_ids,
                config,
                now=cutoff,
                seed=seed,
                threads=threads,
                device=device,
            )
            if name == "model":
                fitted = model
            scorer = model.scorer()
            recs = rank_lists(prep, scorer_block(scorer, model.raw, model.user_factors), depth)
            metrics[name] = summarise(prep, recs, ks, seed)
            timings[name] = round(time.perf_counter() - start, 3)

        for method in baselines:
            bar.step(method)
            start = time.perf_counter()
            say(f"scoring {method}")
            score_block = _baseline(method, prep, train, params, cutoff, seed, threads, device, fitted)
            metrics[method] = summarise(prep, rank_lists(prep, score_block, depth), ks, seed)
            timings[method] = round(time.perf_counter() - start, 3)
    metrics["split"]["seconds"] = timings

    finish_metrics(metrics, prep, ks, seed, warnings)
    if bundles and fitted is not None:
        start = time.perf_counter()
        say("scoring bundles on the held-out orders")
        metrics["bundles"] = _evaluate_bundles(
            the_split, prep, fitted.item_factors, catalog, sample=max_test_users is not None
        )
        timings["bundles"] = round(time.perf_counter() - start, 3)
    return metrics


def finish_metrics(
    metrics: dict[str, Any], prep: Prepared, ks: Sequence[int], seed: int, warnings: list[str]
) -> dict[str, Any]:
    """Complete scored methods' metrics (of any engine): the comparison with the best baseline and
    its warning, the cold purchasers, ``warnings``; the per-user values are dropped."""
    comparison = _compare(metrics, seed)
    if comparison:
        metrics["comparison"] = comparison
        if comparison["ratio"] is not None and comparison["ratio"] < 1.0:
            warnings.append(
                f"the model loses to {comparison['best_baseline']} on {PRIMARY}: "
                f"{comparison['model']:.4f} vs {comparison['baseline']:.4f} ({comparison['ratio']:.2f}x)"
            )
    cold = _cold_users(prep, ks, seed)
    if cold is not None:
        metrics["cold_users"] = cold
    for name in list(metrics):
        if isinstance(metrics[name], dict):
            metrics[name].pop("_per_user", None)
    metrics["warnings"] = warnings
    return metrics


def scorer_block(
    scorer: Scorer, raw: sp.csr_matrix, vectors: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    def block(rows: np.ndarray) -> np.ndarray:
        return scorer.score(raw[rows], vectors[rows] if scorer.spec.als > 0 else None)

    return block


def _baseline(
    method: str,
    prep: Prepared,
    train: Any,
    params: TrainParams,
    cutoff: int,
    seed: int,
    threads: int,
    device: str,
    fitted: Any,
) -> Callable[[np.ndarray], np.ndarray]:
    """The score function of one baseline, fitted on the training part."""
    n_items = len(prep.item_ids)
    if method == "popularity":
        return lambda rows: np.zeros((len(rows), n_items))  # the popularity tie-break ranks
    if method == "recent_popularity":
        recent = popularity_scores(train, prep.item_ids, params.weighting(), now=cutoff).astype(np.float64)
        return lambda rows: np.broadcast_to(recent, (len(rows), n_items))
    same_raw = fitted is not None and _same_raw_matrix(fitted.params, IMPLICIT_DEFAULTS)
    if same_raw:
        weighted = fitted.raw  # the model's matrix on this split is the baselines' matrix
    else:
        weighted = raw_matrix(
            train, IdMap(prep.user_ids), IdMap(prep.item_ids), IMPLICIT_DEFAULTS.weighting()
        )
        weighted = sp.csr_matrix(weighted, dtype=np.float32)
    if method == "item_knn":
        if same_raw and fitted.similarity is not None and fitted.spec.knn_neighbours == _KNN_BASELINE_K:
            # The model's kNN part is this baseline's model (same matrix, same K): fitted once.
            similarity = fitted.similarity
        else:
            similarity = fit_similarity(weighted, _KNN_BASELINE_K, threads)
        scorer = Scorer(KNN_ONLY, None, similarity, None)
        return lambda rows: scorer.score(weighted[rows], None)
    user_factors, item_factors = fit_als(
        weighted, IMPLICIT_DEFAULTS, seed=seed, threads=threads, device=device
    )
    return lambda rows: user_factors[rows] @ item_factors.T


def _same_raw_matrix(a: TrainParams, b: TrainParams) -> bool:
    """Whether two configurations build the same summed event-weight matrix from one split."""
    return (
        dict(a.event_weights) == dict(b.event_weights)
        and a.half_life_days is None
        and b.half_life_days is None
    )


def _cold_users(prep: Prepared, ks: Sequence[int], seed: int) -> dict[str, Any] | None:
    """nDCG of what cold purchasers are served (the popularity order: no method knows them)."""
    test_users, test_items = prep.test_pairs
    users = IdMap(prep.user_ids).positions(test_users)
    cold = users < 0
    if not cold.any():
        return None
    cold_ids, rows = np.unique(np.asarray(test_users, dtype=object)[cold], return_inverse=True)
    cols = IdMap(prep.item_ids).positions(np.asarray(test_items, dtype=object)[cold])
    n_items = len(prep.item_ids)
    relevant = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, np.where(cols >= 0, cols, n_items))),
        shape=(len(cold_ids), n_items + 1),
    )
    relevant.sum_duplicates()
    depth = max(ks)
    order = np.lexsort((np.arange(n_items), -prep.prior))[:depth]
    recommended = np.broadcast_to(order, (len(cold_ids), len(order)))
    hits = hit_matrix(recommended, relevant)
    values = per_user(hits, relevant_counts(relevant), "ndcg", 10)
    return {
        "users": len(cold_ids),
        "served": "popularity",
        PRIMARY: float(values.mean()),
        f"{PRIMARY}_ci": list(bootstrap_interval(values, seed)),
    }


def _compare(metrics: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The model against the best baseline on the primary metric, with a paired interval."""
    if "model" not in metrics:
        return None
    scored = [b for b in BASELINES if b in metrics]
    if not scored:
        return None
    best = max(scored, key=lambda b: metrics[b][PRIMARY])
    ours, theirs = metrics["model"][PRIMARY], metrics[best][PRIMARY]
    interval = ratio_interval(
        metrics["model"]["_per_user"][PRIMARY], metrics[best]["_per_user"][PRIMARY], seed
    )
    return {
        "metric": PRIMARY,
        "best_baseline": best,
        "model": ours,
        "baseline": theirs,
        "ratio": round(ours / theirs, 4) if theirs > 0 else None,
        "ratio_ci": None if interval is None else [round(interval[0], 4), round(interval[1], 4)],
    }


def _evaluate_bundles(
    split: Split, prep: Prepared, item_factors: np.ndarray, catalog: Any, sample: bool = True
) -> dict[str, Any]:
    """Bundle hit rate on the held-out orders against its two baselines (see training.cooccurrence):
    on its seeded sample of queries, or on every query when ``sample`` is false."""
    category = category_codes(prep.item_ids, catalog)[0]
    index = IdMap(prep.item_ids)
    if sample:
        return dict(evaluate_bundles(split.train, split.test, index, item_factors, category))
    return dict(evaluate_bundles(split.train, split.test, index, item_factors, category, max_queries=None))


def category_codes(item_ids: np.ndarray, catalog: Any) -> tuple[np.ndarray, list[str]]:
    """int32 category code per item (-1 unknown) and the sorted category names."""
    codes = np.full(len(item_ids), -1, dtype=np.int32)
    if catalog is None or len(catalog) == 0:
        return codes, []
    names = sorted({c for c in catalog.category if c})
    lookup = {name: i for i, name in enumerate(names)}
    per_catalog_row = np.array([lookup.get(c, -1) for c in catalog.category], dtype=np.int32)
    pos = IdMap(item_ids).positions(catalog.item_id)
    ok = pos >= 0
    codes[pos[ok]] = per_catalog_row[ok]
    return codes, names


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text report: the split, one row per method (with 95 % intervals), buckets, verdict."""
    methods = [
        m for m in metrics if isinstance(metrics.get(m), dict) and PRIMARY in metrics[m] and m != "cold_users"
    ]
    split = metrics.get("split", {})
    lines = []
    if split:
        protocol = split.get("protocol")
        where = (
            f"split {protocol} at {split['cutoff_utc']}"
            if split.get("cutoff_utc")
            else f"split {protocol} (each user's last {split.get('fraction', 0.2):.0%} of events)"
        )
        sample = ", a seeded sample" if split.get("sampled") else ""
        lines.append(
            f"{where}: {split.get('train_events', 0):,} training events, "
            f"{split.get('test_users', 0):,} test users "
            f"({split.get('scored_test_users', 0):,} scored{sample}), "
            f"{split.get('cold_test_users', 0):,} cold purchasers not scored, "
            f"{split.get('items', 0):,} items; excluded: {split.get('exclude', 'purchased')} items"
        )
    if metrics.get("note"):
        lines.append(str(metrics["note"]))
    if methods:
        ks = split.get("k") or [10, 20]
        columns = [f"ndcg@{ks[0]}", f"recall@{ks[-1]}", f"precision@{ks[0]}", f"map@{ks[0]}"]
        columns += [f"hit_rate@{ks[0]}", f"coverage@{ks[0]}"]
        header = "method".ljust(20) + "".join(c.rjust(26 if c in columns[:2] else 14) for c in columns)
        lines.append(header)
        lines.append("-" * len(header))
        for m in methods:
            values = metrics[m]
            row = m.ljust(20)
            for c in columns:
                value = _fmt(values.get(c))
                ci = values.get(f"{c}_ci")
                if c in columns[:2]:
                    text = f"{value} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else value
                    row += text.rjust(26)
                else:
                    row += value.rjust(14)
            lines.append(row)
        buckets = metrics.get("model", {}).get("buckets")
        if buckets:
            parts = []
            for name, b in buckets.items():
                pop = metrics.get("popularity", {}).get("buckets", {}).get(name, {}).get(PRIMARY)
                vs = f" vs popularity {pop:.4f}" if pop is not None else ""
                parts.append(f"{name} events: {b[PRIMARY]:.4f} ({b['users']} users){vs}")
            lines.append(f"model {PRIMARY} by activity: " + "; ".join(parts))
        cold = metrics.get("cold_users")
        if cold:
            lo, hi = cold[f"{PRIMARY}_ci"]
            lines.append(
                f"cold purchasers (served popularity): {PRIMARY} {cold[PRIMARY]:.4f} [{lo:.4f}, {hi:.4f}] "
                f"({cold['users']} users)"
            )
    comparison = metrics.get("comparison")
    if comparison and comparison.get("ratio") is not None:
        ci = comparison.get("ratio_ci")
        interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(
            f"model {PRIMARY} vs the best baseline ({comparison['best_baseline']}): "
            f"{comparison['ratio']:.2f}x{interval}"
        )
    if isinstance(metrics.get("bundles"), dict):
        flat = ", ".join(
            f"{key}={_fmt(v) if isinstance(v, float) else v}" for key, v in metrics["bundles"].items()
        )
        lines.append(f"bundles: {flat}"[:400])
    for warning in metrics.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


__all__ = [
    "BASELINES",
    "DEFAULT_K",
    "IMPLICIT_DEFAULTS",
    "METHODS",
    "PRIMARY",
    "Prepared",
    "category_codes",
    "evaluate",
    "format_table",
    "prepare",
]
