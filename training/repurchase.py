"""Fitting and evaluating the repurchase model (:mod:`recsvc.core.repurchase` holds the maths).

``fit_repurchase(events, user_ids, item_ids, category, until)`` turns purchases into the model a
version carries: purchase *occasions* per (customer, item) pair, their intervals, and the item
parameters estimated by empirical Bayes:

1. **Intervals.** ``within_var`` is the pooled variance of log intervals inside pairs with two
   intervals or more; ``between_var`` the variance of pair means around their item's mean, less
   the part ``within_var`` explains (method of moments).
2. **Typical interval** per item: the precision-weighted mean of its pairs' mean log intervals,
   shrunk towards its category's, itself shrunk towards the shop's (``prior_pairs`` pseudo-pairs
   at each level).
3. **Repurchasability** per item: the share of purchases followed by another, by EM on the cure
   model: the last purchase of each pair is censored at ``until``, and counts as "will be
   repeated" with the probability the model gives a customer who has not repeated yet after that
   long. Shrunk item -> category -> shop with ``prior_purchases`` pseudo-purchases.

``evaluate_repurchase`` measures the due list on a time split against "most frequently bought" and
"most recently bought" by the same customer, with paired bootstrap intervals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.special import ndtr

from recsvc.core.contract import PURCHASE
from recsvc.core.ids import IdMap
from recsvc.core.repurchase import (
    DEFAULT_HORIZON_DAYS,
    MIN_GAP_S,
    RANKER_FEATURES,
    RECENT_DAYS,
    SECONDS_PER_DAY,
    PurchaseHistory,
    RepurchaseModel,
    RepurchaseParams,
    due,
    pair_posterior,
    rank_key,
    ranker_features,
)

#: Bounds of the variance estimates (log-days squared): a data set with one repeat must not give
#: a zero variance, nor one with wild intervals an uninformative one.
_VAR_BOUNDS = (0.01, 4.0)
_DEFAULT_LOG_INTERVAL = math.log(30.0)
_EM_ROUNDS = 25
_BOOTSTRAP_DRAWS = 1000


@dataclass(frozen=True)
class RepurchaseSettings:
    """Hyperparameters of the fit (recorded in the manifest).

    Attributes
    ----------
    strength : float
        Weight, in purchases, of the item's repurchase rate in a customer's own repeat share.
    prior_pairs : float
        Pseudo-pairs of the category (shop) typical interval in an item's (category's) estimate.
    prior_purchases : float
        Pseudo-purchases of the category (shop) rate in an item's (category's) rate.
    pace : bool
        Estimate each customer's pace (off: every customer at the items' typical intervals).
    choose_dispersion : bool
        Choose the variance factor on held-out history (off: the moment estimates as they are).
    ranker : bool
        Learn the order of a customer's items on held-out history (:func:`fit_ranker`; off: by
        the probability, as versions trained before it).
    """

    strength: float = 2.0
    prior_pairs: float = 3.0
    prior_purchases: float = 10.0
    pace: bool = True
    choose_dispersion: bool = True
    ranker: bool = True

    def to_manifest(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "prior_pairs": self.prior_pairs,
            "prior_purchases": self.prior_purchases,
            "pace": self.pace,
            "choose_dispersion": self.choose_dispersion,
            "ranker": self.ranker,
        }


@dataclass(frozen=True)
class PairStats:
    """Purchase occasions summarised per (customer, item) pair, sorted by user then item."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    count: np.ndarray  # int64 occasions
    last: np.ndarray  # int64 unix seconds of the newest occasion
    log_sum: np.ndarray  # float64 sum of log(days) between consecutive occasions
    log_sumsq: np.ndarray  # float64 sum of squares of the same
    recent: np.ndarray  # float64 occasions weighted by their age at `last` (RECENT_DAYS)

    @property
    def intervals(self) -> np.ndarray:
        return self.count - 1

    @property
    def log_mean(self) -> np.ndarray:
        """Mean log interval of each pair (0 where there is none)."""
        k = self.intervals
        return np.where(k > 0, self.log_sum / np.maximum(k, 1), 0.0)

    def history(self, n_users: int, pace: np.ndarray) -> PurchaseHistory:
        """The pairs as :class:`PurchaseHistory` rows over ``n_users`` users."""
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.user, minlength=n_users), out=indptr[1:])
        return PurchaseHistory(
            indptr=indptr,
            items=self.item.astype(np.int32),
            last=self.last.astype(np.int64),
            count=self.count.astype(np.int32),
            log_interval=self.log_mean.astype(np.float32),
            pace=np.asarray(pace, dtype=np.float32)[:n_users],
            recent=self.recent.astype(np.float32),
        )


