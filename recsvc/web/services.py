"""What a running app holds: configuration, the Redis client and the serving objects built on it.

:func:`recsvc.web.app.create_app` builds one :class:`Services` per app (one per gunicorn worker);
views reach it with :func:`services`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app

from recsvc.analytics.registry import ExperimentRegistry, ServedLog
from recsvc.core.config import Config
from recsvc.serving.health import RedisHealth
from recsvc.serving.ingest import EventIngest
from recsvc.serving.model import ModelCache
from recsvc.serving.recommender import Recommender
from recsvc.storage.connection import connect_admin
from recsvc.web.metrics import Metrics


@dataclass
class Services:
    """Per-app state (see the module docstring)."""

    config: Config
    redis_url: str
    client: redis.Redis
    models: ModelCache
    health: RedisHealth
    recommender: Recommender
    ingest: EventIngest
    experiments: ExperimentRegistry
    served_log: ServedLog
    metrics: Metrics | None = None  # None: RECSVC_METRICS_ENABLED=0

    def admin_client(self) -> redis.Redis:
        """A client with generous timeouts for slow admin work (publish)."""
        return connect_admin(self.redis_url)


def services() -> Services:
    """The current app's :class:`Services`."""
    return current_app.extensions["recsvc"]
