"""``recsvc train``, ``recsvc evaluate`` and ``recsvc recommend`` (registered in recsvc/cli.py).

Exit codes: 0 success; 2 bad input (a file, a config or a parameter; the message names file,
line and column where it can, and nothing is written); 1 any other failure.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from recsvc.core.artifact import ArtifactError, read_artifact, resolve
from recsvc.core.config import Config
from recsvc.core.eventfiles import BadInputError, load_catalog, load_events
from recsvc.core.progress import Progress, mode_for
from recsvc.core.progress import configure as configure_progress
from recsvc.core.scoring import PLAIN_ALS, ModelSpec
from training.als import TrainParams
from training.evaluation import DEFAULT_MAX_TEST_USERS, format_table
from training.evaluation import evaluate as run_evaluation
from training.pipeline import data_fingerprint, train_model
from training.splits import SplitSpec
from training.tuning import TUNING_FILE, load_choice, save_choice
from training.tuning import tune as run_tune

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """Bad input: exit code 2, message on stderr, nothing written."""

    exit_code = EXIT_BAD_INPUT


def _err(line: str) -> None:
    click.echo(line, err=True)


def _parse_weights(text: str | None) -> dict[str, float] | None:
    """``view=1,cart=4,purchase=10`` -> dict (None when not given)."""
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise BadInput(f"--weights: expected name=value pairs like view=1,cart=4, got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise BadInput(f"--weights: {name.strip()} has a non-numeric value {value!r}") from None
    return out


def _params(
    config: str | None, overrides: dict[str, Any], models_dir: Path | None = None
) -> tuple[TrainParams, str]:
    """Defaults (or the choice ``recsvc tune`` saved in ``models_dir``) <- config file <- options.

    Returns the parameters and where they came from; errors exit with code 2.
    """
    try:
        if config:
            params, source = TrainParams.from_toml(config), str(config)
        else:
            saved = load_choice(models_dir) if models_dir is not None else None
            params, source = (saved[0], TUNING_FILE) if saved else (TrainParams(), "defaults")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "regularization_per_item" in changes and "regularization" not in changes:
            changes["regularization"] = None  # the rule replaces a number from the config file
        if "half_life_days" in changes and changes["half_life_days"] <= 0:
            changes["half_life_days"] = None  # --half-life-days 0 turns decay off
        if changes:
            params = params.replace(**changes)
            source += " + command-line options"
    except ValueError as e:
        raise BadInput(str(e)) from None
    return params, source


def _param_options(func: Any) -> Any:
    """Model parameter overrides shared by train and evaluate."""
    options = [
        click.option("--config", type=click.Path(dir_okay=False), help="TOML file with model parameters."),
        click.option("--factors", type=click.IntRange(1, 1024), help="Latent factors."),
        click.option(
            "--model",
            "model_kind",
            type=click.Choice(["blend", "als"]),
            help="blend (default): ALS + item-kNN + popularity; als: ALS alone.",
        ),
        click.option(
            "--regularization",
            type=click.FloatRange(0, None),
            help="ALS L2 regularization [default: --regularization-per-item x number of items].",
        ),
        click.option(
            "--regularization-per-item", type=click.FloatRange(0, None), help="ALS regularization per item."
        ),
        click.option("--alpha", type=click.FloatRange(0, None, min_open=True), help="Confidence multiplier."),
        click.option("--iterations", type=click.IntRange(1, 200), help="ALS sweeps."),
        click.option("--scaling", type=click.Choice(["linear", "log", "bm25"]), help="Confidence scaling."),
        click.option("--half-life-days", type=float, help="Time-decay half-life in days (0 = no decay)."),
        click.option("--bm25-k1", type=click.FloatRange(0, None, min_open=True)),
        click.option("--bm25-b", type=click.FloatRange(0, 1)),
        click.option("--weights", help="Event weights, e.g. view=1,cart=4,purchase=10,click=2,impression=0."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    kind = kwargs.pop("model_kind")
    return {
        "model": PLAIN_ALS if kind == "als" else (ModelSpec() if kind == "blend" else None),
        "factors": kwargs.pop("factors"),
        "regularization": kwargs.pop("regularization"),
        "regularization_per_item": kwargs.pop("regularization_per_item"),
        "alpha": kwargs.pop("alpha"),
        "iterations": kwargs.pop("iterations"),
        "scaling": kwargs.pop("scaling"),
        "half_life_days": kwargs.pop("half_life_days"),
        "bm25_k1": kwargs.pop("bm25_k1"),
        "bm25_b": kwargs.pop("bm25_b"),
        "event_weights": _parse_weights(kwargs.pop("weights")),
    }


def _split_options(func: Any) -> Any:
    """How the evaluation splits the log (shared by train and evaluate)."""
    options = [
        click.option(
            "--split",
            "split_spec",
            default="auto",
            show_default=True,
            help="auto | global[:FRACTION] | user[:FRACTION] | days:N (see docs/training.md).",
        ),
        click.option(
            "--split-days", type=click.FloatRange(0, None, min_open=True), help="Same as --split days:N."
        ),
        click.option(
            "--full-evaluation",
            is_flag=True,
            help=f"Score every test user (default: a seeded sample of {DEFAULT_MAX_TEST_USERS:,}).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _split(kwargs: dict[str, Any]) -> str:
    text = f"days:{kwargs['split_days']:g}" if kwargs.get("split_days") else kwargs["split_spec"]
    try:
        SplitSpec.parse(text)
    except ValueError as e:
        raise BadInput(f"--split: {e}") from None
    return text


def _show_progress(flag: bool | None) -> bool:
    """Set the progress mode from ``--progress/--no-progress``; True unless switched off."""
    configure_progress(mode_for(flag))
    return flag is not False


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


@click.command("train")
@click.option(
    "--events",
    "events",
    multiple=True,
    required=True,
    help="Events file (CSV or Parquet); repeat for several. With --engine spark: any URI Spark reads "
    "(a file or a folder of part files; s3a://, hdfs://).",
)
@click.option("--catalog", help="Catalog file (CSV or Parquet); with --engine spark any URI.")
@click.option(
    "--engine",
    type=click.Choice(["local", "spark"]),
    default="local",
    show_default=True,
    help="local: implicit in this process. spark: Apache Spark (the recsvc[spark] extra, Java 17), "
    "for data beyond one machine; see docs/scaling.md.",
)
@click.option(
    "--spark-master", help="Spark master (local[2], spark://host:7077, yarn) [default: spark-submit's]."
)
@click.option(
    "--spark-conf",
    "spark_conf",
    multiple=True,
    metavar="KEY=VALUE",
    help="Spark setting, repeatable (spark.driver.memory=4g, spark.hadoop.fs.s3a.endpoint=...).",
)
@click.option(
    "--spark-work-dir",
    help="URI for intermediate Parquet that the executors and this driver reach [default: a local temp dir].",
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "csv", "parquet"]),
    default="auto",
    show_default=True,
    help="Format of --events/--catalog URIs for --engine spark (auto: from the suffix).",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where versions go [default: $RECSVC_MODELS_DIR or models].",
)
@click.option(
    "--max-bad-fraction",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Fail (and write nothing) when more rows than this are invalid.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="0 = one per core."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    show_default=True,
    help="Evaluate the model vs the baselines on a held-out split before the final fit.",
)
@_split_options
@click.option("--tune", is_flag=True, help="Select the model on a validation split first (as `recsvc tune`).")
@click.option(
    "--tune-budget-s",
    type=click.FloatRange(1, None),
    default=None,
    help="Selection starts no new fit after this many seconds [default: $RECSVC_TUNE_BUDGET_S or 900].",
)
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when on a terminal].")
@_param_options
def train(**kwargs: Any) -> None:
    """Train a model from event files and write a versioned artifact.

    Without --config, the choice saved by `recsvc tune` in the models folder is used, else the
    defaults. Prints the version folder on stdout and the evaluation table; the load report and
    progress go to stderr.
    """
    config = Config.from_env()
    models_dir = Path(kwargs["models_dir"] or config.models_dir)
    params, source = _params(kwargs.pop("config"), _overrides(kwargs), models_dir)
    show_progress = _show_progress(kwargs["progress"])
    split = _split(kwargs)
    common: dict[str, Any] = dict(
        models_dir=models_dir,
        params=params,
        evaluate=kwargs["evaluate"],
        max_bad_fraction=kwargs["max_bad_fraction"],
        seed=kwargs["seed"],
        threads=kwargs["threads"],
        echo=_err,
    )
    try:
        if kwargs["engine"] == "spark":
            result = _train_spark(kwargs, common | {"split": split}, config)
        else:
            with Progress("train", unit="stages", enabled=show_progress) as stages:
                result = train_model(
                    list(kwargs["events"]),
                    kwargs["catalog"],
                    tune=kwargs["tune"],
                    show_progress=show_progress,
                    split=split,
                    max_test_users=None if kwargs["full_evaluation"] else DEFAULT_MAX_TEST_USERS,
                    tune_time_budget_s=kwargs["tune_budget_s"] or config.training.tune_budget_s,
                    device=kwargs["device"],
                    params_source=source,
                    stages=stages,
                    **common,
                )
    except (BadInputError, ValueError) as e:
        raise BadInput(str(e)) from None

    click.echo(str(result.path))
    if result.metrics:
        click.echo(format_table(result.metrics))


def _train_spark(kwargs: dict[str, Any], common: dict[str, Any], config: Config) -> Any:
    """``recsvc train --engine spark``: the same artifact, trained by Apache Spark."""
    if kwargs["tune"]:
        raise BadInput("--tune runs with the local engine only (tune on a sample, then train with Spark)")
    if kwargs["device"] == "gpu":
        raise BadInput("--device gpu is for the local engine; Spark trains on its executors' CPUs")
    # Loaded only for this engine, as batch recommend and the converters are for theirs.
    from training.spark_engine import SparkOptions, SparkUnavailable, train_model_spark

    conf = []
    for item in kwargs["spark_conf"]:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--spark-conf: expected KEY=VALUE, got {item!r}")
        conf.append((key.strip(), value.strip()))
    options = SparkOptions(
        master=kwargs["spark_master"],
        conf=tuple(conf),
        work_dir=kwargs["spark_work_dir"],
        python=config.training.spark_python,
        input_format=kwargs["input_format"],
    )
    try:
        return train_model_spark(list(kwargs["events"]), kwargs["catalog"], options=options, **common)
    except SparkUnavailable as e:
        raise click.ClickException(str(e)) from None


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


@click.command("evaluate")
@click.option(
    "--events",
    "events",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Events file (CSV or Parquet); repeat for several.",
)
@click.option("--catalog", type=click.Path(dir_okay=False), help="Catalog file.")
@click.option(
    "--dataset",
    help="Convert and evaluate a public dataset instead (see `recsvc datasets list`).",
)
@click.option(
    "--data-dir",
    default="../shared/data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where --dataset finds its source files.",
)
@_split_options
@click.option("--k", "ks", type=click.IntRange(1, 1000), multiple=True, default=(10, 20), show_default=True)
@click.option(
    "--exclude",
    type=click.Choice(["auto", "purchased", "interacted"]),
    default="auto",
    show_default=True,
    help="What no list may hold: measured (auto), the user's purchases, or every item they touched.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 when the split is degenerate or the model loses to a baseline.",
)
@click.option("--max-bad-fraction", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="BLAS threads (0: default)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the metrics as JSON here.")
@click.option(
    "--bundles/--no-bundles",
    default=True,
    show_default=True,
    help="Also score bundles (training.cooccurrence.evaluate_bundles).",
)
@_param_options
def evaluate(**kwargs: Any) -> None:
    """Evaluate the model against the baselines on a held-out split and print a table."""

    params, _source = _params(kwargs.pop("config"), _overrides(kwargs))
    if kwargs["exclude"] != "auto":
        params = params.replace(model=replace(params.model, exclude=kwargs["exclude"]))
    events_paths = list(kwargs["events"])
    catalog_path = kwargs["catalog"]
    if kwargs["dataset"]:
        if events_paths:
            raise BadInput("give either --events or --dataset, not both")

        # Loaded by the command that needs it, so `recsvc train` starts without the converters.
        from training.datasets import DATASETS, convert

        if kwargs["dataset"] not in DATASETS:
            raise BadInput(f"--dataset: unknown dataset {kwargs['dataset']!r} (known: {', '.join(DATASETS)})")
        try:
            converted = convert(
                kwargs["dataset"], kwargs["data_dir"], Path("var/datasets") / kwargs["dataset"]
            )
        except FileNotFoundError as e:
            raise BadInput(str(e)) from None
        _err(f"converted {kwargs['dataset']}: {converted.notes}")
        events_paths, catalog_path = [converted.events], converted.catalog
    if not events_paths:
        raise BadInput("give --events PATH (or --dataset NAME)")
    try:
        events, report = load_events(events_paths, max_bad_fraction=kwargs["max_bad_fraction"])
        _err(report.format())
        catalog = None
        if catalog_path:
            catalog, catalog_report = load_catalog(catalog_path, max_bad_fraction=kwargs["max_bad_fraction"])
            _err("catalog: " + catalog_report.format())
        start = time.perf_counter()
        metrics = run_evaluation(
            events,
            catalog,
            params,
            k=kwargs["ks"],
            split=_split(kwargs),
            seed=kwargs["seed"],
            threads=kwargs["threads"],
            device=kwargs["device"],
            bundles=kwargs["bundles"],
            max_test_users=None if kwargs["full_evaluation"] else DEFAULT_MAX_TEST_USERS,
            progress=_err,
        )
    except BadInputError as e:
        raise BadInput(str(e)) from None
    except ValueError as e:
        raise BadInput(str(e)) from None
    click.echo(format_table(metrics))
    _err(f"evaluated in {time.perf_counter() - start:.1f}s")
    if kwargs["json_out"]:
        document = {"metrics": metrics, "params": params.to_manifest(kwargs["seed"]), "events": events_paths}
        _write_atomic_text(
            Path(kwargs["json_out"]), json.dumps(document, indent=2, sort_keys=True, default=str)
        )
    if kwargs["strict"] and metrics.get("warnings"):
        raise click.ClickException(f"--strict: {len(metrics['warnings'])} warning(s), see above")


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# recommend
# --------------------------------------------------------------------------------------------


@click.command("recommend")
@click.option(
    "--model",
    "model_ref",
    default="latest",
    show_default=True,
    help="Version folder, version name, or 'latest' (in --models-dir).",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to resolve names [default: $RECSVC_MODELS_DIR or models].",
)
@click.option("--n", "n", type=click.IntRange(1, 1000), default=20, show_default=True, help="Items per user.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="recs.csv", show_default=True)
@click.option(
    "--include-purchased",
    is_flag=True,
    help="Keep items the user already purchased (or interacted with, for models that exclude those).",
)
@click.option("--include-unavailable", is_flag=True, help="Keep out-of-stock items.")
@click.option(
    "--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="BLAS threads (0: default)."
)
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option("--progress/--no-progress", default=None)
def recommend(**kwargs: Any) -> None:
    """Write top-N recommendations for every known user to CSV (user_id,rank,item_id,score).

    Ranked by the model's own scoring (the blend, or ALS), as the service's cached lists. The file
    is written under a temporary name and renamed, so an interrupted run never leaves a partial
    file behind.
    """

    models_dir = kwargs["models_dir"] or Config.from_env().models_dir
    try:
        artifact = read_artifact(resolve(models_dir, kwargs["model_ref"]))
    except ArtifactError as e:
        raise BadInput(str(e)) from None
    out = Path(kwargs["out_path"])
    # Loaded by the command that needs it, not by `recsvc train`.
    from training.recommend import write_recommendations

    rows = write_recommendations(
        artifact,
        out,
        n=kwargs["n"],
        include_purchased=kwargs["include_purchased"],
        include_unavailable=kwargs["include_unavailable"],
        threads=kwargs["threads"],
        batch_size=kwargs["batch_size"],
        show_progress=_show_progress(kwargs["progress"]),
    )
    click.echo(f"wrote {rows:,} rows for {artifact.n_users:,} users to {out} (model {artifact.version})")


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------


@click.command("tune")
@click.option(
    "--events",
    "events",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="Events file (CSV or Parquet); repeat for several.",
)
@click.option("--catalog", type=click.Path(dir_okay=False), help="Catalog file (CSV or Parquet).")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the choice is saved (tuning.json) [default: $RECSVC_MODELS_DIR or models].",
)
@click.option("--max-bad-fraction", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="BLAS threads (0: default)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option(
    "--budget-s",
    type=click.FloatRange(1, None),
    default=None,
    help="No new fit is started after this many seconds [default: $RECSVC_TUNE_BUDGET_S or 900].",
)
@click.option("--dry-run", is_flag=True, help="Print the choice without saving it.")
@_param_options
def tune(**kwargs: Any) -> None:
    """Select the model's parameters on a validation split and save the choice for `recsvc train`.

    The search (docs/quality.md) keeps a candidate only when it beats the current parameters with
    a paired 95% interval above 1 on the validation users; the choice, every trial and the reason
    are written to <models-dir>/tuning.json, which `recsvc train` and `recsvc retrain` reuse.
    """
    models_dir = Path(kwargs["models_dir"] or Config.from_env().models_dir)
    params, source = _params(kwargs.pop("config"), _overrides(kwargs), models_dir)
    try:
        events, report = load_events(list(kwargs["events"]), max_bad_fraction=kwargs["max_bad_fraction"])
        _err(report.format())
        catalog = None
        if kwargs["catalog"]:
            catalog, catalog_report = load_catalog(
                kwargs["catalog"], max_bad_fraction=kwargs["max_bad_fraction"]
            )
            _err("catalog: " + catalog_report.format())
    except BadInputError as e:
        raise BadInput(str(e)) from None
    _err(f"tuning from {source}")
    result = run_tune(
        events,
        catalog,
        params,
        seed=kwargs["seed"],
        threads=kwargs["threads"],
        device=kwargs["device"],
        time_budget_s=kwargs["budget_s"] or Config.from_env().training.tune_budget_s,
        progress=_err,
    )
    chosen = result.best.to_config()
    click.echo(json.dumps({"reason": result.reason, "chosen": chosen, "seconds": round(result.seconds, 1)}))
    if not kwargs["dry_run"]:
        path = save_choice(models_dir, result, fingerprint=data_fingerprint(list(kwargs["events"])))
        _err(f"saved {path}: `recsvc train` and `recsvc retrain` use it from now on")
