"""Repurchase: which bought items a customer buys again, and when. Pure numpy/scipy.

The model (fitted by :mod:`training.repurchase`, documented in ``docs/repurchase.md``) is a
*mixture cure model* with log-normal times between purchases and empirical-Bayes shrinkage:

* After a purchase of item ``i``, a customer either never buys it again ("cured": a phone case) or
  buys it again after a time ``T`` whose logarithm is normal. ``rate[i]`` is the item's share of
  purchases that are followed by another (its *repurchasability*), shrunk towards its category's
  and then the shop's rate when the item has few buyers. A customer's own share starts from the
  item's with the weight of ``strength`` purchases and moves towards their own record: someone
  who bought coffee eight times is a repeat buyer whatever the item's rate.
* ``log T`` of a customer-item pair has mean ``mu``: the item's typical ``log_interval[i]`` (itself
  shrunk towards the category's) blended with the customer's own mean log interval, weighted by
  how many intervals they have (a normal-normal posterior with between-customer variance
  ``between_var`` and within-customer variance ``within_var``).
* Given the time ``e`` since the last purchase, the probability of buying again within the next
  ``h`` days is ``q (S(e) - S(e + h)) / (1 - q + q S(e))``: ``S`` is the survival function of the
  predictive log-normal, ``q`` the customer's repeat share. An item long overdue becomes less
  likely (the customer has probably stopped buying it), an item bought yesterday unlikely, an item
  at its usual interval most likely.

Arrays here are indexed like the rest of a model version (item index = position in the model's
item ids). Everything is vectorised over pairs, so the same code serves one request, an email
export of a million users and the offline evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.special import ndtr, ndtri

SECONDS_PER_DAY = 86_400
#: Purchases of an item by one customer less than this apart are one shopping occasion (two lines
#: or two orders of the same trip): intervals are measured between occasions, never between lines.
MIN_GAP_S = 12 * 3600
#: Most bought items kept per customer where a bound matters (Redis records, real-time merges):
#: the most recently bought ones.
MAX_ITEMS_PER_USER = 1000
#: Default horizon of "due" questions, in days.
DEFAULT_HORIZON_DAYS = 7.0
#: Survival below this is treated as this (keeps the conditional median finite).
_MIN_SURVIVAL = 1e-12


@dataclass(frozen=True)
class RepurchaseParams:
    """What the model learned per item, and its variances.

    Attributes
    ----------
    rate : np.ndarray
        float32 per item: share of purchases followed by another purchase of the item by the same
        customer (censoring-corrected, shrunk item -> category -> shop).
    log_interval : np.ndarray
        float32 per item: prior mean of ``log(days between purchases)`` (shrunk the same way).
    buyers, repeat_buyers : np.ndarray
        int32 per item: customers who bought it, and those who bought it on two occasions or more
        (the evidence behind ``rate``; reasons quote it).
    within_var : float
        Variance of one customer's log intervals around their own mean.
    between_var : float
        Variance of customers' mean log intervals around the item's.
    strength : float
        Weight, in purchases, of the item's rate in a customer's own repeat share.
    dispersion : float
        Factor on both variances for the *probability* of a purchase within a horizon, chosen on
        held-out history when training (the moment estimates see only completed intervals); the
        due date uses the variances as estimated.
    ranker : tuple of float, optional
        Coefficients of :data:`RANKER_FEATURES` that order a customer's items (:func:`rank_key`),
        fitted on held-out history; None for a version trained before the ranker existed (items
        are then ordered by the probability).
    """

    rate: np.ndarray
    log_interval: np.ndarray
    buyers: np.ndarray
    repeat_buyers: np.ndarray
    within_var: float
    between_var: float
    strength: float
    dispersion: float = 1.0
    ranker: tuple[float, ...] | None = None

    @property
    def n_items(self) -> int:
        return len(self.rate)


@dataclass(frozen=True)
class UserHistory:
    """One customer's bought items (parallel arrays, one entry per item).

    ``log_interval`` is the mean of the customer's own ``log(days)`` between occasions of the item
    (0 where ``count`` is 1: no interval yet); ``pace`` how much faster (< 0, log scale) or slower
    than other customers they rebuy items in general; ``recent`` the occasions weighted by their
    age at ``last`` (:data:`RECENT_DAYS`; None in versions trained before the ranker).
    """

    items: np.ndarray  # int item indices (int32; the packed dtype when read from Redis)
    last: np.ndarray  # int unix seconds of the newest occasion
    count: np.ndarray  # int occasions
    log_interval: np.ndarray  # float32
    pace: float = 0.0
    recent: np.ndarray | None = None  # float32

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def empty(cls) -> UserHistory:
        # With the recency column: purchases merged into it (a customer new since the model) keep
        # their weights, which a version with a ranker orders by.
        return cls(
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
            recent=np.zeros(0, np.float32),
        )


@dataclass(frozen=True)
class PurchaseHistory:
    """Every customer's :class:`UserHistory`, as CSR rows over users (row ``u`` = user index ``u``)."""

    indptr: np.ndarray  # int64 (n_users + 1,)
    items: np.ndarray  # int32
    last: np.ndarray  # int64
    count: np.ndarray  # int32
    log_interval: np.ndarray  # float32
    pace: np.ndarray  # float32 (n_users,)
    recent: np.ndarray | None = None  # float32, like UserHistory.recent

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def row(self, user: int) -> UserHistory:
        lo, hi = int(self.indptr[user]), int(self.indptr[user + 1])
        return UserHistory(
            self.items[lo:hi],
            self.last[lo:hi],
            self.count[lo:hi],
            self.log_interval[lo:hi],
            float(self.pace[user]),
            None if self.recent is None else self.recent[lo:hi],
        )


