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
import selectors
import time
from collections import deque
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote

from gunicorn import http as gunicorn_http
from gunicorn.glogging import Logger
from gunicorn.http2 import negotiation
from gunicorn.workers.ggevent import GeventWorker as _GeventWorker
from gunicorn.workers.gthread import ThreadWorker as _ThreadWorker

from recsvc.core.config import Config
from recsvc.web.auth import SECRET_PARAM

#: gunicorn's ``--worker-class`` values recsvc supports, by short name.
WORKER_CLASSES = {
    "buffered": "recsvc.web.server.BufferedThreadWorker",
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


#: Request heads above this are answered without a thread: 414 when the request line alone is
#: that long (the app answers 414 from 64 KiB on), else 431.
MAX_HEAD_BYTES = 64 * 1024 + 16 * 1024


def request_complete(buf: bytes | bytearray, max_body: int) -> bool | None:
    """Whether ``buf`` holds a whole HTTP/1.1 request (head and body); None: a malformed head.

    A body announced larger than ``max_body`` counts as complete once the head is in: the app
    refuses it (413) from its ``Content-Length`` without reading it.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].lower()
    if b"content-length" not in head and b"transfer-encoding" not in head:
        return True  # no body: the common GET
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None  # gunicorn answers it (400)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
    pos = end + 4
    if not chunked:
        return length > max_body or len(buf) - pos >= length
    while True:  # walk the chunks: size line, data, CRLF; "0" then the (empty) trailers end it
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return False
        try:
            size = int(buf[pos:line_end].split(b";")[0].strip(), 16)
        except ValueError:
            return None
        if size == 0:
            return buf.find(b"\r\n\r\n", line_end) >= 0 or buf[line_end : line_end + 4] == b"\r\n\r\n"
        pos = line_end + 2 + size + 2
        if pos > len(buf) or pos - end > max_body + 64 * 1024:
            return pos - end > max_body + 64 * 1024  # over the cap: the app refuses it (413)


class BufferedThreadWorker(ThreadWorker):
    """gthread whose threads only ever see whole requests (the default of ``recsvc serve``).

    The worker's main thread -- the one that accepts and polls connections -- reads each request
    (head and body, non-blocking) into memory and hands the connection to a thread only once the
    request is complete: a client that trickles its headers or body, or opens a connection and sends
    nothing, costs a buffer and a socket, never a thread. A request still incomplete after
    ``serving.body_timeout_s`` is answered 408 (431 for an oversized head) by the main thread and
    closed; an idle connection is closed after the keep-alive timeout. Requests are then handled
    exactly as by gthread (blocking Redis calls in the thread), so a fast request costs what it did.
    This is the buffering a proxy in front (nginx) also does; it keeps the service safe without one.
    """

    def init_process(self) -> None:
        serving = Config.from_env().serving
        self.body_timeout_s = serving.body_timeout_s
        self.max_body = serving.max_body_bytes
        self.buffering: deque[Any] = deque()
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client) or conn.is_http2:
            super().enqueue_req(conn)  # TLS and HTTP/2 are not buffered here
            return
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.recsvc_buf = bytearray(leftover)
        conn.recsvc_started = time.monotonic()
        conn.recsvc_continued = False
        conn.recsvc_polled = False
        conn.sock.setblocking(False)
        # A kept-alive connection that became readable, or a client that sent at once: the request
        # is usually whole already, and goes to a thread without a poll round.
        self._on_readable(conn, conn.sock)
        if conn.recsvc_buf is not None and not conn.recsvc_polled:
            conn.recsvc_polled = True
            self.buffering.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: Any, sock: Any) -> None:
        try:
            data = sock.recv(256 * 1024)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":  # the client went away
            self._drop(conn)
            return
        if data:
            conn.recsvc_buf += data
        if self._dispatch_if_complete(conn):
            return
        head_end = conn.recsvc_buf.find(b"\r\n\r\n")
        if (
            head_end >= 0
            and not conn.recsvc_continued
            and b"100-continue" in conn.recsvc_buf[:head_end].lower()
        ):
            # The client waits for this before it sends the body (gunicorn sends it only later).
            conn.recsvc_continued = True
            try:
                sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        if len(conn.recsvc_buf) > MAX_HEAD_BYTES and conn.recsvc_buf.find(b"\r\n\r\n") < 0:
            if conn.recsvc_buf.find(b"\r\n") < 0:  # the request line alone is that long
                self._answer_and_drop(conn, 414, "URI Too Long", "the request line is too long")
            else:
                self._answer_and_drop(
                    conn, 431, "Request Header Fields Too Large", "the request headers are too large"
                )

    def _dispatch_if_complete(self, conn: Any) -> bool:
        buf = conn.recsvc_buf
        if not buf or request_complete(buf, self.max_body) is False:
            return False
        if conn.recsvc_polled:
            self.poller.unregister(conn.sock)
            self.buffering.remove(conn)
        conn.recsvc_polled = False
        if conn.parser is None:
            conn.sock.setblocking(True)
            conn.parser = gunicorn_http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(buf)
        conn.recsvc_buf = None  # handed over
        conn.data_ready = True
        super().enqueue_req(conn)
        return True

    def _drop(self, conn: Any) -> None:
        if conn.recsvc_polled:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.buffering.remove(conn)
        conn.recsvc_polled = False
        conn.recsvc_buf = None
        self.nr_conns -= 1
        conn.close()

    def _answer_and_drop(self, conn: Any, status: int, reason: str, message: str) -> None:
        try:
            conn.sock.send(json_error_bytes(status, reason, message))
        except OSError:
            pass
        self._drop(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.buffering):
            waited = now - conn.recsvc_started
            if conn.recsvc_buf and waited > self.body_timeout_s:
                self._answer_and_drop(
                    conn,
                    408,
                    "Request Timeout",
                    f"the request did not arrive within {self.body_timeout_s:g} s",
                )
            elif not conn.recsvc_buf and (waited > max(self.cfg.keepalive, 1) or not self.alive):
                self._drop(conn)  # an idle connection: closed like any idle keep-alive one
