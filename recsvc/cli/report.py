"""``recsvc report``: the A/B attribution report of one experiment, as a table or JSON.

The numbers come from :mod:`recsvc.analytics.attribution`; this module gathers the inputs: events files
(``--events``, CSV or Parquet per the events contract), optionally the live Redis event stream and
the server-side served log, the experiment's definition (experiments file or Redis) and an
optional catalog for purchases without a price. ``GET /v1/admin/experiments/<name>/report`` uses
the same functions.

Exit codes: 0 report printed; 1 internal error (e.g. Redis unreachable when asked to read it);
2 bad input (an unusable events/catalog/experiments file -- the message names file, line and
column --, a bad option, or an experiment with neither a definition nor any rec id in the data).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import numpy as np

from recsvc.analytics import experiments as ex
from recsvc.analytics.registry import read_served
from recsvc.analytics.report import combine_events, find_definition, make_report
from recsvc.core.config import Config
from recsvc.core.eventfiles import BadInputError, load_catalog, load_events
from recsvc.storage.embedded import redis_if_available
from recsvc.storage.stream import DEFAULT_STREAM_LIMIT, read_stream_events

log = logging.getLogger(__name__)

EXIT_ERROR, EXIT_BAD_INPUT = 1, 2
MAX_STREAM_LIMIT = 10_000_000


class BadInput(click.ClickException):
    """Bad input: exit code 2, message on stderr, nothing printed on stdout."""

    exit_code = EXIT_BAD_INPUT


class InternalError(click.ClickException):
    exit_code = EXIT_ERROR


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@click.command("report")
@click.option(
    "--experiment", "name", required=True, help="Experiment name (as in its definition and rec ids)."
)
@click.option(
    "--events",
    "event_paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Events file (CSV or Parquet; repeatable): storefront events with rec_id, stream dumps.",
)
@click.option(
    "--window-days",
    default=7.0,
    show_default=True,
    type=click.FloatRange(0, 365),
    help="Attribution window: a conversion counts for recs served and clicked at most this long before it.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output.",
)
@click.option(
    "--attribution",
    type=click.Choice(["last_click", "linear"]),
    default="last_click",
    show_default=True,
    help="Model whose verdict is the report's winner (both are always shown).",
)
@click.option(
    "--alpha",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 0.5, min_open=True),
    help="Significance level (split over comparisons with Bonferroni when there are 3+ variants).",
)
@click.option("--control", default=None, help="Control variant (default: the definition's, else the first).")
@click.option(
    "--catalog",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Catalog file: prices for purchases that carry none.",
)
@click.option(
    "--experiments-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Definitions file (default: RECSVC_EXPERIMENTS_FILE). Redis is also searched when reachable.",
)
@click.option(
    "--include-stream", is_flag=True, help="Also read the live Redis event stream (not yet dumped)."
)
@click.option("--include-served", is_flag=True, help="Also count exposure from the server-side served log.")
@click.option(
    "--stream-limit",
    default=DEFAULT_STREAM_LIMIT,
    show_default=True,
    type=click.IntRange(1, MAX_STREAM_LIMIT),
    help="Newest stream / served-log entries read at most.",
)
@click.option(
    "--max-bad-fraction",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Largest share of invalid rows tolerated in the events files.",
)
def report(
    name: str,
    event_paths: tuple[Path, ...],
    window_days: float,
    fmt: str,
    attribution: str,
    alpha: float,
    control: str | None,
    catalog: Path | None,
    experiments_file: Path | None,
    include_stream: bool,
    include_served: bool,
    stream_limit: int,
    max_bad_fraction: float,
) -> None:
    """A/B experiment attribution report.

    Per variant: users, impressions, clicks, CTR, add-to-carts, purchases, converters, conversion
    rate, revenue and revenue per user, under last-click and linear attribution; each variant is
    compared with the control by a two-proportion z-test on user conversion, and a winner is named
    only when the difference is significant.
    """

    if not ex.NAME_PATTERN.fullmatch(name):
        raise BadInput(f"--experiment: {name!r} is not 1-32 characters of [A-Za-z0-9_-]")
    if not event_paths and not include_stream:
        raise BadInput("give at least one --events file, or --include-stream")
    config = Config.from_env()
    experiments_file = experiments_file or config.experiments.file
    client = None
    try:
        client = redis_if_available(config)
    except Exception as e:  # noqa: BLE001 - optional here; required only with --include-*
        log.warning("Redis not usable (%s)", type(e).__name__)
    if (include_stream or include_served) and client is None:
        raise InternalError(
            "--include-stream/--include-served need Redis: set REDIS_URL or start the service"
        )

    try:
        definition, source = find_definition(name, experiments_file, client)
    except ex.ExperimentFileError as e:
        raise BadInput(str(e)) from None
    except Exception as e:  # noqa: BLE001 - Redis trouble while looking up: report without it
        log.warning("could not read definitions from Redis (%s)", type(e).__name__)
        definition, source = None, None

    parts: list[Any] = []
    try:
        if event_paths:
            table, load_report = load_events(list(event_paths), max_bad_fraction=max_bad_fraction)
            if load_report.rows_rejected:
                click.echo(load_report.format(), err=True)
            parts.append(table)
        prices = None
        if catalog is not None:
            cat, _ = load_catalog(catalog)
            prices = {i: float(p) for i, p in zip(cat.item_id, cat.price, strict=True) if np.isfinite(p)}
    except BadInputError as e:
        raise BadInput(str(e)) from None

    served = None
    try:
        if include_stream:
            stream, skipped = read_stream_events(client, config.events.stream, stream_limit)
            if skipped:
                click.echo(f"warning: {skipped} invalid stream entries skipped", err=True)
            parts.append(stream)
        if include_served:
            served = read_served(client, name, limit=stream_limit)
    except Exception as e:  # noqa: BLE001
        raise InternalError(f"reading Redis failed: {type(e).__name__}: {e}") from None
    events = combine_events(parts)

    try:
        result = make_report(
            events,
            name,
            definition,
            window_days=window_days,
            alpha=alpha,
            attribution=attribution,
            control=control,
            served=served,
            catalog_prices=prices,
        )
    except ValueError as e:
        raise BadInput(str(e)) from None
    if definition is None:
        result.warnings.append(
            f"no definition of {name} found (experiments file or Redis): variants come from the rec ids"
        )
    if fmt == "json":
        body = result.to_dict()
        body["definition_source"] = source
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(result.format_table())
