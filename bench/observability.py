"""CPU cost per request of metrics and the request log, measured inside one process.

Run from the repository root::

    .venv/bin/python bench/observability.py            # ~1 minute

``bench/serve.py --observability`` measures the same thing end to end (req/s of two servers under
wrk), which on a shared host swings by tens of percent from one round to the next. This counts the
CPU time of this process (``time.process_time``: other processes' load does not enter it) for
recommendation requests through Flask's test client against four apps built by ``create_app`` on
one real Redis -- everything off, metrics only (multiprocess files, as under ``recsvc serve``),
request log only (the server's batched JSON handler), both -- in alternating paired rounds, and
prints the median extra microseconds per request of each against "off".
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=600, help="requests per app per round")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="recsvc-bench-observability-"))
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    # As `recsvc serve` does for its workers: prometheus-client's files, and the server's log set-up.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from serve import synthetic_artifact

    from recsvc.core import logs
    from recsvc.core.artifact import write_artifact
    from recsvc.core.config import Config
    from recsvc.storage import versions
    from recsvc.storage.connection import connect_admin
    from recsvc.storage.embedded import RedisServer
    from recsvc.web.app import create_app

    server = RedisServer(workdir / "redis").start()
    try:
        log_file = open(workdir / "requests.log", "w")  # noqa: SIM115 - closed below
        logs.configure("INFO", "json", 0.5)
        logging.getLogger().handlers[:] = [logs.LineHandler(log_file, flush_s=0.5)]
        logging.getLogger().handlers[0].setFormatter(logs.JsonFormatter())
        artifact = synthetic_artifact(20_000, 5_000, 64, seed=2)
        write_artifact(artifact, workdir / "models")
        config = Config.from_env(redis_url=server.url, models_dir=workdir / "models", var_dir=workdir / "var")
        versions.publish(connect_admin(server.url), artifact, config)
        off = dict(metrics_enabled=False, request_log=False, prometheus_multiproc_dir=None)
        apps = {
            "off": create_app(config.with_overrides(**off)).test_client(),
            "metrics": create_app(config.with_overrides(request_log=False)).test_client(),
            "request log": create_app(
                config.with_overrides(metrics_enabled=False, prometheus_multiproc_dir=None)
            ).test_client(),
            "both": create_app(config).test_client(),
        }
        users = artifact.user_ids[:500]

        def cpu_per_request(client) -> float:
            started = time.process_time()
            for i in range(args.requests):
                client.get(f"/v1/users/{users[i % len(users)]}/recommendations?n=20")
            return (time.process_time() - started) / args.requests * 1e6

        for client in apps.values():
            cpu_per_request(client)  # load the model, warm caches
        extra: dict[str, list[float]] = {name: [] for name in apps if name != "off"}
        base: list[float] = []
        for _ in range(args.rounds):
            for name in extra:
                reference = cpu_per_request(apps["off"])
                extra[name].append(cpu_per_request(apps[name]) - reference)
                base.append(reference)
        reference = statistics.median(base)
        print(f"CPU per request, everything off: {reference:.0f} us (median of {len(base)} runs)")
        print(f"{'on':<14}{'extra us/request':>18}{'share':>8}")
        for name, values in extra.items():
            cost = statistics.median(values)
            print(f"{name:<14}{cost:>18.1f}{cost / reference:>8.1%}")
        log_file.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