def pair_stats(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    order: np.ndarray | None = None,
    presorted: bool = False,
) -> PairStats:
    """Occasions and intervals of every (customer, item) pair from purchase lines.

    Parameters
    ----------
    user, item : np.ndarray
        int user and item index of each purchase line (negative: skipped).
    timestamp : np.ndarray
        int unix seconds.
    order : np.ndarray, optional
        int order code per line (-1 = none): lines of one order are one occasion however far
        apart their timestamps are. Lines of a pair less than :data:`MIN_GAP_S` apart are one
        occasion too (two orders of the same trip).
    presorted : bool
        The lines are already sorted by user, item and time (saves the sort when the same lines
        are summarised up to several cutoffs).
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    ts = np.asarray(timestamp, dtype=np.int64)
    keep = (user >= 0) & (item >= 0)
    user, item, ts = user[keep], item[keep], ts[keep]
    order_code = np.full(len(user), -1, np.int64) if order is None else np.asarray(order, np.int64)[keep]
    if not presorted:
        sort = np.lexsort((ts, item, user))
        user, item, ts, order_code = user[sort], item[sort], ts[sort], order_code[sort]
    n = len(user)
    if n == 0:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return PairStats(empty_i, empty_i, empty_i, empty_i, empty_f, empty_f, empty_f)
    new_pair = np.ones(n, dtype=bool)
    new_pair[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    new_occasion = new_pair.copy()
    same_order = np.zeros(n, dtype=bool)
    same_order[1:] = (order_code[1:] == order_code[:-1]) & (order_code[1:] >= 0)
    gap = np.zeros(n, dtype=np.int64)
    gap[1:] = ts[1:] - ts[:-1]
    new_occasion |= (gap > MIN_GAP_S) & ~same_order
    # One row per occasion: its first line's time; pair id of each occasion.
    occ = np.flatnonzero(new_occasion)
    occ_time = ts[occ]
    occ_pair = np.cumsum(new_pair)[occ] - 1
    pair_first_occ = np.flatnonzero(new_pair[occ])
    n_pairs = len(pair_first_occ)
    count = np.diff(np.append(pair_first_occ, len(occ)))
    last = occ_time[np.append(pair_first_occ[1:], len(occ)) - 1]
    # Intervals between consecutive occasions of the same pair.
    same = np.zeros(len(occ), dtype=bool)
    same[1:] = occ_pair[1:] == occ_pair[:-1]
    days = np.diff(occ_time, prepend=occ_time[0]) / SECONDS_PER_DAY
    logs = np.log(np.maximum(days[same], MIN_GAP_S / SECONDS_PER_DAY))
    log_sum = np.bincount(occ_pair[same], weights=logs, minlength=n_pairs)
    log_sumsq = np.bincount(occ_pair[same], weights=logs * logs, minlength=n_pairs)
    age_days = (last[occ_pair] - occ_time) / SECONDS_PER_DAY
    recent = np.bincount(occ_pair, weights=np.exp(-age_days / RECENT_DAYS), minlength=n_pairs)
    first_line = np.flatnonzero(new_pair)
    return PairStats(user[first_line], item[first_line], count, last, log_sum, log_sumsq, recent)


def purchase_lines(
    events: Any, user_index: IdMap, item_index: IdMap, until: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(user, item, timestamp, order)`` index arrays of the purchases in ``events`` before ``until``."""
    is_purchase = np.asarray(events.event) == PURCHASE
    if until is not None:
        is_purchase &= np.asarray(events.timestamp) < until
    rows = np.flatnonzero(is_purchase)
    user = _positions(events, "user_id", user_index, rows)
    item = _positions(events, "item_id", item_index, rows)
    order_ids = np.asarray(events.order_id, dtype=object)[rows] if events.order_id is not None else None
    order = np.full(len(rows), -1, np.int64)
    if order_ids is not None and len(rows):
        values, codes = np.unique(order_ids.astype(str), return_inverse=True)
        order = np.where(values[codes] != "", codes, -1).astype(np.int64)
    return user, item, np.asarray(events.timestamp, dtype=np.int64)[rows], order


def _positions(events: Any, column: str, index: IdMap, rows: np.ndarray) -> np.ndarray:
    if hasattr(events, "codes"):
        codes, values = events.codes(column)
        return index.positions(values)[codes[rows]]
    return index.positions(np.asarray(getattr(events, column), dtype=object)[rows])


# ------------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------------


def _variances(stats: PairStats) -> tuple[float, float]:
    """``(within_var, between_var)`` by the method of moments (see the module docstring)."""
    k = stats.intervals.astype(np.float64)
    multi = k >= 2
    if multi.any():
        within_ss = stats.log_sumsq[multi] - stats.log_sum[multi] ** 2 / k[multi]
        within = float(within_ss.sum() / (k[multi] - 1).sum())
    else:
        within = 0.25
    within = float(np.clip(within, *_VAR_BOUNDS))
    has = k >= 1
    if not has.any():
        return within, 0.5
    item, m, kk = stats.item[has], stats.log_mean[has], k[has]
    n_items = int(item.max()) + 1
    pairs = np.bincount(item, minlength=n_items).astype(np.float64)
    item_mean = np.bincount(item, weights=m, minlength=n_items) / np.maximum(pairs, 1)
    shared = pairs[item] >= 2
    if not shared.any():
        return within, 0.5
    resid = (m - item_mean[item])[shared]
    shrink = (1.0 - 1.0 / pairs[item])[shared]
    between = float((resid**2).sum() / shrink.sum() - (within / kk[shared]).mean())
    return within, float(np.clip(between, *_VAR_BOUNDS))


