"""Paired load test of two worker models: the same locust step alternates between two servers.

    .venv/bin/python bench/loadtest/paired.py --classes buffered,gthread --rate 200 --rounds 6

Starts one redis-server, one sample shop and one ``recsvc serve --worker-class X`` per class (4
workers each, loopback), then runs ``run.py``'s storefront mix at ``--rate`` requests/s for
``--step-s`` seconds on each server in turn, ``--rounds`` times, swapping the order every round: the
host's background load hits both alike, which a sequential ``make loadtest`` per class cannot
promise on a shared machine. Prints each step and, per class, the p99 of every round and their
median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import run as loadtest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="buffered,gthread", help="two or more worker classes")
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s of every step")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--step-s", type=float, default=15.0)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    classes = args.classes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-paired-"))
    redis = harness.RedisProc(tmp / "redis").start()
    services: dict[str, harness.Service] = {}
    try:
        env = harness.base_env(
            redis.url, tmp, RECSVC_API_KEYS=loadtest.KEY, RECSVC_EVENTS_RATE_LIMIT_PER_MIN="100000000"
        )
        shop = harness.make_shop(tmp, env, users=2000, items=500)
        harness.recsvc(["publish", shop.version_a], env, tmp)
        data = tmp / "shop.json"
        data.write_text(json.dumps({"users": shop.users, "items": shop.items, "categories": shop.categories}))
        for name in classes:
            services[name] = harness.Service(
                env, tmp, workers=args.workers, name=name, worker_class=name
            ).start(ready="ready")
        steps: dict[str, list[dict]] = {name: [] for name in classes}
        for i in range(args.rounds):
            for name in classes if i % 2 == 0 else classes[::-1]:
                step = loadtest.run_step(services[name].base, data, args.rate, args.step_s, tmp, loadtest.KEY)
                steps[name].append(step)
                print(
                    f"round {i} {name:<9} achieved {step['achieved_rps']:>6} p50 {step['p50_ms']:>5} "
                    f"p95 {step['p95_ms']:>5} p99 {step['p99_ms']:>5} errors {step['failures']} "
                    f"load {step['load_average']}",
                    flush=True,
                )
        for name in classes:
            p99 = [s["p99_ms"] for s in steps[name]]
            errors = sum(s["failures"] for s in steps[name])
            print(f"{name}: p99 per round {p99}, median {statistics.median(p99):g} ms, errors {errors}")
    finally:
        for service in services.values():
            service.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
