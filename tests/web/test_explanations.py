"""Explanations served with recommendations: computed from the published model's parts, real-time
events named as such, popular lists trending, and nothing read or added when they are turned off."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.artifact import write_artifact
from recsvc.core.explain import FactorStats, History, explain_items
from recsvc.storage import reads, versions
from tests.factories import API_KEY, blend_artifact

AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = 1_718_000_000

pytestmark = pytest.mark.redis_backends("single", "cluster")


@pytest.fixture
def artifact(models_dir):
    a = blend_artifact(seed=1)
    a.manifest["params"].update(regularization=0.5, alpha=2.0)
    a.manifest["trained_until"] = T
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def client(redis_client, artifact, config, make_app):
    versions.publish(redis_client, artifact, config)
    return make_app(config).test_client()


def expected(artifact, user: int, item_ids: list[str]):
    """The core's explanations of these items, from the artifact itself (linear scaling: raw = stored)."""
    row = artifact.interactions[user]
    alpha = artifact.manifest["params"]["alpha"]
    history = History(
        row.indices,
        row.data.astype(np.float64),
        effective=alpha * row.data.astype(np.float64),
        regularization=artifact.manifest["params"]["regularization"],
        bought=np.isin(row.indices, artifact.purchases[user].indices),
    )
    items = np.array([artifact.item_ids.index(i) for i in item_ids])
    return explain_items(
        artifact.scorer(),
        history,
        artifact.user_factors[user],
        items,
        stats=FactorStats.of(artifact.item_factors),
    )


def test_cached_list_explanations_are_the_models(client, artifact):
    body = client.get("/v1/users/u6/recommendations?n=8").get_json()
    assert body["source"] == "personalized"
    got = [it["explanation"] for it in body["items"]]
    want = expected(artifact, 6, [it["item_id"] for it in body["items"]])
    assert [g["code"] for g in got] == [w.code.value for w in want]
    assert [g["because"] for g in got] == [[artifact.item_ids[a] for a in w.anchors] for w in want]
    # u6 viewed i7, i8, i9 without buying: the own-items term puts them first, as seen.
    assert [g["code"] for g in got[:3]] == ["seen"] * 3
    assert got[0]["text"] == "You looked at this before"
    # u6 bought i6, whose strongest item-kNN neighbour is i13: bought, named first.
    by_item = {it["item_id"]: it["explanation"] for it in body["items"]}
    assert by_item["i13"]["code"] == "bought" and by_item["i13"]["because"][0] == "i6"
    assert by_item["i13"]["text"].startswith("Because you bought Item 6")
    # i0 is no one's neighbour in u6's history and the best seller: popularity put it there.
    assert by_item["i0"] == {"code": "popular", "text": "Popular in shoes", "because": []}


def test_real_time_events_are_named_as_just_viewed(client, artifact):
    event = {"user_id": "u3", "item_id": "i30", "event": "view", "timestamp": T + 100}
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    body = client.get("/v1/users/u3/recommendations?n=10").get_json()
    assert body["source"] == "realtime"
    by_item = {it["item_id"]: it["explanation"] for it in body["items"]}
    # i30's item-kNN neighbours are i31 (weight 2) and i37: the fresh view explains them.
    assert by_item["i31"]["code"] == "just_viewed" and by_item["i31"]["because"][0] == "i30"
    assert by_item["i31"]["text"].startswith("Because you just viewed Item 30")
    assert by_item["i30"]["code"] == "seen"


def test_unknown_users_get_trending_items(client):
    body = client.get("/v1/users/stranger/recommendations?n=4").get_json()
    assert body["source"] == "fallback"
    assert {it["explanation"]["code"] for it in body["items"]} == {"trending"}
    first = body["items"][0]
    assert first["explanation"]["text"] == f"Trending in {first['category']}"


def test_explain_false_reads_nothing_more_and_adds_nothing(client, monkeypatch):
    """Explaining reads the training row in the request's one round trip; the lean path does not."""
    round_trips, hgets = [], []
    original_records, original_field = reads.read_user_records, reads.read_field

    def counted_records(redis_client, record_keys, user_id, probe_keys=()):
        round_trips.append(len(record_keys))
        return original_records(redis_client, record_keys, user_id, probe_keys)

    def counted_field(redis_client, key, field):
        hgets.append(field)
        return original_field(redis_client, key, field)

    monkeypatch.setattr(reads, "read_user_records", counted_records)
    monkeypatch.setattr(reads, "read_field", counted_field)
    lean = client.get("/v1/users/u6/recommendations?n=5&explain=false").get_json()
    assert round_trips == [1] and hgets == [] and all("explanation" not in it for it in lean["items"])
    full = client.get("/v1/users/u6/recommendations?n=5").get_json()
    assert round_trips == [1, 2] and hgets == []  # the record and the training row, one round trip
    assert [it["item_id"] for it in full["items"]] == [it["item_id"] for it in lean["items"]]
    personal = [it for it in full["items"] if it["explanation"]["code"] in ("viewed", "bought")]
    assert personal and all(it["explanation"]["because"] for it in personal)


def test_explain_must_be_true_or_false(client):
    r = client.get("/v1/users/u6/recommendations?explain=yes")
    assert r.status_code == 400 and r.get_json()["field"] == "explain"
