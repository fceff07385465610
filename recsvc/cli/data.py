"""`recsvc sample-data` and `recsvc datasets`: a synthetic shop, and the public data sets converted."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from training.datasets import DATASETS, convert
from training.synth import CATEGORIES, write_shop


@click.command("sample-data")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write into."
)
@click.option("--seed", default=7, show_default=True, help="Random seed (same seed, same shop).")
@click.option("--users", "n_users", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option(
    "--items", "n_items", default=500, show_default=True, type=click.IntRange(len(CATEGORIES), 10_000_000)
)
@click.option("--days", default=60, show_default=True, type=click.IntRange(1, 3650))
@click.option(
    "--sessions-per-user",
    default=12.0,
    show_default=True,
    type=click.FloatRange(0.1, 10_000),
    help="Mean activity.",
)
def sample_data(
    out_dir: str, seed: int, n_users: int, n_items: int, days: int, sessions_per_user: float
) -> None:
    """Generate a seeded synthetic shop (catalog + events) for demos and tests.

    Writes OUT/events.csv and OUT/catalog.csv in the input contract.
    """
    events_path, catalog_path = write_shop(
        out_dir, seed=seed, n_users=n_users, n_items=n_items, days=days, sessions_per_user=sessions_per_user
    )
    n_events = sum(1 for _ in open(events_path, "rb")) - 1
    click.echo(f"wrote {events_path} ({n_events:,} events) and {catalog_path} ({n_items:,} items)")
    sys.stdout.flush()


@click.group("datasets")
def datasets() -> None:
    """Convert public datasets into the recsvc events/catalog contract."""


@datasets.command("list")
def list_datasets() -> None:
    """List the datasets this module can convert."""
    for spec in DATASETS.values():
        click.echo(f"{spec.name:28} {spec.folder}/{spec.files[0]:40} {spec.description}")


@datasets.command("convert")
@click.argument("name", type=click.Choice(sorted(DATASETS)))
@click.option("--data-dir", default="../shared/data", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Default: var/datasets/NAME"
)
def convert_command(name: str, data_dir: str, out_dir: str | None) -> None:
    """Convert dataset NAME into events.csv (+ catalog.csv)."""
    try:
        result = convert(name, data_dir, out_dir or Path("var/datasets") / name)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"events:  {result.events}")
    click.echo(f"catalog: {result.catalog or '-'}")
    click.echo(f"notes:   {result.notes}")
    click.echo(
        f"evaluate with: recsvc evaluate --events {result.events}"
        + (f" --catalog {result.catalog}" if result.catalog else "")
    )
