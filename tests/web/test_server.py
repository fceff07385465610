"""gunicorn plumbing: when a buffered request is whole, what the access log may show, JSON errors."""

from __future__ import annotations

import datetime as _dt
import json
from types import SimpleNamespace

import pytest

from recsvc.web.server import RedactingLogger, json_error_bytes, redact_query, request_complete

HEAD = b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    "buf, whole",
    [
        (b"GET /v1/popular HTTP/1.1\r\nHost: x\r\n", False),  # head not ended
        (b"GET /v1/popular HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (HEAD + b'Content-Length: 5\r\n\r\n{"a"', False),
        (HEAD + b'content-length: 5\r\n\r\n{"a":', True),
        (HEAD + b"Content-Length: 999999\r\n\r\n", True),  # over the cap: the app refuses it unread
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n", False),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n", True),
        (HEAD + b"Content-Length: nope\r\n\r\n", None),  # malformed: gunicorn answers it
    ],
)
def test_a_request_is_whole_when_its_head_and_body_are_in(buf, whole):
    assert request_complete(buf, max_body=1000) is whole


def test_a_chunked_body_past_the_cap_is_handed_over_to_be_refused():
    chunk = b"%x\r\n" % 4096 + b"a" * 4096 + b"\r\n"
    buf = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 40  # 160 KiB, never terminated
    assert request_complete(buf, max_body=64 * 1024) is True


@pytest.mark.parametrize(
    "query, shown",
    [
        ("n=5&api_key=s3cret", "n=5&api_key=***"),
        ("token=s3cret&category=a,b", "token=***&category=a,b"),
        ("apikey=s3cret&password=p", "apikey=***&password=***"),
        ("n=5", "n=5"),
    ],
)
def test_secret_query_parameters_are_redacted(query, shown):
    assert redact_query(query) == shown


def test_the_access_log_never_shows_a_credential():
    logger = RedactingLogger.__new__(RedactingLogger)
    logger.cfg = SimpleNamespace(access_log_format="", logconfig_dict={})
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/v1/admin/experiments?api_key=s3cret-key-123",
        "PATH_INFO": "/v1/admin/experiments",
        "QUERY_STRING": "api_key=s3cret-key-123",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": "Basic czNjcmV0LWtleS0xMjM6",  # the key as Basic user
        "REMOTE_ADDR": "127.0.0.1",
    }
    req = SimpleNamespace(
        headers=[("AUTHORIZATION", "Basic czNjcmV0LWtleS0xMjM6"), ("X-API-KEY", "s3cret-key-123")]
    )
    resp = SimpleNamespace(status="200 OK", sent=10, headers=[])
    atoms = logger.atoms(resp, req, environ, _dt.timedelta(milliseconds=3))
    text = json.dumps(atoms)
    assert "s3cret-key-123" not in text and "czNjcmV0" not in text
    assert atoms["u"] == "-" and atoms["r"] == "GET /v1/admin/experiments?api_key=*** HTTP/1.1"


def test_gunicorn_level_errors_have_the_json_shape():
    raw = json_error_bytes(414, "URI Too Long", "the request line is too long")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 414 URI Too Long") and b"application/json" in head
    assert json.loads(body) == {"error": "uri_too_long", "message": "the request line is too long"}
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
