"""``train_model``: events + catalog files -> a validated, evaluated model artifact on disk.

Steps: load and validate the inputs (nothing is written if they are bad) -> optionally select the
model on a validation split -> measure what the model must exclude -> evaluate the model against
the baselines on a held-out split -> fit every part of the model (ALS, item-kNN, popularity prior)
and build purchase histories, item metadata and bundle candidates from *all* events -> write the
artifact atomically (:func:`recsvc.core.artifact.write_artifact`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.core.artifact import Artifact, BundleCandidates, write_artifact
from recsvc.core.eventfiles import LoadReport, load_catalog, load_events
from recsvc.core.events import Catalog, EventTable
from recsvc.core.ids import IdMap
from recsvc.core.memory import release_unused_memory, use_system_allocator
from recsvc.core.progress import Progress
from recsvc.core.repurchase import RepurchaseModel
from recsvc.core.weighting import id_maps, index_positions, popularity_scores
from training.als import TrainParams
from training.cooccurrence import MiningParams, build_baskets, mine_baskets_report, mine_bundles_report
from training.evaluation import DEFAULT_MAX_TEST_USERS, category_codes
from training.evaluation import evaluate as evaluate_split
from training.model import fit_parts, model_matrices
from training.report import customer_segments, write_documents
from training.repurchase import fit_repurchase
from training.splits import SplitSpec, exclusion_rule, split_events
from training.tuning import save_choice
from training.tuning import tune as tune_params

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


class StageClock:
    """Wall and CPU seconds of each stage of a run, and the process's peak RSS when it ended.

    ``with clock("fit"): ...`` tells ``step`` (the progress display) the stage's name and records
    it; the peak is the high-water mark so far (it only grows: the stage that raised it is the one
    whose figure jumps).
    """

    def __init__(self, step: Callable[[str], Any] | None = None):
        self.step = step or (lambda name: None)
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.step(name)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
            self.peak_mb[name] = peak_rss_mb()

    def resources(self) -> dict[str, dict[str, float]]:
        """``manifest["resources"]``: CPU seconds and peak RSS (MB) per stage."""
        return {
            "cpu_s": {k: round(v, 3) for k, v in self.cpu.items()},
            "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_mb.items()},
        }


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB.

    Linux's ``VmHWM`` belongs to the address space; ``ru_maxrss`` (the fallback elsewhere) also
    counts the parent's resident set at the moment it forked this process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    resources: dict[str, Any] | None = None,
    similarity: Any = None,
    prior: np.ndarray | None = None,
    repurchase: RepurchaseModel | None = None,
    events: Any = None,
    segments: Any = None,
) -> tuple[Path, Artifact]:
    """Assemble the artifact (the same for every engine) and write it atomically; ``(path, artifact)``.

    ``similarity`` and ``prior`` are the blend's item-kNN and popularity parts (None for plain ALS);
    ``resources`` (CPU seconds and peak RSS per stage, :class:`StageClock`) goes to the manifest.
    Then the version's documents: customer segments (``segments``, or computed from ``events``
    when given) and the training report (``timings["documents"]`` says how long they took; a
    failure only logs a warning).
    """
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
        similarity=similarity,
        prior=prior,
        repurchase=repurchase,
    )
    # Stage timings up to here (writing itself is not in them: the manifest is written last).
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    if resources is not None:
        manifest["resources"] = resources
    path = write_artifact(artifact, models_dir, version=version)
    t0 = time.perf_counter()
    write_documents(path, artifact, events, segments=segments)
    timings["documents"] = time.perf_counter() - t0
    return path, artifact


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
    split: str | None = None,
    max_test_users: int | None = DEFAULT_MAX_TEST_USERS,
    tune_time_budget_s: float = 900.0,
    compare: Mapping[str, TrainParams] | None = None,
    params_source: str = "given",
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
        Evaluate the model and the baselines on a held-out split first; metrics go into the
        manifest.
    max_bad_fraction : float, default 0.01
        Fail (and write nothing) when more rows than this are rejected.
    seed : int
        Seed of the ALS initialisation (and of the tuner).
    tune : bool, default False
        Run the bounded model selection (:func:`training.tuning.tune`) first, on data before the
        evaluation's test part; the choice is saved to ``<models_dir>/tuning.json``.
    show_progress : bool, optional
        Progress bars; default: when stderr is a terminal.
    threads : int, default 0
        implicit threads (0 = one per core); recorded in the manifest.
    split : str, optional
        Evaluation split (:class:`training.splits.SplitSpec`): ``auto`` (default), ``global[:F]``,
        ``user[:F]`` or ``days:N``.
    max_test_users : int or None
        Test users scored by the evaluation (a seeded sample); None scores every one.
    tune_time_budget_s : float
        Bound of the search.
    compare : mapping of name -> TrainParams, optional
        Other configurations fitted and scored on the evaluation's split next to the model (the
        retrain gate passes the live version's as ``"live"``); their metrics go into the manifest.
    params_source : str
        Where ``params`` came from (``given``, ``tuning.json``, ``defaults``...): recorded.
    device : {"auto", "cpu", "gpu"}
        Where ALS runs.
    version : str, optional
        Version folder name (default: UTC timestamp + fingerprint prefix).
    echo : callable, optional
        Receives progress lines (the CLI passes ``click.echo`` to stderr).
    stages : Progress, optional
        Told each stage as it starts (load, tune, exclusion, evaluate, matrix, extras, baskets,
        repurchase, segments, fit, bundles, write); its total is set here.

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
    started = time.perf_counter()
    say = echo or (lambda line: log.info(line))
    if show_progress is None:
        show_progress = True  # recsvc.core.progress decides: a bar on a terminal, else log lines
    clock = StageClock(stages.step if stages is not None else None)
    if stages is not None:
        stages.total = 10 + int(tune) + int(evaluate)
    params = params or TrainParams()
    paths = (
        [Path(event_paths)] if isinstance(event_paths, str | os.PathLike) else [Path(p) for p in event_paths]
    )
    inputs = paths + ([Path(catalog_path)] if catalog_path is not None else [])
    fingerprint = _Fingerprint(inputs)
    fingerprint.start()
    use_system_allocator()  # a training run reads its files once: see recsvc.core.memory

    with clock("load"):
        events, report = load_events(paths, max_bad_fraction=max_bad_fraction)
        catalog, catalog_report = (None, None)
        if catalog_path is not None:
            catalog, catalog_report = load_catalog(catalog_path, max_bad_fraction=max_bad_fraction)
    say(report.format())
    if catalog_report is not None:
        say("catalog: " + catalog_report.format())

    tuning = None
    if tune:
        with clock("tune"):
            # Tuning looks only at data before the evaluation's future, so the evaluation stays honest.
            tune_events = split_events(events, SplitSpec.parse(split)).train if evaluate else events
            result = tune_params(
                tune_events,
                catalog,
                params,
                seed=seed,
                threads=threads,
                device=device,
                time_budget_s=tune_time_budget_s,
                progress=say,
            )
            del tune_events
        params, tuning = result.best, result.to_dict()
        say(f"tuning: {result.reason}")

    with clock("exclusion"):
        # What the model leaves out of a user's list is measured on this shop's data (a count).
        exclusion = (
            exclusion_rule(events) if params.model.exclude == "auto" else {"exclude": params.model.exclude}
        )
    params = params.replace(model=replace(params.model, exclude=exclusion["exclude"]))

    metrics: dict[str, Any] = {}
    if evaluate:
        with clock("evaluate"):
            try:
                metrics = evaluate_split(
                    events,
                    catalog,
                    params,
                    split=split,
                    seed=seed,
                    threads=threads,
                    device=device,
                    max_test_users=max_test_users,
                    compare=compare,
                    progress=say,
                )
            except ValueError as e:
                # A log too short to split still trains; the manifest says why it has no metrics.
                metrics = {"note": f"not evaluated: {e}"}
        for warning in metrics.get("warnings", [metrics.get("note")] if metrics.get("note") else []):
            say(f"warning: {warning}")

    # Everything read from the events is built here, then the events are released: the fits and
    # the pair counts run on matrices a fraction of their size. A part of the model that needs
    # the events is built in this block too.
    with clock("matrix"):
        weighting = params.weighting()
        trained_until = int(events.timestamp.max())
        user_ids, item_ids = id_maps(events, weighting, None if catalog is None else catalog.item_id)
        if len(user_ids) == 0:
            raise ValueError("no user has an event with a positive weight: nothing to train on")
        matrices = model_matrices(events, user_ids, item_ids, params, now=trained_until)
    with clock("extras"):
        meta = item_metadata(item_ids, catalog)
        popularity = popularity_scores(events, item_ids, weighting, now=trained_until)
    with clock("baskets"):
        mining = MiningParams()
        baskets = build_baskets(events, IdMap(item_ids), mining)
    with clock("repurchase"):
        repurchase, repurchase_report = fit_repurchase(
            events, user_ids, item_ids, meta["category"], trained_until
        )
    with clock("segments"):
        segments = customer_segments(events)
    del events
    release_unused_memory()

    with clock("fit"):
        fitted = fit_parts(matrices, seed=seed, threads=threads, device=device, show_progress=show_progress)
    del matrices

    with clock("bundles"):
        # Mining runs after the fit, so it may use the fit's cores (0 = one per core).
        bundles, bundle_report = mine_baskets_report(
            baskets,
            fitted.item_factors,
            meta["category"],
            mining,
            threads=threads or os.cpu_count() or 1,
            seconds={"baskets": round(clock.wall["baskets"], 3)},
        )
    del baskets

    with clock("write"):
        fp = fingerprint.result()
        manifest = base_manifest(
            fingerprint=fp,
            params=fitted.manifest_params(seed),
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
        manifest.update(model=fitted.spec.to_dict(), exclusion=exclusion, params_source=params_source)
        if tuning is not None:
            manifest["tuning"] = tuning
        path, artifact = write_model(
            manifest,
            user_ids=user_ids,
            item_ids=item_ids,
            user_factors=fitted.user_factors,
            item_factors=fitted.item_factors,
            meta=meta,
            popularity=popularity,
            confidence=fitted.confidence,
            purchases=fitted.purchases,
            bundles=bundles,
            models_dir=models_dir,
            version=version,
            timings=clock.wall,
            resources=clock.resources(),
            similarity=fitted.similarity,
            prior=fitted.prior,
            repurchase=repurchase,
            segments=segments,
        )
        if tuning is not None:
            # `recsvc train` and the nightly retrain reuse the choice until it is re-tuned.
            save_choice(models_dir, tuning, fingerprint=fp)
    say(
        f"wrote {path} in {time.perf_counter() - started:.1f}s (fit {clock.wall['fit']:.1f}s, "
        f"peak memory {peak_rss_mb():.0f} MB)"
    )
    return TrainResult(
        path=path, manifest=artifact.manifest, report=report, metrics=metrics, catalog_report=catalog_report
    )
