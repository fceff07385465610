"""Pre-promotion stress test: step the request rate up until p99 > 50 ms or an error.

    make loadtest                                   # its own Redis + sample shop + recsvc serve
    .venv/bin/python bench/loadtest/run.py --host http://10.0.0.5:8000 --data shop.json --api-key KEY
    .venv/bin/python bench/loadtest/run.py --rates 100,200,400 --step-s 20 --workers 4

Each step runs ``locust`` headless (bench/loadtest/locustfile.py: 70 % recommendations, a third
of them filtered; 10 % similar; 10 % bundles; 10 % events; known, unknown and real-time users) at a
fixed total rate (``constant_throughput`` per simulated user) for ``--step-s`` seconds, after a
stats reset once every user is running. A step *holds* when p99 <= ``--p99-ms`` (50), there is no
error, and the achieved rate is >= 90 % of the target (else the server, or the load generator on
the same host, fell behind). The capacity is the highest target rate that held; the run stops at the
second step in a row that does not hold.

Writes bench/results/loadtest/{steps.json, capacity.md, capacity.png}. Without ``--host`` it
starts its own redis-server, sample shop (2,000 users, 500 items), published model and
``recsvc serve --workers N`` on loopback, with the event rate limit raised (the mix posts far more
than one storefront key's default 600 requests a minute) and stops them all at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402

KEY = "loadtest-key-7d1e0c5b9a8f4e3d2c1b0a9f8e7d6c5b"
DEFAULT_RATES = [50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000]


def locust_bin() -> str:
    candidate = Path(sys.executable).parent / "locust"
    return str(candidate) if candidate.exists() else "locust"


def run_step(host: str, data: Path, rate: float, step_s: float, out: Path, key: str) -> dict:
    """One locust run at ``rate`` requests/s in total; the Aggregated row of its stats CSV."""
    per_user = 10.0
    users = max(4, int(round(rate / per_user)))
    prefix = out / f"step-{int(rate)}"
    env = {
        **os.environ,
        "LOADTEST_DATA": str(data),
        "LOADTEST_API_KEY": key,
        "LOADTEST_RATE_PER_USER": str(rate / users),
    }
    cmd = [
        locust_bin(), "-f", str(HERE / "locustfile.py"), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{int(step_s)}s",
        "--host", host, "--csv", str(prefix), "--reset-stats", "--only-summary",
        "--loglevel", "WARNING", "--stop-timeout", "5",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=step_s + 60, stdin=subprocess.DEVNULL
    )
    wall = time.monotonic() - t0
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv", encoding="utf-8")))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    per_name = {
        r["Name"]: {
            "requests": int(r["Request Count"]),
            "failures": int(r["Failure Count"]),
            "p99_ms": _f(r["99%"]),
        }
        for r in rows
        if r["Name"] != "Aggregated"
    }
    failures = []
    fpath = Path(f"{prefix}_failures.csv")
    if fpath.exists():
        failures = [
            {"name": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])}
            for r in csv.DictReader(open(fpath, encoding="utf-8"))
        ]
    return {
        "target_rps": rate,
        "users": users,
        "achieved_rps": round(_f(agg["Requests/s"]), 1),
        "requests": int(agg["Request Count"]),
        "failures": int(agg["Failure Count"]),
        "p50_ms": _f(agg["50%"]),
        "p95_ms": _f(agg["95%"]),
        "p99_ms": _f(agg["99%"]),
        "max_ms": round(_f(agg["Max Response Time"]), 1),
        "per_endpoint": per_name,
        "failure_kinds": failures,
        "locust_exit": proc.returncode,
        "wall_s": round(wall, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _f(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def holds(step: dict, p99_ms: float) -> bool:
    return (
        step["failures"] == 0
        and step["p99_ms"] <= p99_ms
        and step["achieved_rps"] >= 0.9 * step["target_rps"]
    )


def plot(steps: list[dict], capacity: float | None, p99_ms: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["target_rps"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(x, [s[key] for s in steps], style, label=key.replace("_ms", ""))
    ax.axhline(p99_ms, color="red", linestyle="--", linewidth=1, label=f"p99 target {p99_ms:g} ms")
    for s in steps:
        if s["failures"]:
            ax.annotate(f"{s['failures']} err", (s["target_rps"], s["p99_ms"]), color="red", fontsize=8)
    if capacity:
        ax.axvline(capacity, color="green", linestyle=":", label=f"capacity {capacity:g} req/s")
    ax.set_yscale("log")
    ax.set_xlabel("target rate (requests/s, whole mix)")
    ax.set_ylabel("latency (ms, log scale)")
    ax2 = ax.twinx()
    ax2.plot(x, [s["achieved_rps"] for s in steps], "k.:", label="achieved req/s")
    ax2.set_ylabel("achieved requests/s")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(steps: list[dict], p99_ms: float) -> str:
    lines = [
        "| target req/s | achieved | requests | errors | p50 ms | p95 ms | p99 ms | max ms | load avg "
        "| holds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['target_rps']:g} | {s['achieved_rps']:g} | {s['requests']:,} | {s['failures']} | "
            f"{s['p50_ms']:g} | {s['p95_ms']:g} | {s['p99_ms']:g} | {s['max_ms']:g} | {s['load_average']} | "
            f"{'yes' if holds(s, p99_ms) else 'no'} |"
        )
    return "\n".join(lines)


class OwnService:
    """Redis + sample shop + published model + ``recsvc serve`` of our own (loopback)."""

    def __init__(self, workdir: Path, workers: int, worker_class: str | None = None):
        self.workdir, self.workers, self.worker_class = workdir, workers, worker_class
        self.redis = self.service = None

    def __enter__(self) -> tuple[str, Path]:
        try:
            self.redis = harness.RedisProc(self.workdir / "redis").start()
            env = harness.base_env(
                self.redis.url,
                self.workdir,
                RECSVC_API_KEYS=KEY,
                RECSVC_EVENTS_RATE_LIMIT_PER_MIN="100000000",
            )
            shop = harness.make_shop(self.workdir, env, users=2000, items=500)
            harness.recsvc(["publish", shop.version_a], env, self.workdir)
            self.service = harness.Service(
                env, self.workdir, workers=self.workers, name="loadtest", worker_class=self.worker_class
            )
            self.service.start(ready="ready")
        except BaseException:
            self.__exit__()
            raise
        data = self.workdir / "shop.json"
        data.write_text(json.dumps({"users": shop.users, "items": shop.items, "categories": shop.categories}))
        return self.service.base, data

    def __exit__(self, *exc: object) -> None:
        if self.service:
            self.service.stop()
        if self.redis:
            self.redis.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", help="a running service (default: start one on loopback)")
    ap.add_argument("--data", help='JSON {"users": [...], "items": [...], "categories": [...]} (with --host)')
    ap.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY", KEY))
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="target rates, req/s")
    ap.add_argument("--step-s", type=float, default=20.0, help="seconds per step")
    ap.add_argument("--p99-ms", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=4, help="gunicorn workers of the service it starts")
    ap.add_argument("--worker-class", choices=("buffered", "gevent", "gthread"), help="default: serve's")
    ap.add_argument("--out", default="bench/results/loadtest")
    args = ap.parse_args(argv)
    if args.host and not args.data:
        ap.error("--host needs --data (the ids of users and items the service knows)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-loadtest-"))
    steps: list[dict] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        if args.host:
            ctx = _Given(args.host, Path(args.data))
        else:
            ctx = OwnService(tmp, args.workers, args.worker_class)
        with ctx as (host, data):
            misses = 0
            for rate in rates:
                step = run_step(host, data, rate, args.step_s, tmp, args.api_key)
                steps.append(step)
                ok = holds(step, args.p99_ms)
                print(
                    f"{rate:>6g} req/s: achieved {step['achieved_rps']:>7g}, p50 {step['p50_ms']:g} ms, "
                    f"p99 {step['p99_ms']:g} ms, errors {step['failures']}, load {step['load_average']} "
                    f"-> {'holds' if ok else 'does not hold'}",
                    flush=True,
                )
                misses = 0 if ok else misses + 1
                if misses >= 2:
                    break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    held = [s["target_rps"] for s in steps if holds(s, args.p99_ms)]
    # The capacity: the highest rate that held with every lower step holding too.
    capacity = None
    for s in steps:
        if not holds(s, args.p99_ms):
            break
        capacity = s["target_rps"]
    own = f" (recsvc serve, {args.workers} workers x 1 thread, redis-server on loopback)"
    cond = (
        f"{os.cpu_count()} CPU cores shared by the load generator (locust, 1 process) and the service"
        f"{'' if args.host else own}"
        f"; {args.step_s:g} s per step; started {started}"
    )
    summary = {
        "capacity_rps": capacity,
        "held_rates": held,
        "p99_target_ms": args.p99_ms,
        "conditions": cond,
        "host": args.host or "own loopback service",
        "steps": steps,
    }
    (out / "steps.json").write_text(json.dumps(summary, indent=2))
    md = (
        f"Capacity: **{capacity if capacity is not None else 'none'} req/s** of the storefront mix with "
        f"p99 <= {args.p99_ms:g} ms and 0 errors.\n\nConditions: {cond}.\n\n{table(steps, args.p99_ms)}\n"
    )
    (out / "capacity.md").write_text(md)
    plot(
        steps, capacity, args.p99_ms, out / "capacity.png", f"recsvc capacity: {capacity} req/s; {cond[:120]}"
    )
    print()
    print(md)
    print(f"plot: {out / 'capacity.png'}")
    return 0 if steps else 1


class _Given:
    def __init__(self, host: str, data: Path):
        self.host, self.data = host, data

    def __enter__(self):
        return self.host, self.data

    def __exit__(self, *exc: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
