"""``recsvc events``: tools for the real-time event stream.

``recsvc events dump --out PATH`` moves accepted events from the Redis stream into an events file
that ``recsvc train`` reads, exactly once (see :func:`recsvc.storage.dump.dump_events`).
``recsvc events status`` prints the stream's length and what a dump would pick up.

Exit codes: 0 done (also when there was nothing to dump), 1 Redis or file system error,
2 bad usage (output exists, folder missing), 4 another dump is running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from recsvc.core.config import Config
from recsvc.core.progress import Progress, mode_for
from recsvc.core.progress import configure as configure_progress
from recsvc.storage.connection import connect_admin
from recsvc.storage.dump import DumpError, DumpLocked, dump_events, stream_status
from recsvc.storage.embedded import ensure_redis

EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 1, 2, 4


def _client():

    config = Config.from_env()
    return config, connect_admin(ensure_redis(config))


@click.group("events")
def events() -> None:
    """Real-time event stream tools (dump to an events file)."""


@events.command("dump")
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=True, path_type=Path),
    help="File to create (.csv or .parquet; must not exist), or a folder to create events-<stamp>.csv in.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet"]),
    default=None,
    help="Output format (default: from the file suffix, else csv).",
)
@click.option(
    "--batch-size",
    default=10_000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Stream entries read per round trip.",
)
@click.option(
    "--max-events",
    default=None,
    type=click.IntRange(1, None),
    help="Stop after about this many events; the rest stays for the next dump.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar; without either, a bar on a terminal and a log line every few seconds otherwise.",
)
def dump(
    out_path: Path, fmt: str | None, batch_size: int, max_events: int | None, progress: bool | None
) -> None:
    """Move accepted events from the stream into an events file, exactly once.

    Events are acknowledged and deleted from the stream only after the file is flushed, fsynced and
    renamed into place. Prints one JSON line: count, path, first_id, last_id, recovered, remaining.
    """
    import redis

    configure_progress(mode_for(progress))
    try:
        config, client = _client()
        with Progress("events dump", unit="events") as bar:
            result = dump_events(
                client,
                out_path,
                stream=config.events.stream,
                batch_size=batch_size,
                max_events=max_events,
                fmt=fmt,
                on_batch=bar.update,
            )
    except DumpLocked as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_LOCKED)
    except DumpError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except (redis.RedisError, OSError) as e:
        click.echo(f"error: {type(e).__name__}: {e} (nothing is lost: the next dump writes it)", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(json.dumps(result.to_dict(), sort_keys=True))


@events.command("status")
def status() -> None:
    """Print the stream length, entries an interrupted dump left, and the dump lock (JSON)."""
    import redis

    try:
        config, client = _client()
        click.echo(json.dumps(stream_status(client, config.events.stream), sort_keys=True))
    except redis.RedisError as e:
        click.echo(f"error: {type(e).__name__}: {e}", err=True)
        sys.exit(EXIT_ERROR)
