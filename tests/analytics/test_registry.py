"""Definitions in Redis, the per-process registry, and the served log (real Redis server)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from recsvc.analytics import experiments as ex
from recsvc.analytics import recids
from recsvc.analytics import registry as reg
from recsvc.storage import keys
from recsvc.storage.embedded import free_port

pytestmark = pytest.mark.redis_backends("single", "cluster")


def dead_redis() -> redis.Redis:
    """A client for a port nobody listens on, without retries (they only slow the test down)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_timeout=0.05,
        socket_connect_timeout=0.05,
        retry=Retry(NoBackoff(), 0),
    )


def definition(name="exp", **overrides):
    base = {"name": name, "variants": [{"name": "A", "share": 50}, {"name": "B", "share": 50}]}
    base.update(overrides)
    return ex.parse_experiment(base)


def test_store_load_delete_round_trip(redis_client):
    assert reg.store_experiment(redis_client, definition()) is True
    assert reg.store_experiment(redis_client, definition(description="again")) is False  # replaced
    stored = reg.load_stored_experiments(redis_client)
    assert list(stored) == ["exp"] and stored["exp"].description == "again"
    assert stored["exp"].to_dict() == definition(description="again").to_dict()
    assert int(redis_client.get(keys.EXPERIMENTS_REV)) == 2
    assert reg.delete_stored_experiment(redis_client, "exp") is True
    assert reg.delete_stored_experiment(redis_client, "exp") is False
    assert reg.load_stored_experiments(redis_client) == {}


def test_store_is_bounded_and_corrupt_entries_are_skipped(redis_client):
    for i in range(ex.MAX_EXPERIMENTS):
        reg.store_experiment(redis_client, definition(f"e{i}"))
    with pytest.raises(ex.ExperimentError, match="stored already"):
        reg.store_experiment(redis_client, definition("one-too-many"))
    reg.store_experiment(redis_client, definition("e0", description="replacing is fine"))
    redis_client.hset(keys.EXPERIMENTS, "e1", "{not json")
    redis_client.hset(keys.EXPERIMENTS, "e2", json.dumps({"name": "e2", "variants": []}))
    stored = reg.load_stored_experiments(redis_client)
    assert len(stored) == ex.MAX_EXPERIMENTS - 2 and "e1" not in stored and "e2" not in stored


def test_registry_sees_changes_and_survives_redis_outage(redis_client, tmp_path):
    registry = reg.ExperimentRegistry(client=redis_client, refresh_s=0.0, retry_s=0.0)
    assert registry.assign("u1").experiment is None
    reg.store_experiment(redis_client, definition())
    assert registry.assign("u1").experiment == "exp"
    assert registry.source_of("exp") == "redis"

    # File experiments are merged in, and re-read when the file changes.
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"experiments": [definition("from-file").to_dict()]}))
    both = reg.ExperimentRegistry(path, client=redis_client, refresh_s=0.0)
    assert [e.name for e in both.all()] == ["exp", "from-file"]
    assert both.source_of("from-file") == "file"
    time.sleep(0.01)
    path.write_text("{broken")  # a bad edit keeps the previous definitions
    import os

    os.utime(path, (time.time() + 5, time.time() + 5))
    assert [e.name for e in both.all()] == ["exp", "from-file"]

    # Redis unreachable: the last definitions keep serving, nothing raises.
    dead = dead_redis()
    registry.client = dead
    registry.refresh(force=True)
    assert registry.assign("u1").experiment == "exp"


def test_invalid_file_fails_at_construction(tmp_path):
    path = tmp_path / "e.json"
    path.write_text('{"experiments": [{"name": "x"}]}')
    with pytest.raises(ex.ExperimentFileError, match="variants"):
        reg.ExperimentRegistry(path)


def test_served_log_writes_a_capped_list_off_the_request_path(redis_client):
    log = reg.ServedLog(redis_client, maxlen=100, max_pending=50, flush_interval_s=0.02)
    untagged = reg.Assignment(recids.new_rec_id())
    log.record(untagged, "u0", ["i1"], "recommendations")  # not experiment traffic: not logged
    assert log.pending == 0
    for i in range(40):
        a = reg.Assignment(recids.new_rec_id("exp", "A", 1_700_000_000), "exp", "A", "personalized")
        log.record(a, f"u{i}", [f"i{j}" for j in range(80)], "recommendations", now=1_700_000_000 + i)
    deadline = time.monotonic() + 5
    while log.written < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.written == 40 and log.dropped == 0
    ts, rec_id, user, surface, items = redis_client.lindex(keys.EXPERIMENTS_SERVED, 0).decode().split("\t")
    assert (ts, user, surface) == ("1700000000", "u0", "recommendations")
    assert recids.parse_rec_id(rec_id).experiment == "exp"
    assert len(items.split(",")) == 50  # items are capped per record
    log.close()

    served = reg.read_served(redis_client, "exp")
    assert sorted(served["user_id"].tolist()) == sorted(f"u{i}" for i in range(40))
    assert served["timestamp"].min() == 1_700_000_000
    assert len(reg.read_served(redis_client, "other")["user_id"]) == 0
    assert len(reg.read_served(redis_client, "exp", limit=7)["user_id"]) == 7  # newest 7 only

    # A full queue drops the oldest and counts them; the list keeps exactly the newest maxlen.
    quiet = reg.ServedLog(redis_client, maxlen=100, max_pending=50, background=False)
    for i in range(300):
        quiet.record(reg.Assignment(recids.new_rec_id("exp", "B"), "exp", "B"), f"v{i}", [], "bundles")
    assert quiet.dropped == 250 and quiet.pending == 50
    for _ in range(3):
        for i in range(50):
            quiet.record(reg.Assignment(recids.new_rec_id("exp", "B"), "exp", "B"), f"w{i}", [], "bundles")
        quiet.flush()
    assert redis_client.llen(keys.EXPERIMENTS_SERVED) == 100
    assert len(reg.read_served(redis_client, "exp", limit=10_000)["user_id"]) == 100


def test_served_log_never_raises_when_redis_is_down():
    dead = dead_redis()
    log = reg.ServedLog(dead, background=False)
    log.record(reg.Assignment(recids.new_rec_id("exp", "A"), "exp", "A"), "u1", ["i1"], "recommendations")
    assert log.flush() == 0 and log.dropped == 1
