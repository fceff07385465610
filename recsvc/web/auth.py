"""API keys for write and admin endpoints: one decorator, used by every blueprint that needs it.

Keys come from ``RECSVC_API_KEYS`` (comma-separated) via :class:`recsvc.core.config.Config`. With no key
configured, protected endpoints answer 403 ``disabled``: they are never open. The caller sends the key
as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; it is compared with every configured key
in constant time (``hmac.compare_digest``) and never logged or echoed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, g, request

from recsvc.core.logs import log_fields
from recsvc.web.errors import ApiError

F = TypeVar("F", bound=Callable[..., Any])

audit_log = logging.getLogger("recsvc.audit")


def presented_key() -> str | None:
    """The key the caller sent, or None."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


def key_matches(presented: str, configured: tuple[str, ...]) -> bool:
    """True when ``presented`` equals one of ``configured``; every key is compared (constant time)."""
    candidate = presented.encode("utf-8")
    found = False
    for key in configured:
        found |= hmac.compare_digest(candidate, key.encode("utf-8"))
    return found


def key_fingerprint(key: str) -> str:
    """A short, non-reversible name for a key (for rate-limit buckets and audit logs)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def check_api_key(also: tuple[str, ...] = ()) -> str:
    """Check the request's key; return it, or raise 403 (disabled) / 401 (missing or wrong).

    ``also``: more keys accepted here besides ``RECSVC_API_KEYS`` (the read-only metrics keys).
    """
    configured = current_app.extensions["recsvc"].config.api_keys + also
    if not configured:
        raise ApiError(
            403, "disabled", "this endpoint is disabled: no API key is configured (RECSVC_API_KEYS)"
        )
    key = presented_key()
    if key is None:
        raise ApiError(
            401, "unauthorized", "an API key is required (Authorization: Bearer <key> or X-API-Key)"
        )
    if not key_matches(key, configured):
        raise ApiError(401, "unauthorized", "the API key is not valid")
    g.api_key = key  # for per-key rate limits; never logged
    g.api_key_fingerprint = key_fingerprint(key)
    return key


def require_api_key(view: F) -> F:
    """Decorator for a view that needs a valid API key (see module docstring)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_api_key()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def audit(action: str, message: str, **fields: Any) -> None:
    """One audit line (logger ``recsvc.audit``): what an admin key did, named by its fingerprint.

    ``fields`` become keys of the JSON line next to ``audit`` (the action), ``key`` (the sha256
    prefix of the caller's key, never the key) and ``request_id``.
    """
    audit_log.info(
        message,
        extra=log_fields(
            audit=action, key=g.get("api_key_fingerprint"), request_id=g.get("request_id"), **fields
        ),
    )
