"""``train_model``: events + catalog files -> a validated, evaluated model artifact on disk.

Steps: load and validate the inputs (nothing is written if they are bad) -> optionally tune on a
validation split -> evaluate ALS against baselines on a time split -> build id maps, confidence
matrix, ALS factors, popularity, purchase histories, item metadata and bundle candidates from
*all* events -> write the artifact atomically (:func:`recsvc.core.artifact.write_artifact`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.core.artifact import Artifact, BundleCandidates, write_artifact
from recsvc.core.eventfiles import LoadReport, load_catalog, load_events
from recsvc.core.events import Catalog, EventTable
from recsvc.core.ids import IdMap
from recsvc.core.progress import Progress
from recsvc.core.repurchase import RepurchaseModel
from recsvc.core.weighting import (
    bm25_manifest_params,
    id_maps,
    index_positions,
    popularity_scores,
    purchase_counts,
    raw_matrix,
    scale,
    to_float32,
)
from training.als import TrainParams, fit_als
from training.cooccurrence import mine_bundles_report
from training.evaluation import category_codes
from training.evaluation import evaluate as evaluate_split
from training.evaluation import tune as tune_params
from training.repurchase import fit_repurchase

log = logging.getLogger("recsvc.training")

DEFAULT_SEED = 42

__all__ = ["DEFAULT_SEED", "TrainParams", "TrainResult", "data_fingerprint", "train_model"]


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    path: Path  # the version folder
    manifest: dict[str, Any]
    report: LoadReport  # events load report
    metrics: dict[str, Any] = field(default_factory=dict)
    catalog_report: LoadReport | None = None


def data_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the bytes of the input files, in the order given (file names do not count)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


class _Fingerprint(threading.Thread):
    """Hash the inputs in the background while they are parsed (hashlib releases the GIL)."""

    def __init__(self, paths: list[Path]):
        super().__init__(daemon=True)
        self.paths, self.value = paths, ""
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.value = data_fingerprint(self.paths)
        except OSError as e:  # the loader reports missing files with a better message
            self.error = e

    def result(self) -> str:
        self.join()
        return self.value


def item_metadata(item_ids: np.ndarray, catalog: Catalog | None) -> dict[str, Any]:
    """price (NaN unknown), available (True unknown), category codes (-1 unknown), titles."""
    n = len(item_ids)
    price = np.full(n, np.nan, dtype=np.float32)
    available = np.ones(n, dtype=bool)
    titles = [""] * n
    category, names = category_codes(item_ids, catalog)
    if catalog is not None and len(catalog):
        pos = index_positions(catalog.item_id, item_ids)
        ok = pos >= 0
        price[pos[ok]] = catalog.price[ok]
        available[pos[ok]] = catalog.available[ok]
        for p, title in zip(pos[ok], catalog.title[ok], strict=True):
            titles[int(p)] = str(title)
    return {
        "price": price,
        "available": available,
        "category": category,
        "categories": names,
        "titles": titles,
    }


def bundle_candidates(
    events: EventTable, item_ids: np.ndarray, item_factors: np.ndarray, category: np.ndarray, threads: int
) -> tuple[BundleCandidates, dict[str, Any]]:
    """Bundle candidates mined from the training orders, and the mining report for the manifest.

    Mining runs after the fit, so it may use the fit's cores (``threads``, 0 = one per core).
    """

    item_index = IdMap(item_ids)
    threads = threads or os.cpu_count() or 1
    return mine_bundles_report(events, item_index, item_factors, category, threads=threads)


def base_manifest(
    *,
    fingerprint: str,
    params: dict[str, Any],
    trained_until: int,
    metrics: dict[str, Any],
    report: LoadReport,
    catalog: Catalog | None,
    catalog_report: LoadReport | None,
    inputs: dict[str, Any],
    training: dict[str, Any],
    n_items: int,
) -> dict[str, Any]:
    """The manifest every training engine writes (an engine adds its own details)."""
    return {
        "data_fingerprint": fingerprint,
        "params": params,
        "trained_until": trained_until,
        "trained_until_utc": _dt.datetime.fromtimestamp(trained_until, _dt.UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
        "load_report": report.to_dict(),
        "catalog_load_report": None if catalog_report is None else catalog_report.to_dict(),
        "inputs": inputs,
        "training": training | {"popularity": "recency-aware purchase-weighted, half-life 14 days"},
        "counts": {
            "events": report.rows_loaded,
            "events_rejected": report.rows_rejected,
            "duplicates_dropped": report.duplicates_dropped,
            "catalog_items": 0 if catalog is None else len(catalog),
            "items_without_catalog_entry": 0 if catalog is None else int(n_items - len(catalog)),
        },
    }


def write_model(
    manifest: dict[str, Any],
    *,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    meta: dict[str, Any],
    popularity: np.ndarray,
    confidence: Any,
    purchases: Any,
    bundles: BundleCandidates,
    models_dir: str | os.PathLike,
    version: str | None,
    timings: dict[str, float],
    repurchase: RepurchaseModel | None = None,
) -> tuple[Path, Artifact]:
    """Assemble the artifact (the same for every engine) and write it atomically; ``(path, artifact)``."""
    artifact = Artifact(
        item_ids=[str(x) for x in item_ids],
        user_ids=[str(x) for x in user_ids],
        item_factors=item_factors,
        user_factors=user_factors,
        price=meta["price"],
        available=meta["available"],
        category=meta["category"],
        categories=meta["categories"],
        titles=meta["titles"],
        popularity=popularity,
        interactions=confidence,
        purchases=purchases,
        bundles=bundles,
        manifest=manifest,
        repurchase=repurchase,
    )
    # Stage timings up to here (writing itself is not in them: the manifest is written last).
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return write_artifact(artifact, models_dir, version=version), artifact


def train_model(
    event_paths: str | os.PathLike | Iterable[str | os.PathLike],
    catalog_path: str | os.PathLike | None = None,
    *,
    models_dir: str | os.PathLike = "models",
    params: TrainParams | None = None,
    evaluate: bool = True,
    max_bad_fraction: float = 0.01,
    seed: int = DEFAULT_SEED,
    tune: bool = False,
    show_progress: bool | None = None,
    threads: int = 0,
    split_days: float | None = None,
    tune_trials: int = 12,
    tune_time_budget_s: float = 600.0,
    device: str = "auto",
    version: str | None = None,
    echo: Any = None,
    stages: Progress | None = None,
) -> TrainResult:
    """Train a model from event files and write it as ``<models_dir>/<version>/``.

    Parameters
    ----------
    event_paths : path or iterable of paths
        Events files (CSV or Parquet, see :func:`training.events.load_events`).
    catalog_path : path, optional
        Catalog file; its items are always in the model (even without events).
    models_dir : path, default "models"
        Where versions are written.
    params : TrainParams, optional
        Model parameters; defaults when None. With ``tune`` they are the search's starting point.
    evaluate : bool, default True
        Evaluate ALS and baselines on a time split first; metrics go into the manifest.
    max_bad_fraction : float, default 0.01
        Fail (and write nothing) when more rows than this are rejected.
    seed : int
        Seed of the ALS initialisation (and of the tuner).
    tune : bool, default False
        Run the bounded hyperparameter search (:func:`training.evaluation.tune`) first.
    show_progress : bool, optional
        Progress bars; default: when stderr is a terminal.
    threads : int, default 0
        implicit threads (0 = one per core); recorded in the manifest.
    split_days : float, optional
        Evaluation (and validation) window; default 10% of the span, 1..14 days.
    tune_trials, tune_time_budget_s
        Bounds of the search.
    device : {"auto", "cpu", "gpu"}
        Where ALS runs.
    version : str, optional
        Version folder name (default: UTC timestamp + fingerprint prefix).
    echo : callable, optional
        Receives progress lines (the CLI passes ``click.echo`` to stderr).
    stages : Progress, optional
        Told each stage as it starts (load, tune, evaluate, matrix, fit, extras, bundles, repurchase,
        write);
        its total is set here.

    Returns
    -------
    TrainResult

    Raises
    ------
    training.events.BadInputError
        Bad input files; nothing is written.
    ValueError
        Bad parameters, or nothing to train on.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    say = echo or (lambda line: log.info(line))
    if show_progress is None:
        show_progress = True  # recsvc.core.progress decides: a bar on a terminal, else log lines
    step = stages.step if stages is not None else (lambda name: None)
    if stages is not None:
        stages.total = 7 + int(tune) + int(evaluate)
    params = params or TrainParams()
    paths = (
        [Path(event_paths)] if isinstance(event_paths, str | os.PathLike) else [Path(p) for p in event_paths]
    )
    inputs = paths + ([Path(catalog_path)] if catalog_path is not None else [])
    fingerprint = _Fingerprint(inputs)
    fingerprint.start()

    t0 = time.perf_counter()
    step("load")
    events, report = load_events(paths, max_bad_fraction=max_bad_fraction)
    catalog, catalog_report = (None, None)
    if catalog_path is not None:
        catalog, catalog_report = load_catalog(catalog_path, max_bad_fraction=max_bad_fraction)
    timings["load"] = time.perf_counter() - t0
    say(report.format())
    if catalog_report is not None:
        say("catalog: " + catalog_report.format())

    tuning = None
    if tune:
        t0 = time.perf_counter()
        step("tune")
        result = tune_params(
            events,
            catalog,
            params,
            split_days=split_days,
            trials=tune_trials,
            time_budget_s=tune_time_budget_s,
            seed=seed,
            threads=threads,
            device=device,
            log=say,
        )
        params, tuning = result.best, result.to_dict()
        timings["tune"] = time.perf_counter() - t0
        say(f"tuning chose {tuning['chosen']} ({result.metric}={result.best_score:.4f} on validation)")

    metrics: dict[str, Any] = {}
    if evaluate:
        t0 = time.perf_counter()
        step("evaluate")
        try:
            metrics = evaluate_split(
                events, catalog, params, split_days=split_days, seed=seed, threads=threads, device=device
            )
        except ValueError as e:
            # A log too short to split still trains; the manifest says why it has no metrics.
            metrics = {"note": f"not evaluated: {e}"}
            say(f"warning: {metrics['note']}")
        timings["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("matrix")
    weighting = params.weighting()
    trained_until = int(events.timestamp.max())
    user_ids, item_ids = id_maps(events, weighting, None if catalog is None else catalog.item_id)
    if len(user_ids) == 0:
        raise ValueError("no user has an event with a positive weight: nothing to train on")
    raw = raw_matrix(events, user_ids, item_ids, weighting, now=trained_until)
    confidence = to_float32(scale(raw, weighting))
    extra_params = bm25_manifest_params(raw, weighting)
    del raw
    timings["matrix"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("fit")
    user_factors, item_factors = fit_als(
        confidence, params, seed=seed, threads=threads, show_progress=show_progress, device=device
    )
    timings["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("extras")
    meta = item_metadata(item_ids, catalog)
    popularity = popularity_scores(events, item_ids, weighting, now=trained_until)
    purchases = purchase_counts(events, user_ids, item_ids)
    timings["extras"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("bundles")
    bundles, bundle_report = bundle_candidates(events, item_ids, item_factors, meta["category"], threads)
    timings["bundles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("repurchase")
    repurchase, repurchase_report = fit_repurchase(
        events, user_ids, item_ids, meta["category"], trained_until
    )
    timings["repurchase"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("write")
    manifest = base_manifest(
        fingerprint=fingerprint.result(),
        params=params.to_manifest(seed) | extra_params,
        trained_until=trained_until,
        metrics=metrics,
        report=report,
        catalog=catalog,
        catalog_report=catalog_report,
        inputs={
            "events": [str(p) for p in paths],
            "catalog": None if catalog_path is None else str(catalog_path),
        },
        training={
            "engine": "local",
            "threads": int(threads),
            "device": device,
            "bundles": bundle_report,
            "repurchase": repurchase_report,
        },
        n_items=len(item_ids),
    )
    if tuning is not None:
        manifest["tuning"] = tuning
    path, artifact = write_model(
        manifest,
        user_ids=user_ids,
        item_ids=item_ids,
        user_factors=user_factors,
        item_factors=item_factors,
        meta=meta,
        popularity=popularity,
        confidence=confidence,
        purchases=purchases,
        bundles=bundles,
        models_dir=models_dir,
        version=version,
        timings=timings,
        repurchase=repurchase,
    )
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    say(f"wrote {path} in {timings['total']:.1f}s (fit {timings['fit']:.1f}s)")
    return TrainResult(
        path=path, manifest=artifact.manifest, report=report, metrics=metrics, catalog_report=catalog_report
    )
