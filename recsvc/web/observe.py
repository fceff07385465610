"""Per request: what it answered, its metrics and its one log line (the last ``after_request`` hook).

:func:`install` registers the hook. Views and ``render`` note what a request answered
(:func:`note_answer`, :func:`note_variant`); the hook counts it in :class:`~recsvc.web.metrics.Metrics`
and writes the JSON line (logger ``recsvc.request``): ``request_id, method, endpoint, status, source,
reason, model_version, experiment, variant, latency_ms``. Everything comes from those notes and the
matched route -- never the request's path, query string, headers or body -- so neither a metric
nor a log line can carry an API key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request

from recsvc.core import logs
from recsvc.core.config import Config
from recsvc.core.logs import log_fields
from recsvc.web import jsonio
from recsvc.web.metrics import Metrics

request_log = logging.getLogger("recsvc.request")


def install(app: Flask, metrics: Metrics | None, config: Config) -> None:
    """Time every request; count it in ``metrics`` (None: off) and log it (``ops.request_log``)."""
    log_requests = config.ops.request_log
    if metrics is None and not log_requests:
        return
    lines = RequestLines()

    def finish(response: Response) -> Response:
        # The objects behind Flask's proxies, once: each proxy access costs a context lookup.
        ctx = g._get_current_object()
        req = request._get_current_object()  # type: ignore[attr-defined]
        d = ctx.__dict__
        started = d.get("started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        rule = req.url_rule
        endpoint = rule.rule if rule is not None else "unmatched"
        status = response.status_code
        seen: Answered = d.get("answered") or NOTHING
        if metrics is not None:
            metrics.observe_request(endpoint, req.method, status, seconds)
            if seen.item_answer:
                metrics.observe_answer(endpoint, seen.source, seen.reason)
            if seen.variant is not None:
                metrics.count(metrics.assignments, seen.variant)
            if status == 429:
                metrics.count(metrics.rate_limited, (endpoint,))
            if req.endpoint == "events.post_events":
                if status == 202:
                    metrics.count(metrics.events_accepted, (), d.get("events_accepted", 0))
                else:
                    metrics.count(metrics.events_rejected, (str(status),))
        if log_requests:
            variant = seen.variant
            lines.write(
                {
                    "request_id": d.get("request_id"),
                    "method": req.method,
                    "endpoint": endpoint,
                    "status": status,
                    "source": seen.source,
                    "reason": seen.reason,
                    "model_version": seen.model_version,
                    "experiment": variant[0] if variant is not None else None,
                    "variant": variant[1] if variant is not None else None,
                    "latency_ms": round(seconds * 1000, 3),
                }
            )
        return response

    # Registered before every other after_request hook, so it runs last and sees the final status.
    app.after_request_funcs.setdefault(None, []).insert(0, finish)


class RequestLines:
    """Writes the per-request line (logger ``recsvc.request``, INFO).

    When the line would reach exactly one JSON :class:`~recsvc.core.logs.LineHandler` (the set-up
    of ``recsvc serve``), it is built here with orjson and handed to that handler: the same line,
    without a LogRecord and the stdlib encoder (~45 µs of a ~400 µs request in
    bench/serve.py --observability). Anything else (text format, tests capturing logs) goes
    through ``logging`` as usual. The choice is made at the first line and again every second (a
    change of the logging set-up is seen within a second).
    """

    RECHECK_S = 1.0

    def __init__(self) -> None:
        self._handler: logs.LineHandler | None = None
        self._recheck_at = 0.0

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if now >= self._recheck_at:
            self._handler, self._recheck_at = logs.direct_json_handler(request_log), now + self.RECHECK_S
        if self._handler is None:
            request_log.info("request", extra=log_fields(**fields))
            return
        body = logs.envelope(request_log.name, "info", "request", now)
        body.update(fields)
        self._handler.write_line(jsonio.dumps(body).decode() + "\n")


@dataclass
class Answered:
    """What a request answered, for its metrics and log line (kept on ``flask.g.answered``)."""

    model_version: str | None = None
    source: str | None = None
    reason: str | None = None
    item_answer: bool = False
    variant: tuple[str, str] | None = None


NOTHING = Answered()


def _answered() -> Answered:
    ctx = g._get_current_object()
    seen = ctx.__dict__.get("answered")
    if seen is None:
        seen = ctx.answered = Answered()
    return seen


def note_answer(body: dict[str, Any], *, item_answer: bool = False) -> None:
    """Remember what this request answered (model version, source, reason) for metrics and logs."""
    seen = _answered()
    seen.model_version = body.get("model_version")
    seen.source = _text(body.get("source"))
    seen.reason = _text(body.get("reason"))
    seen.item_answer = seen.item_answer or item_answer


def note_variant(experiment: str, variant: str) -> None:
    """Remember the A/B variant this request's answer was served under."""
    _answered().variant = (experiment, variant)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
