"""`recsvc segments`: customer segment sizes (RFM), and the threshold options export shares."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import click

from recsvc.core.contract import parse_timestamp
from recsvc.core.eventfiles import BadInputError
from training.segments import (
    SegmentThresholds,
    catalog_price_map,
    compute_segments,
    format_sizes,
    load_inputs,
)


def threshold_options(func):
    """The ``--new-days/--dormant-days/--high-value-quantile`` options shared with ``export``."""
    func = click.option(
        "--high-value-quantile",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=SegmentThresholds.high_value_quantile,
        show_default=True,
        envvar="RECSVC_SEGMENT_HIGH_VALUE_QUANTILE",
        help="high_value = monetary at or above this quantile of purchasing users.",
    )(func)
    func = click.option(
        "--dormant-days",
        type=click.FloatRange(0, min_open=True),
        default=SegmentThresholds.dormant_days,
        show_default=True,
        envvar="RECSVC_SEGMENT_DORMANT_DAYS",
        help="dormant = last purchase more than this many days before --as-of.",
    )(func)
    func = click.option(
        "--new-days",
        type=click.FloatRange(0),
        default=SegmentThresholds.new_days,
        show_default=True,
        envvar="RECSVC_SEGMENT_NEW_DAYS",
        help="new = no purchase, or first purchase within this many days of --as-of.",
    )(func)
    func = click.option(
        "--as-of",
        "as_of",
        default=None,
        metavar="DATE",
        help="Segment as of this ISO date/time or unix second (default: the newest event).",
    )(func)
    return func


@click.command("segments")
@click.option(
    "--events",
    "event_paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Events file(s), CSV or Parquet, or a folder of them (repeatable).",
)
@click.option(
    "--catalog",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Catalog for missing prices.",
)
@threshold_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def segments(event_paths, catalog, as_of, new_days, dormant_days, high_value_quantile, as_json) -> None:
    """Print customer segment sizes (RFM: new, active, high_value, dormant, all)."""
    thresholds = SegmentThresholds(new_days, dormant_days, high_value_quantile)
    as_of_ts = parse_as_of(as_of)

    try:
        table, _report, catalog_obj = load_inputs(event_paths, catalog)
    except BadInputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    result = compute_segments(table, as_of_ts, thresholds, catalog_price_map(catalog_obj))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "as_of": result.as_of,
                    "sizes": result.sizes(),
                    "thresholds": asdict(thresholds),
                    "high_value_threshold": None
                    if math.isinf(result.high_value_threshold)
                    else result.high_value_threshold,
                    "monetary_unit": result.monetary_unit,
                }
            )
        )
    else:
        click.echo(format_sizes(result))


def parse_as_of(value: str | None) -> int | None:
    """``--as-of`` accepts ISO-8601 (date or datetime, naive = UTC) or unix seconds."""
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except (ValueError, TypeError, OverflowError):
        raise click.BadParameter(
            f"{value!r} is not an ISO-8601 date/time or a Unix time after 1970 and before 2100",
            param_hint="--as-of",
        ) from None
