"""The one JSON error shape, ``{"error": CODE, "message": TEXT, "field"?: NAME}``, and its mapping.

Views raise :class:`ApiError` for HTTP-only conditions, or let an error of the project's hierarchy
(:mod:`recsvc.core.errors`) propagate: :func:`register_error_handlers` maps each kind to a status
and code in one place, so a view never formats an error itself.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from recsvc.core.contract import BatchError
from recsvc.core.errors import (
    BadInput,
    Conflict,
    Locked,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RecsvcError,
    Unavailable,
)
from recsvc.storage.stream import StreamFull


class ApiError(Exception):
    """Raised anywhere in a request to answer with a JSON error. ``field`` names the bad input."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra


def bad_request(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field)


def not_found(field: str, message: str) -> ApiError:
    return ApiError(404, "not_found", message, field=field)


def json_error(status: int, code: str, message: str, field: str | None = None, **extra: Any):
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return jsonify(body), status


#: Error kinds of the hierarchy -> (status, code), most specific first.
STATUS: tuple[tuple[type[RecsvcError], int, str], ...] = (
    (RateLimited, 429, "rate_limited"),
    (BatchError, 400, "invalid_event"),
    (BadInput, 400, "invalid_request"),
    (StreamFull, 503, "stream_full"),
    (OutcomeUnknown, 503, "outcome_unknown"),
    (Unavailable, 503, "unavailable"),
    (Locked, 409, "locked"),
    (Conflict, 409, "conflict"),
    (NotFound, 404, "not_found"),
)


def api_error_for(error: RecsvcError) -> ApiError:
    """The HTTP form of an error of the project's hierarchy (500 ``internal`` for the rest)."""
    found = next(((status, code) for kind, status, code in STATUS if isinstance(error, kind)), None)
    if found is None:
        return ApiError(500, "internal", "internal error")
    status, code = found
    extra: dict[str, Any] = {}
    field = getattr(error, "field", None)
    if isinstance(error, BatchError):
        extra = {"index": error.index, "reason": error.reason}
    if isinstance(error, RateLimited):
        extra = {"retry_after_s": error.retry_after_s}
    if isinstance(error, OutcomeUnknown):
        extra = {"batch_id": error.batch_id}
    if isinstance(error, RateLimited | Unavailable):
        g.retry_after_s = getattr(error, "retry_after_s", 1)
    message = getattr(error, "message", None) or str(error)
    return ApiError(status, code, message, field=field, **extra)


def status_of(error: BaseException) -> int:
    """The HTTP status ``error`` is answered with (500 for anything unexpected)."""
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, RecsvcError):
        return next((status for kind, status, _ in STATUS if isinstance(error, kind)), 500)
    if isinstance(error, HTTPException):
        return error.code or 500
    return 500


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return json_error(e.status, e.code, e.message, e.field, **e.extra)

    @app.errorhandler(RecsvcError)
    def _recsvc_error(e: RecsvcError):
        return _api_error(api_error_for(e))

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        response, status = json_error(e.code or 500, code, e.description or e.name)
        # werkzeug's own headers: above all ``Allow`` on a 405 (RFC 9110 requires it).
        for name, value in e.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.after_request
    def _retry_after(response):
        # Clients of 429 and 503 answers learn when to retry.
        retry_after = g.get("retry_after_s")
        if retry_after is not None and response.status_code in (429, 503):
            response.headers["Retry-After"] = str(retry_after)
        return response
