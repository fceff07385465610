"""Fallbacks, never a 5xx: Redis stopped or stalled, nothing published, nothing anywhere.

Each test runs its own redis-server (recsvc.storage.connection.RedisServer) so it can stop it.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from recsvc.core.artifact import write_artifact
from recsvc.core.config import Config
from recsvc.storage import versions
from recsvc.storage.embedded import RedisServer
from tests.factories import make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

URLS = [
    "/v1/users/u1/recommendations?n=5&category=hats",
    "/v1/users/visitor/recommendations?n=5",
    "/v1/items/i4/similar?n=5",
    "/v1/popular?n=5",
    "/v1/model",
    "/v1/users/u1/buy-again?n=5",
]


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def server_config(server, make_config):
    """Configs for apps on this test's own Redis, which the test stops and stalls."""

    def build(**overrides) -> Config:
        return make_config(redis_url=server.url, redis_down_recheck_s=0.3, **overrides)

    return build


def _ids(body) -> list[str]:
    return [it["item_id"] for it in body["items"]]


def test_redis_stopped_serves_the_in_process_popular_list(server, tmp_path, make_app, server_config):
    config = server_config()
    artifact = make_artifact()
    write_artifact(artifact, config.models_dir)
    versions.publish(redis.Redis.from_url(server.url), artifact, config)
    # Make the local artifact differ from the live one, to prove the fallback is the in-process copy.
    write_artifact(make_artifact(seed=7), config.models_dir, version="29990101T000000Z-other")
    client = make_app(config).test_client()
    assert client.get(URLS[0]).get_json()["source"] == "personalized"

    server.stop()
    started = time.perf_counter()
    body = client.get(URLS[0]).get_json()
    assert time.perf_counter() - started < 1.0  # bounded timeouts and retries, no hang
    assert body["source"] == "fallback" and body["reason"] == "redis_unavailable"
    assert body["model_version"] == artifact.version
    assert _ids(body) == ["i2", "i5", "i8", "i11", "i14"]  # popular hats of the live version
    for url in URLS:
        r = client.get(url)
        assert r.status_code == 200, (url, r.get_data(as_text=True))
        assert r.get_json()["source"] == "fallback"
        assert r.get_json()["model_version"] == artifact.version
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["status"] == "degraded"
    assert ready.get_json()["checks"]["redis"] == "unreachable"
    assert client.get("/health/live").status_code == 200

    # Redis comes back: after the recheck window, answers are personalized again.
    server.start()
    versions.publish(redis.Redis.from_url(server.url), artifact, config)
    time.sleep(0.35)
    body = client.get(URLS[0]).get_json()
    assert body["source"] == "personalized"
    assert client.get("/health/ready").get_json()["status"] == "ready"


def test_redis_stalled_is_treated_like_down(server, tmp_path, make_app, server_config):
    config = server_config()
    artifact = make_artifact()
    write_artifact(artifact, config.models_dir)
    admin = redis.Redis.from_url(server.url)
    versions.publish(admin, artifact, config)
    client = make_app(config).test_client()
    assert client.get(URLS[0]).get_json()["source"] == "personalized"

    # CLIENT PAUSE stalls every other client's commands: Redis is up but too slow to answer.
    pauser = threading.Thread(target=lambda: admin.execute_command("CLIENT", "PAUSE", 1500, "ALL"))
    pauser.start()
    pauser.join()
    try:
        started = time.perf_counter()
        r = client.get(URLS[0])
        elapsed = time.perf_counter() - started
        assert r.status_code == 200 and r.get_json()["source"] == "fallback"
        assert r.get_json()["reason"] == "redis_unavailable"
        assert elapsed < 1.0
        # Within the recheck window, requests do not even try Redis: fast.
        started = time.perf_counter()
        assert client.get(URLS[1]).get_json()["source"] == "fallback"
        assert time.perf_counter() - started < 0.1
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")


def test_redis_down_before_any_model_was_loaded_uses_the_newest_local_artifact(
    server, tmp_path, make_app, server_config
):
    config = server_config()
    artifact = make_artifact()
    write_artifact(artifact, config.models_dir)
    client = make_app(config).test_client()
    server.stop()
    body = client.get(URLS[0]).get_json()
    assert body["source"] == "fallback" and body["model_version"] == artifact.version
    assert _ids(body) == ["i2", "i5", "i8", "i11", "i14"]
    assert client.get("/health/ready").get_json()["status"] == "degraded"


