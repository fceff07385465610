"""The one JSON error shape: ``{"error": CODE, "message": TEXT}`` with a 4xx (or 503) status."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """Raised anywhere in a request to answer with a JSON error. ``field`` names the bad input."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra


def bad_request(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field)


def json_error(status: int, code: str, message: str, field: str | None = None, **extra: Any):
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return jsonify(body), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return json_error(e.status, e.code, e.message, e.field, **e.extra)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        return json_error(e.code or 500, code, e.description or e.name)
