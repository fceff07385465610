"""Buy again: quality of the due list, what training it costs, and the endpoint's latency.

Run from the repository root::

    .venv/bin/python bench/repurchase.py                  # every part, ~6 minutes
    .venv/bin/python bench/repurchase.py --quick          # smaller shops, shorter load runs
    .venv/bin/python bench/repurchase.py --parts quality  # quality | train | serve, comma-separated

Parts:

``quality``
    ``training.repurchase.evaluate_repurchase`` on a time split of every data set: Instacart and UCI
    Online Retail (rows with customers) from ``../shared/data``, the sample shop (``recsvc
    sample-data`` defaults, 60 days) and a replenishment-heavy sample shop. For each: precision,
    recall and nDCG@10 of the due list and of the two baselines computed in the same run (the
    customer's most frequently and most recently bought items), 95% bootstrap intervals over
    customers (paired for the ratios), the median absolute error of ``due_in_days`` against two
    simple predictors, and the designs measured (the same model without the learned ranker,
    without the variance factor chosen on held-out history, without the customer's pace).
    Target: nDCG@10 >= 1.1 x the better baseline on Instacart.
``train``
    ``recsvc train`` in fresh processes (three runs per data set); the repurchase stage's seconds
    (the manifest's ``timings_s.repurchase``) over the rest of the command's wall time. Target:
    <= 10%.
``serve``
    A trained model (a sample shop with a few bought items per customer, and Instacart with about
    90) published to a throw-away redis-server and ``recsvc serve``; wrk loads
    ``/v1/users/<id>/recommendations?n=10`` (as served by default: with explanations), the same
    with ``explain=false`` (the lean answer) and ``/v1/users/<id>/buy-again?n=10`` for the same
    random customers, alternating, first at max throughput, then all three paced at half of the
    faster recommendations max (the same offered load). Target: buy-again p99 no worse than the
    recommendations p99, against both answers (median of the per-round ratios).

The data sets are read from ``../shared/data`` and converted under a temporary folder; nothing is
written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

from serve import free_port, run_wrk, stop, wait_http  # noqa: E402

from recsvc.core.eventfiles import load_catalog, load_events  # noqa: E402
from training.repurchase import RepurchaseSettings, evaluate_repurchase  # noqa: E402

#: Where the public data sets are: ``../shared/data`` of the checkout, or of the folder holding it.
DATA_DIR = next(
    (p for p in (REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data") if p.is_dir()),
    REPO.parent / "shared" / "data",
)
TARGET_NDCG = 1.1
TARGET_OVERHEAD = 0.10
DESIGNS = {
    "cure model, moment variances": RepurchaseSettings(pace=False, choose_dispersion=False, ranker=False),
    "+ customer pace": RepurchaseSettings(choose_dispersion=False, ranker=False),
    "+ variance factor on held-out history": RepurchaseSettings(ranker=False),
    "+ ranker learned on held-out windows (served)": RepurchaseSettings(),
}


# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------


def datasets(workdir: Path, quick: bool, data_dir: Path) -> list[tuple[str, Path, Path | None, float]]:
    """``(name, events, catalog, horizon_days)`` of every data set available here.

    UCI Online Retail's rows with customers span five days (see its SOURCE.txt): its horizon is one
    day. The second sample shop makes replenishment the main reason to buy again (most
    consumable purchases are repeated, fewer browsing sessions).
    """
    from training.datasets import convert
    from training.synth import write_shop

    out = []
    for name, horizon in (("instacart", 7.0), ("online-retail-uci", 1.0)):
        folder = workdir / name
        if not (folder / "events.csv").exists():
            try:
                convert(name, data_dir, folder)
            except FileNotFoundError as e:
                print(f"skipping {name}: {e}")
                continue
        catalog = folder / "catalog.csv"
        out.append((name, folder / "events.csv", catalog if catalog.exists() else None, horizon))
    if not (workdir / "sample" / "events.csv").exists():
        write_shop(workdir / "sample")  # `recsvc sample-data` defaults
    out.append((SAMPLE, workdir / "sample" / "events.csv", workdir / "sample" / "catalog.csv", 7.0))
    users = 2000 if quick else 4000
    heavy = workdir / "replenishment"
    if not (heavy / "events.csv").exists():
        write_shop(heavy, n_users=users, days=120, repeat_rate=0.85, sessions_per_user=4.0)
    name = f"replenishment sample shop ({users:,} users, 120 days, repeat rate 0.85, 4 sessions)"
    out.append((name, heavy / "events.csv", heavy / "catalog.csv", 7.0))
    return out


SAMPLE = "sample shop (recsvc sample-data defaults, 60 days)"


# ------------------------------------------------------------------------------------------------
# Quality
# ------------------------------------------------------------------------------------------------


def _ci(result: dict[str, Any], key: str) -> str:
    lo, hi = result["ci95"][key]
    return f"{result[key]:.4f} [{lo:.4f}, {hi:.4f}]"


def quality(workdir: Path, quick: bool, data_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, events_path, catalog_path, horizon in datasets(workdir, quick, data_dir):
        events, _ = load_events([events_path])
        catalog = load_catalog(catalog_path)[0] if catalog_path else None
        runs = {
            design: evaluate_repurchase(events, catalog, horizon_days=horizon, settings=s)
            for design, s in DESIGNS.items()
        }
        result = runs[list(DESIGNS)[-1]]
        print(
            f"\n## {name}: horizon {horizon:g} days; {result['users_with_rebuys']:,} of {result['users']:,} "
            f"customers bought again in the window ({result['relevant']:,} of {result['candidates']:,} "
            f"bought items); variance factor {result['params']['dispersion']:g}"
        )
        print(f"{'method':<12}{'precision@10':>26}{'recall@10':>26}{'nDCG@10':>26}")
        for method in ("repurchase", "frequency", "recency"):
            cells = "".join(f"{_ci(result, f'{method}_{m}@10'):>26}" for m in ("precision", "recall", "ndcg"))
            print(f"{method:<12}{cells}")
        better = max(("frequency", "recency"), key=lambda b: result[f"{b}_ndcg@10"])
        for base in ("frequency", "recency"):
            cells = "  ".join(_ci(result, f"ratio_vs_{base}_{m}@10") for m in ("precision", "recall", "ndcg"))
            print(f"ratio vs {base:<10} precision / recall / nDCG: {cells}")
        key = f"ratio_vs_{better}_ndcg@10"
        line = f"nDCG@10 vs the better baseline ({better}): {_ci(result, key)}"
        if name == "instacart":
            line += f"   target >= {TARGET_NDCG}: {'PASS' if result[key] >= TARGET_NDCG else 'MISS'}"
        print(line)
        cal = result["calibration"]
        if cal.get("pairs"):
            print(
                f"due_in_days median absolute error, {cal['pairs']:,} items bought again within "
                f"{cal['follow_up_days']:g} days: model {cal['repurchase_mae_days']:.2f}, item's typical "
                f"interval {cal['item_interval_mae_days']:.2f}, "
                f"customer's own {cal['own_interval_mae_days']:.2f}"
            )
        else:
            print(f"due_in_days calibration: {cal.get('note', 'no items bought again')}")
        print("designs, nDCG@10 and ratio to the better baseline:")
        for design, run in runs.items():
            print(f"  {design:<50}{_ci(run, 'repurchase_ndcg@10'):>26}  {_ci(run, key):>26}")
        summary[name] = {design: {k: v for k, v in run.items()} for design, run in runs.items()}
    return summary


# ------------------------------------------------------------------------------------------------
# Training overhead
# ------------------------------------------------------------------------------------------------


def train_overhead(workdir: Path, quick: bool, data_dir: Path) -> dict[str, Any]:
    from training.synth import write_shop

    sets = [(n, e, c) for n, e, c, _ in datasets(workdir, quick, data_dir) if n in ("instacart", SAMPLE)]
    users = 5000 if quick else 20_000
    events, catalog = write_shop(workdir / "train-big", n_users=users, n_items=2000, days=90)
    sets.append((f"sample shop ({users:,} users, 2,000 items, 90 days)", events, catalog))
    recsvc = str(Path(sys.executable).parent / "recsvc")
    runs = 2 if quick else 3
    print(f"\n{'data set':<52}{'events':>10}{'train s':>10}{'repurchase s':>14}{'overhead':>10}")
    out = {}
    for name, events_path, catalog_path in sets:
        walls, stages = [], []
        for run in range(runs):
            models = workdir / f"models-{run}"
            shutil.rmtree(models, ignore_errors=True)
            cmd = [recsvc, "train", "--events", str(events_path), "--models-dir", str(models)]
            if catalog_path:
                cmd += ["--catalog", str(catalog_path)]
            started = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
            manifest = json.loads(next(models.glob("*/manifest.json")).read_text())
            stages.append(float(manifest["timings_s"]["repurchase"]))
            n_events = manifest["counts"]["events"]
        wall, stage = float(np.median(walls)), float(np.median(stages))
        overhead = stage / max(wall - stage, 1e-9)
        verdict = "PASS" if overhead <= TARGET_OVERHEAD else "MISS"
        print(f"{name:<52}{n_events:>10,}{wall:>10.2f}{stage:>14.3f}{overhead:>9.1%}  {verdict}")
        out[name] = {"events": n_events, "train_s": walls, "repurchase_s": stages, "overhead": overhead}
    print(
        f"(median of {runs} runs in fresh processes; "
        "overhead = repurchase stage / the rest of `recsvc train`)"
    )
    return out


# ------------------------------------------------------------------------------------------------
# Endpoint latency
# ------------------------------------------------------------------------------------------------


def serve_models(workdir: Path, quick: bool, data_dir: Path) -> list[tuple[str, Path, Path | None]]:
    """``(label, events, catalog)`` of the models the serve part loads: a sample shop (few bought
    items per customer) and Instacart (about 90)."""
    from training.synth import write_shop

    users = 2000 if quick else 20_000
    events, catalog = write_shop(workdir / "serve-shop", n_users=users, n_items=2000, days=90)
    out: list[tuple[str, Path, Path | None]] = [
        (f"sample shop, {users:,} users x 2,000 items, 90 days", events, catalog)
    ]
    instacart = [(e, c) for n, e, c, _ in datasets(workdir, quick, data_dir) if n == "instacart"]
    if instacart:
        out.append(("instacart, 593 users", *instacart[0]))
    return out


def serve(
    workdir: Path, label: str, events: Path, catalog: Path | None, rounds: int, seconds: int, connections: int
) -> dict[str, Any]:
    from recsvc.core.artifact import read_artifact
    from recsvc.storage.embedded import RedisServer

    slug = "".join(c if c.isalnum() else "-" for c in label)[:40]
    server = RedisServer(workdir / f"redis-{slug}").start()
    models = workdir / f"serve-models-{slug}"
    env = dict(os.environ)
    env.update(REDIS_URL=server.url, RECSVC_MODELS_DIR=str(models), RECSVC_VAR_DIR=str(workdir / "var"))
    recsvc = str(Path(sys.executable).parent / "recsvc")
    procs: list[subprocess.Popen] = []
    try:
        train = [recsvc, "train", "--events", str(events), "--no-evaluate"]
        subprocess.run(
            train + (["--catalog", str(catalog)] if catalog else []), check=True, capture_output=True, env=env
        )
        subprocess.run([recsvc, "publish", "latest"], check=True, capture_output=True, env=env)
        artifact = read_artifact(next(models.iterdir()), verify=False)
        assert artifact.repurchase is not None
        buyers = np.flatnonzero(np.diff(artifact.repurchase.history.indptr) > 0)
        rng = np.random.default_rng(5)
        sample = [artifact.user_ids[u] for u in rng.choice(buyers, min(1000, len(buyers)), replace=False)]
        items_per_buyer = float(np.mean(np.diff(artifact.repurchase.history.indptr)[buyers]))
        port = free_port()
        log = open(workdir / f"serve-{slug}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [recsvc, "serve", "--port", str(port)], env=env, stdout=log, stderr=log, cwd=workdir
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready", timeout=120.0)
        # Due dates at the end of the training data, as a storefront on a fresh model would see them
        # (both endpoints take the same parameter; recommendations ignore it without include_due).
        at = int(artifact.manifest["trained_until"])
        paths = {
            "recommendations": [f"/v1/users/{u}/recommendations?n=10&as_of={at}" for u in sample],
            # The lean answer (no explanations): the faster of the two, the stricter comparison.
            "recommendations-lean": [
                f"/v1/users/{u}/recommendations?n=10&explain=false&as_of={at}" for u in sample
            ],
            "buy-again": [f"/v1/users/{u}/buy-again?n=10&as_of={at}" for u in sample],
        }
        with urllib.request.urlopen(base + paths["buy-again"][0]) as r:
            body = json.loads(r.read())
        assert body["source"] == "personalized" and body["items"], body
        for name in paths:  # warm every worker
            run_wrk(base, paths[name], 2, connections, 0, workdir)
        peak: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name in paths:
                peak[name].append(run_wrk(base, paths[name], seconds, connections, 0, workdir))
        rec_max = max(r["rps"] for name in ("recommendations", "recommendations-lean") for r in peak[name])
        pace_ms = 1000.0 * connections / (rec_max / 2)
        paced: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name in paths:
                paced[name].append(run_wrk(base, paths[name], 2 * seconds, connections, pace_ms, workdir))
        print(
            f"\nmodel: {label}, {items_per_buyer:.1f} bought items per sampled customer; recsvc serve "
            f"defaults; wrk {connections} connections, {rounds} alternating rounds of {seconds} s "
            f"(paced: {2 * seconds} s)"
        )
        print(f"{'endpoint':<20}{'max req/s':>12}{'paced req/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for name in paths:
            best = max(peak[name], key=lambda r: r["rps"])
            p50 = float(np.median([r["p50"] for r in paced[name]]))
            p99 = float(np.median([r["p99"] for r in paced[name]]))
            rate = float(np.median([r["rps"] for r in paced[name]]))
            errors = sum(r["errors"] for r in peak[name] + paced[name])
            print(f"{name:<20}{best['rps']:>12,.0f}{rate:>13,.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}")
        result: dict[str, Any] = {"peak": peak, "paced": paced}
        for other in ("recommendations", "recommendations-lean"):
            ratios = [b["p99"] / r["p99"] for b, r in zip(paced["buy-again"], paced[other], strict=True)]
            ratio = float(np.median(ratios))
            print(
                f"buy-again p99 / {other} p99 at the same half load (~{rec_max / 2:,.0f} req/s): "
                f"{ratio:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})   target <= 1.0: "
                f"{'PASS' if ratio <= 1.0 else 'MISS'}"
            )
            result[f"p99_ratio_{other}"], result[f"ratios_{other}"] = ratio, ratios
        return result
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shops, shorter load runs")
    parser.add_argument("--parts", default="quality,train,serve", help="comma-separated: quality,train,serve")
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating load rounds (default 2 quick, 4)"
    )
    parser.add_argument("--seconds", type=int, default=None, help="seconds per load run (default 3 quick, 6)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json-out", type=Path, default=None, help="also write every figure here")
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help=f"public data sets (default {DATA_DIR})"
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"quality", "train", "serve"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "serve" in parts and shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="recsvc-bench-repurchase-"))
    out: dict[str, Any] = {}
    try:
        if "quality" in parts:
            print("# quality of the due list (time split; 95% bootstrap intervals over customers)")
            out["quality"] = quality(workdir, args.quick, args.data_dir)
        if "train" in parts:
            print("\n# training: what the repurchase model adds to `recsvc train`")
            out["train"] = train_overhead(workdir, args.quick, args.data_dir)
        if "serve" in parts:
            print("\n# serving: buy-again against recommendations, paired")
            out["serve"] = {
                label: serve(
                    workdir,
                    label,
                    events,
                    catalog,
                    args.rounds or (2 if args.quick else 6),
                    args.seconds or (3 if args.quick else 6),
                    args.connections,
                )
                for label, events, catalog in serve_models(workdir, args.quick, args.data_dir)
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
