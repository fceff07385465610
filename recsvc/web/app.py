"""The Flask application factory.

``create_app()`` reads the configuration (once, from the environment unless given), connects to Redis
(the embedded server when no ``REDIS_URL`` is set), and registers one blueprint per API surface from
:data:`BLUEPRINTS`. gunicorn calls it once per worker: ``gunicorn "recsvc.web.app:create_app()"``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from flask import Flask, Response, g, request

from recsvc.api.common import Services
from recsvc.core.config import Config
from recsvc.core.ids import is_valid_id
from recsvc.serving import ModelCache, RedisHealth
from recsvc.storage.connection import connect, ensure_redis
from recsvc.web.errors import register_error_handlers
from recsvc.web.jsonio import OrjsonProvider, dumps, loads

log = logging.getLogger("recsvc.web.app")

# "module:attribute" of every blueprint; each area adds its own line when its blueprint exists.
BLUEPRINTS: list[str] = [
    "recsvc.api.health:bp",
    "recsvc.api.recommendations:bp",
    "recsvc.api.items:bp",
    "recsvc.api.bundles:bp",
    "recsvc.api.admin:bp",
    "recsvc.api.docs:bp",
    "recsvc.api.events:bp",
    "recsvc.api.experiments:bp",
]


def _make_config(config: Config | dict[str, Any] | None) -> Config:
    if config is None:
        return Config.from_env()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_env(**config)
    raise TypeError(f"config must be a Config, a dict of overrides or None, not {type(config).__name__}")


def create_app(config: Config | dict[str, Any] | None = None) -> Flask:
    """Build the recsvc Flask app.

    Parameters
    ----------
    config : Config or dict or None
        A :class:`~recsvc.config.Config`; a dict of field overrides applied on top of
        ``Config.from_env()``; or None for ``Config.from_env()``.

    Returns
    -------
    Flask
        The app; its services are in ``app.extensions["recsvc"]`` (:class:`~recsvc.api.common.Services`).
    """
    config = _make_config(config)
    app = Flask("recsvc", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json = OrjsonProvider(app)  # compact, fields in insertion order (envelope first, items ranked)

    redis_url = ensure_redis(config)
    client = connect(redis_url, config)
    app.extensions["recsvc"] = Services(
        config=config,
        redis_url=redis_url,
        client=client,
        models=ModelCache(
            config,
            check_interval_s=float(config.extra.get("model_check_interval_s", 1.0)),
            keep=max(1, config.keep_versions),
        ),
        health=RedisHealth(config.redis_down_recheck_s),
    )

    register_error_handlers(app)
    app.before_request(_assign_request_id)
    app.after_request(_finish_response)
    for target in BLUEPRINTS:
        module, attr = target.split(":")
        app.register_blueprint(getattr(importlib.import_module(module), attr))
    return app


def _assign_request_id() -> None:
    incoming = request.headers.get("X-Request-ID")
    # 128 random bits as 32 hex digits (the shape of uuid4().hex, at a quarter of its cost).
    g.request_id = incoming if incoming and is_valid_id(incoming) else os.urandom(16).hex()


def _finish_response(response: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        response.headers["X-Request-ID"] = rid
        # Error bodies come from recsvc.errors (and werkzeug); give them the request id too.
        if response.status_code >= 400 and response.mimetype == "application/json":
            try:
                body = loads(response.get_data())
            except ValueError:
                return response
            if isinstance(body, dict) and "request_id" not in body:
                body["request_id"] = rid
                response.set_data(dumps(body))
    return response
