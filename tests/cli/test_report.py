"""`recsvc report` end to end: files, definitions, the live stream and the served log (real Redis)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.analytics.attribution import build_report
from recsvc.analytics.experiments import parse_experiment
from recsvc.analytics.recids import new_rec_id
from recsvc.analytics.registry import Assignment, ServedLog, store_experiment
from recsvc.cli import main
from tests.shops import T, push_to_stream, simulate, write_events_csv

pytestmark = pytest.mark.redis_backends("single", "cluster")

DEFINITION = {
    "name": "sim",
    "control": "A",
    "variants": [{"name": "A", "share": 50}, {"name": "B", "share": 50, "strategy": "popular"}],
}


@pytest.fixture(scope="module")
def shop():
    return simulate(7, {"A": 0.05, "B": 0.08}, 4000)


@pytest.fixture
def env(tmp_path):
    # Isolate from any embedded Redis a developer runs under ./var.
    return {"RECSVC_VAR_DIR": str(tmp_path / "var"), "REDIS_URL": "", "RECSVC_EXPERIMENTS_FILE": ""}


def run(args, env):
    return CliRunner().invoke(main, ["report", *args], env=env, catch_exceptions=False)


def test_table_and_json_from_files_with_a_definition_file(tmp_path, shop, env):
    events = tmp_path / "events.csv"
    write_events_csv(shop, events)
    defs = tmp_path / "experiments.json"
    defs.write_text(json.dumps({"experiments": [DEFINITION]}))
    expected = build_report(shop, "sim", variants=["A", "B"])

    table = run(["--experiment", "sim", "--events", str(events), "--experiments-file", str(defs)], env)
    assert table.exit_code == 0, table.output
    assert "Attribution: last-click  (primary)" in table.output and "winner: B" in table.output

    out = run(
        ["--experiment", "sim", "--events", str(events), "--format", "json", "--window-days", "7"],
        {**env, "RECSVC_EXPERIMENTS_FILE": str(defs)},
    )
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["definition_source"] == "file" and body["winner"] == expected.winner == "B"
    got = {row["variant"]: row for row in body["attribution"]["last_click"]["variants"]}
    for m in expected.results["last_click"].variants:
        assert got[m.variant]["users"] == m.users and got[m.variant]["converters"] == m.converters

    linear = run(
        ["--experiment", "sim", "--events", str(events), "--attribution", "linear", "--format", "json"], env
    )
    assert json.loads(linear.output)["primary_attribution"] == "linear"


def test_bad_inputs_exit_2_with_file_line_and_column(tmp_path, shop, env):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,event,timestamp\nu1,i1,purchase,not-a-time\n")
    result = run(["--experiment", "sim", "--events", str(bad)], env)
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output and "timestamp" in result.output

    events = tmp_path / "events.csv"
    write_events_csv(shop, events)
    defs = tmp_path / "experiments.json"
    defs.write_text('{"experiments": [\n  {"name": "sim" "variants": []}\n]}')
    result = run(["--experiment", "sim", "--events", str(events), "--experiments-file", str(defs)], env)
    assert result.exit_code == 2 and f"{defs}:2:18: invalid JSON" in result.output

    result = run(["--experiment", "nosuch", "--events", str(events)], env)
    assert result.exit_code == 2 and "no rec id" in result.output
    assert run(["--experiment", "bad name", "--events", str(events)], env).exit_code == 2
    assert run(["--experiment", "sim"], env).exit_code == 2  # no events at all
    assert run(["--experiment", "sim", "--events", str(tmp_path / "missing.csv")], env).exit_code == 2
    missing_redis = run(["--experiment", "sim", "--events", str(events), "--include-stream"], env)
    assert missing_redis.exit_code == 1 and "need Redis" in missing_redis.output


def test_stream_and_served_log_are_merged_without_double_counting(
    tmp_path, shop, env, redis_url, redis_client
):
    # First half of the events in a file, the second half (and 100 rows of the first half again,
    # as after a dump that crashed before deleting) in the live stream.
    half = len(shop) // 2
    first, second = shop.take(np.arange(half)), shop.take(np.arange(half, len(shop)))
    write_events_csv(first, tmp_path / "dump.csv")
    again = shop.take(np.arange(half - 100, half))
    push_to_stream(redis_client, again)
    push_to_stream(redis_client, second)
    # The definition lives in Redis (as the admin API stores it).
    store_experiment(redis_client, parse_experiment(DEFINITION))
    # A served answer to a user who never produced an event: exposure only the log knows.
    log = ServedLog(redis_client, background=False)
    log.record(
        Assignment(new_rec_id("sim", "A", T), "sim", "A"), "ghost", ["i1", "i2"], "recommendations", now=T
    )
    assert log.flush() == 1

    renv = {**env, "REDIS_URL": redis_url}
    args = [
        "--experiment",
        "sim",
        "--events",
        str(tmp_path / "dump.csv"),
        "--include-stream",
        "--format",
        "json",
    ]
    body = json.loads(run(args, renv).output)
    expected = build_report(shop, "sim", variants=["A", "B"])
    assert body["definition_source"] == "redis"
    assert body["data"]["events"] == len(shop)  # the 100 repeated rows were dropped
    rows = {r["variant"]: r for r in body["attribution"]["last_click"]["variants"]}
    for m in expected.results["last_click"].variants:
        assert (rows[m.variant]["users"], rows[m.variant]["purchases"]) == (m.users, m.purchases)

    with_served = json.loads(run([*args, "--include-served"], renv).output)
    rows_served = {r["variant"]: r for r in with_served["attribution"]["last_click"]["variants"]}
    assert rows_served["A"]["users"] == rows["A"]["users"] + 1
    assert with_served["data"]["served_entries"] == 1


def test_catalog_fills_missing_prices_and_window_applies(tmp_path, env):
    from tests.shops import attribution_shop as tiny_shop

    events = tmp_path / "tiny.csv"
    write_events_csv(tiny_shop(), events)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,price\ni7,6.0\ni4,99\n")
    args = ["--experiment", "exp", "--events", str(events), "--format", "json"]
    without = json.loads(run(args, env).output)
    with_catalog = json.loads(run([*args, "--catalog", str(catalog)], env).output)
    b = {r["variant"]: r for r in without["attribution"]["last_click"]["variants"]}["B"]
    b_cat = {r["variant"]: r for r in with_catalog["attribution"]["last_click"]["variants"]}["B"]
    assert (b["revenue"], b_cat["revenue"]) == (4.0, 10.0)  # i4 had its own price: the catalog's is unused
    assert (
        without["data"]["purchases_without_price"] == 1
        and with_catalog["data"]["purchases_without_price"] == 0
    )
    nine = json.loads(run([*args, "--window-days", "9"], env).output)
    assert {r["variant"]: r for r in nine["attribution"]["last_click"]["variants"]}["B"]["converters"] == 3
