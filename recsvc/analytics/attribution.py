"""Attribution of carts, purchases and revenue to recommendations, and the A/B statistics (pure numpy).

Vocabulary
    *Touchpoint*: an event that carries a ``rec_id`` and shows interest in an item -- a ``click``,
    a ``cart`` or a ``purchase`` (a purchase whose ``rec_id`` the storefront sent back touches its
    own item). *Conversion*: a ``cart`` or ``purchase`` event. A conversion of item ``i`` by user
    ``u`` at time ``t`` is credited to the touchpoints of the same user on the same item with
    time in ``[t - window, t]`` whose rec was served in ``[t - window, t + skew]`` (the served
    second is decoded from the rec id; ids the service did not make have no served time and are
    judged by the event time only).
Models
    ``last_click``: all credit to the latest touchpoint (ties in time: purchase > cart > click,
    then file order). ``linear``: equal credit to each distinct rec id among the touchpoints.
    Touchpoints from other experiments or from untagged recs compete for credit like any other.
Metrics per variant
    ``users`` (exposed: any event carrying one of the variant's rec ids, or a served-log entry),
    ``impressions`` and ``clicks`` (events with the variant's rec ids), ``ctr`` = clicks /
    impressions, ``add_to_carts``, ``purchases`` and ``revenue`` (credited; fractional for
    linear), ``converters`` (exposed users with a credited purchase), ``conversion_rate`` =
    converters / users, ``revenue_per_user`` = revenue / users.
Significance
    Every variant is compared with the control by a two-proportion z-test on user conversion
    (pooled standard error for the test, unpooled for the confidence interval of the difference),
    Bonferroni-corrected for the number of comparisons. A verdict needs at least 5 expected
    converters and 5 expected non-converters in each group; otherwise it is ``insufficient_data``.
    Revenue per user gets a Welch interval for information; the winner is decided on conversion.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from recsvc.core.contract import CART, CLICK, IMPRESSION, PURCHASE

ATTRIBUTION_MODELS: tuple[str, ...] = ("last_click", "linear")
DEFAULT_WINDOW_DAYS = 7.0
DEFAULT_ALPHA = 0.05
#: Allowed clock difference between the service (rec id time) and the storefront (event time).
DEFAULT_SKEW_S = 300
#: The z-test's normal approximation needs this many expected converters and non-converters per group.
MIN_EXPECTED = 5

_REC_ID_REGEX = (
    r"^(?:(?P<experiment>[A-Za-z0-9_-]{1,32})\.(?P<variant>[A-Za-z0-9_-]{1,32})\.)?"
    r"(?P<ts>[0-9a-z]{7})(?P<random>[a-z2-7]{16})$"
)
_DIGIT_VALUE = np.full(256, -1, dtype=np.int64)
for _value, _char in enumerate("0123456789abcdefghijklmnopqrstuvwxyz"):
    _DIGIT_VALUE[ord(_char)] = _value


class EventColumns(Protocol):
    """Anything shaped like ``training.events.EventTable`` (parallel arrays, one entry per event)."""

    user_id: np.ndarray
    item_id: np.ndarray
    event: np.ndarray
    timestamp: np.ndarray
    quantity: np.ndarray
    price: np.ndarray
    rec_id: np.ndarray


# --------------------------------------------------------------------------------------------
# Rec ids, vectorised
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRecIds:
    """Decoded rec ids: ``experiment``/``variant`` are ``""`` and ``served_at`` is -1 when unknown."""

    experiment: np.ndarray  # object
    variant: np.ndarray  # object
    served_at: np.ndarray  # int64


def parse_rec_ids(values: np.ndarray) -> ParsedRecIds:
    """Vectorised :func:`recsvc.analytics.recids.parse_rec_id` over an array of strings."""
    arr = pa.array(np.asarray(values, dtype=object), type=pa.string())
    found = pc.extract_regex(arr, _REC_ID_REGEX)
    n = len(arr)
    experiment = np.asarray(
        pc.fill_null(pc.struct_field(found, "experiment"), "").to_numpy(zero_copy_only=False), dtype=object
    )
    variant = np.asarray(
        pc.fill_null(pc.struct_field(found, "variant"), "").to_numpy(zero_copy_only=False), dtype=object
    )
    ts_text = pc.fill_null(pc.struct_field(found, "ts"), "")
    matched = np.asarray(pc.is_valid(found).to_numpy(zero_copy_only=False), dtype=bool)
    served_at = np.full(n, -1, dtype=np.int64)
    if matched.any():
        text = np.asarray(ts_text.to_numpy(zero_copy_only=False), dtype=object)[matched].astype("S7")
        digits = _DIGIT_VALUE[np.frombuffer(text.tobytes(), dtype=np.uint8).reshape(-1, 7)]
        served_at[matched] = digits @ (36 ** np.arange(6, -1, -1, dtype=np.int64))
    return ParsedRecIds(experiment, variant, served_at)


def _encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary encoding ``(codes int64, distinct values)`` of a string column."""
    encoded = pa.array(np.asarray(values, dtype=object), type=pa.string()).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)