def test_nothing_published_serves_local_popularity_and_ready_is_degraded(
    server, tmp_path, make_app, server_config
):
    config = server_config()
    artifact = make_artifact()
    write_artifact(artifact, config.models_dir)
    client = make_app(config).test_client()
    for url in URLS:
        r = client.get(url)
        assert r.status_code == 200 and r.get_json()["source"] == "fallback"
    body = client.get(URLS[0]).get_json()
    assert body["reason"] == "not_published" and body["model_version"] == artifact.version
    assert _ids(body) == ["i2", "i5", "i8", "i11", "i14"]
    # It serves: a balancer must keep it (503 only when nothing at all can be served).
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.get_json()["status"] == "degraded" and ready.get_json()["reason"] == "not_published"
    # Publishing makes it ready without a restart.
    versions.publish(redis.Redis.from_url(server.url), artifact, config)
    assert client.get("/health/ready").status_code == 200
    assert client.get(URLS[0]).get_json()["source"] == "personalized"


def test_an_emptied_redis_keeps_serving_the_version_that_was_live(server, make_app, server_config):
    """Not the newest artifact on disk: that may be a rolled-back or gate-refused model."""
    config = server_config()
    old, new = make_artifact(seed=1), make_artifact(seed=2)
    write_artifact(old, config.models_dir, version="20240101T000000-old")
    write_artifact(new, config.models_dir, version="20240102T000000-new")  # newer on disk, never live
    versions.publish(redis.Redis.from_url(server.url), old, config)
    client = make_app(config).test_client()
    assert client.get(URLS[0]).get_json()["model_version"] == old.version
    redis.Redis.from_url(server.url).flushall()
    for url in URLS:
        body = client.get(url).get_json()
        assert body["model_version"] == old.version and body["reason"] == "not_published", (url, body)
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["status"] == "degraded"


def test_nothing_published_and_no_artifact_is_an_empty_200(server, tmp_path, make_app, server_config):
    client = make_app(server_config()).test_client()
    for url in URLS:
        r = client.get(url)
        assert r.status_code == 200
        body = r.get_json()
        assert body["source"] == "fallback" and body["model_version"] is None
        assert body.get("items", []) == []
    assert client.get("/health/ready").status_code == 503
    server.stop()
    assert client.get(URLS[0]).status_code == 200
    assert client.get("/health/ready").status_code == 503


def test_admin_answers_503_when_redis_is_down(server, tmp_path, make_app, server_config):
    config = server_config(api_keys=("k" * 16,))
    write_artifact(make_artifact(), config.models_dir)
    client = make_app(config).test_client()
    server.stop()
    r = client.post("/v1/admin/rollback", headers={"X-API-Key": "k" * 16})
    assert r.status_code == 503 and r.get_json()["error"] == "redis_unavailable"


READ_ENDPOINTS = [
    ("GET", "/v1/users/{user}/recommendations?n=5", None),
    ("GET", "/v1/users/{user}/recommendations?n=5&category=hats&max_price=30", None),
    ("GET", "/v1/users/{user}/bundles?n=2", None),
    ("GET", "/v1/items/i4/similar?n=5", None),
    ("GET", "/v1/items/i4/bundle", None),
    ("POST", "/v1/bundles", {"items": ["i4"], "user_id": "{user}"}),
    ("GET", "/v1/popular?n=5", None),
    ("GET", "/v1/model", None),
]


@pytest.mark.parametrize("user", ["u3", "visitor-1"])
def test_fold_in_raising_never_fails_a_read_endpoint(client, published, redis_client, monkeypatch, user):
    """A bug in fold-in costs the user real time, never a 5xx: every read endpoint answers 200."""
    from recsvc.core import foldin
    from recsvc.serving import realtime

    def broken(*args, **kwargs):
        raise RuntimeError("fold-in bug")

    monkeypatch.setattr(realtime, "fold_in", broken)
    assert foldin.fold_in is not broken  # only the serving path's reference is broken
    r = client.post(
        "/v1/events",
        json={"user_id": user, "item_id": "i9", "event": "cart", "timestamp": 1_900_000_000},
        headers={"Authorization": "Bearer test-key-0123456789"},
    )
    assert r.status_code == 202
    for method, url, body in READ_ENDPOINTS:
        url = url.format(user=user)
        if body is not None:
            body = {k: (v.format(user=user) if isinstance(v, str) else v) for k, v in body.items()}
        r = client.open(url, method=method, json=body)
        assert r.status_code == 200, (url, r.get_data(as_text=True))
    # Recommendations fall through from real time to the next strategy in the chain.
    answer = client.get(f"/v1/users/{user}/recommendations?n=5").get_json()
    expected = ("personalized", None) if user == "u3" else ("fallback", "unknown_user")
    assert (answer["source"], answer.get("reason")) == expected
