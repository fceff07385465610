"""API keys for write and admin endpoints: one decorator, used by every blueprint that needs it.

Keys come from ``RECSVC_API_KEYS`` (comma-separated) via :class:`recsvc.core.config.Config`; each must
be at least :data:`MIN_KEY_LENGTH` characters (the service refuses to start otherwise). With no key
configured, protected endpoints answer 403 ``disabled``: they are never open. The caller sends the key
as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` -- never in the URL (a query parameter such
as ``api_key=`` is refused with 400: URLs end up in logs and browser histories); it is compared with
every configured key in constant time (``hmac.compare_digest``) and never logged or echoed.

Wrong keys are throttled per client address: after ``serving.auth_failures_per_min`` wrong keys in a
minute, every keyed request from that address answers 429 until the minute ends (without checking
the key, so a guess that happens to be right learns nothing either).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from flask import current_app, g, request

from recsvc.core.config import Config
from recsvc.core.errors import RateLimited
from recsvc.core.logs import log_fields
from recsvc.storage import ratelimit
from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.web.errors import ApiError

F = TypeVar("F", bound=Callable[..., Any])

audit_log = logging.getLogger("recsvc.audit")

#: Shortest API key accepted in ``RECSVC_API_KEYS``: a short key is guessed, throttle or not.
MIN_KEY_LENGTH = 16
_FAILURE_SCOPE = "auth-failures"
#: Query parameter names whose values are credentials: refused here, redacted in the access log.
SECRET_PARAM = re.compile(r"(?i)(api[-_]?key|apikey|^key|token|secret|passw(or)?d|^auth\w*|signature)$")


def configured_keys_problem(config: Config) -> str | None:
    """Why the configured keys (``RECSVC_API_KEYS`` and the read-only ``RECSVC_METRICS_KEYS``) are
    unusable; None when they are fine. The service does not start otherwise."""
    for variable, keys in (
        ("RECSVC_API_KEYS", config.api_keys),
        ("RECSVC_METRICS_KEYS", config.ops.metrics_keys),
    ):
        short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
        if short:
            return (
                f"{variable}: {len(short)} key(s) shorter than {MIN_KEY_LENGTH} characters; "
                "use long random keys (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    return None


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
    for name in request.args:
        if SECRET_PARAM.search(name):
            raise ApiError(
                400,
                "invalid_request",
                "credentials are never accepted in the URL; send Authorization: Bearer <key>",
                field=name,
            )
    key = presented_key()
    if key is None:
        raise ApiError(
            401, "unauthorized", "an API key is required (Authorization: Bearer <key> or X-API-Key)"
        )
    accept_key(key, configured)
    return key


def accept_key(key: str, configured: tuple[str, ...]) -> None:
    """Check ``key`` against ``configured`` under the wrong-key throttle, and remember it for the
    request; raise 429 (throttled) or 401 (wrong). Every way a key comes in goes through here."""
    _refuse_if_throttled()
    if not key_matches(key, configured):
        _count_failure()
        raise ApiError(401, "unauthorized", "the API key is not valid")
    g.api_key = key  # for per-key rate limits; never logged
    g.api_key_fingerprint = key_fingerprint(key)


def require_api_key(view: F) -> F:
    """Decorator for a view that needs a valid API key (see module docstring)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_api_key()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _failure_decision(count: bool) -> ratelimit.RateDecision | None:
    """This client address's wrong keys this minute (counting one more when ``count``)."""
    svc = current_app.extensions["recsvc"]
    limit = svc.config.serving.auth_failures_per_min
    if limit <= 0:
        return None
    address = request.remote_addr or "-"
    try:
        if count:
            return ratelimit.rate_limit(svc.client, address, limit, scope=_FAILURE_SCOPE)
        return ratelimit.peek(svc.client, address, limit, scope=_FAILURE_SCOPE)
    except (redis.RedisError, *REDIS_DOWN_ERRORS):
        return None  # Redis down: no counting; the key check itself does not need Redis


def _refuse_if_throttled() -> None:
    decision = _failure_decision(count=False)
    if decision is not None and not decision.allowed:
        raise RateLimited(
            f"too many wrong API keys from this address; retry in {decision.retry_after_s}s",
            retry_after_s=decision.retry_after_s,
            limit=decision.limit,
        )


def _count_failure() -> None:
    _failure_decision(count=True)


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
