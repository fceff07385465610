"""`recsvc publish | rollback | versions | serve` against a real Redis."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from recsvc.cli import main
from recsvc.cli.serving import example_requests
from recsvc.core.artifact import write_artifact
from recsvc.storage import versions
from recsvc.storage.embedded import free_port
from tests.factories import make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")


@pytest.fixture
def env(redis_url, models_dir, tmp_path) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "RECSVC_MODELS_DIR": str(models_dir),
        "RECSVC_VAR_DIR": str(tmp_path / "var"),
    }


def run(env, *args: str):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_publish_versions_rollback(env, models_dir, redis_client):
    first = write_artifact(make_artifact(seed=1), models_dir).name
    second = write_artifact(make_artifact(seed=2), models_dir).name

    r = run(env, "publish", first)
    assert r.exit_code == 0, r.output
    assert f"published {first}" in r.output and "previous live: none" in r.output
    r = run(env, "publish")  # default: latest
    assert r.exit_code == 0 and f"published {second}" in r.output and f"previous live: {first}" in r.output

    r = run(env, "versions")
    lines = r.output.splitlines()
    assert lines[1].startswith(f"* {second}") and lines[2].startswith(f"  {first}")
    data = json.loads(run(env, "versions", "--json").output)
    assert [d["version"] for d in data] == [second, first] and data[0]["live"]

    r = run(env, "rollback")
    assert r.exit_code == 0 and f"{second} -> {first}" in r.output
    assert versions.current_version(redis_client) == first
    r = run(env, "rollback")
    assert r.exit_code == 1 and "no previous published version" in r.output


def test_publish_errors_name_the_problem(env, models_dir, tmp_path):
    r = run(env, "publish")
    assert r.exit_code == 1 and "no model versions found" in r.output
    r = run(env, "publish", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "nowhere" in r.output and "manifest.json" in r.output
    path = write_artifact(make_artifact(), models_dir)
    (path / "items.npz").write_bytes(b"garbage")
    r = run(env, "publish", str(path))
    assert r.exit_code == 1 and "items.npz" in r.output and "checksum" in r.output


def test_redis_unreachable_exits_3(models_dir, tmp_path):
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "RECSVC_MODELS_DIR": str(models_dir)}
    write_artifact(make_artifact(), models_dir)
    for args in (["publish"], ["rollback"], ["versions"]):
        r = CliRunner().invoke(main, args, env=env)
        assert r.exit_code == 3 and "Redis is unreachable" in r.output


def test_example_requests_need_a_published_model(redis_client, artifact, config):
    assert example_requests(redis_client, "http://h:1") == []
    versions.publish(redis_client, artifact, config)
    lines = example_requests(redis_client, "http://h:1")
    assert len(lines) == 3
    assert "/v1/users/u" in lines[0] and "/v1/items/i0/similar" in lines[1]
    assert lines[2].endswith("/v1/popular?n=5&category=shoes'")


def test_serve_runs_gunicorn_and_the_printed_examples_work(env, models_dir, redis_client, config, tmp_path):
    write_artifact(make_artifact(), models_dir)
    assert run(env, "publish").exit_code == 0
    port = free_port()
    recsvc = Path(sys.executable).parent / "recsvc"
    proc = subprocess.Popen(
        [str(recsvc), "serve", "--port", str(port), "--workers", "1", "--threads", "2", "--examples"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Listening at" in line or "Booting worker" in line:
                break
        examples = [shlex.split(x.strip())[-1] for x in lines if x.strip().startswith("curl ")]
        assert len(examples) == 3, "".join(lines)
        assert any("gunicorn" in x for x in lines)
        for url in examples:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        body = json.loads(r.read())
                    break
                except OSError:
                    time.sleep(0.1)
            assert body["model_version"] and len(body["items"]) == 5, body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
