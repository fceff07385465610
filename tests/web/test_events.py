"""``POST /v1/events`` and the real-time recommendation answer, through the Flask app on real Redis."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from recsvc.core.artifact import write_artifact
from recsvc.core.foldin import fold_in
from recsvc.storage import keys, versions
from recsvc.storage.embedded import RedisServer
from recsvc.storage.stream import stream_length
from tests.factories import API_KEY, make_artifact

AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = 1_718_000_000

pytestmark = pytest.mark.redis_backends("single", "cluster")
STREAM = "recsvc:events"


@pytest.fixture
def artifact(models_dir):
    a = make_artifact(n_users=20, n_items=50, factors=8, seed=1)
    a.manifest["params"] = {"factors": 8, "regularization": 0.5, "alpha": 2.0, "scaling": "linear"}
    a.manifest["trained_until"] = T
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def make_http(make_app, make_config):
    """A test client of an app built with these setting overrides."""
    return lambda **overrides: make_app(make_config(**overrides)).test_client()


def _event(user="u1", item="i3", kind="view", ts=T + 1, **extra):
    return {"user_id": user, "item_id": item, "event": kind, "timestamp": ts, **extra}


def test_post_one_event_and_a_batch(make_http, redis_client):
    http = make_http()
    r = http.post("/v1/events", json=_event(), headers=AUTH)
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["accepted"] == 1 and body["first_id"] == body["last_id"] and body["request_id"]
    r = http.post("/v1/events", json={"events": [_event(item=f"i{k}") for k in range(3)]}, headers=AUTH)
    assert r.status_code == 202 and r.get_json()["accepted"] == 3
    r = http.post(
        "/v1/events", json=[_event(user="u2"), _event(user="u2", kind="purchase", price=3.5)], headers=AUTH
    )
    assert r.status_code == 202 and r.get_json()["accepted"] == 2
    assert stream_length(redis_client, STREAM) == 6
    assert redis_client.llen(keys.recent("u1")) == 4 and redis_client.llen(keys.recent("u2")) == 2
    assert r.headers["X-Request-ID"] == r.get_json()["request_id"]


@pytest.mark.parametrize(
    "body, field, index, reason",
    [
        ([_event(), _event(ts="soon"), _event(item="bad id")], "events[1].timestamp", 1, "invalid_timestamp"),
        ({"events": [_event(), {"user_id": "u1"}]}, "events[1].item_id", 1, "missing_field"),
        (_event(kind="like"), "event", None, "unknown_event"),
        (_event(quantity=-1), "quantity", None, "invalid_quantity"),
        ({"events": []}, "events", None, "no_events"),
        ([_event()] * 6, "events", None, "too_many_events"),
    ],
)
def test_bad_events_are_400_naming_index_and_field_and_store_nothing(
    make_http, redis_client, body, field, index, reason
):
    http = make_http(max_events_batch=5)
    r = http.post("/v1/events", json=body, headers=AUTH)
    assert r.status_code == 400
    error = r.get_json()
    assert (error["error"], error["field"], error.get("index"), error["reason"]) == (
        "invalid_event",
        field,
        index,
        reason,
    )
    assert error["message"] and error["request_id"]
    assert stream_length(redis_client, STREAM) == 0 and not list(
        redis_client.scan_iter(keys.recent_pattern())
    )


def test_bad_bodies(make_http, redis_client):
    http = make_http(max_body_bytes=2000)
    r = http.post("/v1/events", data="{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.get_json()["field"] == "body"
    r = http.post("/v1/events", data="", headers=AUTH)
    assert r.status_code == 400 and r.get_json()["field"] == "body"
    r = http.post("/v1/events", json=[_event()] * 40, headers=AUTH)  # > 2000 bytes
    assert r.status_code == 413 and r.get_json()["error"]
    r = http.post("/v1/events?debug=1", json=_event(), headers=AUTH)
    assert r.status_code == 400 and r.get_json()["field"] == "debug"
    assert stream_length(redis_client, STREAM) == 0


def test_api_key_required_and_never_logged(make_http, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    http = make_http()
    assert http.post("/v1/events", json=_event()).status_code == 401
    assert http.post("/v1/events", json=_event(), headers={"X-API-Key": "wrong"}).status_code == 401
    assert http.post("/v1/events", json=_event(), headers={"X-API-Key": API_KEY}).status_code == 202
    disabled = make_http(api_keys=())
    r = disabled.post("/v1/events", json=_event(), headers=AUTH)
    assert r.status_code == 403 and r.get_json()["error"] == "disabled"
    assert stream_length(redis_client, STREAM) == 1
    assert API_KEY not in caplog.text
    assert not any(API_KEY in k.decode() for k in list(redis_client.scan_iter("*")))


def test_rate_limit_per_key(make_http, redis_client):
    http = make_http(events_rate_limit_per_min=2)
    assert [http.post("/v1/events", json=_event(), headers=AUTH).status_code for _ in range(2)] == [202, 202]
    r = http.post("/v1/events", json=_event(), headers=AUTH)
    assert r.status_code == 429 and r.get_json()["error"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert stream_length(redis_client, STREAM) == 2  # the refused request stored nothing


def test_history_length_is_bounded(make_http, redis_client):
    http = make_http(history_length=5)
    http.post("/v1/events", json=[_event(item=f"i{k}", ts=T + k) for k in range(12)], headers=AUTH)
    assert redis_client.lrange(keys.recent("u1"), 0, -1) == [
        f"{T + k}|0|i{k}".encode() for k in range(11, 6, -1)
    ]


def test_stream_full_is_503_and_stores_nothing(make_http, redis_client):
    http = make_http(events_stream_maxlen=3)
    assert http.post("/v1/events", json=[_event()] * 3, headers=AUTH).status_code == 202
    r = http.post("/v1/events", json=_event(), headers=AUTH)
    assert r.status_code == 503 and r.get_json()["error"] == "stream_full" and r.headers["Retry-After"]
    assert stream_length(redis_client, STREAM) == 3


def test_redis_down_is_503_not_a_crash(tmp_path, make_http):
    server = RedisServer(tmp_path / "down").start()
    http = make_http(redis_url=server.url)
    assert http.post("/v1/events", json=_event(), headers=AUTH).status_code == 202
    server.stop()
    r = http.post("/v1/events", json=_event(), headers=AUTH)
    assert r.status_code == 503 and r.get_json()["error"] == "unavailable"


def test_get_after_post_is_realtime(make_http, make_config, redis_client, artifact):
    versions.publish(redis_client, artifact, make_config(topk_cached=20))
    http = make_http()

    # A visitor the model does not know: popular until the first event, then folded in.
    r = http.get("/v1/users/visitor-7/recommendations?n=5")
    assert r.get_json()["source"] == "fallback" and r.get_json()["reason"] == "unknown_user"
    assert (
        http.post(
            "/v1/events", json=_event(user="visitor-7", item="i4", kind="purchase"), headers=AUTH
        ).status_code
        == 202
    )
    r = http.get("/v1/users/visitor-7/recommendations?n=5")
    body = r.get_json()
    assert r.status_code == 200 and body["source"] == "realtime" and body["model_version"]
    vector = fold_in(artifact.item_factors, [4], [10.0], 0.5, 2.0)
    scores = artifact.item_factors @ vector
    scores[4] = -np.inf  # just bought
    assert [item["item_id"] for item in body["items"]] == [
        artifact.item_ids[i] for i in np.argsort(-scores)[:5]
    ]

    # A known user: personalised from the cache until they have an event newer than the model.
    assert http.get("/v1/users/u3/recommendations?n=5").get_json()["source"] == "personalized"
    http.post("/v1/events", json=_event(user="u3", item="i9", kind="view", ts=T - 100), headers=AUTH)
    assert http.get("/v1/users/u3/recommendations?n=5").get_json()["source"] == "personalized"
    http.post("/v1/events", json=_event(user="u3", item="i9", kind="cart", ts=T + 100), headers=AUTH)
    body = http.get("/v1/users/u3/recommendations?n=5&category=shoes").get_json()
    assert body["source"] == "realtime"
    assert body["items"] and all(item["category"] == "shoes" for item in body["items"])
    # u3's training row (i3: 10) plus the new cart (4): i3 was bought in training, so it stays out.
    vector = fold_in(artifact.item_factors, [3, 9], [10.0, 4.0], 0.5, 2.0)
    scores = artifact.item_factors @ vector
    shoes = np.flatnonzero(artifact.category == 0)
    shoes = shoes[shoes != 3]
    expected = shoes[np.argsort(-scores[shoes])][:5]
    assert [item["item_id"] for item in body["items"]] == [artifact.item_ids[i] for i in expected]


def test_openapi_documents_events(make_http):
    doc = make_http().get("/openapi.json").get_json()
    operation = doc["paths"]["/v1/events"]["post"]
    assert {"202", "400", "401", "403", "413", "429", "503"} <= set(operation["responses"])
    assert "Event" in doc["components"]["schemas"]
