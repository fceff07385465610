"""`recsvc export` end to end on a tiny shop whose every pick is computed by hand."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from recsvc.cli.export import export
from recsvc.core.artifact import Artifact, BundleCandidates, write_artifact
from recsvc.core.config import Config
from recsvc.core.events import Catalog, EventTable
from training.export import COLUMNS, ExportLedger, ExportLocked, ExportOptions, RowWriter, run_export

T = 1_700_000_000
DAY = 86_400
REPO = Path(__file__).resolve().parents[2]


def make_shop() -> tuple[Artifact, EventTable]:
    """Six items (i5 out of stock), four users the model knows, two it does not.

    One factor: item i scores ``user_factor * (6 - i)``, so a positive user ranks i0 > i1 > ... and
    a negative one the other way round. Popularity also falls with the index; price = index + 1.
    """
    items = [f"i{i}" for i in range(6)]
    users = ["w1", "w2", "w3", "w4"]
    purchases = sp.csr_matrix(([1.0], ([0], [0])), shape=(4, 6), dtype=np.float32)  # w1 bought i0
    bundles = BundleCandidates(
        indptr=np.array([0, 0, 0, 3, 3, 3, 3], np.int64),
        indices=np.array([3, 5, 0], np.int32),  # i2 goes with i3, i5 (out of stock), i0
        score=np.array([3.0, 2.0, 1.0], np.float32),
        support=np.array([5, 4, 3], np.int32),
    )
    artifact = Artifact(
        item_ids=items,
        user_ids=users,
        item_factors=np.array([[6], [5], [4], [3], [2], [1]], np.float32),
        user_factors=np.array([[1], [1], [1], [-1]], np.float32),
        price=np.arange(1, 7, dtype=np.float32),
        available=np.array([True, True, True, True, True, False]),
        category=np.array([0, 0, 1, 1, 0, 1], np.int32),
        categories=["shoes", "hats"],
        titles=[f'Item "{i}", special' for i in range(6)],
        popularity=np.array([10, 9, 8, 7, 6, 5], np.float32),
        interactions=purchases,
        purchases=purchases,
        bundles=bundles,
        manifest={"version": "v2", "trained_until": T},
    )

    def e(user, item, event, days_ago, price=None):
        row = {"user_id": user, "item_id": item, "event": event, "timestamp": T - days_ago * DAY}
        if price is not None:
            row["price"] = price
        return row

    events = EventTable.from_records(
        [
            e("w1", "i0", "purchase", 100, 10),  # active: first purchase 100 days ago, last 10
            e("w1", "i1", "purchase", 10, 10),
            e("w2", "i2", "purchase", 200, 10),  # dormant, hats; last seen 150 days ago
            e("w2", "i3", "view", 150),
            e("w3", "i2", "view", 5),  # new (never bought), known to the model
            e("w4", "i0", "purchase", 60, 1000),  # high value
            e("c1", "i3", "view", 3),  # new and cold: viewed hats
            e("c2", "i4", "purchase", 50, 10),  # active but cold: bought shoes
        ]
    )
    return artifact, events


def previous_version(artifact: Artifact) -> Artifact:
    """120 days ago: i3 was out of stock and i4 not in the catalogue yet."""
    keep = [0, 1, 2, 3, 5]
    return dataclasses.replace(
        artifact,
        item_ids=[artifact.item_ids[i] for i in keep],
        available=np.array([True, True, True, False, False]),
        manifest={"version": "v1", "trained_until": T - 120 * DAY},
    )


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def picks_by_user(rows) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        out.setdefault(row["user_id"], []).append((row["item_id"], row["reason"]))
    return out


def test_export_all_hand_computed(tmp_path):
    artifact, events = make_shop()
    out = tmp_path / "campaign.csv"
    summary = run_export(
        artifact,
        events,
        out,
        ExportOptions(segment="all", n=4, export_id="E1"),
        previous=[previous_version(artifact)],
    )
    rows = read_rows(out)
    assert list(rows[0]) == [
        "user_id", "segment", "rank", "item_id", "title", "category", "price", "score", "reason",
        "model_version", "export_id",
    ]  # fmt: skip
    P, OC, OP, PC, PO, WB = (
        "personalized", "onboarding_category", "onboarding_popular", "popular_in_category", "popular",
        "winback_back_in_stock",
    )  # fmt: skip
    assert picks_by_user(rows) == {
        # warm users first, in id order; i5 is out of stock everywhere
        "w1": [("i2", P), ("i3", P), ("i4", P)],  # bought i0 (model + events) and i1
        "w2": [("i3", WB), ("i0", P), ("i1", P), ("i4", P)],  # hats: i3 back in stock since their visit
        "w4": [("i4", P), ("i3", P), ("i2", P), ("i1", P)],  # negative factor: reversed; bought i0
        # then cold or onboarding users
        "c1": [("i2", OC), ("i3", OC), ("i0", OP), ("i1", OP)],  # viewed hats
        "c2": [("i0", PC), ("i1", PC), ("i2", PO), ("i3", PO)],  # bought shoes (i4)
        "w3": [("i2", OC), ("i3", OC), ("i0", OP), ("i1", OP)],  # new: onboarding even though known
    }
    first = rows[0]
    assert first["segment"] == "active" and first["rank"] == "1" and float(first["score"]) == 4.0
    assert first["title"] == 'Item "2", special' and float(first["price"]) == 3.0
    assert first["category"] == "hats"
    assert first["model_version"] == "v2" and first["export_id"] == "E1"
    c1 = [r for r in rows if r["user_id"] == "c1"]
    assert [float(r["score"]) for r in c1] == [0.8, 0.7, 1.0, 0.9]  # popularity / max
    assert {r["segment"] for r in rows if r["user_id"] == "w2"} == {"dormant"}
    assert summary.rows == len(rows) == 23 and summary.users == 6 and summary.users_without_picks == 0
    assert summary.reasons["winback_back_in_stock"] == 1
    assert summary.segment_sizes == {"new": 2, "active": 2, "high_value": 1, "dormant": 1, "all": 6}


def test_export_one_segment_and_jsonl(tmp_path):
    artifact, events = make_shop()
    csv_out, jsonl_out = tmp_path / "d.csv", tmp_path / "d.jsonl"
    run_export(
        artifact,
        events,
        csv_out,
        ExportOptions(segment="dormant", n=2),
        previous=[previous_version(artifact)],
    )
    run_export(
        artifact,
        events,
        jsonl_out,
        ExportOptions(segment="dormant", n=2, fmt="jsonl"),
        previous=[previous_version(artifact)],
    )
    lines = [json.loads(line) for line in jsonl_out.read_text().splitlines()]
    assert [(r["user_id"], r["rank"], r["item_id"], r["reason"]) for r in lines] == [
        ("w2", 1, "i3", "winback_back_in_stock"),
        ("w2", 2, "i0", "personalized"),
    ]
    assert lines[0]["title"] == 'Item "3", special' and lines[0]["price"] == 4.0 and lines[0]["score"] == 3.0
    assert lines[0]["category"] == "hats" and lines[1]["category"] == "shoes"
    assert [r["item_id"] for r in read_rows(csv_out)] == ["i3", "i0"]


def test_without_history_nothing_is_fresh_for_the_dormant_user(tmp_path):
    artifact, events = make_shop()
    run_export(artifact, events, tmp_path / "d.csv", ExportOptions(segment="dormant", n=2))
    assert picks_by_user(read_rows(tmp_path / "d.csv"))["w2"] == [
        ("i0", "personalized"),
        ("i1", "personalized"),
    ]


def test_fresher_catalog_overrides_stock_price_and_title(tmp_path):
    artifact, events = make_shop()
    catalog = Catalog(
        item_id=np.array(["i0", "i1", "i2", "i3", "i4", "i5"], dtype=object),
        title=np.array(["", "", "Hat two", "", "", ""], dtype=object),
        category=np.array(["shoes"] * 6, dtype=object),
        price=np.array([1, 2, 99, 4, 5, 6], np.float32),
        available=np.array([True, True, True, False, True, True]),  # i3 sold out, i5 back
    )
    run_export(artifact, events, tmp_path / "a.csv", ExportOptions(segment="active", n=4), catalog=catalog)
    rows = read_rows(tmp_path / "a.csv")
    assert picks_by_user(rows)["w1"] == [
        ("i2", "personalized"),
        ("i4", "personalized"),
        ("i5", "personalized"),
    ]
    assert rows[0]["title"] == "Hat two" and float(rows[0]["price"]) == 99.0
    assert rows[1]["title"] == 'Item "4", special'  # empty catalogue title: the model's


def test_with_bundles_match_the_storefront_bundles(tmp_path):
    from recsvc.core.bundles import BundleCatalog, BundleRules, assemble_bundle, price_bundle

    artifact, events = make_shop()
    out = tmp_path / "b.csv"
    config = Config.create(bundle_size=3, bundle_discount_rule="percent", bundle_discount_pct=10)
    run_export(artifact, events, out, ExportOptions(segment="all", n=2, with_bundles=True), config=config)
    rows = read_rows(out)
    assert list(rows[0])[-2:] == ["bundle_item_ids", "bundle_price"]
    catalog, rules = BundleCatalog.from_model(artifact), BundleRules.from_config(config)
    for row in rows:
        anchor = artifact.item_ids.index(row["item_id"])
        expected = assemble_bundle(catalog, anchor, rules)
        companions = row["bundle_item_ids"].split("|") if row["bundle_item_ids"] else []
        assert companions == [artifact.item_ids[c] for c in expected.companions]
        assert "i5" not in companions and row["item_id"] not in companions  # in stock, not the anchor
        if not companions:  # a lone item is no bundle: no price either
            assert row["bundle_price"] == ""
            continue
        members = [anchor] + [artifact.item_ids.index(c) for c in companions]
        offer = price_bundle(artifact.price[members], "percent", 10)
        assert float(row["bundle_price"]) == pytest.approx(offer.bundle_price)
    # i2 (hats) pairs with what was bought with it, best first: i3 (hats too, but really bought
    # together), then i0; i5 is out of stock
    i2 = next(r for r in rows if r["item_id"] == "i2")
    assert i2["bundle_item_ids"].split("|") == ["i3", "i0"]


def test_frequency_cap_across_runs(tmp_path):
    artifact, events = make_shop()
    ledger = ExportLedger(tmp_path / "exports")
    sent = []
    for run, cap in enumerate((2, 2, 1)):
        out = tmp_path / f"run{run}.csv"
        summary = run_export(
            artifact, events, out, ExportOptions(segment="high_value", n=1, cap_last=cap), ledger=ledger
        )
        sent.append(picks_by_user(read_rows(out))["w4"][0][0])
        assert summary.cap_last == cap
    # w4 ranks i4 > i3 > i2: run 2 skips run 1's pick; run 3 (cap 1) may resend run 1's but not run 2's
    assert sent == ["i4", "i3", "i4"]
    assert len(ledger.records()) == 3
    meta = ledger.metadata(ledger.records()[0])
    assert meta["segment"] == "high_value" and meta["rows"] == 1
    table = pq.read_table(ledger.records()[0]).to_pylist()
    assert table == [{"user_id": "w4", "item_id": "i4"}]


def test_failure_mid_export_leaves_no_file_and_no_record(tmp_path, monkeypatch):
    artifact, events = make_shop()
    ledger = ExportLedger(tmp_path / "exports")
    out = tmp_path / "campaign.csv"
    out.write_text("previous complete export\n")

    def broken(self, table):
        raise OSError("disk full")

    monkeypatch.setattr(RowWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        run_export(artifact, events, out, ExportOptions(segment="all", n=2), ledger=ledger)
    assert out.read_text() == "previous complete export\n"  # untouched
    assert list(tmp_path.glob(".*part")) == [] and ledger.records() == []
    assert list(ledger.dir.glob(".*")) == []


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_export import make_shop
from training.export import ExportLedger, ExportOptions, RowWriter, run_export
real_write = RowWriter.write
def slow_write(self, table):
    real_write(self, table)
    self._file.flush()
    Path({marker!r}).write_text("chunk written")
    time.sleep(60)
RowWriter.write = slow_write
artifact, events = make_shop()
run_export(artifact, events, Path({out!r}), ExportOptions(n=2), ledger=ExportLedger(Path({ledger!r})))
"""


