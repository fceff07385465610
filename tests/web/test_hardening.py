"""Input and credential rules at the HTTP edge: body caps, keys never in URLs, wrong keys throttled,
405 with Allow, events stored at most once per batch id."""

from __future__ import annotations

import io

import pytest
import redis
from redis.crc import key_slot

from recsvc.storage import keys, ratelimit, stream
from recsvc.web.auth import configured_keys_problem, key_fingerprint
from tests.factories import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EVENT = {"user_id": "u1", "item_id": "i3", "event": "view", "timestamp": 1_718_000_001}


@pytest.fixture
def http(make_app, make_config):
    return lambda **overrides: make_app(make_config(**overrides)).test_client()


def _chunked(client, path: str, body: bytes):
    """POST ``body`` without a Content-Length, as a chunked upload arrives at the app."""
    return client.post(
        path,
        input_stream=io.BytesIO(body),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def test_a_chunked_body_over_the_cap_is_413_not_cut(http):
    client = http(max_body_bytes=1000)
    small = b'{"items": ["i1"]}'
    assert _chunked(client, "/v1/bundles", small).status_code == 200
    big = b'{"items": ["i1"], "pad": "' + b"a" * 1000 + b'"}'  # a valid prefix of 1000 bytes + more
    r = _chunked(client, "/v1/bundles", big)
    assert r.status_code == 413 and r.get_json()["field"] == "body"
    assert client.post("/v1/bundles", data=big, content_type="application/json").status_code == 413


@pytest.mark.parametrize("name", ["api_key", "apikey", "token", "key", "access_token"])
def test_a_key_in_the_query_string_is_refused_without_being_echoed(http, name):
    r = http().get(f"/v1/admin/experiments?{name}={API_KEY}", headers=AUTH)
    assert r.status_code == 400 and r.get_json()["field"] == name
    assert API_KEY not in r.get_data(as_text=True)


def test_basic_auth_is_not_a_way_in(http):
    import base64

    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    assert http().get("/v1/admin/experiments", headers={"Authorization": f"Basic {basic}"}).status_code == 401


def test_wrong_keys_are_throttled_per_address_then_the_right_one_waits_too(http):
    client = http(auth_failures_per_min=5)
    statuses = [
        client.post(
            "/v1/events", json=EVENT, headers={"Authorization": f"Bearer wrong-{i:02d}-xxxxxxxxxxxx"}
        ).status_code
        for i in range(8)
    ]
    assert statuses == [401] * 5 + [429] * 3
    # The address is refused until the minute ends, whatever key it sends: a guess learns nothing.
    r = client.post("/v1/events", json=EVENT, headers=AUTH)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    other = client.post("/v1/events", json=EVENT, headers=AUTH, environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert other.status_code == 202  # another client is not affected


def test_short_keys_are_refused_at_start(make_app, make_config):
    assert configured_keys_problem(make_config(api_keys=("x" * 15,)))
    assert configured_keys_problem(make_config(api_keys=("x" * 16,))) is None
    with pytest.raises(ValueError, match="RECSVC_API_KEYS: 1 key.* shorter than 16"):
        make_app(make_config(api_keys=("short",)))
    # The read-only scrape keys open /metrics: they are held to the same length.
    with pytest.raises(ValueError, match="RECSVC_METRICS_KEYS: 1 key.* shorter than 16"):
        make_app(make_config(metrics_keys=("short",)))


@pytest.mark.parametrize(
    "method, path, allowed", [("DELETE", "/v1/popular", "GET"), ("GET", "/v1/events", "POST")]
)
def test_405_names_the_allowed_methods(http, method, path, allowed):
    r = http().open(path, method=method)
    assert r.status_code == 405 and r.mimetype == "application/json"
    assert allowed in r.headers["Allow"]


def test_a_list_or_object_event_type_is_400_and_not_charged(http, redis_client):
    client = http(events_rate_limit_per_min=3)
    for bad in (["view"], {"type": "view"}):
        r = client.post("/v1/events", json={**EVENT, "event": bad}, headers=AUTH)
        assert r.status_code == 400 and r.get_json()["field"] == "event"


@pytest.mark.redis_backends("single", "cluster")
def test_a_batch_retried_with_its_idempotency_key_is_stored_once(http, redis_client):
    client = http()
    headers = {**AUTH, "Idempotency-Key": "batch-0001"}
    first = client.post("/v1/events", json=[EVENT, EVENT], headers=headers)
    again = client.post("/v1/events", json=[EVENT, EVENT], headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["duplicate"] is False and again.get_json()["duplicate"] is True
    assert again.get_json()["first_id"] == first.get_json()["first_id"] and again.get_json()["accepted"] == 2
    assert stream.stream_length(redis_client, "recsvc:events") == 2
    bad = client.post("/v1/events", json=EVENT, headers={**AUTH, "Idempotency-Key": "has space"})
    assert bad.status_code == 400 and bad.get_json()["field"] == "Idempotency-Key"


@pytest.mark.redis_backends("single", "cluster")
def test_a_write_that_runs_late_after_its_attempt_was_given_up_stores_nothing(redis_client):
    """The stalled-Redis case: the reply of the first attempt is lost, the service settles it (gives
    it up), and when Redis runs the first copy afterwards it finds the mark and stores nothing."""
    events = [dict(EVENT)]
    batch = stream.record_key(events, "fp", "b1")
    assert stream.settle_batch(redis_client, batch, "attempt-1", 60) is None  # nothing stored: given up
    with pytest.raises(stream.BatchGivenUp):
        stream.store_batch(redis_client, events, batch_key=batch, attempt="attempt-1", stream="s",
                           history_length=5, history_ttl_s=60, dedup_ttl_s=60)  # fmt: skip
    assert stream.stream_length(redis_client, "s") == 0
    # A new attempt of the same batch (the client's retry) is stored, once.
    stored = stream.store_batch(redis_client, events, batch_key=batch, attempt="attempt-2", stream="s",
                                history_length=5, history_ttl_s=60, dedup_ttl_s=60)  # fmt: skip
    assert stored.count == 1 and not stored.duplicate
    settled = stream.settle_batch(redis_client, batch, "attempt-3", 60)
    assert settled is not None and settled.first_id == stored.first_id
    assert stream.stream_length(redis_client, "s") == 1


@pytest.mark.redis_backends("single", "cluster")
def test_a_batch_of_users_in_several_groups_is_stored_once_with_every_recent_list(http, redis_client):
    """The record lives in the slot of the shard the batch goes to (its first user's group): one
    script on one node stores it at most once, also on a cluster; the other groups' recent lists
    follow once, and not again for the retry."""
    users = ["u1"] + [
        u for u in (f"v{i}" for i in range(100)) if keys.user_group(u) != keys.user_group("u1")
    ][:2]
    batch = [{**EVENT, "user_id": u} for u in users]
    record = stream.record_key(batch, key_fingerprint(API_KEY), "multi-0001")
    shard = keys.stream_shard("recsvc:events", keys.user_group("u1"))
    assert key_slot(record.encode()) == key_slot(shard.encode()) == key_slot(keys.recent("u1").encode())
    client = http()
    headers = {**AUTH, "Idempotency-Key": "multi-0001"}
    for _ in range(2):
        assert client.post("/v1/events", json=batch, headers=headers).status_code == 202
    assert redis_client.exists(record) and redis_client.xlen(shard) == 3
    assert stream.stream_length(redis_client, "recsvc:events") == 3
    assert [redis_client.llen(keys.recent(u)) for u in users] == [1, 1, 1]


def test_redis_gone_mid_write_answers_503_without_claiming_nothing_was_stored(
    http, redis_client, monkeypatch
):
    """Not "nothing was stored" (it may have been); and not charged to the key's rate limit."""
    client = http()

    def boom(*args, **kwargs):
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(stream, "store_batch", boom)
    monkeypatch.setattr(stream, "settle_batch", boom)
    r = client.post("/v1/events", json=EVENT, headers=AUTH)
    assert r.status_code == 503 and r.get_json()["error"] == "outcome_unknown" and r.get_json()["batch_id"]
    assert ratelimit.peek(redis_client, API_KEY, 600).count == 0


def test_behind_a_proxy_the_throttle_counts_the_forwarded_client(http):
    client = http(auth_failures_per_min=2, proxy_hops=1)
    wrong = {"Authorization": "Bearer wrong-key-xxxxxxxxxxxx"}
    for _ in range(3):
        client.post("/v1/events", json=EVENT, headers={**wrong, "X-Forwarded-For": "203.0.113.7"})
    blocked = client.post("/v1/events", json=EVENT, headers={**AUTH, "X-Forwarded-For": "203.0.113.7"})
    other = client.post("/v1/events", json=EVENT, headers={**AUTH, "X-Forwarded-For": "203.0.113.8"})
    assert blocked.status_code == 429 and other.status_code == 202
