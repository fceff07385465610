"""GET /metrics, the per-request log line and the audit lines, through the real app and a real Redis.

(Summing across gunicorn workers is checked against a real multi-worker server in
tests/system/test_operations.py.)
"""

from __future__ import annotations

import base64
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recsvc.storage.embedded import free_port
from tests.factories import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
METRICS_KEY = "metrics-only-key-0123456789"
T = 1_718_000_000


def scrape(client, headers=AUTH) -> dict[tuple[str, frozenset], float]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name, **labels) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


REC = "/v1/users/<user_id>/recommendations"


def test_metrics_need_a_key_and_a_metrics_key_is_read_only(make_app, make_config):
    client = make_app(make_config(metrics_keys=(METRICS_KEY,))).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
    scrape(client, AUTH)
    scrape(client, {"Authorization": f"Bearer {METRICS_KEY}"})
    # The metrics key opens nothing else.
    assert client.post("/v1/admin/rollback", headers={"X-API-Key": METRICS_KEY}).status_code == 401
    closed = make_app(make_config(api_keys=())).test_client()
    assert closed.get("/metrics").status_code == 403


@pytest.mark.redis_backends("single", "cluster")
def test_requests_answers_model_and_redis_are_counted(client, published):
    for user in ("u1", "u2", "u3"):
        assert client.get(f"/v1/users/{user}/recommendations?n=3").status_code == 200
    for user in ("nobody-1", "nobody-2"):
        assert client.get(f"/v1/users/{user}/recommendations?n=3").get_json()["reason"] == "unknown_user"
    client.get("/v1/popular?n=2")
    assert client.get("/v1/users/u1/recommendations?n=0").status_code == 400
    m = scrape(client)
    assert (
        value(m, "recsvc_http_request_duration_seconds_count", endpoint=REC, method="GET", status="200") == 5
    )
    assert (
        value(m, "recsvc_http_request_duration_seconds_count", endpoint=REC, method="GET", status="400") == 1
    )
    assert value(m, "recsvc_answers_total", endpoint=REC, source="personalized", reason="none") == 3
    assert value(m, "recsvc_answers_total", endpoint=REC, source="fallback", reason="unknown_user") == 2
    assert value(m, "recsvc_answers_total", endpoint="/v1/popular", source="fallback", reason="none") == 1
    # Latency buckets are cumulative and end at the count.
    inf = value(
        m, "recsvc_http_request_duration_seconds_bucket", endpoint=REC, method="GET", status="200", le="+Inf"
    )
    assert inf == 5
    # Every recommendation read its user in one scripted round trip.
    assert total(m, "recsvc_redis_command_duration_seconds_count", command="EVALSHA") >= 5
    assert total(m, "recsvc_redis_errors_total") == 0
    assert value(m, "recsvc_redis_up") == 1
    assert value(m, "recsvc_model_info", version=published.version, origin="redis", degraded="false") == 1
    assert 0 <= value(m, "recsvc_model_age_seconds") < 3600


def test_events_accepted_refused_and_rate_limited(make_app, make_config, published):
    client = make_app(make_config(events_rate_limit_per_min=3)).test_client()
    event = {"user_id": "u1", "item_id": published.item_ids[0], "event": "view", "timestamp": T}
    assert client.post("/v1/events", json=[event, event, event], headers=AUTH).status_code == 202
    assert client.post("/v1/events", json={**event, "event": "teleport"}, headers=AUTH).status_code == 400
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 429
    assert client.post("/v1/events", json=event).status_code == 401
    m = scrape(client)
    assert value(m, "recsvc_events_accepted_total") == 4
    assert value(m, "recsvc_event_requests_rejected_total", status="400") == 1
    assert value(m, "recsvc_event_requests_rejected_total", status="429") == 1
    assert value(m, "recsvc_event_requests_rejected_total", status="401") == 1
    assert value(m, "recsvc_rate_limited_total", endpoint="/v1/events") == 1
    # The visitor's new event is folded in on the next request: a fold-in.
    assert client.get("/v1/users/u1/recommendations?n=3").get_json()["source"] == "realtime"
    assert value(scrape(client), "recsvc_foldins_total", endpoint=REC) == 1


def test_a_retried_batch_is_stored_and_counted_once(client, published):
    event = {"user_id": "u1", "item_id": published.item_ids[0], "event": "view", "timestamp": T}
    headers = {**AUTH, "Idempotency-Key": "batch-0001"}
    first = client.post("/v1/events", json=[event, event], headers=headers)
    retry = client.post("/v1/events", json=[event, event], headers=headers)
    assert first.status_code == retry.status_code == 202
    assert first.get_json()["duplicate"] is False and retry.get_json()["duplicate"] is True
    m = scrape(client)
    assert value(m, "recsvc_events_accepted_total") == 2  # the retry stored nothing new


def test_wrong_keys_on_metrics_are_throttled_like_any_keyed_endpoint(make_app, make_config):
    client = make_app(make_config(metrics_keys=(METRICS_KEY,), auth_failures_per_min=3)).test_client()
    wrong = [client.get("/metrics", headers={"X-API-Key": f"wrong-key-{i}-0123456789"}) for i in range(4)]
    assert [r.status_code for r in wrong] == [401, 401, 401, 429]
    # Throttled by address: even the right metrics key waits for the minute to end.
    assert client.get("/metrics", headers={"X-API-Key": METRICS_KEY}).status_code == 429
    other = {"REMOTE_ADDR": "10.0.0.9"}
    assert client.get("/metrics", headers={"X-API-Key": METRICS_KEY}, environ_base=other).status_code == 200
    # Keys in the URL are refused here too.
    assert client.get(f"/metrics?api_key={METRICS_KEY}", environ_base=other).status_code == 400


