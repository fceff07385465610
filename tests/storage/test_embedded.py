"""The embedded Redis: one owner process, restarted when it dies, stopped on request; REDIS_URL: nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from recsvc.core.config import Config
from recsvc.storage import embedded


@pytest.fixture
def config(tmp_path):
    # A short folder: a unix socket path must fit in 108 bytes.
    config = Config.create(var_dir=tmp_path / "v")
    yield config
    embedded.stop(config)


def _wait(predicate, seconds=15.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_one_owner_even_when_commands_race_and_a_killed_server_comes_back(config):
    with ThreadPoolExecutor(4) as pool:
        urls = set(pool.map(lambda _: embedded.ensure_redis(config), range(4)))
    assert len(urls) == 1
    url = urls.pop()
    client = redis.Redis.from_url(url)
    client.set("kept", "1")
    state = embedded.status(config)
    assert state["running"] and state["owner_running"] and state["restarts"] == 0
    workdir = embedded.embedded_dir(config)
    owners = json.loads((workdir / embedded.OWNER_STATE).read_text())
    assert owners["owner_pid"] == state["owner_pid"]
    time.sleep(1.1)  # the append-only file is fsynced every second

    os.kill(state["redis_pid"], signal.SIGKILL)
    assert _wait(lambda: embedded.status(config).get("restarts") == 1 and embedded.status(config)["running"])
    after = embedded.status(config)
    assert after["owner_pid"] == state["owner_pid"] and after["redis_pid"] != state["redis_pid"]
    assert redis.Redis.from_url(url).get("kept") == b"1"  # from the append-only file

    assert embedded.stop(config) is True
    assert not embedded.status(config)["running"] and not embedded.owner_running(workdir)
    assert embedded.stop(config) is False
    # The next command starts it again, with its data.
    assert redis.Redis.from_url(embedded.ensure_redis(config)).get("kept") == b"1"


def test_a_server_whose_owner_was_killed_is_taken_over(config):
    embedded.ensure_redis(config)
    state = embedded.status(config)
    os.kill(state["owner_pid"], signal.SIGKILL)
    # The server gets SIGTERM when its owner dies (no orphan keeps the socket).
    assert _wait(lambda: not embedded.status(config)["running"])
    embedded.ensure_redis(config)
    again = embedded.status(config)
    assert again["running"] and again["owner_pid"] != state["owner_pid"]


def test_with_redis_url_nothing_is_started_or_stopped(tmp_path, redis_url):
    config = Config.create(var_dir=tmp_path / "v", redis_url=redis_url)
    assert embedded.ensure_redis(config) == redis_url
    assert not (tmp_path / "v").exists()
    assert embedded.status(config) == {"mode": "external", "running": True, "managed": False}
    with pytest.raises(ValueError, match="REDIS_URL"):
        embedded.stop(config)
