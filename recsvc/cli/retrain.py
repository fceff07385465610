"""`recsvc retrain`: the nightly job (dump, train, evaluate, gate, publish, prune)."""

from __future__ import annotations

import logging

import click

from recsvc.core.config import Config
from recsvc.core.errors import ExitCode
from training.als import TrainParams
from training.retrain import (
    MAX_KEEP,
    MAX_LOCK_TTL_S,
    MAX_TOLERANCE,
    MIN_LOCK_TTL_S,
    RetrainSummary,
    run_retrain,
)

log = logging.getLogger(__name__)


@click.command("retrain")
@click.option(
    "--events",
    "event_paths",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Event files to train on, or folders of them (repeatable; e.g. the --dump-stream folder).",
)
@click.option("--catalog", type=click.Path(dir_okay=False), default=None, help="Catalog file.")
@click.option(
    "--dump-stream", is_flag=True, help="First dump the real-time event stream and train on it too."
)
@click.option(
    "--gate-tolerance",
    type=click.FloatRange(0, MAX_TOLERANCE),
    default=0.02,
    show_default=True,
    help="Relative: publish only if new nDCG@10 >= live nDCG@10 * (1 - tolerance) and beats popularity.",
)
@click.option(
    "--force", is_flag=True, help="Publish even if the gate refuses (logged, recorded in the manifest)."
)
@click.option(
    "--keep",
    type=click.IntRange(1, MAX_KEEP),
    default=None,
    help="Model folders kept on disk [default: max(RECSVC_KEEP_VERSIONS, 3)]; live/previous never pruned.",
)
@click.option(
    "--lock-ttl",
    "lock_ttl_s",
    type=click.IntRange(MIN_LOCK_TTL_S, MAX_LOCK_TTL_S),
    default=300,
    show_default=True,
    help="Lock expiry in seconds (renewed while running; frees itself this long after a crash).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file of training parameters (as for `recsvc train`) [default: the live model's parameters].",
)
def retrain(event_paths, catalog, dump_stream, gate_tolerance, force, keep, lock_ttl_s, config_path) -> None:
    """Nightly job: dump, train, evaluate, gate, publish, prune.

    Prints one JSON line on stdout. Exit codes: 0 published, 1 internal error, 2 bad input,
    3 gate refused, 4 another run holds the lock.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = None
    if config_path:
        try:
            params = TrainParams.from_toml(config_path)
        except ValueError as e:
            log.error("bad input: %s", e)
            click.echo(
                RetrainSummary(status="bad_input", exit_code=int(ExitCode.BAD_INPUT), error=str(e)).to_json()
            )
            raise SystemExit(int(ExitCode.BAD_INPUT)) from None
    summary = run_retrain(
        Config.from_env(),
        list(event_paths),
        catalog,
        dump_stream=dump_stream,
        tolerance=gate_tolerance,
        force=force,
        keep=keep,
        lock_ttl_s=lock_ttl_s,
        params=params,
    )
    click.echo(summary.to_json())
    raise SystemExit(summary.exit_code)
