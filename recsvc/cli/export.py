"""`recsvc export`: top-N picks per user of a segment for email campaigns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from recsvc.cli.segments import parse_as_of, threshold_options
from recsvc.core.artifact import ArtifactError, read_artifact
from recsvc.core.config import Config
from recsvc.core.errors import ExitCode
from recsvc.core.eventfiles import BadInputError
from recsvc.core.progress import configure as configure_progress
from recsvc.core.progress import mode_for
from training.export import (
    FORMATS,
    MAX_CAP_LAST,
    MAX_MEMORY_MB,
    MAX_N,
    MAX_THREADS,
    MIN_MEMORY_MB,
    ExportInputError,
    ExportLedger,
    ExportLocked,
    ExportOptions,
    previous_artifacts,
    resolve_model,
    run_export,
)
from training.export.due import SEGMENT as DUE_SEGMENT
from training.export.due import DueExportOptions, run_due_export
from training.segments import (
    SEGMENT_CHOICES,
    SegmentThresholds,
    catalog_price_map,
    load_inputs,
)


def _format_for(out: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"


@click.command("export")
@click.option(
    "--segment",
    required=True,
    type=click.Choice((*SEGMENT_CHOICES, DUE_SEGMENT)),
    help=f"Who to export ({DUE_SEGMENT}: customers with an item due within --horizon-days).",
)
@click.option(
    "--events",
    "event_paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="Event history: CSV/Parquet files or folders of them (repeatable): segments, visits, purchases.",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Output file (written atomically)."
)
@click.option("--n", "n", type=click.IntRange(1, MAX_N), default=8, show_default=True, help="Picks per user.")
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Default: from --out's suffix."
)
@click.option("--with-bundles", is_flag=True, help="Add bundle_item_ids and bundle_price to every row.")
@click.option(
    "--model",
    "model_ref",
    default="live",
    show_default=True,
    help="live (the version Redis serves), latest, a version name, or a model folder.",
)
@click.option(
    "--catalog",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Current catalogue: fresher stock, prices and titles than the model's.",
)
@click.option(
    "--cap-last",
    type=click.IntRange(0, MAX_CAP_LAST),
    default=2,
    show_default=True,
    help="Never resend an item sent to the user in any of the last K exports (0 = no cap).",
)
@click.option(
    "--winback-slots",
    type=click.IntRange(0, MAX_N),
    default=None,
    help="Most win-back picks per dormant user [default: half of --n, rounded up].",
)
@click.option(
    "--memory-mb",
    type=click.IntRange(MIN_MEMORY_MB, MAX_MEMORY_MB),
    default=256,
    show_default=True,
    help="Working-set budget for ranking, shared by the --threads chunks in flight (sets the chunk size).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    default=None,
    help="Chunks ranked in parallel [default: CPU cores, at most 8].",
)
@click.option(
    "--horizon-days",
    type=click.FloatRange(0, 3650, min_open=True),
    default=None,
    help=f"{DUE_SEGMENT}: items due within this many days [default: RECSVC_REPURCHASE_HORIZON_DAYS].",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Write the file but do not record it in the cap ledger (later exports may send the same items).",
)
@threshold_options
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar; without either, a bar on a terminal and a log line every few seconds otherwise.",
)
def export(
    segment,
    event_paths,
    out,
    n,
    fmt,
    with_bundles,
    model_ref,
    catalog,
    cap_last,
    winback_slots,
    memory_mb,
    threads,
    horizon_days,
    dry_run,
    as_of,
    new_days,
    dormant_days,
    high_value_quantile,
    progress,
) -> None:
    """Export top-N picks per user of a segment, ready for an email template.

    ``--segment due_for_reorder``: replenishment reminders, the items each customer is due to buy
    again. Prints one JSON summary line on stdout. Exit codes: 0 written, 2 bad input, 4 another
    export is running, 1 internal error.
    """
    configure_progress(mode_for(progress))

    config = Config.from_env()
    out_path = Path(out)
    fmt = _format_for(out_path, fmt)
    if winback_slots is not None and winback_slots > n:
        raise click.BadParameter(f"must be at most --n ({n})", param_hint="--winback-slots")
    thresholds = SegmentThresholds(new_days, dormant_days, high_value_quantile)
    as_of_ts = parse_as_of(as_of)
    ledger = ExportLedger(Path(config.var_dir) / "exports")
    try:
        with ledger.lock():
            model_path = resolve_model(config, model_ref)
            artifact = read_artifact(model_path)
            table, _report, catalog_obj = load_inputs(event_paths, catalog)
            if segment == DUE_SEGMENT:
                summary = run_due_export(
                    artifact,
                    table,
                    out_path,
                    DueExportOptions(
                        n=n,
                        fmt=fmt,
                        as_of=as_of_ts,
                        horizon_days=horizon_days,
                        cap_last=cap_last,
                        dry_run=dry_run,
                    ),
                    catalog=catalog_obj,
                    ledger=ledger,
                    config=config,
                )
            else:
                summary = run_export(
                    artifact,
                    table,
                    out_path,
                    ExportOptions(
                        segment=segment,
                        n=n,
                        fmt=fmt,
                        with_bundles=with_bundles,
                        thresholds=thresholds,
                        as_of=as_of_ts,
                        cap_last=cap_last,
                        memory_mb=memory_mb,
                        winback_slots=winback_slots,
                        progress=progress,
                        threads=threads,
                        dry_run=dry_run,
                    ),
                    catalog=catalog_obj,
                    previous=previous_artifacts(
                        Path(config.models_dir), model_path, config.serving.keep_versions
                    ),
                    ledger=ledger,
                    config=config,
                    catalog_prices=catalog_price_map(catalog_obj),
                )
    except ExportLocked as e:
        click.echo(f"error: {e}", err=True)
        click.echo(json.dumps({"status": "locked", "error": str(e)}))
        sys.exit(ExitCode.LOCKED)
    except (ExportInputError, ArtifactError, BadInputError) as e:
        click.echo(f"error: {e}", err=True)
        click.echo(json.dumps({"status": "bad_input", "error": str(e)}))
        sys.exit(ExitCode.BAD_INPUT)
    except Exception as e:  # noqa: BLE001 - the scheduler gets a code and a JSON line, stderr the trace
        import traceback

        click.echo(f"internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}", err=True)
        click.echo(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}"}))
        sys.exit(ExitCode.FAILED)
    click.echo(
        f"exported {summary.rows:,} rows for {summary.users:,} {segment} users to {summary.out} "
        f"in {summary.seconds:.1f}s ({summary.users_per_s:,.0f} users/s)",
        err=True,
    )
    click.echo(summary.to_json())