def _shrunk(
    num: np.ndarray, den: np.ndarray, group: np.ndarray, n_groups: int, top: float, pseudo: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item estimates ``(num + pseudo * group value) / (den + pseudo)``, the group value shrunk
    towards ``top`` the same way. Returns ``(item values, group values)``."""
    g_num = np.bincount(group, weights=num, minlength=n_groups)
    g_den = np.bincount(group, weights=den, minlength=n_groups)
    g_val = (g_num + pseudo * top) / (g_den + pseudo)
    return (num + pseudo * g_val[group]) / (den + pseudo), g_val


@dataclass(frozen=True)
class FittedParams:
    """What :func:`fit_params` returns: the item parameters and each customer's pace."""

    params: RepurchaseParams
    pace: np.ndarray  # float64 per user index (0 for users without intervals)


def fit_params(
    stats: PairStats,
    n_items: int,
    category: np.ndarray,
    until: int,
    settings: RepurchaseSettings | None = None,
    dispersion: float = 1.0,
    n_users: int | None = None,
) -> FittedParams:
    """Item parameters and customer paces from pair statistics (see the module docstring).

    Parameters
    ----------
    stats : PairStats
        From :func:`pair_stats` over the training purchases.
    n_items : int
        Items of the model.
    category : np.ndarray
        int category code per item (-1 = none: those items form one more group).
    until : int
        Unix seconds the history ends (censoring time of every pair's last purchase).
    settings : RepurchaseSettings, optional
    dispersion : float
        Factor on both variances (chosen by :func:`choose_dispersion`).
    n_users : int, optional
        Length of the pace array (default: the largest user index + 1).
    """
    settings = settings or RepurchaseSettings()
    category = np.asarray(category, dtype=np.int64)
    n_groups = int(category.max()) + 2 if len(category) else 1
    group = np.where(category >= 0, category, n_groups - 1)
    within, between = _variances(stats)
    k = stats.intervals.astype(np.float64)
    item, user = stats.item, stats.user
    n_users = int(user.max()) + 1 if n_users is None and len(user) else int(n_users or 0)

    # Typical interval: each pair's mean log interval weighted by its precision.
    weight = np.where(k > 0, 1.0 / (between + within / np.maximum(k, 1)), 0.0)
    num = np.bincount(item, weights=weight * stats.log_mean, minlength=n_items)
    den = np.bincount(item, weights=weight, minlength=n_items)
    top = float(num.sum() / den.sum()) if den.sum() > 0 else _DEFAULT_LOG_INTERVAL
    pseudo = settings.prior_pairs / (between + within)
    log_interval, _ = _shrunk(num, den, group, n_groups, top, pseudo)
    # A customer's pace: how far their own intervals sit from the items' typical ones, shrunk
    # towards 0 with the same pseudo-pairs.
    resid = np.where(k > 0, stats.log_mean - log_interval[item], 0.0)
    pace = np.bincount(user, weights=weight * resid, minlength=n_users) / (
        np.bincount(user, weights=weight, minlength=n_users) + pseudo
    )
    if not settings.pace:
        pace[:] = 0.0

    buyers = np.bincount(item, minlength=n_items)
    repeat_buyers = np.bincount(item[k > 0], minlength=n_items)
    # Repurchasability by EM over the censored last purchase of every pair.
    elapsed = np.maximum(0.0, (until - stats.last) / SECONDS_PER_DAY)
    repeats = np.bincount(item, weights=k, minlength=n_items)
    trials = np.bincount(item, weights=k + 1.0, minlength=n_items)
    total_trials = float(trials.sum())
    # EM starts from "as likely as not": items whose purchases are all too recent to tell stay there
    # (then their category's and the shop's evidence decides), instead of at the raw zero.
    rate = np.full(n_items, 0.5)
    params = RepurchaseParams(
        rate=rate.astype(np.float32),
        log_interval=log_interval.astype(np.float32),
        buyers=buyers.astype(np.int32),
        repeat_buyers=repeat_buyers.astype(np.int32),
        within_var=within,
        between_var=between,
        strength=settings.strength,
        dispersion=dispersion,
    )
    mu, sd, _ = pair_posterior(
        params, item, stats.count, stats.log_mean, pace[user] if len(user) else 0.0, dispersion
    )
    with np.errstate(divide="ignore"):
        survival = ndtr(-(np.log(np.maximum(elapsed, 1e-9)) - mu) / sd)
    for _ in range(_EM_ROUNDS):
        q = rate[item]
        pending = q * survival / np.maximum(1.0 - q + q * survival, 1e-12)
        num_q = repeats + np.bincount(item, weights=pending, minlength=n_items)
        top_q = float(num_q.sum() / total_trials) if total_trials else 0.0
        rate, _ = _shrunk(num_q, trials, group, n_groups, top_q, settings.prior_purchases)
    return FittedParams(replace(params, rate=rate.astype(np.float32)), pace)


#: Factors on the variances tried by :func:`choose_dispersion`.
DISPERSIONS = (1.0, 1.5, 2.0, 3.0)


def choose_dispersion(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    order: np.ndarray,
    n_items: int,
    category: np.ndarray,
    until: int,
    horizon_days: float = DEFAULT_HORIZON_DAYS,
    settings: RepurchaseSettings | None = None,
) -> tuple[float, dict[str, float]]:
    """The variance factor whose model best predicts the last ``horizon_days`` of the history.

    The moment estimates of the variances see only completed intervals, which a finite history
    shortens and narrows (a long gap is still open when the log ends). Rather than assume a
    correction, the fit is repeated on the history up to ``until - horizon_days`` for each factor
    in :data:`DISPERSIONS`, and the one with the best Bernoulli log-likelihood of "bought again
    within the horizon" over every pair wins (1.0 when the history is too short to tell).

    Returns
    -------
    (float, dict)
        The factor, and the mean log-likelihood of each factor tried (by its string).
    """
    if settings is not None and not settings.choose_dispersion:
        return 1.0, {}
    split = until - int(round(horizon_days * SECONDS_PER_DAY))
    early = timestamp < split
    stats = pair_stats(user[early], item[early], timestamp[early], order[early])
    if len(stats.user) == 0:
        return 1.0, {}
    key = stats.user * n_items + stats.item
    late = ~early & (timestamp < until) & (user >= 0) & (item >= 0)
    late_key = np.unique(user[late] * n_items + item[late])
    bought = np.isin(key, late_key)
    if not bought.any():
        return 1.0, {}
    scores: dict[str, float] = {}
    best, best_ll = 1.0, -math.inf
    for factor in DISPERSIONS:
        fitted = fit_params(stats, n_items, category, split, settings, factor)
        p = due(
            fitted.params,
            stats.item,
            stats.last,
            stats.count,
            stats.log_mean,
            split,
            horizon_days,
            fitted.pace[stats.user],
        ).probability
        p = np.clip(p, 1e-6, 1 - 1e-6)
        ll = float(np.mean(np.where(bought, np.log(p), np.log1p(-p))))
        scores[str(factor)] = round(ll, 5)
        if ll > best_ll + 1e-9:
            best, best_ll = factor, ll
    return best, scores


#: Held-out windows the ranker learns from: the last ``RANKER_WINDOWS`` horizons of the history,
#: each labelled by the purchases of its own horizon (a small shop gets enough customers).
RANKER_WINDOWS = 4
#: Fewer customers who bought again in those windows, or fewer items bought again, and the ranker
#: keeps the probability's order (identity coefficients): too little to weigh nine features.
RANKER_MIN_CUSTOMERS = 200
RANKER_MIN_POSITIVES = 500
#: Ridge penalty of the ranker on standardised features (a guard against collinear features, not
#: a prior: the windows hold thousands of pairs wherever the ranker is used).
_RANKER_L2 = 1.0
IDENTITY_RANKER = (1.0,) + (0.0,) * (len(RANKER_FEATURES) - 1)


def _top_count(stats: PairStats) -> np.ndarray:
    """Per pair: the largest occasion count of its customer (pairs are sorted by user)."""
    if len(stats.user) == 0:
        return np.zeros(0)
    starts = np.flatnonzero(np.r_[True, stats.user[1:] != stats.user[:-1]])
    top = np.maximum.reduceat(stats.count.astype(np.float64), starts)
    return np.repeat(top, np.diff(np.r_[starts, len(stats.user)]))


def _conditional_logit(x: np.ndarray, y: np.ndarray, group: np.ndarray, l2: float) -> np.ndarray:
    """Coefficients of a conditional (per-customer softmax) logit by Newton's method.

    Each customer-window is one choice set: the likelihood of the items bought again against the
    customer's other items, so only differences *between a customer's items* are fitted -- what
    the ranking needs, whatever makes one customer shop more than another. ``group`` numbers the
    choice sets 0, 1, ... in contiguous runs (each set's rows together, in order).
    """
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    zt = np.ascontiguousarray(z.T)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    positives = np.add.reduceat(y, starts)
    beta = np.zeros(z.shape[1])
    penalty = l2 * np.eye(z.shape[1])
    for _ in range(50):
        eta = z @ beta
        # One shift for all sets unless that could underflow a whole set (then each set's own).
        if float(eta.max() - eta.min()) < 700.0:
            weight = np.exp(eta - eta.max())
        else:
            weight = np.exp(eta - np.repeat(np.maximum.reduceat(eta, starts), sizes))
        share = weight / np.repeat(np.add.reduceat(weight, starts), sizes)
        centre = np.add.reduceat(zt * share, starts, axis=1).T  # each set's expected features
        gradient = z.T @ y - positives @ centre - l2 * beta
        # Sum over sets of positives x the covariance of the features under the set's softmax.
        hessian = (z * (np.repeat(positives, sizes) * share)[:, None]).T @ z
        hessian -= (centre * positives[:, None]).T @ centre
        step = np.linalg.solve(hessian + penalty, gradient)
        beta += step
        if float(np.abs(step).max()) < 1e-9:
            break
    return beta / scale


def fit_ranker(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    order: np.ndarray,
    n_items: int,
    category: np.ndarray,
    until: int,
    horizon_days: float = DEFAULT_HORIZON_DAYS,
    settings: RepurchaseSettings | None = None,
    dispersion: float = 1.0,
) -> tuple[tuple[float, ...] | None, dict[str, Any]]:
    """Coefficients of :data:`RANKER_FEATURES` learned on held-out history, never on what follows ``until``.

    For each of the last :data:`RANKER_WINDOWS` horizons before ``until``, the model is fitted on
    the history before the window and every pair of the customers who buy something again in the
    window is labelled "bought again within it" (only those customers can be ranked well or
    badly, as in the evaluation). A conditional logit over each customer's items weighs the
    features. Too few customers or positives (:data:`RANKER_MIN_CUSTOMERS`,
    :data:`RANKER_MIN_POSITIVES`): :data:`IDENTITY_RANKER`, the probability's order.

    Returns
    -------
    (tuple or None, dict)
        The coefficients (None when ``settings.ranker`` is off), and a report for the manifest.
    """
    if settings is not None and not settings.ranker:
        return None, {"ranker": "off"}
    horizon_s = int(round(horizon_days * SECONDS_PER_DAY))
    # Sorted once: every window's history is a prefix in time of each pair's lines, still sorted.
    sort = np.lexsort((timestamp, item, user))
    user, item, timestamp, order = user[sort], item[sort], timestamp[sort], order[sort]
    blocks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    n_groups = 0
    for k in range(1, RANKER_WINDOWS + 1):
        split = until - k * horizon_s
        early = timestamp < split
        if not early.any():
            break
        stats = pair_stats(user[early], item[early], timestamp[early], order[early], presorted=True)
        late = (timestamp >= split) & (timestamp < split + horizon_s) & (user >= 0) & (item >= 0)
        bought = np.isin(stats.user * n_items + stats.item, np.unique(user[late] * n_items + item[late]))
        n_users = int(stats.user.max()) + 1 if len(stats.user) else 0
        shoppers = np.bincount(stats.user, weights=bought, minlength=n_users) > 0
        sel = np.flatnonzero(shoppers[stats.user])
        if len(sel) == 0:
            continue
        fitted = fit_params(stats, n_items, category, split, settings, dispersion, n_users=n_users)
        u = stats.user[sel]
        estimate = due(
            fitted.params, stats.item[sel], stats.last[sel], stats.count[sel], stats.log_mean[sel],
            split, horizon_days, fitted.pace[u],
        )  # fmt: skip
        top = _top_count(stats)
        elapsed = np.maximum(0.0, (split - stats.last[sel]) / SECONDS_PER_DAY)
        blocks.append(
            ranker_features(
                estimate.probability, stats.count[sel], elapsed, estimate.interval_days,
                fitted.params.rate[stats.item[sel]], stats.recent[sel], top[sel],
            )
        )  # fmt: skip
        labels.append(bought[sel].astype(np.float64))
        _, within = np.unique(u, return_inverse=True)
        groups.append(within + n_groups)
        n_groups += int(within.max()) + 1
    positives = int(sum(float(y.sum()) for y in labels))
    report: dict[str, Any] = {
        "ranker_windows": len(blocks),
        "ranker_customers": n_groups,
        "ranker_positives": positives,
    }
    if n_groups < RANKER_MIN_CUSTOMERS or positives < RANKER_MIN_POSITIVES:
        coefficients = IDENTITY_RANKER
        report["ranker"] = "identity (too few customers bought again in the held-out windows)"
    else:
        beta = _conditional_logit(
            np.vstack(blocks), np.concatenate(labels), np.concatenate(groups), _RANKER_L2
        )
        coefficients = tuple(round(float(b), 6) for b in beta)
        report["ranker"] = "learned"
    report["ranker_coefficients"] = dict(zip(RANKER_FEATURES, coefficients, strict=True))
    return coefficients, report


def fit_repurchase(
    events: Any,
    user_ids: Sequence[str] | np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    category: np.ndarray,
    until: int,
    settings: RepurchaseSettings | None = None,
    horizon_days: float = DEFAULT_HORIZON_DAYS,
) -> tuple[RepurchaseModel, dict[str, Any]]:
    """The repurchase model of a version: item parameters and every customer's history.

    Parameters
    ----------
    events : EventTable
        The training events (only purchases are read).
    user_ids, item_ids : sequence of str
        The version's id maps (row and column order).
    category : np.ndarray
        int category code per item.
    until : int
        Newest event time of the training data (unix seconds).
    settings : RepurchaseSettings, optional
    horizon_days : float
        Horizon the variance factor is chosen for (:func:`choose_dispersion`) and the ranker
        learned on (:func:`fit_ranker`).

    Returns
    -------
    (RepurchaseModel, dict)
        The model, and a report for the manifest (settings, variances, the factor chosen, the
        ranker's coefficients or why it kept the probability's order, counts).
    """
    settings = settings or RepurchaseSettings()
    users, items = IdMap(user_ids), IdMap(item_ids)
    user, item, ts, order = purchase_lines(events, users, items)
    factor, tried = choose_dispersion(
        user, item, ts, order, len(items), category, until, horizon_days, settings
    )
    ranker, ranker_report = fit_ranker(
        user, item, ts, order, len(items), category, until, horizon_days, settings, factor
    )
    stats = pair_stats(user, item, ts, order)
    fitted = fit_params(stats, len(items), category, until, settings, factor, n_users=len(users))
    params = replace(fitted.params, ranker=ranker)
    report = {
        **settings.to_manifest(),
        "dispersion": factor,
        "dispersion_log_likelihood": tried,
        **ranker_report,
        "within_var": round(params.within_var, 5),
        "between_var": round(params.between_var, 5),
        "pairs": len(stats.user),
        "pairs_with_repeats": int((stats.count > 1).sum()),
        "median_rate": round(float(np.median(params.rate)), 4) if len(params.rate) else 0.0,
    }
    return RepurchaseModel(params, stats.history(len(users), fitted.pace)), report


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

METHODS = ("repurchase", "frequency", "recency")


def _per_user_metrics(ranked_hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user precision@k, recall@k and nDCG@k from a (users, k) hit table."""
    top = ranked_hits[:, :k].astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (top * discount[: top.shape[1]]).sum(axis=1)
    ideal = np.concatenate(([0.0], np.cumsum(discount)))[np.minimum(n_relevant, k)]
    return {
        f"precision@{k}": top.sum(axis=1) / k,
        f"recall@{k}": top.sum(axis=1) / np.maximum(n_relevant, 1),
        f"ndcg@{k}": np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1.0), 0.0),
    }


def _bootstrap(rng: np.random.Generator, ours: np.ndarray, base: np.ndarray | None = None) -> list[float]:
    """95% interval of the mean of ``ours`` (or of ``ours.mean() / base.mean()``, paired) over users."""
    n = len(ours)
    if n == 0:
        return [0.0, 0.0]
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=_BOOTSTRAP_DRAWS).astype(np.float64)
    values = weights @ ours / n
    if base is not None:
        values = values / np.maximum(weights @ base / n, 1e-12)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _ranked_hits(user: np.ndarray, key: np.ndarray, relevant: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """(n_users, k) hits of each user's top-k pairs by decreasing ``key`` (ties: lower position)."""
    order = np.lexsort((np.arange(len(key)), -key, user))
    u = user[order]
    starts = np.searchsorted(u, np.arange(n_users))
    rank = np.arange(len(u)) - starts[u]
    table = np.zeros((n_users, k), dtype=bool)
    sel = rank < k
    table[u[sel], rank[sel]] = relevant[order][sel]
    return table


def catalog_categories(items: IdMap, catalog: Any) -> np.ndarray:
    """int64 category code per item of ``items`` from a catalog (-1: none or not listed)."""
    category = np.full(len(items), -1, dtype=np.int64)
    if catalog is None or not len(catalog):
        return category
    names, codes = np.unique(np.asarray(catalog.category, dtype=object).astype(str), return_inverse=True)
    codes = np.where(names[codes] != "", codes, -1)
    position = items.positions(np.asarray(catalog.item_id, dtype=object))
    listed = position >= 0
    category[position[listed]] = codes[listed]
    return category


def format_report(result: dict[str, Any]) -> str:
    """The evaluation as a few plain-text lines (``recsvc evaluate``)."""
    k = result["k"]
    lines = [
        f"buy again, horizon {result['horizon_days']:g} days: {result['users_with_rebuys']:,} of "
        f"{result['users']:,} customers bought again in the window ({result['relevant']:,} of "
        f"{result['candidates']:,} bought items); dispersion {result['params']['dispersion']:g}",
        "method".ljust(14) + "".join(f"{m}@{k}".rjust(14) for m in ("precision", "recall", "ndcg")),
    ]
    for name in METHODS:
        lines.append(
            name.ljust(14)
            + "".join(f"{result[f'{name}_{m}@{k}']:.4f}".rjust(14) for m in ("precision", "recall", "ndcg"))
        )
    for base in ("frequency", "recency"):
        key = f"ratio_vs_{base}_ndcg@{k}"
        lo, hi = result["ci95"][key]
        lines.append(f"repurchase ndcg@{k} vs {base}: {result[key]:.3f}x (95% CI {lo:.3f}-{hi:.3f})")
    cal = result["calibration"]
    if cal.get("pairs"):
        lines.append(
            f"due_in_days median absolute error over {cal['pairs']:,} items bought again within "
            f"{cal['follow_up_days']:g} days: {cal['repurchase_mae_days']:.1f} (item's typical interval "
            f"{cal['item_interval_mae_days']:.1f}, customer's own {cal['own_interval_mae_days']:.1f})"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class _Split:
    """Candidate pairs at a cutoff: training statistics and when each pair was bought next."""

    stats: PairStats
    fitted: FittedParams
    next_purchase: np.ndarray  # int64 unix seconds of the first purchase at/after the cutoff (max: none)
    n_users: int


_NEVER = np.iinfo(np.int64).max


def _split(
    lines: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    n_users: int,
    n_items: int,
    category: np.ndarray,
    cutoff: int,
    horizon_days: float,
    settings: RepurchaseSettings | None,
    choose: bool = True,
) -> _Split:
    user, item, ts, order = lines
    train = ts < cutoff
    factor = 1.0
    if choose:
        factor, _ = choose_dispersion(
            user[train],
            item[train],
            ts[train],
            order[train],
            n_items,
            category,
            cutoff,
            horizon_days,
            settings,
        )
    ranker = None
    if choose:
        ranker, _ = fit_ranker(
            user[train], item[train], ts[train], order[train], n_items, category, cutoff,
            horizon_days, settings, factor,
        )  # fmt: skip
    stats = pair_stats(user[train], item[train], ts[train], order[train])
    fitted = fit_params(stats, n_items, category, cutoff, settings, factor, n_users=n_users)
    fitted = FittedParams(replace(fitted.params, ranker=ranker), fitted.pace)
    key = stats.user * n_items + stats.item  # sorted: pairs are ordered by user, then item
    later = ~train & (user >= 0) & (item >= 0)
    later_key = user[later] * n_items + item[later]
    next_purchase = np.full(len(key), _NEVER, dtype=np.int64)
    if len(key) and len(later_key):
        at = np.minimum(np.searchsorted(key, later_key), len(key) - 1)
        hit = key[at] == later_key
        np.minimum.at(next_purchase, at[hit], ts[later][hit])
    return _Split(stats, fitted, next_purchase, n_users)


def evaluate_repurchase(
    events: Any,
    catalog: Any = None,
    *,
    horizon_days: float = DEFAULT_HORIZON_DAYS,
    cutoff: int | None = None,
    k: int = 10,
    settings: RepurchaseSettings | None = None,
    follow_up_days: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The due list on a time split against the customer's most frequent and most recent items.

    Purchases before ``cutoff`` (default: newest event minus ``horizon_days``) train; for every
    customer who bought before it, the candidates are the items they bought, and the relevant ones
    those they buy again in ``[cutoff, cutoff + horizon_days)``. Customers without any such
    purchase cannot score and are counted apart. Ranked: the model's
    :func:`~recsvc.core.repurchase.rank_key` at the cutoff (the ranker learned on the windows
    before it over the probability of a purchase within the horizon); ``frequency`` (occasions,
    ties by recency); ``recency`` (newest occasion, ties by frequency).

    Calibration of ``due_in_days``, on its own split ``follow_up_days`` (at least the horizon)
    before the newest event: for every candidate bought again before the log ends, the absolute
    error against the days to that purchase; the median over pairs for the model and two simple
    predictors (the item's typical interval after the last purchase, and the customer's own mean
    interval, else the item's). Only pairs bought again within the follow-up can be scored, so
    every predictor is judged on the same, early-biased pairs.

    Returns
    -------
    dict
        ``users``, ``users_with_rebuys``, ``candidates``, metric means per method, ``ci95`` (bootstrap
        over customers, paired for the ratios), ``ratio_vs_<baseline>_<metric>``, ``calibration``,
        ``seconds``.

    Raises
    ------
    ValueError
        Nobody bought anything before the cutoff.
    """
    started = time.perf_counter()
    timestamp = np.asarray(events.timestamp, dtype=np.int64)
    if len(timestamp) == 0:
        raise ValueError("no events to evaluate")
    newest = int(timestamp.max())
    horizon_s = int(round(horizon_days * SECONDS_PER_DAY))
    if cutoff is None:
        cutoff = newest - horizon_s + 1
    end = cutoff + horizon_s
    purchase = np.asarray(events.event) == PURCHASE
    follow_up_cutoff = newest - int(round(max(follow_up_days, horizon_days) * SECONDS_PER_DAY)) + 1
    known = purchase & (timestamp < max(cutoff, follow_up_cutoff))
    users = IdMap(np.unique(np.asarray(events.user_id, dtype=object)[known]))
    items = IdMap(np.unique(np.asarray(events.item_id, dtype=object)[purchase]))
    if not (purchase & (timestamp < cutoff)).any():
        raise ValueError("no purchases before the cutoff: a longer log or a shorter horizon is needed")
    category = catalog_categories(items, catalog)
    lines = purchase_lines(events, users, items)
    split = _split(lines, len(users), len(items), category, cutoff, horizon_days, settings)
    stats, params = split.stats, split.fitted.params
    relevant = split.next_purchase < end

    estimate = due(
        params, stats.item, stats.last, stats.count, stats.log_mean, cutoff, horizon_days,
        split.fitted.pace[stats.user],
    )  # fmt: skip
    model_key = rank_key(
        params, estimate.probability, stats.item, stats.count,
        np.maximum(0.0, (cutoff - stats.last) / SECONDS_PER_DAY), estimate.interval_days, stats.recent,
        _top_count(stats),
    )  # fmt: skip
    span = 1.0 + float(np.ptp(stats.last)) if len(stats.last) else 1.0
    keys = {
        "repurchase": model_key,
        "frequency": stats.count + (stats.last - (stats.last.min() if len(stats.last) else 0)) / span * 0.5,
        "recency": stats.last + stats.count / (1.0 + (stats.count.max() if len(stats.count) else 0)),
    }
    n_users = len(users)
    n_relevant = np.bincount(stats.user, weights=relevant, minlength=n_users).astype(np.int64)
    scored = n_relevant > 0
    per_method = {
        name: _per_user_metrics(
            _ranked_hits(stats.user, key.astype(np.float64), relevant, n_users, k)[scored],
            n_relevant[scored],
            k,
        )
        for name, key in keys.items()
    }
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "horizon_days": horizon_days,
        "cutoff": int(cutoff),
        "k": k,
        "users": int(np.bincount(stats.user, minlength=n_users).astype(bool).sum()),
        "users_with_rebuys": int(scored.sum()),
        "candidates": len(stats.user),
        "relevant": int(relevant.sum()),
        "params": {
            "dispersion": params.dispersion,
            "ranker": None if params.ranker is None else list(params.ranker),
            "within_var": round(params.within_var, 4),
            "between_var": round(params.between_var, 4),
        },
        "ci95": {},
    }
    for name, metrics in per_method.items():
        for metric, values in metrics.items():
            out[f"{name}_{metric}"] = round(float(values.mean()), 4) if len(values) else 0.0
            out["ci95"][f"{name}_{metric}"] = _bootstrap(rng, values)
    for base in ("frequency", "recency"):
        for metric in per_method["repurchase"]:
            ours, theirs = per_method["repurchase"][metric], per_method[base][metric]
            ratio = float(ours.mean() / theirs.mean()) if len(ours) and theirs.mean() > 0 else 0.0
            out[f"ratio_vs_{base}_{metric}"] = round(ratio, 4)
            out["ci95"][f"ratio_vs_{base}_{metric}"] = _bootstrap(rng, ours, theirs)
    if follow_up_cutoff == cutoff:
        follow = split
    elif (purchase & (timestamp < follow_up_cutoff)).any():
        follow = _split(
            lines, len(users), len(items), category, follow_up_cutoff, horizon_days, settings, False
        )
    else:
        follow = None
    out["calibration"] = (
        _calibration(follow, follow_up_cutoff, newest)
        if follow is not None
        else {"pairs": 0, "note": "log too short"}
    )
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def _calibration(split: _Split, cutoff: int, newest: int) -> dict[str, Any]:
    """Median absolute error (days) of the time to the next purchase, for pairs bought again."""
    stats, params = split.stats, split.fitted.params
    rebought = split.next_purchase <= newest
    estimate = due(
        params, stats.item[rebought], stats.last[rebought], stats.count[rebought], stats.log_mean[rebought],
        cutoff, 1.0, split.fitted.pace[stats.user[rebought]],
    )  # fmt: skip
    actual = (split.next_purchase[rebought] - cutoff) / SECONDS_PER_DAY
    elapsed = (cutoff - stats.last[rebought]) / SECONDS_PER_DAY
    item_typical = np.exp(params.log_interval[stats.item[rebought]].astype(np.float64))
    own = np.where(stats.count[rebought] > 1, np.exp(stats.log_mean[rebought]), item_typical)
    predictors = {
        "repurchase": estimate.due_in_days,
        "item_interval": np.maximum(item_typical - elapsed, 0.0),
        "own_interval": np.maximum(own - elapsed, 0.0),
    }
    out: dict[str, Any] = {
        "follow_up_days": round((newest - cutoff) / SECONDS_PER_DAY, 2),
        "pairs": len(actual),
    }
    for name, predicted in predictors.items():
        error = np.abs(predicted - actual)
        out[f"{name}_mae_days"] = round(float(np.median(error)), 3) if len(actual) else 0.0
    return out
