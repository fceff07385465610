"""The key layout that lets the same code run on one Redis and on a Redis Cluster.

Pure checks of the hash tags, then the same behaviour on a single server and on a real 3-master
cluster: pointer copies, a stale copy that pruning must respect, the publish writer spreading
buckets over the masters, a cluster unreachable at start-up, and the cluster refusing what the
layout avoids (an untagged multi-key operation).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from recsvc.core.artifact import write_artifact
from recsvc.serving.model import ServingModel, fetch_user
from recsvc.storage import connection, keys, reads, versions
from recsvc.storage.embedded import RedisServer
from tests.factories import make_artifact


def _slot(key: str) -> int:
    return key_slot(key.encode())


# ------------------------------------------------------------------------------------------------
# Pure: names and slots
# ------------------------------------------------------------------------------------------------


def test_every_multi_key_operation_stays_in_one_slot():
    control = {_slot(k) for k in (keys.CURRENT, keys.EPOCH, keys.VERSIONS, keys.PREVIOUS)}
    control |= {_slot(keys.version("v1", part)) for part in keys.VERSION_PARTS}
    control |= {_slot(keys.EXPERIMENTS), _slot(keys.EXPERIMENTS_REV), _slot(keys.publishing("v1"))}
    assert len(control) == 1  # flip, rollback, deletion, experiment saves
    for user in ("u1", "visitor-7", "x" * 128, "shopper:42"):
        group = keys.user_group(user)
        n_buckets = keys.bucket_count(123_456)
        request = [
            keys.live_pointer(user),
            keys.bucket("v1", "topk", keys.user_bucket(user, n_buckets)),
            keys.bucket("v1", "interactions", keys.user_bucket(user, n_buckets)),
            keys.recent(user),
            keys.stream_shard("recsvc:events", group),
        ]
        assert len({_slot(k) for k in request}) == 1, request  # request script, event append
        assert len({_slot(keys.current_copy(group)), _slot(keys.epoch_copy(group))}) == 1  # copy script


def test_groups_cover_the_slot_space_evenly():
    slots = [_slot(keys.current_copy(g)) for g in range(keys.GROUPS)]
    width = 16384 // keys.GROUPS
    assert [s // width for s in slots] == list(range(keys.GROUPS))
    # Three masters with equal ranges (redis-cli --cluster create) hold 5 or 6 groups each.
    per_master = np.bincount([s * 3 // 16384 for s in slots], minlength=3)
    assert per_master.min() >= keys.GROUPS // 3 and per_master.max() <= -(-keys.GROUPS // 3)


def test_bucket_counts_are_multiples_of_the_groups_and_users_spread_evenly():
    for n_users in (0, 1, 999, 16_001, 1_000_000):
        n = keys.bucket_count(n_users)
        assert n % keys.GROUPS == 0 and n * keys.USERS_PER_BUCKET >= n_users
    groups = np.bincount([keys.user_group(f"u{k}") for k in range(16_000)], minlength=keys.GROUPS)
    assert groups.min() > 0.9 * 1000 and groups.max() < 1.1 * 1000
    name = keys.bucket_namer("v1", "topk")
    assert [name(b) for b in range(40)] == [keys.bucket("v1", "topk", b) for b in range(40)]


def test_names_refuse_what_would_break_the_layout():
    with pytest.raises(ValueError, match="braces"):
        keys.stream_shard("my{events}", 0)
    with pytest.raises(ValueError):
        keys.recent("u*")
    with pytest.raises(ValueError):
        keys.bucket("bad version!", "topk", 0)
    assert keys.stream_shard("recsvc:events", 3) == keys.GROUP_TAGS[3] + ":events"


@pytest.mark.parametrize(
    "url, nodes, options",
    [
        ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", [("10.0.0.1", 7000), ("10.0.0.2", 7001)], {}),
        ("rediss+cluster://app:s%40cret@h:7000/0", [("h", 7000)],
         {"username": "app", "password": "s@cret", "ssl": True}),
        ("redis+cluster://:pw@[::1]:7000", [("::1", 7000)], {"password": "pw"}),
    ],
)  # fmt: skip
def test_cluster_urls(url, nodes, options):
    assert connection.is_cluster_url(url) and connection.cluster_nodes(url) == (nodes, options)


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://h", "redis+cluster://h:7000/2"])
def test_bad_cluster_urls(url):
    with pytest.raises(ValueError):
        connection.cluster_nodes(url)
    assert not connection.is_cluster_url("redis://h:6379/0") and not connection.is_cluster_url(None)


# ------------------------------------------------------------------------------------------------
# Both backends
# ------------------------------------------------------------------------------------------------


@pytest.mark.redis_backends("single", "cluster")
def test_every_group_reads_the_live_version_and_a_request_never_mixes(redis_client, models_dir, config):
    first, second = make_artifact(n_users=300, seed=1), make_artifact(n_users=300, seed=2)
    v1 = versions.publish(redis_client, write_artifact(first, models_dir), config)
    assert versions.pointer_copies(redis_client) == [v1] * keys.GROUPS
    old = ServingModel.load(redis_client, v1)
    v2 = versions.publish(redis_client, write_artifact(second, models_dir), config)
    assert versions.pointer_copies(redis_client) == [v2] * keys.GROUPS
    # A process still holding v1 reads v1's record and learns from the same round trip that v2 is live.
    live, record, _ = fetch_user(redis_client, old, "u7")
    assert live == v2 and record is not None
    np.testing.assert_array_equal(record.vector, first.user_factors[7])
    assert versions.rollback(redis_client, config) == v1
    assert set(versions.pointer_copies(redis_client)) == {v1}


@pytest.mark.redis_backends("single", "cluster")
def test_flips_are_ordered_and_an_older_one_never_overwrites_a_newer_copy(redis_client, models_dir, config):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    v2 = versions.publish(redis_client, write_artifact(make_artifact(seed=2), models_dir), config)
    epoch = int(redis_client.get(keys.EPOCH))
    versions._copy_pointer(redis_client, v1, epoch - 1)  # a copy of the first flip, arriving late
    assert versions.pointer_copies(redis_client) == [v2] * keys.GROUPS
    # A control slot that lost its epoch (a failover) still orders the next flip after the copies.
    redis_client.delete(keys.EPOCH)
    time.sleep(0.005)  # the server's millisecond clock moves past the last flip
    assert versions.rollback(redis_client, config) == v1
    assert versions.pointer_copies(redis_client) == [v1] * keys.GROUPS
    assert int(redis_client.get(keys.EPOCH)) > epoch


@pytest.mark.redis_backends("single", "cluster")
def test_a_flip_that_died_half_way_is_healed_and_its_old_version_survives_pruning(
    redis_client, models_dir, config
):
    v1 = versions.publish(redis_client, write_artifact(make_artifact(seed=1), models_dir), config)
    v2 = versions.publish(redis_client, write_artifact(make_artifact(seed=2), models_dir), config)
    # The control pointer says v2, but group 5's copy was never written (the flip died there).
    stale = 5
    redis_client.set(keys.current_copy(stale), v1)
    redis_client.set(keys.epoch_copy(stale), 0)
    assert versions.prune_versions(redis_client, keep=1) == []  # v1 is still read by group 5
    assert versions.read_info(redis_client, v1)["status"] == "complete"
    with pytest.raises(versions.PublishError, match="live"):
        versions.delete_version(redis_client, v1)
    assert versions.sync_pointer_copies(redis_client) == v2
    assert versions.pointer_copies(redis_client) == [v2] * keys.GROUPS
    assert versions.prune_versions(redis_client, keep=1) == [v1]
    assert versions.read_info(redis_client, v1) == {}


@pytest.mark.redis_backends("single", "cluster")
def test_deleting_a_version_removes_every_key_on_every_node(redis_client, models_dir, config):
    a = make_artifact(n_users=2500, seed=3)
    v1 = versions.publish(redis_client, write_artifact(a, models_dir), config.with_overrides(topk_cached=10))
    versions.publish(redis_client, write_artifact(make_artifact(seed=4), models_dir), config)
    n_buckets = int(versions.read_info(redis_client, v1)["n_buckets"])
    assert sum(redis_client.exists(k) for k in keys.version_keys(v1, n_buckets)) == 5 + 2 * n_buckets
    assert versions.delete_version(redis_client, v1) == 5 + 2 * n_buckets
    assert list(redis_client.scan_iter(match=keys.version_pattern(v1))) == []


# ------------------------------------------------------------------------------------------------
# Cluster only
# ------------------------------------------------------------------------------------------------


@pytest.mark.redis_backends("cluster")
def test_the_cluster_refuses_an_untagged_multi_key_operation(redis_client):
    """What the old layout did: a script over the pointer and a version key without a shared tag."""
    untagged = ("recsvc:model:current", "recsvc:v:v1:topk:0")
    assert _slot(untagged[0]) != _slot(untagged[1])
    with pytest.raises(RedisClusterException, match="same key slot"):
        redis_client.eval("return 1", 2, *untagged)  # refused by the client
    node = connection.node_clients_for(redis_client, [untagged[0]])[0]
    pipe = node.pipeline(transaction=True)
    pipe.set(untagged[0], "v1")
    pipe.hset(untagged[1], "u1", "x")
    with pytest.raises(ResponseError):  # refused by the server: CROSSSLOT or MOVED
        pipe.execute()
    assert redis_client.get(untagged[0]) is None  # nothing of the transaction was applied
    # The same script over tagged keys runs: the request path's one round trip.
    live, record, probes = reads.read_user(
        redis_client, keys.bucket("v1", "topk", keys.user_bucket("u1", 16)), "u1", (keys.recent("u1"),)
    )
    assert (live, record, probes) == (None, None, [0])


@pytest.mark.redis_backends("cluster")
def test_publish_spreads_buckets_over_every_master(redis_client, models_dir, config):
    a = make_artifact(n_users=3000, seed=2)
    small_k = config.with_overrides(topk_cached=10)
    version = versions.publish(redis_client, write_artifact(a, models_dir), small_k)
    masters = connection.masters(redis_client)
    assert len(masters) == 3
    n_buckets = int(versions.read_info(redis_client, version)["n_buckets"])
    names = [keys.bucket(version, "topk", b) for b in range(n_buckets)]
    users_on = {id(node): 0 for node in masters}
    for name, node in zip(names, connection.node_clients_for(redis_client, names), strict=True):
        users_on[id(node)] += node.hlen(name)  # asked of the master itself: no redirection
    assert sum(users_on.values()) == 3000 and min(users_on.values()) > 600  # every master has its share
    model = ServingModel.load(redis_client, version)
    for u in (0, 1500, 2999):
        _, record, _ = fetch_user(redis_client, model, f"u{u}")
        np.testing.assert_array_equal(record.vector, a.user_factors[u])


def test_a_cluster_unreachable_at_start_up_is_a_fallback_not_a_crash(tmp_path):
    down = RedisServer(tmp_path / "gone")  # never started: nothing listens on its port
    client = connection.connect(f"redis+cluster://127.0.0.1:{down.port}")
    assert connection.is_cluster(client)
    with pytest.raises(connection.REDIS_DOWN_ERRORS):
        client.get(keys.CURRENT)
    with pytest.raises(redis.ConnectionError):  # and again: the next command tries again
        client.ping()
