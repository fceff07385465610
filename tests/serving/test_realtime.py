"""The fold-in hook of the recommendation path, against a model published into a real Redis."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from recsvc.core.artifact import write_artifact
from recsvc.core.contract import EVENT_CODE
from recsvc.core.foldin import fold_in
from recsvc.core.ranking import Filters
from recsvc.serving import realtime
from recsvc.serving.model import ServingModel
from recsvc.serving.realtime import realtime_vector, recommend, user_vector_for
from recsvc.storage import versions
from recsvc.storage.embedded import RedisServer
from recsvc.storage.stream import RecentEvents, append_events
from tests.factories import make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

T = 1_718_000_000
ALPHA, REG = 2.0, 0.5


def _artifact(tmp_path, **params):
    artifact = make_artifact(n_users=6, n_items=30, factors=4, seed=1)
    # Linear scaling with the default weights: a view adds 1, a cart 4, a purchase 10.
    artifact.manifest["params"] = {"factors": 4, "regularization": REG, "alpha": ALPHA, "scaling": "linear"}
    artifact.manifest["params"].update(params)
    artifact.manifest["trained_until"] = T
    write_artifact(artifact, tmp_path / "models")
    return artifact


@pytest.fixture
def published(redis_client, tmp_path, make_config):
    artifact = _artifact(tmp_path)
    config = make_config(topk_cached=10)
    version = versions.publish(redis_client, artifact, config)
    return artifact, ServingModel.load(redis_client, version)


def _post(client, user, events):
    batch = [{"user_id": user, "item_id": item, "event": kind, "timestamp": ts} for item, kind, ts in events]
    append_events(client, batch, stream="recsvc:events", history_length=200, history_ttl_s=600)


def test_known_user_without_new_events_keeps_the_cached_answer(redis_client, published):
    _, model = published
    assert user_vector_for(model, redis_client, "u3", known_user=True) is None
    _post(redis_client, "u3", [("i7", "purchase", T - 10), ("i8", "view", T)])  # not newer than the model
    assert user_vector_for(model, redis_client, "u3", known_user=True) is None


def test_known_user_with_new_events_folds_in_training_row_plus_events(redis_client, published):
    artifact, model = published
    # u2's training row: item 2 with confidence 10 (make_artifact). New: two views and a cart of
    # item 5 and a view of item 2 -> linear row {2: 10 + 1, 5: 1 + 1 + 4}.
    _post(
        redis_client,
        "u2",
        [("i5", "view", T + 1), ("i5", "view", T + 2), ("i5", "cart", T + 3), ("i2", "view", T + 4)],
    )
    got = user_vector_for(model, redis_client, "u2", known_user=True)
    assert got is not None and got.known_user and got.events_used == 4
    expected = fold_in(artifact.item_factors, np.array([2, 5]), np.array([11.0, 6.0]), REG, ALPHA)
    np.testing.assert_allclose(got.vector, expected, rtol=1e-5)
    # Without being told, the training row found in Redis says the user is known.
    again = user_vector_for(model, redis_client, "u2")
    assert again is not None and again.known_user
    np.testing.assert_allclose(again.vector, expected, rtol=1e-5)


def test_unknown_visitor_with_one_event_gets_a_vector(redis_client, published):
    artifact, model = published
    assert user_vector_for(model, redis_client, "visitor-1", known_user=False) is None
    _post(redis_client, "visitor-1", [("i9", "purchase", T - 5000)])  # old events count too: all are new
    got = user_vector_for(model, redis_client, "visitor-1", known_user=False)
    assert got is not None and not got.known_user
    np.testing.assert_allclose(got.vector, fold_in(artifact.item_factors, [9], [10.0], REG, ALPHA), rtol=1e-5)
    np.testing.assert_array_equal(got.purchased, [9])


def test_events_the_model_cannot_use_do_not_switch_to_realtime(redis_client, published):
    _, model = published
    _post(redis_client, "visitor-2", [("i4", "impression", T + 1), ("not-in-catalog", "purchase", T + 2)])
    assert user_vector_for(model, redis_client, "visitor-2", known_user=False) is None


def test_recommend_ranks_by_folded_vector_and_excludes_new_purchases(redis_client, published):
    artifact, model = published
    _post(redis_client, "visitor-3", [("i9", "purchase", T + 1), ("i11", "view", T + 2)])
    items, scores, folded = recommend(model, redis_client, "visitor-3", Filters(), 5, known_user=False)
    scores_all = artifact.item_factors @ folded.vector
    scores_all[9] = -np.inf  # bought just now: excluded like any purchase
    np.testing.assert_array_equal(items, np.argsort(-scores_all, kind="stable")[:5])
    np.testing.assert_allclose(scores, scores_all[items], rtol=1e-5)
    # The request's filters still apply (category 0 only, price <= 20).
    items, _, _ = recommend(
        model,
        redis_client,
        "visitor-3",
        Filters(categories=np.array([0]), max_price=20.0),
        5,
        known_user=False,
    )
    assert all(artifact.category[i] == 0 and artifact.price[i] <= 20 for i in items) and 9 not in items


def test_yty_is_computed_once_per_version(redis_client, published):
    _, model = published
    first = realtime.foldin_state(model)
    assert realtime.foldin_state(model) is first
    np.testing.assert_allclose(first.yty, model.item_factors.T.astype(np.float64) @ model.item_factors)


def test_bm25_model_without_document_frequency_disables_fold_in(redis_client, tmp_path, make_config):
    artifact = _artifact(tmp_path, scaling="bm25", bm25_n_users=6, bm25_avg_length=10.0)
    version = versions.publish(redis_client, artifact, make_config(topk_cached=10))
    model = ServingModel.load(redis_client, version)
    _post(redis_client, "visitor-4", [("i1", "view", T + 1)])
    if getattr(model, "document_frequency", None) is None:
        assert user_vector_for(model, redis_client, "visitor-4", known_user=False) is None
        assert "document frequency" in realtime.foldin_state(model).reason
    # From a local artifact the frequencies are at hand, so fold-in works there.
    local = ServingModel.from_artifact(artifact)
    recent = RecentEvents(["i1"], np.array([EVENT_CODE["view"]]), np.array([T + 1]))
    got = realtime_vector(local, recent, np.zeros(0, np.int32), np.zeros(0, np.float32), known_user=False)
    assert got is not None and np.isfinite(got.vector).all()


def test_redis_failure_means_no_realtime_not_an_error(tmp_path, make_config):
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    artifact = _artifact(tmp_path)
    version = versions.publish(client, artifact, make_config(topk_cached=10))
    model = ServingModel.load(client, version)
    _post(client, "u1", [("i3", "view", T + 1)])
    assert user_vector_for(model, client, "u1", known_user=True) is not None
    server.stop()
    assert user_vector_for(model, client, "u1", known_user=True) is None
    assert recommend(model, client, "u1", Filters(), 3, known_user=True) is None


def test_prefetched_recent_list_needs_no_round_trip_without_new_events(redis_client, published):
    artifact, model = published
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)  # would fail if used
    old = [f"{T - 1}|0|i5".encode()]
    assert user_vector_for(model, nowhere, "u2", known_user=True, recent_entries=old) is None
    assert user_vector_for(model, nowhere, "u2", known_user=True, recent_entries=[]) is None
    # Unknown visitor with a prefetched event: folded in without any Redis read.
    got = user_vector_for(model, nowhere, "v9", known_user=False, recent_entries=[f"{T + 1}|2|i9"])
    np.testing.assert_allclose(got.vector, fold_in(artifact.item_factors, [9], [10.0], REG, ALPHA), rtol=1e-5)
    # Known user with a new event: the training row is read (one HGET) and merged.
    new = [f"{T + 5}|1|i5".encode(), *old]
    got = user_vector_for(model, redis_client, "u2", known_user=True, recent_entries=new)
    expected = fold_in(artifact.item_factors, np.array([2, 5]), np.array([10.0, 4.0]), REG, ALPHA)
    np.testing.assert_allclose(got.vector, expected, rtol=1e-5)
    assert got.events_used == 1
