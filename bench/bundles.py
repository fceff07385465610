"""Bundle benchmark: mining speed, bundle quality against two baselines, and endpoint latency.

    .venv/bin/python bench/bundles.py            # real datasets + synthetic 1M orders + HTTP
    .venv/bin/python bench/bundles.py --quick    # real datasets + synthetic 100k orders + short HTTP

1. **Mining** (``training.cooccurrence.mine_bundles_report``) on the real basket datasets in
   ``../shared/data`` (UCI Online Retail: the 22,061 purchase invoices, cancellations ``C...`` and
   non-product codes dropped by ``training.datasets``; Instacart: 15k orders) and on synthetic
   orders (1M, ``--quick`` 100k; 20k items with a Zipf popularity and 3 complements per item).
   Baseline in the same run: the textbook pure-Python pair count (``collections.Counter`` over
   ``itertools.combinations`` of every basket) on the same baskets. Printed: seconds per stage,
   orders/s, and ``baseline pair count / our whole mining`` (the speedup, although ours also does
   significance, ALS blend and coverage re-ranking).
2. **Quality**: ``training.cooccurrence.evaluate_bundles`` on a time split of each real dataset
   (ALS fitted on the training part, as ``recsvc evaluate`` does): hit rate@3 of our bundles vs
   global popularity vs raw co-occurrence counts.
3. **Endpoint latency** in the serving benchmark's setup (``bench/serve.py``: synthetic model of
   50k users x 20k items x 64 factors, ``--quick`` 20k x 5k; ``recsvc serve`` under gunicorn on
   127.0.0.1 with a throw-away redis-server, loaded with ``wrk``), the model's bundle candidates
   mined from the synthetic orders over the same items. Endpoints: ``GET /v1/items/<id>/bundle``,
   ``GET /v1/users/<id>/bundles``, ``POST /v1/bundles``; baseline in the same run:
   ``GET /v1/items/<id>/similar?n=2`` (same item-page widget size, the serving engineer's
   endpoint). Each at max throughput, then paced at half its max for p50/p99.

Datasets are converted into a temporary folder and deleted afterwards; nothing is written to the
repository. Needs ``wrk`` for part 3 (skipped with a note when missing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from recsvc.core.contract import PURCHASE  # noqa: E402
from recsvc.core.eventfiles import EventTable  # noqa: E402
from training.cooccurrence import build_baskets, evaluate_bundles, mine_bundles_report  # noqa: E402

DATA_DIR = REPO.parent / "shared" / "data"
DATASETS = ("online-retail-uci-baskets", "instacart")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def synthetic_orders(n_orders: int, n_items: int, seed: int = 0) -> EventTable:
    """Orders of 1 + Poisson(2.5) items (Zipf popularity); each item brings one of its three
    fixed complements along with probability 0.4 (the signal mining should find)."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(2.5, n_orders)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.9
    weights /= weights.sum()
    items = rng.choice(n_items, size=int(sizes.sum()), p=weights)
    order = np.repeat(np.arange(n_orders), sizes)
    complements = rng.integers(0, n_items, size=(n_items, 3))
    extra = rng.random(len(items)) < 0.4
    extra_items = complements[items[extra], rng.integers(0, 3, int(extra.sum()))]
    items = np.concatenate([items, extra_items])
    order = np.concatenate([order, order[extra]])
    sort = np.argsort(order, kind="stable")
    items, order = items[sort], order[sort]
    ids = np.array([f"sku{i:06d}" for i in range(n_items)], dtype=object)
    order_ids = np.array([f"o{o}" for o in range(n_orders)], dtype=object)
    return EventTable(
        user_id=np.array([f"c{o % (n_orders // 3 + 1)}" for o in range(n_orders)], dtype=object)[order],
        item_id=ids[items],
        event=np.full(len(items), PURCHASE, np.int8),
        timestamp=1_700_000_000 + order.astype(np.int64) * 30,
        order_id=order_ids[order],
    )


def load_dataset(name: str, workdir: Path):
    from recsvc.core.eventfiles import load_events
    from training.datasets import convert

    converted = convert(name, DATA_DIR, workdir / name)
    events, _ = load_events(converted.events)
    return events, converted.split_days


def item_index_of(events: EventTable) -> dict[str, int]:
    codes, values = events.codes("item_id")
    present = np.bincount(codes, minlength=len(values)) > 0
    return {item: i for i, item in enumerate(sorted(values[present]))}


