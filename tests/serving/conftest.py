"""Fixtures for the serving tests: a written artifact, a published version, an app on real Redis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from recsvc.core.artifact import Artifact, write_artifact
from recsvc.core.config import Config
from tests.factories import make_artifact

API_KEY = "test-key-0123456789"


def expected_top(artifact: Artifact, user: int, n: int, allowed: np.ndarray | None = None) -> list[str]:
    """Brute-force reference: the user's best ``n`` allowed items by dot product (ties: lower index)."""
    scores = artifact.item_factors @ artifact.user_factors[user]
    mask = artifact.available.copy() if allowed is None else allowed.copy()
    mask[artifact.purchases[user].indices] = False
    candidates = np.flatnonzero(mask)
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [artifact.item_ids[i] for i in order[:n]]


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def artifact(models_dir) -> Artifact:
    """A written 20-user, 50-item artifact (see tests.factories.make_artifact)."""
    a = make_artifact(n_users=20, n_items=50, seed=1)
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def config(redis_url, models_dir, tmp_path) -> Config:
    return Config.create(
        redis_url=redis_url,
        models_dir=models_dir,
        var_dir=tmp_path / "var",
        api_keys=(API_KEY,),
        model_check_interval_s=0.0,
    )


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def new_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)
