"""The ``recsvc`` command line: one group, subcommands loaded lazily.

Each subcommand lives in the module that owns its work and is imported only when it runs, so
``recsvc serve`` never imports ``implicit`` and ``recsvc --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

from recsvc.core import logs, progress
from recsvc.core.config import Config, unknown_variables

# name -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "sample-data": "recsvc.cli.data:sample_data",
    "train": "recsvc.cli.training:train",
    "evaluate": "recsvc.cli.training:evaluate",
    "tune": "recsvc.cli.training:tune",
    "recommend": "recsvc.cli.training:recommend",
    "publish": "recsvc.cli.serving:publish",
    "rollback": "recsvc.cli.serving:rollback",
    "versions": "recsvc.cli.serving:list_versions",
    "serve": "recsvc.cli.serving:serve",
    "events": "recsvc.cli.events:events",
    "retrain": "recsvc.cli.retrain:retrain",
    "export": "recsvc.cli.export:export",
    "segments": "recsvc.cli.segments:segments",
    "report": "recsvc.cli.report:report",
    "datasets": "recsvc.cli.data:datasets",
    "redis": "recsvc.cli.redisctl:redis_group",
}

HELP: dict[str, str] = {
    "sample-data": "Generate a seeded synthetic shop (catalog + events) for demos and tests.",
    "train": "Train a model (ALS + item-kNN + popularity) and write a versioned artifact.",
    "evaluate": "Evaluate the model against the baselines on a held-out split and print a table.",
    "tune": "Select the model's parameters on a validation split and save the choice.",
    "recommend": "Write top-N recommendations for every known user to CSV.",
    "publish": "Load a model artifact into Redis and switch serving to it.",
    "rollback": "Switch serving back to the previous published version.",
    "versions": "List published versions, marking the live one.",
    "serve": "Serve the HTTP API (gunicorn; --dev for the Flask dev server).",
    "events": "Real-time event stream tools (dump to an events file).",
    "retrain": "Nightly job: dump, train, evaluate, gate, publish, prune.",
    "export": "Export top-N picks per user of a segment for email campaigns.",
    "segments": "Print customer segment sizes.",
    "report": "A/B experiment attribution report.",
    "datasets": "Convert the public data sets in ../shared/data to the events contract.",
    "redis": "The embedded Redis: status, stop (nothing is managed when REDIS_URL is set).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing must not import every module (and implicit with them): use the short help table.
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP.get(name, "")) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(package_name="recsvc")
def main() -> None:
    """recsvc: train, publish and serve product recommendations."""
    for warning in unknown_variables():
        click.echo(f"warning: {warning}", err=True)
    try:
        ops = Config.from_env().ops
        logs.configure(ops.log_level, ops.log_format)
        progress.configure(interval_s=ops.progress_interval_s)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
