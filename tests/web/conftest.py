"""The web layer's fixtures: the app built by the real factory on the test config, and its client."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from recsvc.core.config import Config
from recsvc.web.app import create_app


@pytest.fixture
def make_app(config) -> Callable[..., Flask]:
    """Build apps with :func:`create_app` (the test config, or another one); closed after the test."""
    apps: list[Flask] = []

    def build(app_config: Config | None = None) -> Flask:
        app = create_app(app_config or config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        services = app.extensions["recsvc"]
        services.served_log.close()
        services.client.close()


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
