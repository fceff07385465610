"""One check per hole an outside tester found, against a real 4-worker ``recsvc serve``.

Each check states the right behaviour and must pass (the holes are closed; a check that fails is a
hole reopened). Controls next to them show the probe itself works, so a failure is the hole and not
a broken probe.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time

import faults
import harness
import pytest

from tests.system.conftest import KEYS

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def _event(**over):
    return {
        "user_id": "u000001",
        "item_id": "sku-00001",
        "event": "view",
        "timestamp": int(time.time()),
        **over,
    }


# ------------------------------------------------------------------------------------------------
# (1) slow-body DoS
# ------------------------------------------------------------------------------------------------


def _fast_requests_while_slow_bodies(target, n_slow: int, window_s: float = 3.0):
    socks = faults.slow_body_connections(target.base, n_slow)
    stop = threading.Event()

    def trickle():
        while not stop.wait(2.0):  # one byte every 2 s, as the outside tester did
            for s in socks:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    latencies, unanswered = [], 0
    try:
        client = target.http(timeout_s=1.0)
        end = time.monotonic() + window_s
        while time.monotonic() < end:
            r = client.get("/v1/popular?n=5", {"Connection": "close"})  # any worker may take it
            if r.status == 200:
                latencies.append(r.elapsed)
            else:
                unanswered += 1
                client.close()
        client.close()
    finally:
        stop.set()
        t.join(5)
        for s in socks:
            s.close()
    # Let the workers come back before the next test (bounded poll, not a sleep).
    harness.wait_until(
        lambda: harness.http_once(target.base, "GET", "/health/live", timeout_s=1)[0] == 200, 60
    )
    return sorted(latencies), unanswered


def test_control_fast_requests_are_fast_without_slow_clients(target):
    latencies, unanswered = _fast_requests_while_slow_bodies(target, 0, window_s=1.0)
    assert unanswered == 0 and len(latencies) > 10


def test_8_slow_body_connections_do_not_stall_a_4_worker_server(target):
    latencies, unanswered = _fast_requests_while_slow_bodies(target, 8)
    assert unanswered == 0, f"{unanswered} fast requests got no answer within 1 s"
    assert latencies[int(0.99 * (len(latencies) - 1))] <= 0.050


# ------------------------------------------------------------------------------------------------
# (2) 500 for type errors in bodies, charged to the rate limit
# ------------------------------------------------------------------------------------------------


def test_control_a_valid_event_is_accepted(target):
    r = target.http().post_json("/v1/events", _event(), harness.bearer(KEYS[0]))
    assert r.status == 202, r.body


@pytest.mark.parametrize("value", [["view"], {"type": "view"}], ids=["list", "object"])
def test_events_with_a_list_or_object_event_are_400(target, value):
    r = target.http().post_json("/v1/events", _event(event=value), harness.bearer(KEYS[0]))
    assert r.status == 400, (r.status, r.body[:200])


def _experiment(control):
    return {"variants": [{"name": "a", "share": 50}, {"name": "b", "share": 50}], "control": control}


def test_control_a_valid_experiment_is_stored(target):
    r = target.http().request(
        "PUT", "/v1/admin/experiments/sys-ok", json.dumps(_experiment("a")).encode(),
        {"Content-Type": "application/json", **harness.bearer(KEYS[0])},
    )  # fmt: skip
    assert r.status in (200, 201), r.body


@pytest.mark.parametrize("control", [["a"], {"name": "a"}], ids=["list", "object"])
def test_experiment_with_a_list_or_object_control_is_400(target, control):
    r = target.http().request(
        "PUT", "/v1/admin/experiments/sys-bad", json.dumps(_experiment(control)).encode(),
        {"Content-Type": "application/json", **harness.bearer(KEYS[0])},
    )  # fmt: skip
    assert r.status == 400, (r.status, r.body[:200])


def test_server_errors_are_not_charged_to_the_rate_limit(target):
    """Spend the key's minute (600 requests) on bodies that answer 5xx today, up to the first 429; a
    valid event right after must not be refused because of 5xx answers. Once those bodies answer 400
    (documented to count), the check passes."""
    client = target.http()
    statuses = []
    for _ in range(1300):  # until the first 429: the limit is a fixed window, it may roll over once
        statuses.append(
            client.post_json("/v1/events", _event(event=["view"]), harness.bearer(KEYS[1])).status
        )
        if statuses[-1] == 429:
            break
    server_errors = sum(1 for s in statuses if s >= 500)
    last = client.post_json("/v1/events", _event(), harness.bearer(KEYS[1]))
    assert not (server_errors and last.status == 429), (
        f"{server_errors} answers were 5xx and the valid event after them got {last.status}"
    )


# ------------------------------------------------------------------------------------------------
# (3) chunked bodies over the cap
# ------------------------------------------------------------------------------------------------


def _chunked_post(target, path: str, body: bytes, chunk: int = 65536) -> tuple[int, bytes]:
    host, port = target.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        for i in range(0, len(body), chunk):
            part = body[i : i + chunk]
            s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            data += got
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[-1]


def _big_cart(size: int) -> bytes:
    body = json.dumps({"items": ["sku-00001"], "user_id": "x" * 10})
    return body[:-1].encode() + b', "pad": "' + b"a" * size + b'"}'


def test_control_an_oversized_body_with_content_length_is_413(target):
    r = target.http(10).request(
        "POST", "/v1/bundles", _big_cart(1_500_000), {"Content-Type": "application/json"}
    )
    assert r.status == 413


def test_control_a_small_chunked_body_is_read_whole(target):
    status, body = _chunked_post(target, "/v1/bundles", json.dumps({"items": ["sku-00001"]}).encode())
    assert status == 200, body[:200]


def test_a_chunked_body_over_the_cap_is_413(target):
    status, body = _chunked_post(target, "/v1/bundles", _big_cart(1_500_000))
    assert status == 413, (status, body[:200])


# ------------------------------------------------------------------------------------------------
# (4) admin publish and the working directory
# ------------------------------------------------------------------------------------------------


def test_admin_publish_only_reads_the_models_folder(target):
    decoy = target.workdir / "cwd-only-version"  # the server's working directory, not models/
    shutil.copytree(target.workdir / "models" / target.shop.version_b, decoy)
    try:
        r = target.http(30).post_json("/v1/admin/publish", {"version": decoy.name}, harness.bearer(KEYS[0]))
        assert r.status == 404, (r.status, r.body[:300])
    finally:
        shutil.rmtree(decoy, ignore_errors=True)
        harness.recsvc(["publish", target.shop.version_a], target.env, target.workdir)


def test_control_admin_publish_of_an_unknown_name_is_404(target):
    r = target.http().post_json("/v1/admin/publish", {"version": "no-such-version"}, harness.bearer(KEYS[0]))
    assert r.status == 404


# ------------------------------------------------------------------------------------------------
# (5) API keys: logs, throttling, length
# ------------------------------------------------------------------------------------------------


def _log_after(target, send) -> str:
    before = len(target.service.log_text())
    send()
    # The access line is written after the answer: poll the log (bounded) for the request's marker.
    marker = f"probe-{time.monotonic_ns()}"
    harness.http_once(target.base, "GET", f"/health/live?{marker}=1")
    harness.wait_until(lambda: marker in target.service.log_text()[before:], 10, what="access log line")
    return target.service.log_text()[before:]


def test_control_a_bearer_key_is_not_logged(target):
    text = _log_after(target, lambda: target.http().get("/v1/admin/experiments", harness.bearer(KEYS[2])))
    assert "/v1/admin/experiments" in text
    assert KEYS[2] not in text


@pytest.mark.parametrize("how", ["basic-user", "query-string"])
def test_an_api_key_never_reaches_the_access_log(target, how):
    key = KEYS[3]
    if how == "basic-user":
        send = lambda: target.http().get("/v1/admin/experiments", harness.basic(key))  # noqa: E731
    else:
        send = lambda: target.http().get(f"/v1/admin/experiments?api_key={key}")  # noqa: E731
    assert key not in _log_after(target, send)


def test_wrong_keys_are_throttled(target):
    # From an address of its own: the throttle refuses that address for the rest of the minute.
    client = harness.Http(target.base, source="127.0.0.2")
    statuses = [
        client.post_json("/v1/events", _event(), harness.bearer(f"guess-{i:04d}-0123456789abcdef")).status
        for i in range(100)
    ]
    assert set(statuses) <= {401, 429}
    assert 429 in statuses, "100 wrong keys in a row from one client, none refused with 429"


def test_a_one_character_key_is_refused(tmp_path):
    redis = harness.RedisProc(tmp_path / "redis").start()
    env = harness.base_env(redis.url, tmp_path, RECSVC_API_KEYS="x")
    service = harness.Service(env, tmp_path, workers=1, name="shortkey")
    try:
        try:
            service.start(deadline_s=30, ready="live")
        except (RuntimeError, TimeoutError):
            return  # refusing to start with such a key is a fine answer
        r = harness.Http(service.base).post_json("/v1/events", _event(), harness.bearer("x"))
        assert r.status in (401, 403), f"key 'x' was accepted: {r.status}"
    finally:
        service.stop()
        redis.stop()


# ------------------------------------------------------------------------------------------------
# (7) readiness leaks Redis's address
# ------------------------------------------------------------------------------------------------


def test_ready_does_not_show_the_redis_address(target):
    target.redis.kill()
    try:
        bodies = [harness.http_once(target.base, "GET", "/health/ready", timeout_s=3)[2] for _ in range(8)]
    finally:
        target.redis.start()
        harness.wait_until(
            lambda: harness.http_once(target.base, "GET", "/health/ready", timeout_s=2)[0] == 200, 30,
            what="ready again",
        )  # fmt: skip
    text = b" ".join(bodies).decode()
    assert "unreachable" in text, text[:300]  # the probe did see the outage
    assert str(target.redis.port) not in text and "127.0.0.1" not in text, text[:400]


# ------------------------------------------------------------------------------------------------
# (8) 405 without Allow, HTML 414
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path", [("DELETE", "/v1/popular"), ("PUT", "/health/ready"), ("GET", "/v1/events")]
)
def test_405_names_the_allowed_methods(target, method, path):
    r = target.http().request(method, path)
    assert r.status == 405
    assert "allow" in r.headers, r.headers


def test_414_is_a_json_error(target):
    r = target.http().get("/v1/popular?n=1&category=" + "a" * 70_000)
    assert r.status == 414
    assert r.headers.get("content-type", "").startswith("application/json"), r.body[:120]
    assert json.loads(r.body).get("error")


# ------------------------------------------------------------------------------------------------
# (10) the served OpenAPI document and the code disagree
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(target):
    status, _, body = harness.http_once(target.base, "GET", "/openapi.json")
    assert status == 200
    return json.loads(body)


def _deref(spec, node):
    while isinstance(node, dict) and "$ref" in node:
        target = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _string_allowed(schema: dict, value: str) -> bool:
    """The few keywords the documents' string parameters use."""
    if "minLength" in schema and len(value) < schema["minLength"]:
        return False
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return False
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return False
    return True


