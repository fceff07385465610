"""Gather the inputs of an A/B attribution report: events from files and the stream, definitions.

The numbers come from :mod:`recsvc.analytics.attribution`; ``recsvc report`` and
``GET /v1/admin/experiments/<name>/report`` both build their report with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from recsvc.analytics import experiments as ex
from recsvc.analytics import registry
from recsvc.analytics.attribution import build_report
from recsvc.core.events import EventTable, duplicate_mask


def combine_events(parts: Sequence[Any]) -> Any:
    """Concatenate event tables (files, stream) and drop rows repeated exactly across them.

    A dump that crashed after writing its file but before deleting the entries leaves the same
    events in a file and in the stream; counting them twice would inflate every metric.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return EventTable(
            user_id=np.zeros(0, object), item_id=np.zeros(0, object), event=np.zeros(0, np.int8),
            timestamp=np.zeros(0, np.int64),
        )  # fmt: skip
    fields = ("user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id")
    columns: dict[str, Any] = {f: np.concatenate([np.asarray(getattr(p, f)) for p in parts]) for f in fields}
    table = EventTable(**columns)
    if len(parts) == 1:
        return table
    keys = [
        table.codes("user_id")[0].astype(np.int64),
        table.codes("item_id")[0].astype(np.int64),
        table.timestamp,
        table.event.astype(np.int64),
        table.codes("rec_id")[0].astype(np.int64),
        table.codes("order_id")[0].astype(np.int64),
        np.asarray(table.price, np.float32).view(np.int32).astype(np.int64),
        np.asarray(table.quantity, np.float32).view(np.int32).astype(np.int64),
    ]
    dup = duplicate_mask(keys)
    return table.take(~dup) if dup.any() else table


def find_definition(
    name: str, experiments_file: Path | None, client: Any | None
) -> tuple[Any | None, str | None]:
    """The experiment's definition and where it came from (``file``/``redis``), or (None, None)."""
    if experiments_file is not None:
        for experiment in ex.load_experiments_file(experiments_file):
            if experiment.name == name:
                return experiment, "file"
    if client is not None:
        stored = registry.load_stored_experiments(client)
        if name in stored:
            return stored[name], "redis"
    return None, None


def make_report(
    events: Any,
    name: str,
    definition: Any | None,
    *,
    window_days: float,
    alpha: float,
    attribution: str,
    control: str | None = None,
    served: dict[str, np.ndarray] | None = None,
    catalog_prices: dict[str, float] | None = None,
) -> Any:
    """Build the report for ``name`` using the definition's variants, control and start/end when known."""
    return build_report(
        events,
        name,
        variants=[v.name for v in definition.variants] if definition is not None else None,
        control=control or (definition.control if definition is not None else None),
        window_days=window_days,
        alpha=alpha,
        primary=attribution,
        served=served,
        start=definition.start if definition is not None else None,
        end=definition.end if definition is not None else None,
        catalog_prices=catalog_prices,
    )


def rate_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a rate (``successes`` out of ``trials``); None without trials.

    Used to draw each variant's conversion rate with its interval: unlike the normal
    approximation it stays inside [0, 1] and is sensible for small counts and rates near 0.
    """
    if trials <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict_sentences(report: Any) -> list[str]:
    """The report's verdict in words, one sentence per variant compared with the control.

    ``report`` is an :class:`~recsvc.analytics.attribution.ExperimentReport`; the sentences use
    its primary attribution model's comparisons (conversion z-test, Bonferroni-corrected).
    """
    result = report.results[report.primary]
    out = []
    for c in result.comparisons:
        test = c.conversion
        level = f"{test.confidence:.0%}"
        interval = (
            f"{100 * test.diff:+.2f} points ({level} interval "
            f"{100 * test.ci_low:+.2f} to {100 * test.ci_high:+.2f})"
        )
        if c.verdict == "better":
            out.append(f"{c.variant} converts better than {c.control}: {interval}, p = {test.p_value:.3g}.")
        elif c.verdict == "worse":
            out.append(f"{c.variant} converts worse than {c.control}: {interval}, p = {test.p_value:.3g}.")
        elif c.verdict == "insufficient_data":
            out.append(f"Not enough data yet to compare {c.variant} with {c.control}.")
        else:
            out.append(
                f"No significant difference between {c.variant} and {c.control} yet: {interval}, "
                f"p = {test.p_value:.3g}."
            )
    if report.winner:
        out.append(f"Winner under {report.primary.replace('_', '-')} attribution: {report.winner}.")
    elif out:
        out.append("No winner yet.")
    return out