def fit_factors(events: EventTable, item_ids: list[str], cutoff: int | None = None) -> np.ndarray:
    """ALS item factors as ``recsvc train`` fits them (default parameters), rows in ``item_ids`` order."""
    from recsvc.core.weighting import confidence_matrix, id_maps
    from training.als import TrainParams, fit_als

    params = TrainParams()
    users, _ = id_maps(events, params.weighting())
    confidence = confidence_matrix(
        events, users, np.asarray(item_ids, dtype=object), params.weighting(), now=cutoff
    )
    _, item_factors = fit_als(confidence, params, seed=0, threads=0)
    return item_factors


# ------------------------------------------------------------------------------------------------
# 1. Mining speed
# ------------------------------------------------------------------------------------------------


def naive_pair_count(baskets) -> tuple[float, int]:
    """The textbook way: a Counter over every pair of every basket. Returns (seconds, distinct pairs)."""
    matrix = baskets.matrix
    start = time.perf_counter()
    counts: Counter = Counter()
    indptr, indices = matrix.indptr, matrix.indices
    for b in range(matrix.shape[0]):
        row = indices[indptr[b] : indptr[b + 1]].tolist()
        if len(row) > 1:
            counts.update(itertools.combinations(sorted(row), 2))
    return time.perf_counter() - start, len(counts)


def mining_row(
    label: str, events: EventTable, factors: np.ndarray, index: dict[str, int], threads: int
) -> dict:
    category = np.full(len(index), -1, np.int32)
    start = time.perf_counter()
    candidates, report = mine_bundles_report(events, index, factors, category, threads=threads)
    total = time.perf_counter() - start
    baskets = build_baskets(events, index)
    naive_s, naive_pairs = naive_pair_count(baskets)
    ours_pairs = report["pairs_counted"] // 2  # ordered pairs -> unordered
    return {
        "label": label,
        "orders": report["baskets"],
        "items": len(index),
        "events": len(events),
        "seconds": total,
        "stages": report["seconds"],
        "naive_s": naive_s,
        "pairs_agree": naive_pairs == ours_pairs,
        "pairs": ours_pairs,
        "candidates": report["candidates"],
        "capped": report["baskets_capped"],
    }


def print_mining(rows: list[dict]) -> None:
    print(
        f"{'data':<34}{'orders':>10}{'items':>8}{'mine s':>8}{'baskets':>8}{'pairs':>7}{'blend':>7}"
        f"{'cover':>7}{'orders/s':>11}{'naive s':>9}{'pairs vs naive':>15}"
    )
    for r in rows:
        st = r["stages"]
        print(
            f"{r['label']:<34}{r['orders']:>10,}{r['items']:>8,}{r['seconds']:>8.2f}"
            f"{st['baskets']:>8.2f}{st['pairs']:>7.2f}{st['blend']:>7.2f}{st['coverage']:>7.2f}"
            f"{r['orders'] / r['seconds']:>11,.0f}"
            f"{r['naive_s']:>9.2f}{r['naive_s'] / max(st['pairs'], 1e-9):>14.1f}x"
        )
    for r in rows:
        agree = "agree" if r["pairs_agree"] else "DISAGREE"
        print(
            f"  {r['label']}: {r['pairs']:,} distinct pairs ({agree} with the naive count), "
            f"{r['candidates']:,} candidates kept, {r['capped']:,} baskets capped"
        )


# ------------------------------------------------------------------------------------------------
# 2. Quality
# ------------------------------------------------------------------------------------------------


def quality_row(name: str, events: EventTable, split_days: float) -> dict:
    from training.evaluation import split_cutoff, time_split

    train, test = time_split(events, split_days)
    cutoff = split_cutoff(events, split_days)
    index = item_index_of(train)
    factors = fit_factors(train, list(index), cutoff - 1)
    result = evaluate_bundles(train, test, index, factors, np.full(len(index), -1, np.int32), size=3)
    return {"name": name, "split_days": split_days, **result}


