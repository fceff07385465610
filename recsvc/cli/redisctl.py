"""``recsvc redis status | stop``: the embedded Redis that recsvc starts when REDIS_URL is unset.

Exit codes: 0 success (``status``: the server answers; ``stop``: stopped, or nothing was running);
1 ``status``: not running, ``stop``: it did not stop in time; 2 bad usage (``stop`` with REDIS_URL).
"""

from __future__ import annotations

import datetime as _dt
import json

import click

from recsvc.core.config import Config
from recsvc.storage import embedded


def _config() -> Config:
    try:
        return Config.from_env()
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@click.group("redis")
def redis_group() -> None:
    """The embedded Redis under RECSVC_VAR_DIR/redis (nothing is managed when REDIS_URL is set)."""


@redis_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def redis_status(as_json: bool) -> None:
    """Whether Redis answers; for the embedded one its owner, pids, restarts and memory."""
    state = embedded.status(_config())
    if as_json:
        click.echo(json.dumps(state, indent=2, sort_keys=True))
    elif state["mode"] == "external":
        click.echo(f"external Redis (REDIS_URL): {'answers' if state['running'] else 'does not answer'}")
    else:
        click.echo(f"embedded Redis in {state['dir']}: {'running' if state['running'] else 'not running'}")
        if state.get("owner_running"):
            click.echo(f"  owner pid {state.get('owner_pid')}, redis-server pid {state.get('redis_pid')}")
            click.echo(f"  restarts since the owner started: {state.get('restarts', 0)}")
        if state.get("started_at"):
            when = _dt.datetime.fromtimestamp(state["started_at"], _dt.UTC).isoformat(timespec="seconds")
            click.echo(f"  owner started {when}")
        if state.get("used_memory_bytes") is not None:
            aof = "on" if state.get("aof_enabled") else "off"
            click.echo(f"  memory {state['used_memory_bytes'] / 1e6:.1f} MB, append-only file {aof}")
        click.echo(f"  socket {state['socket']}")
    if not state["running"]:
        raise SystemExit(1)


@redis_group.command("stop")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(1, 600), help="Seconds.")
def redis_stop(timeout: float) -> None:
    """Stop the embedded Redis (saved to its append-only file); the next command starts it again."""
    config = _config()
    try:
        stopped = embedded.stop(config, timeout_s=timeout)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except TimeoutError as e:
        raise click.ClickException(str(e)) from None
    click.echo("stopped" if stopped else "not running")