# --------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credits:
    """Credit given to recs: ``row`` (conversion event row), ``rec`` (rec code), ``credit`` (0..1]."""

    row: np.ndarray
    rec: np.ndarray
    credit: np.ndarray


def attribute(
    user: np.ndarray,
    item: np.ndarray,
    event: np.ndarray,
    timestamp: np.ndarray,
    rec: np.ndarray,
    rec_served_at: np.ndarray,
    *,
    window_s: int,
    skew_s: int = DEFAULT_SKEW_S,
) -> dict[str, Credits]:
    """Credit every cart and purchase to the rec touchpoints before it (both models at once).

    Parameters
    ----------
    user, item : int arrays
        Codes of the user and item of each event (any integer encoding).
    event : int8 array
        :data:`recsvc.core.contract.EVENT_CODE` codes.
    timestamp : int64 array
        Unix seconds.
    rec : int array
        Code of each event's rec id; -1 when the event has none.
    rec_served_at : int64 array
        Served second of each rec code (-1: unknown).
    window_s : int
        Attribution window in seconds (>= 0).
    skew_s : int
        Tolerance for a rec id time later than the conversion (clock differences).

    Returns
    -------
    dict ``{"last_click": Credits, "linear": Credits}``
        Each conversion with at least one eligible touchpoint appears with credits summing to 1.
    """
    if window_s < 0:
        raise ValueError("window_s must be >= 0")
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    event, timestamp, rec = np.asarray(event), np.asarray(timestamp, np.int64), np.asarray(rec, np.int64)
    empty = Credits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    is_touch = (rec >= 0) & ((event == CLICK) | (event == CART) | (event == PURCHASE))
    conversions = np.flatnonzero((event == CART) | (event == PURCHASE))
    touches = np.flatnonzero(is_touch)
    if len(conversions) == 0 or len(touches) == 0:
        return {model: empty for model in ATTRIBUTION_MODELS}

    # (user, item) pairs that have touchpoints, densely numbered; conversions on other pairs
    # cannot be credited and drop out here.
    n_items = int(item.max()) + 1
    touch_pair_raw = user[touches] * n_items + item[touches]
    pairs, touch_pair = np.unique(touch_pair_raw, return_inverse=True)
    conv_pair_raw = user[conversions] * n_items + item[conversions]
    where = np.searchsorted(pairs, conv_pair_raw)
    known = (where < len(pairs)) & (pairs[np.minimum(where, len(pairs) - 1)] == conv_pair_raw)
    conversions, conv_pair = conversions[known], where[known]
    if len(conversions) == 0:
        return {model: empty for model in ATTRIBUTION_MODELS}

    # Sort touchpoints by (pair, time, purchase > cart > click, row) and search each conversion's
    # window in one composite int64 key: pair * span + (time - t0).
    priority = np.select([event[touches] == PURCHASE, event[touches] == CART], [2, 1], 0)
    order = np.lexsort((touches, priority, timestamp[touches], touch_pair))
    touches, touch_pair = touches[order], touch_pair[order]
    t0 = int(min(timestamp[touches].min(), timestamp[conversions].min()))
    span = int(max(timestamp[touches].max(), timestamp[conversions].max())) - t0 + 1
    if len(pairs) * span >= 2**62:
        raise ValueError("too many (user, item) pairs over too long a time span to attribute in one pass")
    keys = touch_pair * span + (timestamp[touches] - t0)
    t_conv = timestamp[conversions]
    lo = np.searchsorted(keys, conv_pair * span + np.maximum(t_conv - window_s - t0, 0), side="left")
    hi = np.searchsorted(keys, conv_pair * span + (t_conv - t0), side="right")
    counts = hi - lo
    conv_of = np.repeat(np.arange(len(conversions)), counts)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    touch_pos = starts + np.arange(len(conv_of))

    touch_rec = rec[touches[touch_pos]]
    served = np.asarray(rec_served_at, np.int64)[touch_rec]
    t_of = t_conv[conv_of]
    eligible = (served < 0) | ((served >= t_of - window_s) & (served <= t_of + skew_s))
    conv_of, touch_rec = conv_of[eligible], touch_rec[eligible]
    if len(conv_of) == 0:
        return {model: empty for model in ATTRIBUTION_MODELS}

    # last-click: the last eligible touchpoint of each conversion (they are in time order).
    last = np.r_[conv_of[1:] != conv_of[:-1], True]
    last_click = Credits(conversions[conv_of[last]], touch_rec[last], np.ones(int(last.sum())))

    # linear: equal shares over the distinct rec ids of each conversion.
    n_recs = int(touch_rec.max()) + 1
    distinct = np.unique(conv_of * n_recs + touch_rec)
    d_conv, d_rec = distinct // n_recs, distinct % n_recs
    per_conv = np.bincount(d_conv, minlength=len(conversions))
    linear = Credits(conversions[d_conv], d_rec, 1.0 / per_conv[d_conv])
    return {"last_click": last_click, "linear": linear}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProportionTest:
    """Two-proportion z-test of treatment vs control conversion.

    ``diff`` = treatment rate - control rate (absolute), with a ``confidence`` interval
    ``[ci_low, ci_high]``; ``relative_lift`` = diff / control rate (None when the control rate is 0).
    """

    control_rate: float
    treatment_rate: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    relative_lift: float | None
    z: float
    p_value: float
    significant: bool
    sufficient_data: bool