def print_quality(rows: list[dict]) -> None:
    print(
        f"{'data (time split)':<34}{'test orders':>12}{'queries':>9}{'bundles':>9}"
        f"{'raw co-occ':>11}{'popular':>9}{'vs co-occ':>10}{'vs popular':>11}"
    )

    def fmt(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.4f}"

    for r in rows:
        vs_co = "-" if r["lift_vs_cooccurrence"] is None else f"{r['lift_vs_cooccurrence']:.3f}x"
        vs_pop = "-" if r["lift_vs_popularity"] is None else f"{r['lift_vs_popularity']:.3f}x"
        label = f"{r['name']} ({r['split_days']:g} d)"
        print(
            f"{label:<34}{r['test_orders']:>12,}{r['queries']:>9,}"
            f"{fmt(r, 'hit_rate@3'):>9}{fmt(r, 'cooccurrence_hit_rate@3'):>11}"
            f"{fmt(r, 'popularity_hit_rate@3'):>9}"
            f"{vs_co:>10}{vs_pop:>11}"
        )


# ------------------------------------------------------------------------------------------------
# 3. Endpoint latency (the serving benchmark's setup)
# ------------------------------------------------------------------------------------------------

WRK_POST = """
local bodies = {%(bodies)s}
local pace_ms = %(pace_ms)s
math.randomseed(%(seed)d)
request = function()
  local body = bodies[math.random(#bodies)]
  return wrk.format("POST", "/v1/bundles", {["Content-Type"] = "application/json"}, body)
end
if pace_ms > 0 then
  delay = function() return pace_ms end
end
"""


