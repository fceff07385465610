"""Publishing into a real Redis: layout, verification, the atomic flip, rollback, retention, crashes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsvc.core import topk
from recsvc.core.artifact import ArtifactError, write_artifact
from recsvc.serving.model import ServingModel, fetch_user
from recsvc.storage import codec, keys, versions
from tests.factories import make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")


def _keys(client, version: str) -> list[bytes]:
    return list(client.scan_iter(match=keys.version_pattern(version), count=1000))


def test_topk_for_users_matches_brute_force_across_chunks():
    rng = np.random.default_rng(3)
    users = rng.standard_normal((37, 4)).astype(np.float32)
    items = rng.standard_normal((29, 4)).astype(np.float32)
    items[7] = items[3]  # an exact tie: the lower index must come first
    got_idx, got_scores = [], []
    for start, idx, scores in topk.topk_for_users(users, items, k=10, chunk_rows=8):
        assert start == sum(len(x) for x in got_idx)
        got_idx.append(idx)
        got_scores.append(scores)
    idx, scores = np.vstack(got_idx), np.vstack(got_scores)
    full = users @ items.T
    for u in range(len(users)):
        expected = np.lexsort((np.arange(29), -full[u]))[:10]
        assert idx[u].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[u], full[u, expected], rtol=1e-6)
        pos3, pos7 = np.flatnonzero(idx[u] == 3), np.flatnonzero(idx[u] == 7)
        if len(pos3) and len(pos7):
            assert pos3[0] < pos7[0]


def test_large_catalogs_pack_indices_as_int32():
    # 2 bytes while every index and the pad (0xFFFF) fit.
    assert codec.index_dtype(65_535) == "<u2" and codec.index_dtype(65_536) == "<i4"
    idx = np.array([[70_000, 3]], dtype=np.int32)
    vec = np.array([[0.5, -1]], dtype=np.float32)
    value = codec.pack_user_rows(idx, None, vec, "<i4")[0].tobytes() + np.array([9], "<i4").tobytes()
    items, scores, vector, bought = codec.unpack_user(value, 2, 2, "<i4")
    assert (items.tolist(), vector.tolist(), bought.tolist()) == ([70_000, 3], [0.5, -1], [9])
    assert scores is None


def test_records_with_scores_and_short_lists_round_trip():
    idx = np.array([[4, 2, -1]], dtype=np.int32)  # two candidates for K = 3
    scores = np.array([[2.5, 1.0, -np.inf]], dtype=np.float32)
    vec = np.array([[1, 2]], dtype=np.float32)
    value = codec.pack_user_rows(idx, scores, vec, "<u2")[0].tobytes() + np.array([7, 8], "<u2").tobytes()
    assert len(value) == 2 * 3 + 4 * 3 + 4 * 2 + 2 * 2
    items, got, vector, excluded = codec.unpack_user(value, 3, 2, "<u2", with_scores=True)
    assert items.tolist() == [4, 2] and got.tolist() == [2.5, 1.0]  # the pad is dropped
    assert vector.tolist() == [1, 2] and excluded.tolist() == [7, 8]


def test_topk_with_k_beyond_catalog_keeps_every_item():
    users = np.eye(3, dtype=np.float32)
    items = np.array([[1, 0, 0], [0, 2, 0], [3, 0, 0]], dtype=np.float32)
    ((_, idx, scores),) = topk.topk_for_users(users, items, k=200)
    assert idx.tolist() == [[2, 0, 1], [1, 0, 2], [0, 1, 2]]
    assert scores[0].tolist() == [3, 1, 0]


def test_publish_writes_a_complete_compact_version(redis_client, artifact, config):
    version = versions.publish(redis_client, artifact, config)
    assert version == artifact.version
    assert versions.current_version(redis_client) == version
    info = versions.read_info(redis_client, version)
    assert info["status"] == "complete"
    assert (int(info["n_users"]), int(info["n_items"]), int(info["k"])) == (
        20,
        50,
        50,
    )  # K clipped to the catalog
    assert json.loads(redis_client.get(keys.version(version, "manifest")))["version"] == version

    # Per-user data sits in bucket hashes with packed binary values (no JSON per item).
    n_buckets = int(info["n_buckets"])
    assert n_buckets == keys.GROUPS  # one bucket per group at least (20 users need one)
    bucket = keys.user_bucket("u3", n_buckets)
    assert bucket % keys.GROUPS == keys.user_group("u3")
    row = redis_client.hget(keys.bucket(version, "topk", bucket), "u3")
    assert info["index_dtype"] == "<u2"
    assert len(row) == 2 * 50 + 4 * 8 + 2  # top-K uint16 indices, float32 user factors, one purchase
    assert info["scores"] == "0"  # plain ALS: scores come back from the factors
    idx, _, vector, bought = codec.unpack_user(row, 50, 8, "<u2")
    full = artifact.item_factors @ artifact.user_factors[3]
    # Every item but the one bought (left out at publish; the list is padded to K).
    assert idx.tolist() == [i for i in np.lexsort((np.arange(50), -full)).tolist() if i != 3]
    np.testing.assert_array_equal(vector, artifact.user_factors[3])
    assert bought.tolist() == [3]
    items, weights = codec.unpack_weighted(
        redis_client.hget(keys.bucket(version, "interactions", bucket), "u3")
    )
    assert (items.tolist(), weights.tolist()) == ([3], [10.0])

    # The in-process model loaded back from Redis equals the artifact.
    model = ServingModel.load(redis_client, version)
    np.testing.assert_array_equal(model.item_factors, artifact.item_factors)
    assert model.item_ids == artifact.item_ids and model.titles == artifact.titles
    assert model.popular[:3].tolist() == [0, 1, 2]
    assert model.popular_by_category[1][:2].tolist() == [1, 4]
    np.testing.assert_array_equal(model.price, artifact.price)
    assert model.bundles.n_items == 50
    live, record, _ = fetch_user(redis_client, model, "u3")
    assert live == version and record.purchased.tolist() == [3]
    np.testing.assert_allclose(record.topk_scores, full[idx], rtol=1e-6)
    assert fetch_user(redis_client, model, "nobody") == (version, None, [])
    assert model.training_row(redis_client, "u3")[0].tolist() == [3]


def test_many_users_are_spread_over_buckets(redis_client, models_dir, config):
    a = make_artifact(n_users=2500, n_items=30, seed=5)
    write_artifact(a, models_dir)
    stats: list[versions.PublishStats] = []
    version = versions.publish(redis_client, a, config.with_overrides(topk_cached=10), stats=stats)
    info = versions.read_info(redis_client, version)
    assert int(info["n_buckets"]) == keys.GROUPS  # 3 buckets' worth, rounded up to the groups
    sizes = [redis_client.hlen(keys.bucket(version, "topk", b)) for b in range(keys.GROUPS)]
    assert sum(sizes) == 2500 and min(sizes) > 100  # crc32 spreads users evenly
    # Every user is where the reader will look for it.
    model = ServingModel.load(redis_client, version)
    for u in (0, 1234, 2499):
        _, record, _ = fetch_user(redis_client, model, f"u{u}")
        np.testing.assert_array_equal(record.vector, a.user_factors[u])
        assert len(record.topk_items) == 10
    assert stats[0].users == 2500 and not stats[0].reused


def test_flip_rollback_and_history(redis_client, models_dir, config):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    v2 = versions.publish(redis_client, write_artifact(make_artifact(seed=2), models_dir), config)
    assert v1 != v2 and versions.current_version(redis_client) == v2
    listed = versions.list_published(redis_client)
    assert [r["version"] for r in listed] == [v2, v1]
    assert [r["live"] for r in listed] == [True, False]
    assert versions.rollback(redis_client, config) == v1
    assert versions.current_version(redis_client) == v1
    with pytest.raises(versions.RollbackError):
        versions.rollback(redis_client, config)
    assert versions.current_version(redis_client) == v1
    # Publishing a version Redis already holds re-activates it without rewriting.
    stats: list[versions.PublishStats] = []
    assert versions.publish(redis_client, models_dir / v2, config, stats=stats) == v2
    assert stats[0].reused and versions.current_version(redis_client) == v2
    assert versions.rollback(redis_client, config) == v1
    # Every move of the pointer is in its history, newest first; the refused rollback is not.
    moves = [(h["action"], h["version"], h["previous"]) for h in versions.history(redis_client)]
    assert moves == [
        ("rollback", v1, v2),
        ("publish", v2, v1),
        ("rollback", v1, v2),
        ("publish", v2, v1),
        ("publish", v1, None),
    ]
    assert all(h["at"] > 1.7e9 for h in versions.history(redis_client))
    assert len(versions.history(redis_client, limit=2)) == 2


def test_retention_keeps_the_newest_versions_and_never_the_live_one(redis_client, models_dir, config):
    written = [
        versions.publish(redis_client, write_artifact(make_artifact(seed=s), models_dir), config)
        for s in range(4)
    ]
    published = [r["version"] for r in versions.list_published(redis_client)]
    assert published == written[:0:-1]  # the 3 newest, newest first
    assert _keys(redis_client, written[0]) == []  # the oldest is gone from Redis entirely
    assert _keys(redis_client, written[1])
    # Roll back twice: the live version is now the oldest kept; a new publish must not delete it.
    versions.rollback(redis_client, config)
    assert versions.rollback(redis_client, config) == written[1]
    v5 = versions.publish(redis_client, write_artifact(make_artifact(seed=9), models_dir), config)
    kept = {r["version"] for r in versions.list_published(redis_client)}
    assert kept == {v5, written[3], written[1]}  # live written[1] kept; written[2] pruned
    assert _keys(redis_client, written[2]) == []
    # and rollback from v5 goes back to the version live before it
    assert versions.rollback(redis_client, config) == written[1]


def test_pointer_does_not_move_until_the_new_version_is_verified(redis_client, models_dir, config):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    seen = []
    a2 = make_artifact(n_users=1500, seed=2)
    write_artifact(a2, models_dir)
    versions.publish(
        redis_client,
        a2,
        config.with_overrides(topk_cached=20),
        progress=lambda n: seen.append(versions.current_version(redis_client)),
    )
    assert seen and set(seen) == {v1}
    assert versions.current_version(redis_client) == a2.version


def test_failed_verification_removes_the_version_and_keeps_the_live_one(
    redis_client, models_dir, config, monkeypatch
):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    bad = write_artifact(make_artifact(seed=2), models_dir)
    real_write = versions._write_version

    def write_then_corrupt(client, artifact, *args, **kwargs):
        real_write(client, artifact, *args, **kwargs)
        client.hset(keys.version(artifact.version, "items"), "factors", b"\x00" * 16)

    monkeypatch.setattr(versions, "_write_version", write_then_corrupt)
    with pytest.raises(versions.PublishError, match="factors"):
        versions.publish(redis_client, bad, config)
    assert versions.current_version(redis_client) == v1
    assert _keys(redis_client, bad.name) == []
    assert redis_client.get(keys.PUBLISHING_PREFIX + bad.name) is None


def test_a_crashed_publish_leaves_nothing_behind_on_the_next_run(redis_client, models_dir, config):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    # What a publish killed mid-write leaves: an incomplete version, and (after expiry) no lease.
    redis_client.hset(keys.version("crashed-1", "info"), mapping={"status": "writing", "n_users": 5})
    redis_client.hset(keys.bucket("crashed-1", "topk", 0), "u1", b"x")
    # A publish in progress elsewhere holds its lease: its keys must survive.
    redis_client.hset(keys.version("busy-1", "info"), mapping={"status": "writing"})
    redis_client.set(keys.PUBLISHING_PREFIX + "busy-1", "token", ex=60)
    v2 = versions.publish(redis_client, write_artifact(make_artifact(seed=2), models_dir), config)
    assert _keys(redis_client, "crashed-1") == []
    assert _keys(redis_client, "busy-1")
    assert [r["version"] for r in versions.list_published(redis_client)] == [v2, v1]


def test_an_incomplete_version_can_never_go_live(redis_client):
    redis_client.hset(keys.version("half", "info"), mapping={"status": "writing"})
    redis_client.zadd(keys.VERSIONS, {"half": 1})
    with pytest.raises(versions.PublishError, match="not completely published"):
        versions.activate(redis_client, "half")
    assert versions.current_version(redis_client) is None


def test_bad_artifacts_are_refused_before_anything_is_written(redis_client, models_dir, config, tmp_path):
    with pytest.raises(ArtifactError, match="no model versions"):
        versions.publish(redis_client, "latest", config)
    path = write_artifact(make_artifact(), models_dir)
    (path / "item_factors.npy").write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="checksum"):
        versions.publish(redis_client, path, config)
    assert list(redis_client.scan_iter(match="*recsvc*")) == []


def test_publish_by_name_and_latest(redis_client, models_dir, config):
    write_artifact(make_artifact(seed=1), models_dir)
    newest = write_artifact(make_artifact(seed=2), models_dir, version="29990101T000000Z-x")
    assert versions.publish(redis_client, "latest", config) == newest.name
    assert versions.delete_version  # (exists)
    with pytest.raises(versions.PublishError, match="live"):
        versions.delete_version(redis_client, newest.name)
