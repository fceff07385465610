"""System tests: a real multi-worker ``recsvc serve`` and real redis-servers, driven only
through public surfaces (the ``recsvc`` console script, HTTP, signals) by bench/harness.py.

Every process is started on a free loopback port and stopped by its own id when the fixture ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

# Several keys: the per-key rate limit of one test does not spill into another.
KEYS = [f"system-key-{i}-0123456789abcdef0123456789" for i in range(4)]


class Target:
    """A published shop served by ``recsvc serve``, with its own redis-server."""

    def __init__(self, workdir: Path, workers: int, access_log: bool = False, **env: str):
        self.workdir = workdir
        self.redis = harness.RedisProc(workdir / "redis").start()
        try:
            self.env = harness.base_env(self.redis.url, workdir, RECSVC_API_KEYS=",".join(KEYS), **env)
            self.shop = harness.make_shop(workdir, self.env, users=300, items=120)
            harness.recsvc(["publish", self.shop.version_a], self.env, workdir)
            self.service = harness.Service(
                self.env, workdir, workers=workers, access_log=access_log, name="system"
            ).start(ready="ready")
        except BaseException:
            self.redis.stop()
            raise

    @property
    def base(self) -> str:
        return self.service.base

    def http(self, timeout_s: float = 5.0) -> harness.Http:
        return harness.Http(self.base, timeout_s)

    def stop(self) -> None:
        self.service.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """4 single-threaded workers (the shape the holes were reported on), access log on."""
    # The rate-limit probes spend a key's minute: the limit they were written against.
    t = Target(
        tmp_path_factory.mktemp("target"), workers=4, access_log=True, RECSVC_EVENTS_RATE_LIMIT_PER_MIN="600"
    )
    yield t
    t.stop()
