"""A blended model end to end: publish, cached lists with their scores, full scoring when the cache
runs short, real-time fold-in scored by the blend, and the "interacted" exclusion rule."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.core.artifact import write_artifact
from recsvc.serving.model import ServingModel, fetch_user
from recsvc.storage import codec, keys, versions
from tests.factories import API_KEY, blend_artifact, expected_blend_top

AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = 1_718_000_000


def ids(body) -> list[str]:
    return [it["item_id"] for it in body["items"]]


@pytest.fixture
def artifact(models_dir):
    a = blend_artifact(seed=1)
    a.manifest["params"].update(regularization=0.5, alpha=2.0)
    a.manifest["trained_until"] = T
    write_artifact(a, models_dir)
    return a


def test_publish_stores_the_blends_scores_and_parts(redis_client, artifact, config):
    version = versions.publish(redis_client, artifact, config)
    info = versions.read_info(redis_client, version)
    assert info["scores"] == "1"
    model = ServingModel.load(redis_client, version)
    assert model.stored_scores and model.spec == artifact.spec()
    assert (model.similarity != artifact.similarity).nnz == 0
    np.testing.assert_array_equal(model.prior, artifact.prior)
    _, record, _ = fetch_user(redis_client, model, "u4")
    scores = artifact.scorer().score(artifact.raw_interactions()[[4]], artifact.user_factors[[4]])[0]
    scores[4] = -np.inf  # bought
    expected = np.lexsort((np.arange(50), -scores))[:49]
    assert record.topk_items.tolist() == expected.tolist()
    np.testing.assert_allclose(record.topk_scores, scores[expected], rtol=1e-5)
    assert record.purchased.tolist() == [4]


def test_cached_and_full_answers_are_the_blends(redis_client, artifact, config, make_app):
    versions.publish(redis_client, artifact, config.with_overrides(topk_cached=5))
    client = make_app(config).test_client()
    body = client.get("/v1/users/u6/recommendations?n=3").get_json()
    assert body["source"] == "personalized" and ids(body) == expected_blend_top(artifact, 6, 3)
    # Viewed but not bought: the blend puts u6's views (i7, i8, i9) first.
    assert set(ids(body)) == {"i7", "i8", "i9"}
    # 5 cached items cannot give 10 shirts: every item is scored from u6's training row.
    body = client.get("/v1/users/u6/recommendations?n=10&category=shirts").get_json()
    allowed = np.arange(50) % 3 == 1
    assert ids(body) == expected_blend_top(artifact, 6, 10, allowed=allowed)
    scores = artifact.scorer().score(artifact.raw_interactions()[[6]], artifact.user_factors[[6]])[0]
    assert [it["score"] for it in body["items"]] == pytest.approx(
        [float(scores[int(i[1:])]) for i in ids(body)], rel=1e-5
    )


def test_realtime_answers_are_scored_by_the_blend(redis_client, artifact, config, make_app):
    versions.publish(redis_client, artifact, config)
    client = make_app(config).test_client()
    event = {"user_id": "u3", "item_id": "i30", "event": "view", "timestamp": T + 100}
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    body = client.get("/v1/users/u3/recommendations?n=5").get_json()
    assert body["source"] == "realtime"
    # The row folded in: the training row (bought i3: 10; viewed i4, i5, i6: 1) plus the new view.
    row = artifact.raw_interactions()[[3]].toarray()[0]
    row[30] += 1.0
    from recsvc.core.foldin import fold_in
    from recsvc.core.weighting import RowRecipe, scale_row

    indices = np.flatnonzero(row)
    recipe = RowRecipe.from_manifest(artifact.manifest["params"])
    vector = fold_in(artifact.item_factors, indices, scale_row(indices, row[indices], recipe), 0.5, 2.0)
    scores = artifact.scorer().score(sp.csr_matrix(row[None, :]), vector[None, :])[0]
    scores[3] = -np.inf  # bought
    assert ids(body) == [artifact.item_ids[i] for i in np.lexsort((np.arange(50), -scores))[:5]]
    assert set(ids(body)[:4]) == {"i4", "i5", "i6", "i30"}  # what they looked at, the new view too


def test_a_catalogue_where_nobody_buys_what_they_looked_at_excludes_it(
    redis_client, models_dir, config, make_app
):
    a = blend_artifact(seed=2, exclude="interacted")
    a.manifest["params"].update(regularization=0.5, alpha=2.0)
    a.manifest["trained_until"] = T
    write_artifact(a, models_dir)
    version = versions.publish(redis_client, a, config)
    client = make_app(config).test_client()
    body = client.get("/v1/users/u6/recommendations?n=10").get_json()
    assert ids(body) == expected_blend_top(a, 6, 10)
    assert not {"i6", "i7", "i8", "i9"} & set(ids(body))
    # The stored record lists every item the user touched, and so do real-time answers.
    n_buckets = int(versions.read_info(redis_client, version)["n_buckets"])
    record = redis_client.hget(keys.bucket(version, "topk", keys.user_bucket("u6", n_buckets)), "u6")
    _, _, _, excluded = codec.unpack_user(record, 50, 8, "<u2", with_scores=True)
    assert excluded.tolist() == [6, 7, 8, 9]
    event = {"user_id": "u6", "item_id": "i20", "event": "view", "timestamp": T + 100}
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    body = client.get("/v1/users/u6/recommendations?n=10").get_json()
    assert body["source"] == "realtime" and not {"i6", "i7", "i8", "i9", "i20"} & set(ids(body))


def test_the_local_fallback_model_scores_the_blend(artifact):
    model = ServingModel.from_artifact(artifact)
    assert model.stored_scores and model.scorer.spec == artifact.spec()
    record = model.local_user("u6")
    assert record is not None and record.purchased.tolist() == [6]
