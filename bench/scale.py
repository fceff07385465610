"""Scaling out: the Spark training engine against the local one, and Redis Cluster against one Redis.

Run from the repository root (needs Java 17 for Spark, redis-server/redis-cli and wrk)::

    .venv/bin/python bench/scale.py            # 200k users x 50k items; ~15-25 minutes on 2 cores
    .venv/bin/python bench/scale.py --quick    # 20k users x 5k items, short load runs; ~5 minutes
    .venv/bin/python bench/scale.py --only train|redis

1. **Training engines on the same matrix.** A synthetic shop (``training.synth``) is split in time
   as ``recsvc evaluate`` does; the training period's confidence matrix is built once (recsvc's
   weighting) and fitted by each engine in its own process: implicit (local, all cores) and Spark
   ML's implicit ALS on ``local[N]`` with recsvc's confidence mapping
   (``training.spark_engine.fit_spark_als``). Printed per engine: fit wall time (the fit only,
   without Spark's start-up, which is reported apart), peak memory of the process tree (the JVM
   and its Python workers included, sampled every 0.1 s) and recall@20 / nDCG@10 on the test
   purchases. Target: Spark recall >= 0.95 x local.
2. **Redis: one server vs a 3-master cluster** (``redis-cli --cluster create``, all on this
   machine). Publish: the same synthetic model written to each (users/s of the write path and of
   the whole publish; target >= 100k users/s on the cluster) and Redis memory per user. Serving:
   ``recsvc serve`` against each backend, same workers and threads, loaded with ``wrk`` at the same
   connection count on ``GET /v1/users/<id>/recommendations?n=20``; rounds alternate between the
   two and the ratio is the median of per-round ratios. Target: cluster >= 0.8 x single.

Everything shares the machine with everything else (Spark, three Redis servers, gunicorn, wrk), so
absolute figures are of this host; the ratios are measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from serve import free_port, run_wrk, stop, synthetic_artifact, wait_http  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Part 1: training engines (each fit in a child process: `scale.py --fit ENGINE --data DIR`)
# ------------------------------------------------------------------------------------------------


def child_fit(engine: str, data: Path, cores: int) -> dict:
    """Fit one engine on the saved matrix; save its factors; return timings."""
    import scipy.sparse as sp

    from training.als import TrainParams

    with np.load(data / "train.npz", allow_pickle=False) as z:
        matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    params = TrainParams(**json.loads((data / "params.json").read_text()))
    out: dict = {"engine": engine}
    if engine == "local":
        from training.als import fit_als

        t0 = time.perf_counter()
        user_factors, item_factors = fit_als(matrix, params, seed=1, threads=cores, device="cpu")
        out["fit_s"] = time.perf_counter() - t0
    else:
        import pyarrow as pa

        from training import spark_engine

        t0 = time.perf_counter()
        options = spark_engine.SparkOptions(master=f"local[{cores}]", conf=(("spark.driver.memory", "2g"),))
        spark = spark_engine.spark_session(options)
        coo = matrix.tocoo()
        entries = spark.createDataFrame(
            pa.table(
                {
                    "u": pa.array(coo.row.astype(np.int32)),
                    "i": pa.array(coo.col.astype(np.int32)),
                    "c": pa.array(coo.data.astype(np.float64)),
                }
            )
        ).cache()
        entries.count()
        out["startup_s"] = time.perf_counter() - t0
        work = spark_engine._WorkDir(spark, None)
        held = spark_engine.SparkMatrix(
            user_ids=np.arange(matrix.shape[0]),
            item_ids=np.arange(matrix.shape[1]),
            users=None,
            items=None,
            entries=entries,
            extra_params={},
        )
        t0 = time.perf_counter()
        user_factors, item_factors, info = spark_engine.fit_spark_als(held, params, seed=1, work=work)
        out["fit_s"] = time.perf_counter() - t0
        out["spark"] = {k: info[k] for k in ("regularization_per_entry", "blocks", "fit_seconds")}
        work.close()
        spark.stop()
    np.save(data / f"{engine}-users.npy", user_factors)
    np.save(data / f"{engine}-items.npy", item_factors)
    return out


class PeakMemory(threading.Thread):
    """Peak resident memory of a process and all its descendants (the JVM and Python workers)."""

    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self.done = pid, every_s, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            time.sleep(self.every_s)


def run_fit(engine: str, data: Path, cores: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--fit", engine, "--data", str(data), "--cores", str(cores)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    meter = PeakMemory(proc.pid)
    meter.start()
    out, _ = proc.communicate()
    meter.done.set()
    meter.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the {engine} fit failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_gib"] = meter.peak / 2**30
    return result


def bench_training(quick: bool, cores: int, workdir: Path) -> dict:
    from recsvc.core.eventfiles import load_events
    from recsvc.core.weighting import confidence_matrix, id_maps, purchase_counts
    from training.als import TrainParams
    from training.evaluation import factor_metrics, prepare_split, split_cutoff, time_split
    from training.synth import write_shop

    users, items = (20_000, 5_000) if quick else (200_000, 50_000)
    params = TrainParams(factors=64, iterations=10)
    data = workdir / "train"
    data.mkdir()
    t0 = time.perf_counter()
    events_path, _ = write_shop(data, seed=7, n_users=users, n_items=items, days=60)
    events, _ = load_events(events_path)
    train, test = time_split(events, None)
    cutoff = split_cutoff(events, None)
    weighting = params.weighting()
    user_ids, item_ids = id_maps(train, weighting)
    matrix = confidence_matrix(train, user_ids, item_ids, weighting, now=cutoff - 1)
    purchased = purchase_counts(train, user_ids, item_ids)
    prep = prepare_split(
        user_ids,
        item_ids,
        matrix,
        purchased,
        test.user_id,
        test.item_id,
        cutoff,
        True,
        train_events=len(train),
    )
    np.savez(
        data / "train.npz",
        data=matrix.data,
        indices=matrix.indices,
        indptr=matrix.indptr,
        shape=np.asarray(matrix.shape),
    )
    (data / "params.json").write_text(
        json.dumps({"factors": params.factors, "iterations": params.iterations, "alpha": params.alpha})
    )
    print(
        f"# training engines: {matrix.shape[0]:,} users x {matrix.shape[1]:,} items, "
        f"{matrix.nnz:,} non-zeros, "
        f"{params.factors} factors, {params.iterations} iterations, {cores} cores "
        f"({len(events):,} events; data ready in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    rows = {}
    for engine in ("local", "spark"):
        result = run_fit(engine, data, cores)
        user_factors = np.load(data / f"{engine}-users.npy")
        item_factors = np.load(data / f"{engine}-items.npy")
        metrics = factor_metrics(prep, user_factors, item_factors, (10, 20), True)
        result |= {"recall@20": metrics["recall@20"], "ndcg@10": metrics["ndcg@10"]}
        rows[engine] = result
    local, spark = rows["local"], rows["spark"]
    print(f"{'engine':<22}{'fit s':>9}{'peak GiB':>10}{'recall@20':>11}{'ndcg@10':>9}")
    for name, row in (("implicit (local)", local), (f"Spark ML local[{cores}]", spark)):
        print(
            f"{name:<22}{row['fit_s']:>9.1f}{row['peak_gib']:>10.2f}{row['recall@20']:>11.4f}{row['ndcg@10']:>9.4f}"
        )
    ratio = spark["recall@20"] / local["recall@20"]
    print(
        f"Spark session start + matrix handed to Spark: {spark['startup_s']:.1f} s; "
        f"Spark/local fit time {spark['fit_s'] / local['fit_s']:.1f}x; "
        f"recall@20 ratio {ratio:.3f} (target >= 0.95: {'PASS' if ratio >= 0.95 else 'MISS'})\n",
        flush=True,
    )
    return {
        "shape": list(matrix.shape),
        "nnz": int(matrix.nnz),
        "events": len(events),
        "test_users": int(len(prep.test_users)),
        "engines": rows,
        "recall_ratio": ratio,
    }


# ------------------------------------------------------------------------------------------------
# Part 2: Redis, one server vs a cluster
# ------------------------------------------------------------------------------------------------


def bench_redis(quick: bool, workdir: Path, connections: int, workers: int, threads: int) -> dict:
    from recsvc.core.artifact import write_artifact
    from recsvc.core.config import Config
    from recsvc.storage import versions
    from recsvc.storage.connection import connect_admin
    from recsvc.storage.embedded import RedisClusterServer, RedisServer

    publish_users, publish_items = (30_000, 1_000) if quick else (100_000, 1_000)
    serve_users, serve_items = (20_000, 5_000) if quick else (50_000, 20_000)
    rounds, seconds = (2, 4) if quick else (5, 8)
    models = workdir / "models"
    single = RedisServer(workdir / "redis-single").start()
    cluster = RedisClusterServer(workdir / "redis-cluster").start()
    backends = {"single": single.url, "cluster": cluster.url}
    procs: list[subprocess.Popen] = []
    out: dict = {"publish": {}, "serve": {}}
    try:
        # -- publish: the same artifact into each, twice, alternating --------------------------------
        big = synthetic_artifact(publish_users, publish_items, 64, seed=1)
        write_artifact(big, models)
        print(f"# publish: {publish_users:,} users x {publish_items:,} items x 64 factors, K=200", flush=True)
        for attempt in range(2):
            for name, url in backends.items():
                client = connect_admin(url)
                client.flushall()
                stats: list[versions.PublishStats] = []
                config = Config.create(redis_url=url, models_dir=models, var_dir=workdir / "var")
                versions.publish(client, big, config, stats=stats)
                s = stats[0]
                row = out["publish"].setdefault(name, {"write": [], "whole": []})
                row["write"].append(s.write_users_per_second)
                row["whole"].append(s.users_per_second)
                if attempt == 0:
                    row["bytes_per_user"] = versions.version_memory(client, s.version) / publish_users
                client.close()
        print(f"{'backend':<10}{'write path users/s':>20}{'whole publish users/s':>23}{'Redis B/user':>14}")
        for name, row in out["publish"].items():
            print(
                f"{name:<10}{np.median(row['write']):>20,.0f}{np.median(row['whole']):>23,.0f}"
                f"{row['bytes_per_user']:>14,.0f}"
            )
        cluster_write = float(np.median(out["publish"]["cluster"]["write"]))
        print(f"cluster write path >= 100,000 users/s: {'PASS' if cluster_write >= 100_000 else 'MISS'}\n")
        del big

        # -- serving ------------------------------------------------------------------------------
        print(
            f"# serving: {serve_users:,} users x {serve_items:,} items x 64 factors; recsvc serve "
            f"--workers {workers} --threads {threads}; wrk -c {connections}, {rounds} alternating rounds "
            f"of {seconds} s",
            flush=True,
        )
        artifact = synthetic_artifact(serve_users, serve_items, 64, seed=2)
        write_artifact(artifact, models)
        rng = np.random.default_rng(3)
        sample = [artifact.user_ids[u] for u in rng.choice(serve_users, 1000, replace=False)]
        paths = [f"/v1/users/{u}/recommendations?n=20" for u in sample]
        bases = {}
        log = open(workdir / "servers.log", "w")  # noqa: SIM115 - closed at the end
        for name, url in backends.items():
            client = connect_admin(url)
            client.flushall()
            versions.publish(client, artifact, Config.create(redis_url=url, models_dir=models))
            client.close()
            port = free_port()
            env = dict(os.environ)
            env.update(
                REDIS_URL=url, RECSVC_MODELS_DIR=str(models), RECSVC_VAR_DIR=str(workdir / f"var-{name}")
            )
            cmd = [
                str(Path(sys.executable).parent / "recsvc"), "serve", "--port", str(port),
                "--workers", str(workers), "--threads", str(threads),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=workdir))
            bases[name] = f"http://127.0.0.1:{port}"
        for name, base in bases.items():
            wait_http(f"{base}/health/ready", timeout=60)
            import urllib.request

            with urllib.request.urlopen(base + paths[0]) as r:
                body = json.loads(r.read())
            assert body["source"] == "personalized" and len(body["items"]) == 20, (name, body)
            run_wrk(base, paths, 2, connections, 0, workdir)  # warm-up: model loaded in every worker
        results: dict[str, list[dict]] = {name: [] for name in bases}
        for k in range(rounds):
            order = list(bases) if k % 2 == 0 else list(reversed(bases))
            for name in order:
                results[name].append(run_wrk(bases[name], paths, seconds, connections, 0, workdir))
        ratios = [c["rps"] / s["rps"] for s, c in zip(results["single"], results["cluster"], strict=True)]
        print(f"{'backend':<10}{'req/s (median)':>16}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for name, runs in results.items():
            print(
                f"{name:<10}{np.median([r['rps'] for r in runs]):>16,.0f}"
                f"{np.median([r['p50'] for r in runs]):>9.2f}{np.median([r['p99'] for r in runs]):>9.2f}"
                f"{sum(r['errors'] for r in runs):>8}"
            )
        ratio = float(np.median(ratios))
        print(
            f"cluster / single req/s per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {ratio:.2f} "
            f"(target >= 0.8: {'PASS' if ratio >= 0.8 else 'MISS'})",
            flush=True,
        )
        out["serve"] = {"runs": results, "ratios": ratios, "ratio": ratio}
        log.close()
    finally:
        for proc in procs:
            stop(proc)
        single.stop()
        cluster.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, short load runs")
    parser.add_argument("--only", choices=["train", "redis"], help="run one part")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores for both engines")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json-out", help="also write the figures as JSON")
    parser.add_argument("--fit", choices=["local", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit:
        print(json.dumps(child_fit(args.fit, Path(args.data), args.cores)))
        return 0
    if args.only != "train" and shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="recsvc-bench-scale-"))
    figures: dict = {"quick": args.quick, "cores": args.cores, "host_cpus": os.cpu_count()}
    try:
        if args.only in (None, "train"):
            figures["training"] = bench_training(args.quick, args.cores, workdir)
        if args.only in (None, "redis"):
            figures["redis"] = bench_redis(args.quick, workdir, args.connections, args.workers, args.threads)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