def test_killed_export_never_leaves_a_complete_looking_file(tmp_path):
    out, marker, ledger_dir = tmp_path / "campaign.csv", tmp_path / "marker", tmp_path / "exports"
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent), marker=str(marker), out=str(out), ledger=str(ledger_dir)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "export process died early"
            assert time.monotonic() < deadline, "export never wrote its first chunk"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    parts = list(tmp_path.glob(".campaign.csv.*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 0  # rows were streamed, under a hidden name
    ledger = ExportLedger(ledger_dir)
    assert ledger.records() == []  # nothing recorded: those picks are not capped
    # The next export cleans the leftover and completes.
    artifact, events = make_shop()
    run_export(artifact, events, out, ExportOptions(segment="all", n=2), ledger=ledger)
    assert list(tmp_path.glob(".campaign.csv.*.part")) == []
    assert len(read_rows(out)) == 12 and len(ledger.records()) == 1


def test_bad_options(tmp_path):
    artifact, events = make_shop()
    for kwargs, message in (
        ({"segment": "vip"}, "unknown segment"),
        ({"n": 0}, "--n"),
        ({"n": 101}, "--n"),
        ({"cap_last": 51}, "--cap-last"),
        ({"fmt": "xml"}, "--format"),
        ({"winback_slots": 9, "n": 4}, "--winback-slots"),
        ({"memory_mb": 1}, "--memory-mb"),
    ):
        with pytest.raises(ValueError, match=message):
            run_export(artifact, events, tmp_path / "x.csv", ExportOptions(**kwargs))
    with pytest.raises(ValueError, match="does not exist"):
        run_export(artifact, events, tmp_path / "missing" / "x.csv")
    assert list(tmp_path.iterdir()) == []


def test_ledger_lock_is_exclusive(tmp_path):
    ledger = ExportLedger(tmp_path)
    with ledger.lock():
        with pytest.raises(ExportLocked, match="another export is running"):
            with ExportLedger(tmp_path).lock():
                pass
    with ledger.lock():  # released
        pass


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def write_inputs(tmp_path: Path) -> tuple[Path, Path, Config]:
    artifact, events = make_shop()
    path = write_artifact(artifact, tmp_path / "models", version="v2")
    rows = ["user_id,item_id,event,timestamp,price"]
    for u, i, e, t, p in zip(
        events.user_id, events.item_id, events.event, events.timestamp, events.price, strict=True
    ):
        name = ("view", "cart", "purchase")[e]
        rows.append(f"{u},{i},{name},{t},{'' if np.isnan(p) else p}")
    events_csv = tmp_path / "events.csv"
    events_csv.write_text("\n".join(rows) + "\n")
    return path, events_csv, Config.create(var_dir=tmp_path / "var", models_dir=tmp_path / "models")


def env_for(config: Config) -> dict[str, str]:
    return {"RECSVC_VAR_DIR": str(config.var_dir), "RECSVC_MODELS_DIR": str(config.models_dir)}


def test_export_command(tmp_path):
    model, events_csv, config = write_inputs(tmp_path)
    out = tmp_path / "campaign.jsonl"
    args = [
        "--segment",
        "all",
        "--events",
        str(events_csv),
        "--model",
        str(model),
        "--n",
        "2",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(export, args, env=env_for(config))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["format"] == "jsonl" and summary["rows"] == 12
    assert summary["model_version"] == "v2" and summary["cap_last"] == 2
    assert len(out.read_text().splitlines()) == 12
    # The ledger lives under var_dir and caps the next run.
    assert len(ExportLedger(config.var_dir / "exports").records()) == 1
    result = CliRunner().invoke(export, args, env=env_for(config))
    assert json.loads(result.stdout.strip().splitlines()[-1])["capped_pairs"] == 12


def test_export_command_exit_codes(tmp_path):
    model, events_csv, config = write_inputs(tmp_path)
    out = tmp_path / "c.csv"
    base = ["--events", str(events_csv), "--model", str(model), "--out", str(out)]
    runner = CliRunner()
    env = env_for(config)
    assert runner.invoke(export, ["--segment", "vip", *base], env=env).exit_code == 2
    assert runner.invoke(export, ["--segment", "all", "--n", "0", *base], env=env).exit_code == 2
    result = runner.invoke(
        export, ["--segment", "all", *base[:2], "--model", str(tmp_path), "--out", str(out)], env=env
    )
    assert result.exit_code == 2 and "not a model version folder" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,event\nu,i,view\n")
    result = runner.invoke(
        export, ["--segment", "all", "--events", str(bad), "--model", str(model), "--out", str(out)], env=env
    )
    assert result.exit_code == 2 and "bad.csv" in result.output
    with ExportLedger(config.var_dir / "exports").lock():
        result = runner.invoke(export, ["--segment", "all", *base], env=env)
    assert result.exit_code == 4 and "another export is running" in result.output
    assert not out.exists()


def test_export_command_uses_the_live_model_by_default(tmp_path, redis_url, redis_client):
    from recsvc.storage import versions

    model, events_csv, config = write_inputs(tmp_path)
    config = config.with_overrides(redis_url=redis_url)
    env = {**env_for(config), "REDIS_URL": redis_url}
    out = tmp_path / "c.csv"
    args = ["--segment", "dormant", "--events", str(events_csv), "--out", str(out), "--n", "1"]
    result = CliRunner().invoke(export, args, env=env)
    assert result.exit_code == 2 and "no live model version" in result.output
    from recsvc.storage.connection import connect_admin

    versions.publish(connect_admin(redis_url), model, config)
    result = CliRunner().invoke(export, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["model_version"] == "v2"
    assert [r["model_version"] for r in read_rows(out)] == ["v2"]


def test_empty_segment_and_nothing_in_stock(tmp_path):
    artifact, events = make_shop()
    from training.segments import SegmentThresholds

    summary = run_export(
        artifact,
        events,
        tmp_path / "d.csv",
        ExportOptions(segment="dormant", thresholds=SegmentThresholds(dormant_days=500)),
    )
    assert summary.users == 0 and read_rows(tmp_path / "d.csv") == []
    header = ",".join(f'"{c}"' for c in COLUMNS)
    assert (tmp_path / "d.csv").read_text().splitlines() == [header]  # a header, no rows
    artifact.available[:] = False
    summary = run_export(artifact, events, tmp_path / "none.jsonl", ExportOptions(segment="all", fmt="jsonl"))
    assert summary.rows == 0 and summary.users_without_picks == summary.users == 6
    assert (tmp_path / "none.jsonl").read_text() == ""
