"""Training speed: end-to-end ``recsvc train`` against a bare implicit ``fit`` on the same matrix.

    .venv/bin/python bench/train.py            # largest dataset in ../shared/data + synthetic 5M events
    .venv/bin/python bench/train.py --quick    # same, synthetic 500k events

For each data set, in the same run and with the same parameters and thread count:

* ``train``: ``recsvc train --no-evaluate`` in a fresh process (load + validate + weight + fit +
  popularity/purchases/bundles + atomic write); wall time from process start to exit.
* ``train+eval``: the default ``recsvc train`` (adds the evaluation split: a second ALS fit and
  the baselines).
* ``bare fit``: a fresh process that loads the artifact's interactions matrix (the exact matrix
  ``train`` fitted) and times only ``implicit.cpu.als.AlternatingLeastSquares.fit`` on it.

Printed: wall times, ``train / bare fit`` (target <= 1.25), events loaded per second, and peak
RSS of each process. Data sets are prepared once under var/bench/ (never in the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
WORK = REPO / "var" / "bench"
TARGET_RATIO = 1.25


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: per address space, so not inherited from the
    parent the way ``ru_maxrss`` is across fork+exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
# Child processes (one measurement each, so peak RSS and caches do not leak between them)
# --------------------------------------------------------------------------------------------


def child_train(args: argparse.Namespace) -> dict:
    from recsvc.cli import main

    cli_args = ["train", "--models-dir", args.models_dir, "--threads", str(args.threads), "--no-progress"]
    for path in args.events:
        cli_args += ["--events", path]
    if args.catalog:
        cli_args += ["--catalog", args.catalog]
    if not args.evaluate:
        cli_args.append("--no-evaluate")
    if args.split_days:
        cli_args += ["--split-days", str(args.split_days)]
    try:
        main(cli_args, standalone_mode=False)
    except SystemExit as e:  # pragma: no cover - a failed train is reported by the parent
        if e.code:
            raise
    wall = time.perf_counter() - _STARTED
    from recsvc.core.artifact import latest_version, read_manifest

    manifest = read_manifest(latest_version(args.models_dir))
    return {
        "wall_s": wall,
        "timings": manifest["timings_s"],
        "rows_read": manifest["load_report"]["rows_read"],
        "counts": manifest["counts"],
        "version": manifest["version"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_fit(args: argparse.Namespace) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from recsvc.core.artifact import read_artifact
    from training.als import TrainParams

    artifact = read_artifact(args.model)
    params = TrainParams.from_mapping(artifact.manifest["params"])
    matrix = artifact.interactions
    with threadpool_limits(limits=1, user_api="blas"):
        from implicit.cpu.als import AlternatingLeastSquares

        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            num_threads=args.threads,
            random_state=artifact.manifest["params"]["seed"],
        )
        start = time.perf_counter()
        model.fit(matrix, show_progress=False)
        fit_s = time.perf_counter() - start
    assert np.isfinite(model.user_factors).all()
    return {
        "fit_s": fit_s,
        "nnz": int(matrix.nnz),
        "shape": list(matrix.shape),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_child(kind: str, *extra: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def largest_dataset() -> tuple[str, Path, Path | None, float] | None:
    """Convert every shared dataset present; return the one with the most events."""
    from training.datasets import DATASETS, convert

    best = None
    for name in DATASETS:
        try:
            result = convert(name, DATA_DIR, WORK / "datasets" / name)
        except FileNotFoundError:
            continue
        with open(result.events, "rb") as f:
            rows = sum(1 for _ in f) - 1
        if best is None or rows > best[0]:
            best = (rows, name, result.events, result.catalog, result.split_days)
    return None if best is None else best[1:]


def synthetic(events_target: int) -> tuple[str, Path, Path, float]:
    """A synthetic shop of about ``events_target`` events (about 37 events per user), cached."""
    from training.synth import write_shop

    users = max(1000, events_target // 37)
    items = max(500, users // 5)
    folder = WORK / f"synthetic-{users}u-{items}i"
    if not (folder / "events.csv").exists():
        start = time.perf_counter()
        write_shop(folder, seed=7, n_users=users, n_items=items, days=90)
        print(f"generated {folder} in {time.perf_counter() - start:.1f}s", flush=True)
    return f"synthetic ({users:,} users)", folder / "events.csv", folder / "catalog.csv", 7.0


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def bench_one(
    name: str,
    events: Path,
    catalog: Path | None,
    split_days: float,
    threads: int,
    with_eval: bool,
    repeat: int,
) -> dict:
    """Alternate train and bare-fit processes ``repeat`` times and keep the fastest of each.

    The machine is shared, so single timings wander by tens of percent; the minimum of a few
    alternating runs is the fairest estimate of each side's own cost.
    """
    models = WORK / "models" / name.split()[0]
    shutil.rmtree(models, ignore_errors=True)
    common = ["--events", str(events), "--threads", str(threads), "--models-dir", str(models)]
    if catalog:
        common += ["--catalog", str(catalog)]
    trains, fits = [], []
    for _ in range(repeat):
        trains.append(run_child("train", *common))
        fits.append(
            run_child("fit", "--model", str(models / trains[-1]["version"]), "--threads", str(threads))
        )
    train = min(trains, key=lambda r: r["process_wall_s"])
    fit = min(fits, key=lambda r: r["fit_s"])
    train["all_process_wall_s"] = [round(r["process_wall_s"], 2) for r in trains]
    fit["all_fit_s"] = [round(r["fit_s"], 2) for r in fits]
    row = {"name": name, "train": train, "fit": fit}
    if with_eval:
        row["train_eval"] = run_child("train", *common, "--evaluate", "--split-days", str(split_days))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="synthetic set of 500k events instead of 5M")
    parser.add_argument(
        "--threads", type=int, default=0, help="implicit threads for both sides (0 = all cores)"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the train+evaluate measurement")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per side, fastest kept (default 3, full: 2)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the raw measurements here")
    parser.add_argument(
        "--sets", default="largest,synthetic", help="comma-separated subset of: largest, synthetic"
    )
    # child mode (internal)
    parser.add_argument("--child", choices=["train", "fit"], help=argparse.SUPPRESS)
    parser.add_argument("--events", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--catalog", help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--split-days", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    if args.child:
        result = child_train(args) if args.child == "train" else child_fit(args)
        print(json.dumps(result), flush=True)
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    wanted = {name.strip() for name in args.sets.split(",")}
    sets = []
    if "largest" in wanted:
        found = largest_dataset()
        if found is None:
            print(f"no shared dataset found under {DATA_DIR}; only the synthetic set is measured")
        else:
            sets.append(found)
    if "synthetic" in wanted:
        sets.append(synthetic(500_000 if args.quick else 5_000_000))

    rows = []
    for name, events, catalog, split_days in sets:
        print(f"measuring {name} ...", flush=True)
        repeat = args.repeat or (3 if args.quick else 2)
        rows.append(bench_one(name, events, catalog, split_days, args.threads, not args.no_eval, repeat))

    print()
    print(f"threads={args.threads or os.cpu_count()}  (implicit threads; BLAS pinned to 1 on both sides)")
    header = (
        f"{'data set':32} {'events':>10} {'nnz':>10} {'load s':>7} {'events/s':>10} {'bare fit s':>10} "
        f"{'train s':>8} {'ratio':>6} {'w/o bundles':>11} {'train+eval s':>12} {'ratio':>6} "
        f"{'peak RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    for row in rows:
        train, fit = row["train"], row["fit"]
        ratio = train["process_wall_s"] / fit["fit_s"]
        worst = max(worst, ratio)
        eval_s = row.get("train_eval", {}).get("process_wall_s")
        eval_ratio = f"{eval_s / fit['fit_s']:6.2f}" if eval_s else f"{'-':>6}"
        eval_text = f"{eval_s:12.1f}" if eval_s else f"{'-':>12}"
        load_s = train["timings"]["load"]
        # Bundle mining is training.cooccurrence's stage; shown apart so each side's cost is visible.
        no_bundles = (train["process_wall_s"] - train["timings"].get("bundles", 0.0)) / fit["fit_s"]
        print(
            f"{row['name'][:32]:32} {train['rows_read']:>10,} {fit['nnz']:>10,} {load_s:7.2f} "
            f"{train['rows_read'] / load_s:>10,.0f} {fit['fit_s']:10.2f} "
            f"{train['process_wall_s']:8.2f} {ratio:6.2f} {no_bundles:11.2f} "
            f"{eval_text} {eval_ratio} {train['peak_rss_mb']:11.0f}"
        )
    print()
    for row in rows:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in row["train"]["timings"].items())
        print(
            f"{row['name']}: train stages {stages}; runs: train {row['train']['all_process_wall_s']} s, "
            f"bare fit {row['fit']['all_fit_s']} s; "
            f"bare-fit process peak RSS {row['fit']['peak_rss_mb']:.0f} MB"
        )
    print(
        f"\ntrain / bare fit: worst {worst:.2f} (target <= {TARGET_RATIO}) -> "
        f"{'OK' if worst <= TARGET_RATIO else 'MISSED'}"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