def _param(spec, path: str, name: str) -> dict:
    op = spec["paths"][path]["get"]
    for p in op.get("parameters", []):
        p = _deref(spec, p)
        if p["name"] == name:
            return p
    raise KeyError(name)


def test_x_request_id_follows_the_served_spec(target, spec):
    schema = _deref(spec, _param(spec, "/v1/popular", "X-Request-ID")["schema"])
    for value in ["", "has space", "ok-id.1"]:
        r = target.http().get("/v1/popular?n=1", {"X-Request-ID": value})
        if _string_allowed(schema, value):
            assert r.status == 200 and r.headers.get("x-request-id") == value, (value, r.status)
        else:
            assert 400 <= r.status < 500, f"X-Request-ID {value!r} violates the spec but got {r.status}"


def test_empty_exclude_follows_the_served_spec(target, spec):
    item = _deref(spec, _deref(spec, _param(spec, "/v1/popular", "exclude")["schema"])["items"])
    r = target.http().get("/v1/popular?n=1&exclude=")
    expected_ok = _string_allowed(item, "")
    assert (r.status == 200) == expected_ok, (r.status, r.body[:200])


def test_empty_category_follows_the_served_spec(target, spec):
    item = _deref(spec, _deref(spec, _param(spec, "/v1/popular", "category")["schema"])["items"])
    r = target.http().get("/v1/popular?n=1&category=")
    assert (r.status == 200) == _string_allowed(item, ""), (r.status, r.body[:200])


