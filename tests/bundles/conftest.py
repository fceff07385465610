"""Fixtures for the bundle HTTP tests: an artifact with known bundle candidates, published to a real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.artifact import Artifact, BundleCandidates, write_artifact
from recsvc.core.config import Config
from tests.factories import make_artifact

API_KEY = "bundle-test-key-0123456789"

#: anchor -> [(candidate, support)], best first. Categories cycle shoes/shirts/hats (i % 3);
#: item i costs i + 1. Anchor 0 (shoes) goes with 1 (shirts), 4 (shirts), 3 (shoes), 2 (hats).
ROWS: dict[int, list[tuple[int, int]]] = {
    0: [(1, 12), (4, 10), (3, 9), (2, 8)],
    1: [(0, 12), (2, 5)],
    2: [(0, 8), (1, 5)],
    4: [(0, 10)],
}


def bundle_candidates(n_items: int) -> BundleCandidates:
    indptr, indices, score, support = [0], [], [], []
    for anchor in range(n_items):
        for item, sup in ROWS.get(anchor, []):
            indices.append(item)
            support.append(sup)
            score.append(sup / 20.0)
        indptr.append(len(indices))
    return BundleCandidates(
        np.asarray(indptr, np.int64),
        np.asarray(indices, np.int32),
        np.asarray(score, np.float32),
        np.asarray(support, np.int32),
    )


@pytest.fixture
def models_dir(tmp_path):
    return tmp_path / "models"


@pytest.fixture
def artifact(models_dir) -> Artifact:
    a = make_artifact(n_users=20, n_items=50, seed=2)
    a.bundles = bundle_candidates(a.n_items)
    a.available[5] = False  # out of stock
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def config(redis_url, models_dir, tmp_path) -> Config:
    return Config.create(
        redis_url=redis_url,
        models_dir=models_dir,
        var_dir=tmp_path / "var",
        api_keys=(API_KEY,),
        max_body_bytes=4096,
        model_check_interval_s=0.0,
    )