@dataclass(frozen=True)
class RepurchaseModel:
    """A version's repurchase model: item parameters and every customer's history."""

    params: RepurchaseParams
    history: PurchaseHistory


@dataclass(frozen=True)
class DueEstimate:
    """How due each (customer, item) pair is at one moment, for a horizon.

    Attributes
    ----------
    probability : np.ndarray
        P(bought again within the horizon | not bought since ``last``).
    due_in_days : np.ndarray
        Median days from now to the next purchase for a customer who still buys the item (>= 0).
    expected_next : np.ndarray
        int64 unix seconds: ``now + due_in_days``.
    interval_days : np.ndarray
        The pair's typical interval (``exp(mu)``): what reasons quote.
    overdue_days : np.ndarray
        Days since ``last`` beyond the typical interval (0 when not overdue).
    """

    probability: np.ndarray
    due_in_days: np.ndarray
    expected_next: np.ndarray
    interval_days: np.ndarray
    overdue_days: np.ndarray


def pair_posterior(
    params: RepurchaseParams,
    items: np.ndarray,
    count: np.ndarray,
    log_interval: np.ndarray,
    pace: float | np.ndarray = 0.0,
    dispersion: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, sd, q)`` of each pair: predictive log-interval mean and spread, repeat share.

    ``mu`` and ``q`` blend the item's prior with the customer's own record, each weighted by how
    much of it there is (``count - 1`` intervals, ``count - 1`` repeats). ``pace`` (log scale) moves
    the item's prior for a customer who buys everything faster (< 0) or slower than most;
    ``dispersion`` multiplies both variances.
    """
    # Intervals (= repeats) seen; count >= 1 everywhere, the maximum only guards hand-made input.
    k = np.maximum(np.subtract(count, 1.0), 0.0)
    # Both variances scale by the dispersion, so mu does not depend on it and sd scales by its root.
    prior_precision = 1.0 / params.between_var
    data_precision = k * (1.0 / params.within_var)
    precision = data_precision + prior_precision
    prior = params.log_interval[items] + pace
    mu = (prior * prior_precision + np.multiply(log_interval, data_precision)) / precision
    sd = np.sqrt((1.0 / precision + params.within_var) * dispersion)
    q = (params.rate[items] * params.strength + k) / (k + params.strength)
    return mu, sd, q


#: Days standing in for 0 in logarithms (the survival of a log-normal at 0 is 1 either way).
_TINY_DAYS = 1e-9


def _survival(days: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(T > days) for log-normal T; 1 at ``days <= 0``."""
    return ndtr((mu - np.log(np.maximum(days, _TINY_DAYS))) / sd)


def _elapsed(last: np.ndarray, now: float) -> np.ndarray:
    return np.maximum(0.0, (float(now) - np.asarray(last, dtype=np.float64)) / SECONDS_PER_DAY)