def test_experiment_answers_are_counted_per_variant(client, published):
    definition = {"variants": [{"name": "a", "share": 50}, {"name": "b", "share": 50, "strategy": "popular"}]}
    assert client.put("/v1/admin/experiments/home", json=definition, headers=AUTH).status_code == 201
    served = {"a": 0, "b": 0}
    for k in range(30):
        body = client.get(f"/v1/users/u{k % 20}/recommendations?n=2").get_json()
        if body["experiment"] == "home":
            served[body["variant"]] += 1
    assert served["a"] > 0 and served["b"] > 0
    m = scrape(client)
    assert value(m, "recsvc_experiment_answers_total", experiment="home", variant="a") == served["a"]
    assert value(m, "recsvc_experiment_answers_total", experiment="home", variant="b") == served["b"]


def test_an_unreachable_redis_shows_as_errors_down_and_fallbacks(make_app, make_config):
    client = make_app(make_config(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    body = client.get("/v1/users/u1/recommendations?n=3").get_json()
    assert body["source"] == "fallback" and body["reason"] == "redis_unavailable"
    m = scrape(client)
    assert total(m, "recsvc_redis_errors_total", error="ConnectionError") >= 1
    assert value(m, "recsvc_answers_total", endpoint=REC, source="fallback", reason="redis_unavailable") == 1
    assert value(m, "recsvc_redis_up") == 0


def test_metrics_and_request_log_can_be_switched_off(make_app, make_config, published, caplog):
    client = make_app(make_config(metrics_enabled=False, request_log=False)).test_client()
    with caplog.at_level(logging.INFO):
        assert client.get("/v1/users/u1/recommendations").status_code == 200
        assert client.get("/metrics", headers=AUTH).status_code == 404
    assert not [r for r in caplog.records if r.name == "recsvc.request"]


# ---- logs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "send",
    [
        {"headers": {"Authorization": f"Bearer {API_KEY}"}},
        {"headers": {"X-API-Key": API_KEY}},
        {"headers": {"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()}},
        {"query_string": {"api_key": API_KEY}},
    ],
    ids=["bearer", "x-api-key", "basic-user", "query-string"],
)
def test_one_log_line_per_request_with_its_fields_and_never_the_key(client, published, caplog, send):
    with caplog.at_level(logging.INFO):
        client.get("/v1/admin/experiments", **send)
        client.post("/v1/events", data=f'{{"secret": "{API_KEY}"}}', **send)
        client.get("/v1/users/u1/recommendations?n=2", headers={"X-Request-ID": "req-42"})
    lines = [r for r in caplog.records if r.name == "recsvc.request"]
    assert len(lines) == 3
    last = lines[-1].fields
    assert last["request_id"] == "req-42" and last["endpoint"] == REC and last["status"] == 200
    assert last["source"] == "personalized" and last["reason"] is None
    assert last["model_version"] == published.version and last["latency_ms"] > 0
    assert API_KEY not in caplog.text
    assert not any(API_KEY in repr(getattr(r, "fields", "")) for r in caplog.records)


def test_admin_actions_write_an_audit_line_naming_the_key_by_fingerprint(client, published, caplog):
    with caplog.at_level(logging.INFO):
        r = client.post("/v1/admin/publish", json={"version": published.version}, headers=AUTH)
        assert r.status_code == 200
    audit = [r for r in caplog.records if r.name == "recsvc.audit"]
    assert len(audit) == 1
    fields = audit[0].fields
    assert fields["audit"] == "publish" and fields["version"] == published.version
    assert fields["key"] and fields["key"] != API_KEY and API_KEY not in caplog.text


def test_the_deploy_dashboard_and_alerts_only_use_metrics_the_service_exports(client, published):
    import re
    from pathlib import Path

    client.get("/v1/users/u1/recommendations")
    client.post(
        "/v1/events", json={"user_id": "u1", "item_id": "i1", "event": "view", "timestamp": T}, headers=AUTH
    )
    exported = {name for name, _ in scrape(client)}
    # Series that appear once something happened (a 429, a Redis error, an experiment answer...).
    families = {n.removesuffix("_total") for n in exported} | {
        "recsvc_rate_limited",
        "recsvc_redis_errors",
        "recsvc_experiment_answers",
        "recsvc_event_requests_rejected",
        "recsvc_foldins",
    }
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    used = set()
    for path in deploy.iterdir():
        used |= set(re.findall(r"recsvc_[a-z_]+", path.read_text()))
    assert used, "no metric referenced in deploy/"
    for name in used:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert name in exported or base in families or base + "_seconds" in families, name


def test_the_servers_request_line_is_written_straight_to_its_json_handler(client, published):
    """Under `recsvc serve` the line skips the LogRecord; it must be the line logging would write."""
    import io
    import json

    from recsvc.core.logs import JsonFormatter, LineHandler

    out = io.StringIO()
    handler = LineHandler(out, flush_s=0.0)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)  # setLevel, not .level: loggers cache whether a level is enabled
    try:
        client.get("/v1/users/u1/recommendations?n=2", headers={"X-Request-ID": "direct-1", **AUTH})
        logging.getLogger("recsvc.request").info("request", extra={"fields": {"status": 1}})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    direct, through_logging = (json.loads(line) for line in out.getvalue().splitlines()[-2:])
    assert list(direct)[:5] == list(through_logging)[:5] == ["ts", "level", "logger", "pid", "msg"]
    assert direct["logger"] == "recsvc.request" and direct["msg"] == "request" and direct["level"] == "info"
    assert (
        direct["request_id"] == "direct-1" and direct["status"] == 200 and direct["source"] == "personalized"
    )
    assert API_KEY not in out.getvalue()
