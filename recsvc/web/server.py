"""How gunicorn runs the app: worker classes, their error answers, and an access log without secrets.

* :class:`GeventWorker` (the default of ``recsvc serve``): one greenlet per connection. A client
  that sends its body slowly, or keeps an idle connection open, holds a greenlet and a socket, not a
  worker: fast requests keep being served (``bench/faults.py``'s slow-clients scenario measured
  both designs; see docs/operations.md). :class:`ThreadWorker` (``--worker-class gthread``) is
  the threaded alternative, where each such client holds one of the worker's threads.
* Both answer the errors gunicorn raises itself, before the app runs (request line too long: 414,
  headers too large: 431, malformed request: 400), with the API's JSON error shape instead of
  gunicorn's HTML page.
* :class:`RedactingLogger`: the access log never carries a credential -- no HTTP Basic user, no
  ``Authorization``/``X-API-Key`` header, and secret-looking query parameters (``api_key=``,
  ``token=`` ...) are written as ``***``.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, quote

from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventWorker as _GeventWorker
from gunicorn.workers.gthread import ThreadWorker as _ThreadWorker

from recsvc.web.auth import SECRET_PARAM

#: gunicorn's ``--worker-class`` values recsvc supports, by short name.
WORKER_CLASSES = {
    "gevent": "recsvc.web.server.GeventWorker",
    "gthread": "recsvc.web.server.ThreadWorker",
}

_SECRET_HEADERS = ("{authorization}i", "{x-api-key}i", "{cookie}i", "{proxy-authorization}i")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
_ERROR_CODES = {400: "invalid_request", 414: "uri_too_long", 431: "headers_too_large", 501: "not_implemented"}


def redact_query(query: str) -> str:
    """``query`` with the values of secret-looking parameters replaced by ``***``."""
    if not query:
        return query
    parts = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        shown = "***" if SECRET_PARAM.search(name) else value
        parts.append(f"{quote(name, safe='')}={quote(shown, safe=',:*')}")
    return "&".join(parts)


class RedactingLogger(Logger):
    """gunicorn's logger, with every credential removed from the access-log atoms."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["u"] = "-"  # the HTTP Basic user: some clients put a key there
        query = environ.get("QUERY_STRING") or ""
        safe_query = redact_query(query)
        atoms["q"] = safe_query
        path = environ.get("PATH_INFO") or ""
        uri = quote(path, safe="/:@!$&'()*+,;=-._~") + ("?" + safe_query if query else "")
        atoms["r"] = f"{environ.get('REQUEST_METHOD')} {uri} {environ.get('SERVER_PROTOCOL')}"
        for name in _SECRET_HEADERS:
            if name in atoms:
                atoms[name] = "***"
        for name in ("{raw_uri}e", "{query_string}e", "{http_authorization}e", "{http_x_api_key}e"):
            if name in atoms:
                atoms[name] = "***"
        return atoms


class _CapturedSocket:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)


def json_error_bytes(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer (``Connection: close``) with the API's JSON error body."""
    code = _ERROR_CODES.get(status, "internal" if status >= 500 else "invalid_request")
    body = json.dumps({"error": code, "message": message or reason}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class JsonErrors:
    """Mixin for gunicorn workers: errors gunicorn answers itself go out as JSON.

    gunicorn decides the status (and logs it) in ``handle_error``; its HTML page is captured and
    replaced by the JSON shape every other answer of the API has.
    """

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        captured = _CapturedSocket()
        super().handle_error(req, captured, addr, exc)  # type: ignore[misc]
        match = _STATUS_LINE.match(captured.data)
        if match is None:
            return
        status, reason = int(match.group(1)), match.group(2).decode("latin-1")
        message = {
            414: "the request line is too long (query strings are bounded: see the parameter limits)",
            431: "the request headers are too large",
        }.get(status, reason)
        try:
            client.sendall(json_error_bytes(status, reason, message))
        except OSError:
            pass  # the client is gone


class GeventWorker(JsonErrors, _GeventWorker):
    """gunicorn's gevent worker with JSON errors (see :class:`JsonErrors`)."""


class ThreadWorker(JsonErrors, _ThreadWorker):
    """gunicorn's gthread worker with JSON errors (see :class:`JsonErrors`)."""