def two_proportion_ztest(
    control_successes: int,
    control_n: int,
    treatment_successes: int,
    treatment_n: int,
    alpha: float = DEFAULT_ALPHA,
) -> ProportionTest:
    """Two-sided two-proportion z-test with a ``1 - alpha`` interval on the difference.

    The test statistic uses the pooled standard error (the null hypothesis says the rates are
    equal); the interval uses the unpooled one. ``significant`` requires ``p < alpha`` *and* an
    interval that excludes 0, and enough data for the normal approximation (:data:`MIN_EXPECTED`
    expected converters and non-converters per group under the pooled rate).
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    for name, x, n in (
        ("control", control_successes, control_n),
        ("treatment", treatment_successes, treatment_n),
    ):
        if n < 0 or x < 0 or x > n:
            raise ValueError(f"{name}: need 0 <= successes <= n, got {x} of {n}")
    if control_n == 0 or treatment_n == 0:
        nan = float("nan")
        return ProportionTest(nan, nan, nan, nan, nan, 1 - alpha, None, nan, nan, False, False)
    p1, p2 = control_successes / control_n, treatment_successes / treatment_n
    diff = p2 - p1
    pooled = (control_successes + treatment_successes) / (control_n + treatment_n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / control_n + 1 / treatment_n))
    se = math.sqrt(p1 * (1 - p1) / control_n + p2 * (1 - p2) / treatment_n)
    z = diff / se_pooled if se_pooled > 0 else 0.0
    p_value = float(2 * stats.norm.sf(abs(z))) if se_pooled > 0 else 1.0
    z_crit = float(stats.norm.isf(alpha / 2))
    low, high = diff - z_crit * se, diff + z_crit * se
    sufficient = all(
        n * pooled >= MIN_EXPECTED and n * (1 - pooled) >= MIN_EXPECTED for n in (control_n, treatment_n)
    )
    significant = sufficient and p_value < alpha and (low > 0 or high < 0)
    return ProportionTest(
        control_rate=p1,
        treatment_rate=p2,
        diff=diff,
        ci_low=low,
        ci_high=high,
        confidence=1 - alpha,
        relative_lift=diff / p1 if p1 > 0 else None,
        z=z,
        p_value=p_value,
        significant=significant,
        sufficient_data=sufficient,
    )


@dataclass(frozen=True)
class MeanDifference:
    """Welch interval for a difference of means (revenue per user): informative, not a verdict."""

    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float


def welch_difference(
    control: np.ndarray, treatment: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> MeanDifference:
    """``mean(treatment) - mean(control)`` with a Welch ``1 - alpha`` interval and two-sided p-value."""
    control, treatment = np.asarray(control, np.float64), np.asarray(treatment, np.float64)
    nan = float("nan")
    if len(control) < 2 or len(treatment) < 2:
        return MeanDifference(nan, nan, nan, 1 - alpha, nan)
    diff = float(treatment.mean() - control.mean())
    v1, v2 = control.var(ddof=1) / len(control), treatment.var(ddof=1) / len(treatment)
    se = math.sqrt(v1 + v2)
    if se == 0:
        return MeanDifference(diff, diff, diff, 1 - alpha, 1.0 if diff == 0 else 0.0)
    df = (v1 + v2) ** 2 / (v1**2 / (len(control) - 1) + v2**2 / (len(treatment) - 1))
    t_crit = float(stats.t.isf(alpha / 2, df))
    p_value = float(2 * stats.t.sf(abs(diff / se), df))
    return MeanDifference(diff, diff - t_crit * se, diff + t_crit * se, 1 - alpha, p_value)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class VariantMetrics:
    variant: str
    users: int
    impressions: int
    clicks: int
    ctr: float | None
    add_to_carts: float
    purchases: float
    converters: int
    conversion_rate: float | None
    revenue: float
    revenue_per_user: float | None


@dataclass
class Comparison:
    variant: str
    control: str
    conversion: ProportionTest
    revenue_per_user: MeanDifference
    verdict: str  # better | worse | no_significant_difference | insufficient_data


@dataclass
class ModelResult:
    """Metrics, comparisons and winner under one attribution model."""

    variants: list[VariantMetrics]
    comparisons: list[Comparison]
    winner: str | None


@dataclass
class ExperimentReport:
    experiment: str
    control: str
    variants: list[str]
    window_days: float
    alpha: float
    alpha_per_comparison: float
    primary: str
    results: dict[str, ModelResult]
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def winner(self) -> str | None:
        """The winner under the primary attribution model (None: no winner can be declared)."""
        return self.results[self.primary].winner

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN and infinities become null)."""
        body = {
            "experiment": self.experiment,
            "control": self.control,
            "variants": self.variants,
            "window_days": self.window_days,
            "alpha": self.alpha,
            "alpha_per_comparison": self.alpha_per_comparison,
            "test": "two-proportion z-test on user conversion, Bonferroni-corrected",
            "primary_attribution": self.primary,
            "winner": self.winner,
            "attribution": {name: asdict(result) for name, result in self.results.items()},
            "data": self.data,
            "warnings": self.warnings,
        }
        return _json_safe(body)

    def format_table(self) -> str:
        """A plain-text report: one table per attribution model, then the comparisons."""
        lines = [
            f"Experiment {self.experiment}: window {self.window_days:g} days, control {self.control}, "
            f"alpha {self.alpha:g}"
            + (
                f" ({self.alpha_per_comparison:.4g} per comparison, Bonferroni)"
                if len(self.variants) > 2
                else ""
            ),
        ]
        if self.data.get("first_event"):
            lines.append(
                f"Events: {self.data.get('events', 0):,} from {self.data['first_event']} "
                f"to {self.data['last_event']}; "
                f"{self.data.get('experiment_rec_ids', 0):,} rec ids of this experiment"
            )
        header = (
            "variant",
            "users",
            "impressions",
            "clicks",
            "CTR",
            "carts",
            "purchases",
            "converters",
            "conv.rate",
            "revenue",
            "rev/user",
        )
        for model in ATTRIBUTION_MODELS:
            result = self.results[model]
            lines += [
                "",
                f"Attribution: {model.replace('_', '-')}" + ("  (primary)" if model == self.primary else ""),
            ]
            rows = [header] + [
                (
                    m.variant + (" *" if m.variant == self.control else ""),
                    f"{m.users:,}",
                    f"{m.impressions:,}",
                    f"{m.clicks:,}",
                    _pct(m.ctr),
                    _num(m.add_to_carts),
                    _num(m.purchases),
                    f"{m.converters:,}",
                    _pct(m.conversion_rate),
                    f"{m.revenue:,.2f}",
                    "-" if m.revenue_per_user is None else f"{m.revenue_per_user:,.2f}",
                )
                for m in result.variants
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            for r in rows:
                lines.append(
                    "  ".join(
                        c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))
                    )
                )
            for c in result.comparisons:
                t = c.conversion
                level = (
                    f"{t.confidence:.0%}"
                    if t.confidence * 100 == round(t.confidence * 100)
                    else f"{t.confidence:.2%}"
                )
                if not t.sufficient_data:
                    lines.append(
                        f"  {c.variant} vs {c.control}: not enough data for a verdict (need >= "
                        f"{MIN_EXPECTED} expected converters and non-converters per group)"
                    )
                    continue
                rel = "" if t.relative_lift is None else f", {t.relative_lift:+.1%} relative"
                lines.append(
                    f"  {c.variant} vs {c.control}: conversion {t.diff * 100:+.2f} pp "
                    f"[{level} CI {t.ci_low * 100:+.2f}, {t.ci_high * 100:+.2f}]{rel}, "
                    f"z = {t.z:.2f}, p = {t.p_value:.3g} -> {c.verdict.replace('_', ' ')}"
                )
                rev = c.revenue_per_user
                if not math.isnan(rev.diff):
                    lines.append(
                        f"  {' ' * len(c.variant)}    revenue/user {rev.diff:+,.3f} "
                        f"[{level} CI {rev.ci_low:+,.3f}, {rev.ci_high:+,.3f}], p = {rev.p_value:.3g}"
                    )
            no_winner = "none (no variant is significantly better; do not roll out on this data)"
            lines.append(f"  winner: {result.winner or no_winner}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _iso(seconds: int) -> str:
    return _dt.datetime.fromtimestamp(int(seconds), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    events: EventColumns,
    experiment: str,
    *,
    variants: Sequence[str] | None = None,
    control: str | None = None,
    window_days: float = DEFAULT_WINDOW_DAYS,
    alpha: float = DEFAULT_ALPHA,
    primary: str = "last_click",
    served: Mapping[str, np.ndarray] | None = None,
    start: int | None = None,
    end: int | None = None,
    catalog_prices: Mapping[str, float] | None = None,
    skew_s: int = DEFAULT_SKEW_S,
) -> ExperimentReport:
    """Attribute ``events`` and compare the variants of ``experiment``.

    Parameters
    ----------
    events : EventTable-like
        All events to consider (every experiment's and untagged ones: they compete for credit).
    experiment : str
        The experiment name as encoded in rec ids.
    variants : sequence of str, optional
        Variant names in display order (from the definition). Default: the variants seen in the
        data, sorted. Variants in the data but not listed are added (and warned about).
    control : str, optional
        The variant the others are compared with. Default: the first of ``variants``.
    window_days : float
        Attribution window (default 7).
    alpha : float
        Overall significance level; each of the ``k - 1`` comparisons uses ``alpha / (k - 1)``.
    primary : str
        ``last_click`` or ``linear``: the model whose winner is the report's winner.
    served : mapping with ``user_id`` and ``rec_id`` arrays, optional
        Server-side log of served answers; adds exposed users who produced no event.
    start, end : int, optional
        Unix seconds: rec ids of this experiment served outside ``[start, end)`` are ignored.
    catalog_prices : mapping item_id -> price, optional
        Price for purchases that carry none (otherwise they add 0 revenue and are counted).
    skew_s : int
        See :func:`attribute`.

    Returns
    -------
    ExperimentReport
    """
    if primary not in ATTRIBUTION_MODELS:
        raise ValueError(f"primary must be one of {', '.join(ATTRIBUTION_MODELS)}")
    if not (math.isfinite(window_days) and window_days >= 0):
        raise ValueError("window_days must be a number >= 0")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    window_s = int(round(window_days * 86400))
    warnings: list[str] = []
    n = len(events.user_id)
    event = np.asarray(events.event)
    timestamp = np.asarray(events.timestamp, np.int64)

    user_codes, user_values = _encode(events.user_id)
    item_codes, item_values = _encode(events.item_id)
    rec_values_all = np.asarray(events.rec_id, dtype=object)
    has_rec = rec_values_all != ""
    rec = np.full(n, -1, dtype=np.int64)
    rec_codes, rec_values = _encode(rec_values_all[has_rec])
    rec[has_rec] = rec_codes
    parsed = parse_rec_ids(rec_values)

    # Which variant (index into `names`) each rec code belongs to, -1 for other experiments.
    in_experiment = parsed.experiment == experiment
    if start is not None or end is not None:
        known_time = parsed.served_at >= 0
        outside = known_time & (
            (parsed.served_at < (start if start is not None else -1))
            | (parsed.served_at >= (end if end is not None else 2**62))
        )
        if (in_experiment & outside).any():
            warnings.append(
                f"{int((in_experiment & outside).sum()):,} rec ids of {experiment} were served outside "
                "the experiment's start/end and are ignored"
            )
        in_experiment &= ~outside
    seen_variants = sorted(set(parsed.variant[in_experiment].tolist()))
    served_parsed = None
    if served is not None and len(served.get("rec_id", ())):
        served_parsed = parse_rec_ids(np.asarray(served["rec_id"], dtype=object))
        served_in = served_parsed.experiment == experiment
        seen_variants = sorted(set(seen_variants) | set(served_parsed.variant[served_in].tolist()))
    names = list(variants) if variants else list(seen_variants)
    extra = [v for v in seen_variants if v not in names]
    if extra and variants:
        warnings.append(f"rec ids name variants not in the definition: {', '.join(extra)} (reported too)")
    names += extra
    if not names:
        raise ValueError(f"experiment {experiment!r}: no variants given and no rec id of it in the data")
    control = control or names[0]
    if control not in names:
        raise ValueError(f"control {control!r} is not a variant of {experiment!r} ({', '.join(names)})")
    index_of = {name: i for i, name in enumerate(names)}
    rec_variant = np.array([index_of.get(v, -1) for v in parsed.variant], dtype=np.int64)
    rec_variant[~in_experiment] = -1
    row_variant = np.full(n, -1, dtype=np.int64)
    row_variant[has_rec] = rec_variant[rec_codes]

    # Revenue of each row (purchases only); missing prices from the catalog, else 0 (counted).
    price = np.asarray(events.price, np.float64).copy()
    quantity = np.asarray(events.quantity, np.float64)
    missing = (event == PURCHASE) & np.isnan(price)
    if catalog_prices and missing.any():
        lookup = np.array([catalog_prices.get(v, np.nan) for v in item_values], dtype=np.float64)
        price[missing] = lookup[item_codes[missing]]
        missing = (event == PURCHASE) & np.isnan(price)
    revenue_of_row = np.where(event == PURCHASE, np.nan_to_num(price, nan=0.0) * quantity, 0.0)

    # Exposure: users per variant (events carrying the variant's rec ids, plus the served log).
    served_variant = served_codes = None
    if served_parsed is not None:
        served_variant = np.array([index_of.get(v, -1) for v in served_parsed.variant], dtype=np.int64)
        served_variant[served_parsed.experiment != experiment] = -1
        if start is not None:
            served_variant[(served_parsed.served_at >= 0) & (served_parsed.served_at < start)] = -1
        if end is not None:
            served_variant[served_parsed.served_at >= end] = -1
        assert served is not None  # served_parsed comes from it
        # Served users may have no event at all: extend the user dictionary for them.
        user_index = {u: i for i, u in enumerate(user_values.tolist())}
        extra_users: dict[str, int] = {}
        served_codes = np.empty(len(served_variant), dtype=np.int64)
        for i, u in enumerate(np.asarray(served["user_id"], dtype=object).tolist()):
            code = user_index.get(u)
            if code is None:
                code = extra_users.setdefault(u, len(user_values) + len(extra_users))
            served_codes[i] = code
        if extra_users:
            user_values = np.concatenate([user_values, np.array(list(extra_users), dtype=object)])
    n_users_total = len(user_values)
    exposure_pairs = [row_variant[row_variant >= 0] * n_users_total + user_codes[row_variant >= 0]]
    if served_variant is not None:
        assert served_codes is not None  # set together with served_variant
        keep = served_variant >= 0
        exposure_pairs.append(served_variant[keep] * n_users_total + served_codes[keep])
    exposed = np.unique(np.concatenate(exposure_pairs))
    exposed_variant, exposed_user = exposed // n_users_total, exposed % n_users_total
    users_per_variant = np.bincount(exposed_variant, minlength=len(names))
    several = np.bincount(exposed_user, minlength=n_users_total)
    n_several = int((several > 1).sum())
    if n_several:
        warnings.append(
            f"{n_several:,} users were exposed to more than one variant (shares changed, or ids shared); "
            "they count in each"
        )

    impressions = np.bincount(row_variant[(row_variant >= 0) & (event == IMPRESSION)], minlength=len(names))
    clicks = np.bincount(row_variant[(row_variant >= 0) & (event == CLICK)], minlength=len(names))
    credits = attribute(
        user_codes, item_codes, event, timestamp, rec, parsed.served_at, window_s=window_s, skew_s=skew_s
    )
    alpha_each = alpha / max(len(names) - 1, 1)
    results: dict[str, ModelResult] = {}
    for model, credit in credits.items():
        variant_of_credit = rec_variant[credit.rec]
        mine = variant_of_credit >= 0
        v, rows, share = variant_of_credit[mine], credit.row[mine], credit.credit[mine]
        is_cart, is_purchase = event[rows] == CART, event[rows] == PURCHASE
        carts = np.bincount(v[is_cart], weights=share[is_cart], minlength=len(names))
        purchases = np.bincount(v[is_purchase], weights=share[is_purchase], minlength=len(names))
        revenue = np.bincount(
            v[is_purchase],
            weights=share[is_purchase] * revenue_of_row[rows[is_purchase]],
            minlength=len(names),
        )
        converter_keys = np.unique(v[is_purchase] * n_users_total + user_codes[rows[is_purchase]])
        converters = np.bincount(converter_keys // n_users_total, minlength=len(names))
        # Per-user revenue over exposed users (a converter is always exposed: its touchpoint
        # event carries the variant's rec id), for the Welch interval on revenue per user.
        slot = np.searchsorted(exposed, v[is_purchase] * n_users_total + user_codes[rows[is_purchase]])
        user_revenue = np.bincount(
            slot, weights=share[is_purchase] * revenue_of_row[rows[is_purchase]], minlength=len(exposed)
        )
        per_user = {i: user_revenue[exposed_variant == i] for i in range(len(names))}
        metrics = [
            VariantMetrics(
                variant=name,
                users=int(users_per_variant[i]),
                impressions=int(impressions[i]),
                clicks=int(clicks[i]),
                ctr=float(clicks[i] / impressions[i]) if impressions[i] else None,
                add_to_carts=round(float(carts[i]), 6),
                purchases=round(float(purchases[i]), 6),
                converters=int(converters[i]),
                conversion_rate=float(converters[i] / users_per_variant[i]) if users_per_variant[i] else None,
                revenue=round(float(revenue[i]), 6),
                revenue_per_user=float(revenue[i] / users_per_variant[i]) if users_per_variant[i] else None,
            )
            for i, name in enumerate(names)
        ]
        c = index_of[control]
        comparisons = []
        for i, name in enumerate(names):
            if i == c:
                continue
            test = two_proportion_ztest(
                int(converters[c]),
                int(users_per_variant[c]),
                int(converters[i]),
                int(users_per_variant[i]),
                alpha_each,
            )
            if not test.sufficient_data:
                verdict = "insufficient_data"
            elif test.significant:
                verdict = "better" if test.diff > 0 else "worse"
            else:
                verdict = "no_significant_difference"
            comparisons.append(
                Comparison(
                    name, control, test, welch_difference(per_user[c], per_user[i], alpha_each), verdict
                )
            )
        results[model] = ModelResult(metrics, comparisons, _winner(comparisons, control))

    data: dict[str, Any] = {
        "events": int(n),
        "events_with_rec_id": int(has_rec.sum()),
        "experiment_rec_ids": int(in_experiment.sum()),
        "served_entries": 0 if served is None else len(served.get("rec_id", ())),
        "users_in_several_variants": n_several,
        "purchases_without_price": int(missing.sum()),
        "first_event": _iso(timestamp.min()) if n else None,
        "last_event": _iso(timestamp.max()) if n else None,
    }
    if int(missing.sum()):
        warnings.append(
            f"{int(missing.sum()):,} purchases have no price (and none in a catalog): they add 0 revenue"
        )
    if int(users_per_variant.sum()) == 0:
        warnings.append(f"no exposure found for {experiment}: no event carries one of its rec ids")
    return ExperimentReport(
        experiment=experiment,
        control=control,
        variants=names,
        window_days=window_days,
        alpha=alpha,
        alpha_per_comparison=alpha_each,
        primary=primary,
        results=results,
        data=data,
        warnings=warnings,
    )


def _winner(comparisons: Sequence[Comparison], control: str) -> str | None:
    """The best variant significantly better than control; control when every other is significantly worse."""
    better = [c for c in comparisons if c.verdict == "better"]
    if better:
        return max(better, key=lambda c: c.conversion.diff).variant
    if comparisons and all(c.verdict == "worse" for c in comparisons):
        return control
    return None
