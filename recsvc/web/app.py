"""The Flask application factory.

``create_app()`` reads the configuration (once, from the environment unless given), connects to Redis
(the embedded server when no ``REDIS_URL`` is set), builds the serving objects
(:class:`~recsvc.web.services.Services`) and registers one blueprint per API surface. gunicorn calls
it once per worker: ``gunicorn "recsvc.web.app:create_app()"``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from recsvc.analytics.registry import ExperimentRegistry, ServedLog
from recsvc.core import logs
from recsvc.core.config import Config, unknown_variables
from recsvc.core.ids import is_valid_id
from recsvc.serving.health import RedisHealth
from recsvc.serving.ingest import EventIngest
from recsvc.serving.model import ModelCache
from recsvc.serving.recommender import Recommender
from recsvc.storage.connection import connect
from recsvc.storage.embedded import ensure_redis
from recsvc.web import metrics as request_metrics
from recsvc.web import observe
from recsvc.web.auth import configured_keys_problem
from recsvc.web.body import read_body
from recsvc.web.declare import REQUEST_ID, by_rule
from recsvc.web.errors import register_error_handlers
from recsvc.web.jsonio import OrjsonProvider, dumps, loads
from recsvc.web.params import query_specs
from recsvc.web.services import Services
from recsvc.web.views import (
    admin,
    bundles,
    console,
    docs,
    events,
    experiments,
    health,
    items,
    metrics,
    recommendations,
)

log = logging.getLogger(__name__)

BLUEPRINTS = (health, recommendations, items, bundles, admin, docs, events, experiments, metrics, console)


def _make_config(config: Config | dict[str, Any] | None) -> Config:
    if config is None:
        return Config.from_env()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_env(**config)
    raise TypeError(f"config must be a Config, a dict of overrides or None, not {type(config).__name__}")


def create_app(config: Config | dict[str, Any] | None = None, *, warn_unknown: bool = True) -> Flask:
    """Build the recsvc Flask app.

    Parameters
    ----------
    config : Config or dict or None
        A :class:`~recsvc.core.config.Config`; a dict of setting overrides applied on top of
        ``Config.from_env()``; or None for ``Config.from_env()``.
    warn_unknown : bool
        Log a warning per unknown ``RECSVC_*`` variable (``recsvc serve`` has already warned once,
        so its workers do not repeat it).

    Returns
    -------
    Flask
        The app; its services are in ``app.extensions["recsvc"]`` (:class:`Services`).

    Raises
    ------
    ExperimentFileError
        ``experiments.file`` is set and unusable: the service does not start.
    """
    config = _make_config(config)
    if not logging.getLogger().handlers:
        # Run by a bare WSGI server that set up no logging: recsvc's lines must not be lost.
        logs.configure(config.ops.log_level, config.ops.log_format, config.ops.log_flush_s)
    if warn_unknown:
        for warning in unknown_variables():
            log.warning("%s", warning)
    problem = configured_keys_problem(config)
    if problem:
        raise ValueError(problem)
    app = Flask("recsvc", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.serving.max_body_bytes
    app.json = OrjsonProvider(app)  # compact, fields in insertion order (envelope first, items ranked)

    observed = (
        request_metrics.Metrics(config.ops.metrics_dir, config.ops.metrics_flush_s)
        if config.ops.metrics_enabled
        else None
    )
    redis_url = ensure_redis(config)
    client = connect(redis_url, config, observer=observed.observe_redis if observed is not None else None)
    models = ModelCache(
        config,
        check_interval_s=config.serving.model_check_interval_s,
        keep=max(1, config.serving.keep_versions),
    )
    health_memory = RedisHealth(config.redis.down_recheck_s)
    app.extensions["recsvc"] = Services(
        config=config,
        redis_url=redis_url,
        client=client,
        models=models,
        health=health_memory,
        recommender=Recommender(config, client, models, health_memory),
        ingest=EventIngest(config, client, health_memory),
        experiments=ExperimentRegistry(
            config.experiments.file,
            client,
            refresh_s=config.experiments.refresh_s,
            retry_s=config.redis.down_recheck_s,
        ),
        served_log=ServedLog(client, maxlen=config.experiments.served_maxlen),
        metrics=observed,
    )

    observe.install(app, observed, config)
    register_error_handlers(app)
    app.before_request(_assign_request_id)
    serving = config.serving
    app.before_request(lambda: read_body(serving.max_body_bytes, serving.body_timeout_s))
    app.after_request(_finish_response)
    for view in BLUEPRINTS:
        app.register_blueprint(view.bp)
    app.extensions["recsvc.query"] = query_specs(by_rule(config))
    if serving.proxy_hops > 0:
        # The client address (wrong-key throttle) is the one the trusted proxies saw.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=serving.proxy_hops)  # type: ignore[method-assign]
    return app


def _assign_request_id() -> None:
    incoming = request.headers.get("X-Request-ID")
    g.started = time.perf_counter()
    if incoming is None:
        # 128 random bits as 32 hex digits (the shape of uuid4().hex, at a quarter of its cost).
        g.request_id = os.urandom(16).hex()
    elif is_valid_id(incoming):
        g.request_id = incoming
    else:
        g.request_id = os.urandom(16).hex()  # the 400 below still carries one
        REQUEST_ID.parse_one(incoming)  # 400 naming the header, as the document says


def _finish_response(response: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        response.headers["X-Request-ID"] = rid
        # Error bodies come from recsvc.web.errors (and werkzeug); give them the request id too.
        if response.status_code >= 400 and response.mimetype == "application/json":
            try:
                body = loads(response.get_data())
            except ValueError:
                return response
            if isinstance(body, dict) and "request_id" not in body:
                body["request_id"] = rid
                response.set_data(dumps(body))
    return response
