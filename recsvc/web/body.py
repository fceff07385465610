"""Request bodies are read whole, bounded in size and in time, before a view sees them (and the
request target is bounded: 414 beyond :data:`MAX_URL_BYTES`).

* **Size**: a body over ``serving.max_body_bytes`` is refused with 413, whether it announces its
  length (``Content-Length``) or not (``Transfer-Encoding: chunked``: read up to one byte past the
  cap, never silently cut at the cap).
* **Time**: the whole body must arrive within ``serving.body_timeout_s``, else 408. Under the
  default buffered worker the request is already whole when the app runs (the worker's poll loop
  applies the same deadline, :mod:`recsvc.web.server`); under gevent the deadline covers the whole
  read; elsewhere (plain gthread, Flask's server) it bounds each wait for data.

The body then sits in memory (at most the cap) and the view reads it as usual.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Iterator
from typing import Any

from flask import request

from recsvc.web.errors import ApiError

_CHUNK = 64 * 1024
#: A refused chunked body is drained up to this many times the cap (then the connection just closes).
_DRAIN_FACTOR = 4


class _BodyTimeout(Exception):
    pass


def too_large(limit: int) -> ApiError:
    return ApiError(413, "request_entity_too_large", f"the body is larger than {limit:,} bytes", field="body")


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_BodyTimeout` in this greenlet after ``seconds`` (gevent only; else nothing)."""
    gevent = sys.modules.get("gevent")
    monkey = sys.modules.get("gevent.monkey")
    if gevent is None or monkey is None or not monkey.is_module_patched("socket"):
        yield
        return
    with gevent.Timeout(seconds, _BodyTimeout):
        yield


def _read(stream: Any, sock: Any, size: int, end: float) -> bytes:
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise _BodyTimeout
    if sock is not None:
        sock.settimeout(remaining)
    return stream.read(size)


#: Longest request target (path and query) answered; the longest valid one is ~26 KB.
MAX_URL_BYTES = 64 * 1024


def read_body(max_bytes: int, timeout_s: float) -> None:
    """``before_request`` hook: read the body whole (see the module docstring).

    Raises
    ------
    ApiError
        413 over ``max_bytes``; 408 when the body does not arrive within ``timeout_s``.
    """
    environ: dict[str, Any] = request.environ
    if len(environ.get("RAW_URI") or "") > MAX_URL_BYTES:
        raise ApiError(414, "uri_too_long", f"the request target is longer than {MAX_URL_BYTES:,} bytes")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    length = request.content_length
    if not chunked and not length:
        return
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    want = length if length is not None and not chunked else max_bytes + 1
    stream = environ["wsgi.input"]
    sock = environ.get("gunicorn.socket")
    end = time.monotonic() + timeout_s
    parts: list[bytes] = []
    got = 0
    try:
        with _deadline(timeout_s):
            while got < want:
                data = _read(stream, sock, min(_CHUNK, want - got), end)
                if not data:
                    break
                parts.append(data)
                got += len(data)
            if got > max_bytes:
                # Read (and drop) a bounded rest, so that the client, still sending, reads the 413
                # instead of a connection reset when the socket closes with unread data.
                dropped = 0
                with contextlib.suppress(_BodyTimeout, TimeoutError, OSError):
                    while dropped < _DRAIN_FACTOR * max_bytes and _read(stream, sock, _CHUNK, end):
                        dropped += _CHUNK
    except (_BodyTimeout, TimeoutError):
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s", field="body"
        ) from None
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
    if got > max_bytes:
        raise too_large(max_bytes)
    body = b"".join(parts)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input_terminated"] = True
