"""`recsvc retrain` end to end: real training on a synthetic shop, a real Redis, the real store.

A small shop and small parameters (16 factors, 5 iterations) keep one run near a second; the
crash test runs the command as a subprocess that SIGKILLs itself after each step
(RECSVC_RETRAIN_CRASH_AFTER) and checks that the live model is intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from recsvc.cli.retrain import retrain
from recsvc.core.artifact import list_versions, read_manifest
from recsvc.core.config import Config
from recsvc.core.errors import ExitCode
from recsvc.storage import versions
from recsvc.storage.stream import stream_length
from training.retrain import LOCK_KEY, RetrainLock, run_retrain

REPO = Path(__file__).resolve().parents[2]


SMALL = {"factors": 16, "iterations": 5}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from training.synth import write_shop

    folder = tmp_path_factory.mktemp("shop")
    events, catalog = write_shop(folder, seed=7, n_users=1200, n_items=300, days=40, sessions_per_user=8)
    params_toml = folder / "params.toml"
    params_toml.write_text("".join(f"{k} = {v}\n" for k, v in SMALL.items()))
    return events, catalog, params_toml


def retrain_once(config, shop, **kwargs):
    from training.als import TrainParams

    events, catalog, _ = shop
    kwargs.setdefault("params", TrainParams(**SMALL))
    return run_retrain(config, [events], catalog, **kwargs)


@pytest.fixture
def config(make_config):
    return make_config(keep_versions=3, retune_days=0)


def live(client) -> str | None:
    value = versions.current_version(client)
    return value.decode() if isinstance(value, bytes) else value


def test_first_run_publishes_and_records_the_gate(shop, config, redis_client):
    summary = retrain_once(config, shop, params=None)
    assert summary.exit_code == ExitCode.OK and summary.status == "published", summary
    assert summary.live_before is None and summary.live_after == summary.version == live(redis_client)
    gate = read_manifest(config.models_dir / summary.version)["gate"]
    assert gate["passed"] and not gate["forced"] and "nothing live yet" in gate["reason"]
    assert gate["new"] > gate["popularity"]
    assert summary.params_source == "defaults"  # RECSVC_RETUNE_DAYS=0 in the tests' config
    assert set(summary.steps_s) == {"train", "gate", "publish", "prune"}
    assert redis_client.get(LOCK_KEY) is None  # released


def test_the_live_configuration_is_scored_on_the_same_split_and_a_regression_refused(
    shop, make_config, redis_client
):
    from recsvc.core.scoring import PLAIN_ALS
    from training.als import TrainParams

    config = make_config(keep_versions=3, retune_days=0)
    first = retrain_once(config, shop)
    assert first.exit_code == ExitCode.OK

    # A worse configuration (still above popularity): the live one, refitted on the candidate's
    # split, wins.
    worse = TrainParams(factors=4, iterations=3, model=PLAIN_ALS)
    refused = retrain_once(config, shop, tolerance=0.02, params=worse)
    assert refused.exit_code == ExitCode.GATE_REFUSED and refused.status == "refused"
    assert live(redis_client) == first.version == refused.live_after
    manifest = read_manifest(config.models_dir / refused.version)
    gate, scored = manifest["gate"], manifest["metrics"]
    assert scored["live"]["ndcg@10"] == gate["live"] > gate["new"] == scored["model"]["ndcg@10"]
    assert scored["live"]["ndcg@10_ci"] and "same_as" not in scored["live"]
    assert not gate["passed"] and f"worse than live {first.version}'s {gate['live']:.4f}" in gate["reason"]
    assert f"new ndcg@10 {gate['new']:.4f}" in gate["reason"]
    assert gate["floor"] == pytest.approx(gate["live"] * 0.98)
    assert "prune" in refused.steps_s  # a refusal is pruned like any other version

    # Nothing changed: the same configuration scores the same on the same split and passes.
    again = retrain_once(config, shop, tolerance=0.0)
    assert again.exit_code == ExitCode.OK, again.gate
    scored = read_manifest(config.models_dir / again.version)["metrics"]
    assert scored["live"]["same_as"] == "model" and again.gate["new"] == again.gate["live"]

    forced = retrain_once(config, shop, tolerance=0.02, force=True, params=worse)
    assert forced.exit_code == ExitCode.OK and forced.forced
    assert live(redis_client) == forced.version
    gate = read_manifest(config.models_dir / forced.version)["gate"]
    assert gate["forced"] and not gate["passed"]


def test_refused_versions_are_pruned_like_any_other(shop, make_config, redis_client):
    from recsvc.core.scoring import PLAIN_ALS
    from training.als import TrainParams

    config = make_config(keep_versions=1, retune_days=0)
    first = retrain_once(config, shop)
    worse = TrainParams(factors=4, iterations=3, model=PLAIN_ALS)
    refusals = [retrain_once(config, shop, params=worse, keep=1) for _ in range(3)]
    assert all(r.exit_code == ExitCode.GATE_REFUSED for r in refusals)
    on_disk = {p.name for p in list_versions(config.models_dir)}
    # The live version stays; of the refused ones only the newest fits in keep=1.
    assert on_disk == {first.version, refusals[-1].version}
    assert refusals[-1].pruned == [refusals[-2].version]


def test_model_selection_is_saved_reused_and_redone_when_stale(shop, make_config, redis_client):
    config = make_config(keep_versions=3, retune_days=30)
    tuned = retrain_once(config, shop, params=None)
    assert tuned.exit_code == ExitCode.OK and tuned.params_source == "tuned"
    choice = config.models_dir / "tuning.json"
    document = json.loads(choice.read_text())
    assert read_manifest(config.models_dir / tuned.version)["tuning"]["chosen"] == document["chosen"]

    reused = retrain_once(config, shop, params=None)
    assert reused.params_source == "tuning.json"
    assert "tuning" not in read_manifest(config.models_dir / reused.version)

    document["created_at"] = "2020-01-01T00:00:00+00:00"  # older than 30 days
    choice.write_text(json.dumps(document))
    stale = retrain_once(config, shop, params=None)
    assert stale.params_source == "tuning.json (re-tuned)"
    assert json.loads(choice.read_text())["created_at"] > "2020"


def test_second_run_while_locked_exits_4(shop, config, redis_client):
    holder = RetrainLock(redis_client, ttl_s=60)
    assert holder.acquire()
    try:
        summary = retrain_once(config, shop)
    finally:
        holder.release()
    assert summary.exit_code == ExitCode.LOCKED and summary.status == "locked"
    assert '"pid"' in summary.error and "expires in" in summary.error
    assert list_versions(config.models_dir) == []  # nothing trained


def test_bad_input_exits_2_and_writes_nothing(tmp_path, config):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,event\nu1,i1,view\n")
    summary = run_retrain(config, [bad], None)
    assert summary.exit_code == ExitCode.BAD_INPUT and "timestamp" in summary.error
    assert list_versions(config.models_dir) == []
    empty = tmp_path / "dumps"
    empty.mkdir()
    assert run_retrain(config, [empty], None).exit_code == ExitCode.BAD_INPUT


def test_prune_keeps_live_and_previous(shop, make_config, redis_client):
    # Redis keeps 2 versions for rollback; the disk keeps 1 plus whatever is live or in Redis.
    config = make_config(keep_versions=2)
    published = []
    for _ in range(3):
        summary = retrain_once(config, shop, keep=1, tolerance=1.0)
        assert summary.exit_code == ExitCode.OK, summary
        published.append(summary.version)
    on_disk = [p.name for p in list_versions(config.models_dir)]
    assert on_disk == published[1:]  # live + the one it replaced (still in Redis); the oldest went
    assert summary.pruned == [published[0]]


def test_command_prints_one_json_line(shop, config):
    events, catalog, params_toml = shop
    env = {
        "REDIS_URL": config.redis.url,
        "RECSVC_MODELS_DIR": str(config.models_dir),
        "RECSVC_VAR_DIR": str(config.var_dir),
    }
    args = ["--events", str(events), "--catalog", str(catalog), "--config", str(params_toml)]
    result = CliRunner().invoke(retrain, args, env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "published" and summary["exit_code"] == 0
    bad_config = config.var_dir / "params.toml"
    bad_config.parent.mkdir(parents=True, exist_ok=True)
    bad_config.write_text("factors = 'many'\n")
    result = CliRunner().invoke(retrain, ["--events", str(events), "--config", str(bad_config)], env=env)
    assert result.exit_code == 2 and "factors" in result.stdout


def run_cli(args: list[str], config: Config, crash_after: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        REDIS_URL=config.redis.url,
        RECSVC_MODELS_DIR=str(config.models_dir),
        RECSVC_VAR_DIR=str(config.var_dir),
    )
    env.pop("RECSVC_RETRAIN_CRASH_AFTER", None)
    if crash_after:
        env["RECSVC_RETRAIN_CRASH_AFTER"] = crash_after
    code = "from recsvc.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def redis_versions(client: redis.Redis) -> set[str]:
    """Versions that have any key (``...:v:<version>:...``, control or per-user) in Redis."""
    found = set()
    for key in client.scan_iter(match="*:v:*", count=1000):
        found.add(key.decode().split(":v:", 1)[1].split(":")[0])
    return found


def test_crash_between_steps_keeps_live_model(shop, config, redis_client):
    events, catalog, params_toml = shop
    first = retrain_once(config, shop)
    assert first.exit_code == ExitCode.OK
    args = ["retrain", "--events", str(events), "--catalog", str(catalog), "--config", str(params_toml)]
    args += ["--lock-ttl", "10", "--gate-tolerance", "1"]
    for step in ("lock", "train", "gate", "publish"):
        live_before = live(redis_client)
        proc = run_cli(args, config, crash_after=step)
        assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed itself after `step`
        assert proc.stdout == ""  # it died before any summary
        on_disk = [p.name for p in list_versions(config.models_dir)]
        if step == "publish":
            # Killed right after publish completed: the new version is live and whole.
            assert live(redis_client) == on_disk[-1] != live_before
        else:
            assert live(redis_client) == live_before, step
        # No half-published version: Redis holds keys only of complete, published versions.
        assert redis_versions(redis_client) == set(store_versions(redis_client)) <= set(on_disk)
        assert all(
            versions.read_info(redis_client, v)["status"] == "complete" for v in redis_versions(redis_client)
        )
        assert not any(p.name.startswith(".") for p in config.models_dir.iterdir())  # no temp folders
        # The live version still serves: the API answers from it.
        assert api_model_version(config) == live(redis_client)
        # The dead run's lock keeps the next run off until it expires (10 s here).
        locked = retrain_once(config, shop)
        assert locked.exit_code == ExitCode.LOCKED and 0 < redis_client.pttl(LOCK_KEY) <= 10_000, step
        redis_client.delete(LOCK_KEY)  # what the expiry does
    again = retrain_once(config, shop, tolerance=1.0)
    assert again.exit_code == ExitCode.OK, again


def store_versions(client) -> list[str]:
    return [entry["version"] for entry in versions.list_published(client)]


def api_model_version(config: Config) -> str:
    """The version the serving layer answers a known user's recommendations from."""
    from recsvc.serving.health import RedisHealth
    from recsvc.serving.model import ModelCache
    from recsvc.serving.recommender import Recommender

    client = redis.Redis.from_url(config.redis.url)
    user = read_manifest_users(config.models_dir / live(client))[0]
    answer = Recommender(config, client, ModelCache(config), RedisHealth(1.0)).recommend(user, 5)
    assert answer.source == "personalized" and len(answer.items) == 5, answer
    return answer.model_version


