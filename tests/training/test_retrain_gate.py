"""The retrain quality gate (pure) and the Redis lock (real Redis)."""

from __future__ import annotations

import json
import time

import pytest

from training.retrain import LOCK_KEY, RetrainLock, gate_decision


def metrics(model=None, popularity=None, live=None):
    """A new manifest's metrics: the candidate, popularity and the live configuration, one split."""
    out = {"split": {"test_users": 10}}
    for name, value in (("model", model), ("popularity", popularity), ("live", live)):
        if value is not None:
            out[name] = {"ndcg@10": value}
    return out


def test_gate_passes_within_relative_tolerance():
    d = gate_decision(metrics(0.196, 0.05, live=0.2), 0.02, "v1")
    assert d.passed and d.floor == pytest.approx(0.196)  # 0.2 * (1 - 0.02)
    assert "v1" in d.reason and d.new == 0.196 and d.live == 0.2 and d.popularity == 0.05
    assert "same split" in d.reason


def test_gate_refuses_a_regression_beyond_tolerance_naming_both_figures():
    d = gate_decision(metrics(0.195, 0.05, live=0.2), 0.02, "v1")
    assert not d.passed and "worse than live v1's 0.2000 on the same split" in d.reason
    assert "new ndcg@10 0.1950" in d.reason and "0.1960" in d.reason


def test_gate_refuses_when_popularity_is_not_beaten():
    d = gate_decision(metrics(0.05, 0.05, live=0.01), 0.02, "v1")
    assert not d.passed and "does not beat popularity" in d.reason
    assert not gate_decision(metrics(0.04, 0.05), 0.5).passed


def test_gate_first_publish_and_live_configuration_unknown():
    d = gate_decision(metrics(0.1, 0.05), 0.02, None)
    assert d.passed and "nothing live yet" in d.reason and d.floor is None
    d = gate_decision(metrics(0.1, 0.05), 0.02, "v0")
    assert d.passed and "configuration of live v0 is unknown" in d.reason


def test_gate_refuses_without_metrics():
    assert "evaluation did not run" in gate_decision({"note": "no test user"}, 0.02).reason
    assert not gate_decision(None, 0.02).passed
    assert "no popularity" in gate_decision(metrics(0.1), 0.02).reason
    assert not gate_decision(metrics(float("nan"), 0.01), 0.02).passed


def test_gate_tolerance_bounds():
    assert gate_decision(metrics(0.0001, 0.0, live=0.2), 1.0, "v").passed
    with pytest.raises(ValueError):
        gate_decision(metrics(0.1, 0.0), -0.1)


def test_lock_is_exclusive_and_names_its_holder(redis_client):
    first = RetrainLock(redis_client, ttl_s=30)
    assert first.acquire()
    try:
        second = RetrainLock(redis_client, ttl_s=30)
        assert not second.acquire()
        holder = second.holder()
        assert json.loads(holder.split(" (expires")[0])["pid"] > 0 and "expires in" in holder
        assert 0 < redis_client.pttl(LOCK_KEY) <= 30_000
        assert first.still_held()
    finally:
        first.release()
    assert redis_client.get(LOCK_KEY) is None
    third = RetrainLock(redis_client, ttl_s=30)
    assert third.acquire()
    third.release()


def test_release_never_frees_someone_elses_lock(redis_client):
    mine = RetrainLock(redis_client, ttl_s=30)
    assert mine.acquire()
    redis_client.set(LOCK_KEY, "someone else")  # as if ours expired and another run took it
    assert not mine.still_held()
    mine.release()
    assert redis_client.get(LOCK_KEY) == b"someone else"


def test_lock_expires_when_holder_dies_and_heartbeat_renews_while_alive(redis_client):
    alive = RetrainLock(redis_client, ttl_s=1.5)
    assert alive.acquire()
    time.sleep(2.5)  # longer than the ttl: the heartbeat (every 0.5 s) must have renewed it
    assert alive.still_held()
    alive.release()
    dead = RetrainLock(redis_client, ttl_s=0.3)
    assert dead.acquire()
    dead._stop.set()  # a SIGKILLed holder renews nothing
    time.sleep(0.5)
    assert redis_client.get(LOCK_KEY) is None
    assert RetrainLock(redis_client, ttl_s=30).acquire()


def test_update_manifest_is_atomic_and_keeps_checksums_valid(tmp_path):
    from recsvc.core.artifact import (
        ArtifactError,
        read_artifact,
        read_manifest,
        update_manifest,
        write_artifact,
    )
    from tests.factories import make_artifact

    path = write_artifact(make_artifact(), tmp_path)
    updated = update_manifest(path, gate={"passed": False, "reason": "worse than live"})
    assert updated["gate"]["reason"] == "worse than live" == read_manifest(path)["gate"]["reason"]
    read_artifact(path)  # checksums and consistency still verify
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    with pytest.raises(ArtifactError, match="cannot be updated"):
        update_manifest(path, files={})
    with pytest.raises(ArtifactError, match="not found"):
        update_manifest(tmp_path / "nope", gate={})


def test_unreachable_redis_is_an_internal_error(tmp_path, make_config):
    from recsvc.core.errors import ExitCode
    from recsvc.storage.embedded import free_port
    from training.retrain import run_retrain

    config = make_config(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    summary = run_retrain(config, [tmp_path / "events.csv"], None)
    assert summary.exit_code == ExitCode.FAILED and summary.status == "error"
    assert "ConnectionError" in summary.error
    assert json.loads(summary.to_json())["exit_code"] == 1