def test_min_price_above_max_price_follows_the_served_spec(target, spec):
    p = _param(spec, "/v1/popular", "min_price")
    assert p["schema"].get("minimum", 0) <= 5  # both bounds are valid numbers in the document
    r = target.http().get("/v1/popular?n=1&min_price=5&max_price=1")
    assert r.status == 200, (r.status, r.body[:200])


def test_timestamp_zero_follows_the_served_spec(target, spec):
    ts = _deref(spec, _deref(spec, spec["components"]["schemas"]["Event"])["properties"]["timestamp"])
    numbers = [s for s in ts.get("oneOf", [ts]) if s.get("type") in ("number", "integer")]
    allowed = any(s.get("minimum", 0) <= 0 and s.get("exclusiveMinimum", -1) < 0 for s in numbers)
    r = target.http().post_json("/v1/events", _event(timestamp=0), harness.bearer(KEYS[0]))
    assert (r.status == 202) == allowed, (allowed, r.status, r.body[:200])


def test_a_request_that_never_completes_gets_408_without_holding_the_worker(tmp_path):
    """The buffered worker's own deadline: a head or body still incomplete after
    RECSVC_BODY_TIMEOUT_S is answered 408 (JSON) by the poll loop; meanwhile the one worker, with
    one thread, keeps answering others."""
    redis = harness.RedisProc(tmp_path / "redis").start()
    env = harness.base_env(redis.url, tmp_path, RECSVC_BODY_TIMEOUT_S="1.5")
    service = harness.Service(env, tmp_path, workers=1, name="deadline").start(ready="live")
    try:
        host, port = service.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/bundles HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            t0 = time.monotonic()
            fast = [harness.http_once(service.base, "GET", "/health/live", timeout_s=1)[0] for _ in range(5)]
            data = b""
            while b"\r\n\r\n" not in data:
                got = s.recv(4096)
                if not got:
                    break
                data += got
            waited = time.monotonic() - t0
        assert fast == [200] * 5
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert b"application/json" in data and 1.0 <= waited <= 5.0, (waited, data[:200])
    finally:
        service.stop()
        redis.stop()