def read_manifest_users(path: Path) -> list[str]:
    from recsvc.core.artifact import read_artifact

    return read_artifact(path, verify=False).user_ids


def test_dump_stream_trains_on_the_dumped_events(shop, config, redis_client):
    from recsvc.storage.stream import append_events

    events = [
        {"user_id": "u000001", "item_id": "sku-00001", "event": "purchase", "timestamp": 1_719_700_000},
        {"user_id": "u-brand-new", "item_id": "sku-00002", "event": "view", "timestamp": 1_719_700_100},
    ]
    append_events(redis_client, events, stream=config.events.stream, history_length=10, history_ttl_s=60)
    summary = retrain_once(config, shop, dump_stream=True)
    assert summary.exit_code == ExitCode.OK, summary
    assert summary.dumped_events == 2 and "dump" in summary.steps_s
    dumped = [p for p in (config.var_dir / "events").iterdir() if p.suffix == ".csv"]
    assert len(dumped) == 1 and str(dumped[0]) in summary.event_files
    assert stream_length(redis_client, config.events.stream) == 0  # moved, not copied
    manifest = read_manifest(config.models_dir / summary.version)
    assert str(dumped[0]) in manifest["inputs"]["events"]
    # Nothing new in the stream: the next run dumps nothing; naming the dump folder in --events
    # keeps the earlier dump in the training history.
    from training.als import TrainParams

    again = run_retrain(
        config,
        [shop[0], config.var_dir / "events"],
        shop[1],
        dump_stream=True,
        tolerance=1.0,
        params=TrainParams(**SMALL),
    )
    assert again.exit_code == ExitCode.OK and again.dumped_events == 0
    assert again.event_files == [str(shop[0]), str(dumped[0])]