@dataclass(frozen=True)
class RankedDue:
    """The most due of one customer's pairs, best first (see :func:`rank_history`)."""

    order: np.ndarray  # positions in the history, best first
    probability: np.ndarray
    due_in_days: np.ndarray
    interval_days: np.ndarray
    elapsed_days: np.ndarray


def _probability(
    q: np.ndarray, mu: np.ndarray, sd: np.ndarray, elapsed: np.ndarray, horizon_days: float
) -> np.ndarray:
    s_now = _survival(elapsed, mu, sd)
    s_later = _survival(elapsed + float(horizon_days), mu, sd)
    # 1 - q + q * s_now is 0 only when q = 1 and s_now = 0, where the numerator is 0 too.
    return q * (s_now - s_later) / np.maximum(1.0 - q + q * s_now, 1e-300)


def _median_next(mu: np.ndarray, sd: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
    """Days to the next purchase: the median given none by ``elapsed``, ``S(t) = S(elapsed) / 2``."""
    half = np.maximum(_survival(elapsed, mu, sd), _MIN_SURVIVAL) / 2.0
    return np.maximum(np.exp(mu + sd * ndtri(1.0 - half)) - elapsed, 0.0)


#: Age, in days, at which one occasion weighs 1/e in a customer's recency-weighted count of an item
#: (:attr:`UserHistory.recent`): a habit of the last month or two outweighs an old one.
RECENT_DAYS = 30.0
#: What :func:`rank_key` weighs, in the order of :attr:`RepurchaseParams.ranker`. Only quantities of
#: the customer's own record (the item's, or the customer's largest occasion count): features
#: shared by all of a customer's items could not change their order.
RANKER_FEATURES = (
    "probability_log_odds",  # the cure model's answer
    "log1p_occasions",
    "log1p_days_since",
    "rate_log_odds",  # the item's repurchasability
    "log_overdue",  # log1p(days since) - log1p(typical interval)
    "log_odds_x_occasions",
    "bought_once",
    "occasions_share_of_top",  # occasions / the customer's largest occasion count
    "log1p_recent",  # occasions weighted by their age (RECENT_DAYS)
)
_P_CLIP = 1e-6
_RATE_CLIP = 1e-4


def ranker_features(
    probability: np.ndarray,
    count: np.ndarray,
    elapsed: np.ndarray,
    interval_days: np.ndarray,
    rate: np.ndarray,
    recent: np.ndarray | None,
    top_count: np.ndarray | float,
) -> np.ndarray:
    """The ``(pairs, len(RANKER_FEATURES))`` matrix :func:`rank_key` weighs.

    ``recent`` is :attr:`UserHistory.recent` (at the last purchase; None: one occasion), decayed
    here to ``elapsed``; ``top_count`` the customer's largest occasion count (per pair when pairs of
    several customers).
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), _P_CLIP, 1.0 - _P_CLIP)
    log_odds = np.log(p) - np.log1p(-p)
    c = np.asarray(count, dtype=np.float64)
    log_count = np.log1p(c)
    e = np.asarray(elapsed, dtype=np.float64)
    log_elapsed = np.log1p(e)
    r = np.clip(np.asarray(rate, dtype=np.float64), _RATE_CLIP, 1.0 - _RATE_CLIP)
    weighted = np.ones_like(c) if recent is None else np.asarray(recent, dtype=np.float64)
    return np.column_stack(
        (
            log_odds,
            log_count,
            log_elapsed,
            np.log(r) - np.log1p(-r),
            log_elapsed - np.log1p(interval_days),
            log_odds * log_count,
            (c <= 1.0).astype(np.float64),
            c / np.maximum(top_count, 1.0),
            np.log1p(weighted * np.exp(-e / RECENT_DAYS)),
        )
    )


def rank_key(
    params: RepurchaseParams,
    probability: np.ndarray,
    items: np.ndarray,
    count: np.ndarray,
    elapsed: np.ndarray,
    interval_days: np.ndarray,
    recent: np.ndarray | None,
    top_count: np.ndarray | float,
) -> np.ndarray:
    """What orders a customer's items, higher first: the learned ranker's linear predictor, or the
    probability itself for a version without one.

    The displayed probability (and every threshold on it) stays the cure model's: the ranker is
    fitted to order items *within* a customer who shops, so its scale is not a probability.
    """
    if params.ranker is None:
        return np.asarray(probability, dtype=np.float64)
    features = ranker_features(
        probability, count, elapsed, interval_days, params.rate[items], recent, top_count
    )
    return features @ np.asarray(params.ranker, dtype=np.float64)


def _rank_key_small(
    ranker: tuple[float, ...],
    probability: float,
    count: float,
    elapsed: float,
    interval_days: float,
    rate: float,
    recent: float,
    top_count: float,
) -> float:
    """:func:`rank_key` of one pair with Python floats (same formulas, same order of features)."""
    p = min(max(probability, _P_CLIP), 1.0 - _P_CLIP)
    log_odds = math.log(p) - math.log1p(-p)
    log_count = math.log1p(count)
    log_elapsed = math.log1p(elapsed)
    r = min(max(rate, _RATE_CLIP), 1.0 - _RATE_CLIP)
    # Written out term by term: the request path calls this once per bought item.
    w = ranker
    return (
        w[0] * log_odds
        + w[1] * log_count
        + w[2] * log_elapsed
        + w[3] * (math.log(r) - math.log1p(-r))
        + w[4] * (log_elapsed - math.log1p(interval_days))
        + w[5] * log_odds * log_count
        + (w[6] if count <= 1.0 else 0.0)
        + w[7] * count / max(top_count, 1.0)
        + w[8] * math.log1p(recent * math.exp(-elapsed / RECENT_DAYS))
    )


#: Histories up to this many items are ranked with Python floats: for a handful of items numpy's
#: per-call overhead (~30 calls of ~1 us) costs more than the arithmetic. Both paths compute the
#: same formulas (tests/core/test_repurchase.py compares them).
SMALL_HISTORY = 24
#: The same with a ranker: its nine terms per item move the crossover down (measured: ~1.1 us per
#: item more in Python, ~20 us per call more with numpy).
SMALL_HISTORY_RANKED = 14
_NORMAL = NormalDist()
_SQRT_HALF = math.sqrt(0.5)


def rank_history(
    params: RepurchaseParams,
    history: UserHistory,
    now: float,
    horizon_days: float,
    n: int,
    allowed: np.ndarray | None = None,
    min_probability: float = 0.0,
) -> RankedDue:
    """The ``n`` most due ``allowed`` items of one customer, with dates for those only.

    :func:`due` for the request path: every item is ranked by :func:`rank_key` (the probability
    for a version without a ranker), and only the ``n`` shown get the median of their next purchase
    (the due dates use the variances as estimated, the probability the dispersion factor: sd
    scales by its square root).
    """
    if len(history) <= (SMALL_HISTORY if params.ranker is None else SMALL_HISTORY_RANKED):
        return _rank_small(params, history, now, horizon_days, n, allowed, min_probability)
    elapsed = _elapsed(history.last, now)
    mu, sd, q = pair_posterior(params, history.items, history.count, history.log_interval, history.pace)
    probability = _probability(q, mu, sd * math.sqrt(params.dispersion), elapsed, horizon_days)
    if min_probability > 0:
        passing = probability >= min_probability
        allowed = passing if allowed is None else allowed & passing
    key = rank_key(
        params, probability, history.items, history.count, elapsed, np.exp(mu), history.recent,
        float(history.count.max()),
    )  # fmt: skip
    order = rank_due(key, allowed)[:n]
    mu, sd, elapsed = mu[order], sd[order], elapsed[order]
    return RankedDue(order, probability[order], _median_next(mu, sd, elapsed), np.exp(mu), elapsed)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z * _SQRT_HALF)


def _rank_small(
    params: RepurchaseParams,
    history: UserHistory,
    now: float,
    horizon_days: float,
    n: int,
    allowed: np.ndarray | None,
    min_probability: float,
) -> RankedDue:
    """:func:`rank_history` with Python floats (the formulas of :func:`pair_posterior`,
    :func:`_probability` and :func:`_median_next`, one pair at a time)."""
    within, between, strength = params.within_var, params.between_var, params.strength
    widen = math.sqrt(params.dispersion)
    items = history.items.tolist()
    prior = params.log_interval[history.items].tolist()
    rate = params.rate[history.items].tolist()
    ok = [True] * len(items) if allowed is None else np.asarray(allowed, dtype=bool).tolist()
    ranker = params.ranker
    recent = [1.0] * len(items) if history.recent is None else history.recent.tolist()
    top_count = float(max(history.count.tolist(), default=1))
    rows = []
    for j, (last, count, own) in enumerate(
        zip(history.last.tolist(), history.count.tolist(), history.log_interval.tolist(), strict=True)
    ):
        if not ok[j]:
            continue
        k = max(count - 1.0, 0.0)
        precision = 1.0 / between + k / within
        mu = ((prior[j] + history.pace) / between + own * k / within) / precision
        sd = math.sqrt(within + 1.0 / precision)
        q = (strength * rate[j] + k) / (strength + k)
        elapsed = max((now - last) / SECONDS_PER_DAY, 0.0)
        s_now = _normal_sf((math.log(max(elapsed, _TINY_DAYS)) - mu) / (sd * widen))
        s_later = _normal_sf((math.log(max(elapsed + horizon_days, _TINY_DAYS)) - mu) / (sd * widen))
        probability = q * (s_now - s_later) / max(1.0 - q + q * s_now, 1e-300)
        if probability >= min_probability:
            key = probability
            if ranker is not None:
                key = _rank_key_small(
                    ranker, probability, count, elapsed, math.exp(mu), rate[j], recent[j], top_count
                )
            rows.append((-key, j, probability, mu, sd, elapsed))
    rows.sort()  # by key, then position: the order of rank_due
    rows = rows[:n]
    due_in, interval = [], []
    for _, _, _, mu, sd, elapsed in rows:
        half = max(_normal_sf((math.log(max(elapsed, _TINY_DAYS)) - mu) / sd), _MIN_SURVIVAL) / 2.0
        due_in.append(max(math.exp(mu + sd * _NORMAL.inv_cdf(1.0 - half)) - elapsed, 0.0))
        interval.append(math.exp(mu))
    return RankedDue(
        order=np.asarray([r[1] for r in rows], dtype=np.int64),
        probability=np.asarray([r[2] for r in rows], dtype=np.float64),
        due_in_days=np.asarray(due_in, dtype=np.float64),
        interval_days=np.asarray(interval, dtype=np.float64),
        elapsed_days=np.asarray([r[5] for r in rows], dtype=np.float64),
    )


def due(
    params: RepurchaseParams,
    items: np.ndarray,
    last: np.ndarray,
    count: np.ndarray,
    log_interval: np.ndarray,
    now: float,
    horizon_days: float = DEFAULT_HORIZON_DAYS,
    pace: float | np.ndarray = 0.0,
) -> DueEstimate:
    """How due each pair is at ``now`` (unix seconds) for the next ``horizon_days``.

    Parameters
    ----------
    params : RepurchaseParams
        The item parameters.
    items, last, count, log_interval : np.ndarray
        Parallel arrays, one entry per (customer, item) pair (a :class:`UserHistory`'s columns).
    now : float
        The moment asked about; a ``last`` after it counts as bought just now.
    horizon_days : float
        Length of the window the probability is about.
    pace : float or np.ndarray
        The customer's pace (:attr:`UserHistory.pace`; per pair when pairs of several customers).

    Returns
    -------
    DueEstimate
    """
    elapsed = _elapsed(last, now)
    mu, sd, q = pair_posterior(params, items, count, log_interval, pace)
    probability = _probability(q, mu, sd * math.sqrt(params.dispersion), elapsed, horizon_days)
    due_in, interval = _median_next(mu, sd, elapsed), np.exp(mu)
    return DueEstimate(
        probability=probability,
        due_in_days=due_in,
        expected_next=(float(now) + due_in * SECONDS_PER_DAY).astype(np.int64),
        interval_days=interval,
        overdue_days=np.maximum(elapsed - interval, 0.0),
    )


def repurchasable_items(
    rate: np.ndarray | None,
    min_rate: float,
    category: np.ndarray | None = None,
    override_categories: np.ndarray | None = None,
) -> np.ndarray:
    """Bool mask over items: bought items that stay recommendable (exempt from "already bought").

    The one rule every "already bought" exclusion uses (request filters, bundles, email exports,
    publish): an item is exempt when the learned repurchase ``rate`` reaches ``min_rate``, or its
    category is one of ``override_categories`` (the operator's list, ``RECSVC_REPURCHASE_CATEGORIES``).

    Parameters
    ----------
    rate : np.ndarray or None
        :attr:`RepurchaseParams.rate`; None for a model without a repurchase model (only the
        override applies).
    min_rate : float
        Threshold; above 1 nothing is exempt by the learned rate.
    category : np.ndarray, optional
        Category code per item (needed with ``override_categories``; its length sets the mask's).
    override_categories : np.ndarray, optional
        int category codes always exempt.
    """
    if rate is None and category is None:
        raise ValueError("repurchasable_items needs the learned rate or the item categories")
    n = len(rate) if rate is not None else len(category)  # type: ignore[arg-type]
    mask = np.zeros(n, dtype=bool) if rate is None else np.asarray(rate) >= min_rate
    if category is not None and override_categories is not None and len(override_categories):
        mask |= np.isin(category, override_categories)
    return mask


def merge_purchases(history: UserHistory, items: np.ndarray, times: np.ndarray) -> UserHistory:
    """``history`` updated with purchases made since (real-time events), bounded in size.

    A purchase within :data:`MIN_GAP_S` after the item's last occasion is the same occasion; a
    later one adds an occasion and an interval to the customer's mean. Purchases older than the
    item's last occasion are already in the history.
    """
    if len(items) == 0:
        return history
    order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
    position = {int(item): j for j, item in enumerate(history.items.tolist())}
    new_items = history.items.tolist()
    last = history.last.tolist()
    count = history.count.tolist()
    mean = history.log_interval.astype(np.float64).tolist()
    recent = None if history.recent is None else history.recent.astype(np.float64).tolist()
    for j in order.tolist():
        item, t = int(items[j]), int(times[j])
        at = position.get(item)
        if at is None:
            position[item] = len(new_items)
            new_items.append(item)
            last.append(t)
            count.append(1)
            mean.append(0.0)
            if recent is not None:
                recent.append(1.0)
            continue
        if t - last[at] <= MIN_GAP_S:
            continue
        gap = math.log((t - last[at]) / SECONDS_PER_DAY)
        intervals = count[at] - 1
        mean[at] = (mean[at] * intervals + gap) / (intervals + 1)
        if recent is not None:  # the older occasions age by the gap, the new one counts 1
            recent[at] = recent[at] * math.exp(-(t - last[at]) / SECONDS_PER_DAY / RECENT_DAYS) + 1.0
        count[at] += 1
        last[at] = t
    merged = UserHistory(
        np.asarray(new_items, np.int32),
        np.asarray(last, np.int64),
        np.asarray(count, np.int32),
        np.asarray(mean, np.float32),
        history.pace,
        None if recent is None else np.asarray(recent, np.float32),
    )
    return newest(merged, MAX_ITEMS_PER_USER)


def newest(history: UserHistory, limit: int) -> UserHistory:
    """The ``limit`` most recently bought items of ``history`` (all of them when fewer)."""
    if len(history) <= limit:
        return history
    keep = np.sort(np.argsort(-history.last, kind="stable")[:limit])
    return UserHistory(
        history.items[keep],
        history.last[keep],
        history.count[keep],
        history.log_interval[keep],
        history.pace,
        None if history.recent is None else history.recent[keep],
    )


def rank_due(probability: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Positions of the pairs by decreasing ``probability`` (or any :func:`rank_key`; ties: lower
    position first), only the ``allowed`` ones when a mask is given."""
    order = np.argsort(-np.asarray(probability), kind="stable")
    if allowed is not None:
        order = order[np.asarray(allowed, dtype=bool)[order]]
    return order


def _days(value: float) -> str:
    days = int(round(value))
    return "1 day" if days == 1 else f"{days} days"


def reason(count: int, interval_days: float, elapsed_days: float, due_in_days: float, rate: float) -> str:
    """A sentence a customer or a merchandiser can read: why this item is due now.

    ``rate`` is the item's learned repurchase rate (quoted for an item bought once).
    """
    if count >= 2:
        habit = f"bought {count} times, about every {_days(interval_days)}"
    else:
        habit = (
            f"{round(100.0 * rate)}% of its purchases are repeated, typically after {_days(interval_days)}"
        )
    when = "last bought today" if elapsed_days < 0.5 else f"last bought {_days(elapsed_days)} ago"
    if elapsed_days > interval_days + 0.5:
        timing = f"{_days(elapsed_days - interval_days)} later than usual"
    elif due_in_days < 0.5:
        timing = "due now"
    else:
        timing = f"due in {_days(due_in_days)}"
    return f"{habit}; {when}, {timing}"