def run_wrk_post(base: str, bodies: list[str], seconds: int, connections: int, pace_ms: float, workdir: Path):
    from serve import parse_wrk

    script = workdir / f"wrk-post-{time.monotonic_ns()}.lua"
    script.write_text(
        WRK_POST % {"bodies": ",".join(json.dumps(b) for b in bodies), "pace_ms": f"{pace_ms:.3f}", "seed": 7}
    )
    cmd = [
        "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s",
        "--latency", "--timeout", "5s", "-s", str(script), base,
    ]  # fmt: skip
    return parse_wrk(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def endpoint_latency(quick: bool, workdir: Path, workers: int, threads: int, connections: int) -> int:
    from serve import free_port, run_wrk, stop, synthetic_artifact, wait_http

    from recsvc.core.artifact import write_artifact
    from recsvc.core.config import Config
    from recsvc.storage import versions
    from recsvc.storage.connection import connect_admin
    from recsvc.storage.embedded import RedisServer

    if shutil.which("wrk") is None:
        print("wrk is not installed: endpoint latency skipped (apt-get install wrk)")
        return 0
    serve_users, serve_items = (20_000, 5_000) if quick else (50_000, 20_000)
    seconds = 3 if quick else 8
    artifact = synthetic_artifact(serve_users, serve_items, 64, seed=2)
    orders = synthetic_orders(100_000 if quick else 300_000, serve_items, seed=5)
    index = {item: i for i, item in enumerate(artifact.item_ids)}
    artifact.bundles, report = mine_bundles_report(orders, index, artifact.item_factors, artifact.category)
    print(
        f"model: {serve_users:,} users x {serve_items:,} items x 64 factors; bundle candidates for "
        f"{report['anchors_with_candidates']:,} items mined from {report['baskets']:,} synthetic orders"
    )
    server = RedisServer(workdir / "redis").start()
    procs: list[subprocess.Popen] = []
    try:
        client = connect_admin(server.url)
        models = workdir / "models"
        config = Config.create(redis_url=server.url, models_dir=models, var_dir=workdir / "var")
        write_artifact(artifact, models)
        versions.publish(client, artifact, config)
        env = dict(os.environ)
        env.update(
            REDIS_URL=server.url,
            RECSVC_MODELS_DIR=str(models),
            RECSVC_VAR_DIR=str(workdir / "var"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        )
        port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "recsvc"), "serve", "--port", str(port),
            "--workers", str(workers), "--threads", str(threads),
        ]  # fmt: skip
        log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=workdir))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready")

        rng = np.random.default_rng(11)
        in_stock = np.flatnonzero(artifact.available)
        anchors = [artifact.item_ids[i] for i in rng.choice(in_stock, 1000, replace=False)]
        users = [artifact.user_ids[u] for u in rng.choice(serve_users, 1000, replace=False)]
        carts = [
            json.dumps({"items": [artifact.item_ids[i] for i in rng.choice(in_stock, 3, replace=False)]})
            for _ in range(500)
        ]
        cases = [
            ("baseline: GET /v1/items/<id>/similar?n=2", [f"/v1/items/{a}/similar?n=2" for a in anchors]),
            ("GET /v1/items/<id>/bundle?size=3", [f"/v1/items/{a}/bundle?size=3" for a in anchors]),
            ("GET /v1/users/<id>/bundles?n=3", [f"/v1/users/{u}/bundles?n=3" for u in users]),
        ]
        # Sanity: real answers, not errors.
        import urllib.request

        with urllib.request.urlopen(base + cases[1][1][0]) as r:
            body = json.loads(r.read())
        assert len(body["bundles"]) == 1 and len(body["bundles"][0]["items"]) == 3, body
        for _, paths in cases:  # warm every worker
            run_wrk(base, paths, 1, connections, 0, workdir)
        run_wrk_post(base, carts, 1, connections, 0, workdir)

        results = []
        for label, paths in cases:
            peak = run_wrk(base, paths, seconds, connections, 0, workdir)
            paced = run_wrk(
                base, paths, seconds, connections, 1000.0 * connections / (peak["rps"] / 2), workdir
            )
            results.append((label, peak, paced))
        peak = run_wrk_post(base, carts, seconds, connections, 0, workdir)
        paced = run_wrk_post(
            base, carts, seconds, connections, 1000.0 * connections / (peak["rps"] / 2), workdir
        )
        results.append(("POST /v1/bundles (3-item carts)", peak, paced))

        print(f"workers={workers} threads={threads} connections={connections} seconds/run={seconds}")
        print(
            f"{'endpoint':<42}{'max req/s':>10}{'p99@max':>9}{'p50@half':>9}{'p99@half':>9}"
            f"{'p99 ratio':>10}{'errors':>7}"
        )
        base_p99 = results[0][2]["p99"]
        errors = 0
        for label, pk, pc in results:
            errors += pk["errors"] + pc["errors"]
            print(
                f"{label:<42}{pk['rps']:>10,.0f}{pk['p99']:>9.2f}{pc['p50']:>9.2f}{pc['p99']:>9.2f}"
                f"{pc['p99'] / base_p99:>9.2f}x{pk['errors'] + pc['errors']:>7}"
            )
        print(
            "(latencies in ms; 'half' = paced at half of that endpoint's own max; "
            "ratio vs the baseline's p99@half)"
        )
        return 1 if errors else 0
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k synthetic orders, short HTTP runs")
    parser.add_argument("--no-http", action="store_true", help="skip the endpoint latency part")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--mining-threads", type=int, default=0, help="mining threads, as `recsvc train` uses (0 = all cores)"
    )
    args = parser.parse_args(argv)
    mining_threads = args.mining_threads or os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="recsvc-bench-bundles-"))
    rc = 0
    try:
        print(
            f"# 1. mining speed, {mining_threads} threads (baseline: a pure-Python pair Counter on the "
            "same baskets, compared with the pairs stage)",
            flush=True,
        )
        mining, quality, loaded = [], [], {}
        for name in DATASETS:
            try:
                events, split_days = load_dataset(name, workdir)
            except FileNotFoundError as e:
                print(f"  {name}: skipped ({e})")
                continue
            loaded[name] = (events, split_days)
            index = item_index_of(events)
            factors = fit_factors(events, list(index))
            mining.append(mining_row(name, events, factors, index, mining_threads))
        n_orders = 100_000 if args.quick else 1_000_000
        orders = synthetic_orders(n_orders, 20_000, seed=1)
        index = {f"sku{i:06d}": i for i in range(20_000)}
        factors = (np.random.default_rng(2).standard_normal((20_000, 64)) * 0.3).astype(np.float32)
        mining.append(mining_row(f"synthetic {n_orders:,} orders", orders, factors, index, mining_threads))
        del orders
        print_mining(mining)

        print(
            "\n# 2. hit rate@3 on held-out orders (given one item, does the bundle hold another?)", flush=True
        )
        for name, (events, split_days) in loaded.items():
            quality.append(quality_row(name, events, split_days))
        print_quality(quality)

        if not args.no_http:
            print(
                "\n# 3. endpoint latency (serving benchmark setup: recsvc serve + wrk, loopback)", flush=True
            )
            rc = endpoint_latency(args.quick, workdir, args.workers, args.threads, args.connections)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
