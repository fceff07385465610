"""A lock or lease of a holder that died on this host is taken over at once; a live one never."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from recsvc.core.artifact import write_artifact
from recsvc.storage import holders, keys, versions
from tests.factories import make_artifact

KEY = "recsvc:test:lease"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def test_a_dead_holders_key_is_taken_over(redis_client):
    token = f"{socket.gethostname()}/{_dead_pid()}/abc"
    redis_client.set(KEY, token, ex=300)
    assert holders.take_over_if_dead(redis_client, KEY) == token
    assert redis_client.get(KEY) is None


def test_a_live_or_remote_holder_is_left_alone(redis_client):
    for token in (
        f"{socket.gethostname()}/{os.getppid()}/abc",  # alive
        holders.holder_token(),  # this very process
        f"another-host/{_dead_pid()}/abc",  # cannot be checked from here
        "a-token-of-another-format",
    ):
        redis_client.set(KEY, token, ex=300)
        assert holders.take_over_if_dead(redis_client, KEY) is None
        assert redis_client.get(KEY).decode() == token


def test_a_publish_killed_mid_write_does_not_block_the_retry(redis_client, models_dir, config):
    path = write_artifact(make_artifact(seed=3), models_dir)
    dead = f"{socket.gethostname()}/{_dead_pid()}/abc"
    redis_client.set(keys.publishing(path.name), dead, ex=120)  # the lease a SIGKILLed publish left
    assert versions.publish(redis_client, path, config) == path.name
    assert versions.current_version(redis_client) == path.name
    other = write_artifact(make_artifact(seed=4), models_dir)
    redis_client.set(keys.publishing(other.name), holders.holder_token(), ex=120)  # a live publish
    with pytest.raises(versions.PublishError, match="another publish"):
        versions.publish(redis_client, other, config)
