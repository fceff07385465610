"""The repurchase model in Redis: written with the version, verified, read back, deleted with it."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.artifact import write_artifact
from recsvc.core.repurchase import MAX_ITEMS_PER_USER, UserHistory
from recsvc.serving.model import ServingModel, fetch_history
from recsvc.storage import keys, versions
from recsvc.storage import repurchase as store
from tests.factories import make_artifact, repurchase_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")


@pytest.mark.parametrize("dtype", ["<u2", "<i4"])
def test_pack_and_unpack(dtype):
    h = UserHistory(
        np.array([3, 40000 if dtype == "<i4" else 400], np.int32),
        np.array([1_700_000_000, 1_710_000_000], np.int64),
        np.array([5, 70000], np.int32),
        np.array([2.3, 0.0], np.float32),
        pace=-0.25,
    )
    back = store.unpack_history(store.pack_history(h, dtype), dtype)
    assert back.items.tolist() == h.items.tolist() and back.last.tolist() == h.last.tolist()
    assert back.count.tolist() == [5, 65535]  # capped, never wrapped
    assert back.log_interval.tolist() == pytest.approx([2.3, 0.0]) and back.pace == -0.25
    with pytest.raises(ValueError):
        store.unpack_history(store.pack_history(h, dtype)[:-1], dtype)


def test_records_keep_the_newest_items():
    n = MAX_ITEMS_PER_USER + 5
    h = UserHistory(
        np.arange(n, dtype=np.int32),
        np.arange(n, dtype=np.int64),
        np.ones(n, np.int32),
        np.zeros(n, np.float32),
    )
    back = store.unpack_history(store.pack_history(h, "<i4"), "<i4")
    assert len(back) == MAX_ITEMS_PER_USER and back.items[0] == 5


@pytest.fixture
def artifact(models_dir):
    a = repurchase_artifact()
    write_artifact(a, models_dir)
    return a


def test_published_with_the_version_and_read_back(redis_client, published, config):
    version = published.version
    assert redis_client.exists(keys.version(version, "repurchase"))
    model = ServingModel.load(redis_client, version)
    assert model.repurchase is not None
    assert np.array_equal(model.repurchase.rate, published.repurchase.params.rate)
    assert model.repurchase.within_var == 0.1 and model.repurchase.dispersion == 1.0
    _, history, _ = fetch_history(redis_client, model, "u1")
    want = published.repurchase.history.row(1)
    assert history is not None and history.items.tolist() == want.items.tolist()
    assert history.last.tolist() == want.last.tolist() and history.count.tolist() == want.count.tolist()
    assert fetch_history(redis_client, model, "u0")[1] is None  # bought nothing
    assert fetch_history(redis_client, model, "nobody")[1] is None


def test_verify_notices_a_changed_record(redis_client, published, config):
    key = keys.bucket(published.version, "repurchase", keys.user_bucket("u1", keys.bucket_count(20)))
    redis_client.hset(key, "u1", b"\x00\x00\x00\x00")
    with pytest.raises(versions.PublishError, match="repurchase record of 'u1'"):
        versions.verify_version(redis_client, published, config)
    redis_client.hdel(key, "u1")
    with pytest.raises(versions.PublishError, match="repurchase records in Redis"):
        versions.verify_version(redis_client, published, config)


def test_deleted_with_its_version(redis_client, published, config, models_dir):
    other = make_artifact(seed=9)
    write_artifact(other, models_dir)
    versions.publish(redis_client, other, config)
    assert not redis_client.exists(keys.version(other.version, "repurchase"))  # none in that version
    versions.delete_version(redis_client, published.version)
    assert not list(redis_client.scan_iter(match=f"*{published.version}*"))


def test_a_record_with_the_recency_weighted_occasions():
    h = UserHistory(
        np.array([3, 7], np.int32),
        np.array([1_700_000_000, 1_710_000_000], np.int64),
        np.array([5, 1], np.int32),
        np.array([2.3, 0.0], np.float32),
        pace=0.5,
        recent=np.array([2.5, 1.0], np.float32),
    )
    packed = store.pack_history(h, "<u2")
    back = store.unpack_history(packed, "<u2", recent=True)
    assert back.recent is not None and back.recent.tolist() == [2.5, 1.0]
    assert back.items.tolist() == [3, 7] and back.log_interval.tolist() == pytest.approx([2.3, 0.0])
    with pytest.raises(ValueError):  # read with the old layout: does not fit
        store.unpack_history(packed, "<u2")


def test_the_ranker_travels_in_the_version_hash_and_old_hashes_are_unchanged():
    from dataclasses import replace

    from tests.factories import repurchase_model

    params = repurchase_model(20, 50).params
    old = store.item_mapping(params)
    assert b"ranker" not in old["hyper"]  # a version without one publishes the bytes it always did
    assert store.params_from_mapping({k.encode(): v for k, v in old.items()}).ranker is None
    ranker = tuple(float(i) / 10 for i in range(9))
    new = store.item_mapping(replace(params, ranker=ranker))
    assert store.params_from_mapping({k.encode(): v for k, v in new.items()}).ranker == ranker


@pytest.mark.parametrize("ranker", [None, (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0)])
def test_published_records_read_back_in_the_versions_layout(redis_client, config, models_dir, ranker):
    a = repurchase_artifact(seed=5, ranker=ranker)
    write_artifact(a, models_dir)
    versions.publish(redis_client, a, config)
    versions.verify_version(redis_client, a, config)  # raises on any difference
    model = ServingModel.load(redis_client, a.version)
    assert model.repurchase is not None and model.repurchase.ranker == ranker
    _, history, _ = fetch_history(redis_client, model, "u1")
    want = a.repurchase.history.row(1)
    assert history is not None and history.items.tolist() == want.items.tolist()
    if ranker is None:
        assert history.recent is None
    else:
        assert history.recent is not None and history.recent.tolist() == want.recent.tolist()
