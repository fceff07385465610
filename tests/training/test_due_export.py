"""`recsvc export --segment due_for_reorder` and `--dry-run`: replenishment reminders, capped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.cli.export import export
from recsvc.core.artifact import write_artifact
from recsvc.core.config import Config
from recsvc.core.contract import PURCHASE, VIEW
from recsvc.core.events import Catalog, EventTable
from tests.factories import DAY, REPURCHASE_NOW, make_artifact, repurchase_artifact
from training.export import ExportLedger, ExportOptions, run_export
from training.export.due import DueExportOptions, run_due_export
from training.export.files import ExportInputError

NOW = REPURCHASE_NOW


def purchases() -> EventTable:
    """u1: i3 every 10 days (last 9 days ago, due), i6 (bought again by most, after 10 days) two days
    ago, i20 (rarely bought again) 10 days ago; u2: i7 (3 and 13 days ago); u5 only browses; u9
    bought i3 a year ago (lapsed)."""
    rows = [("u1", "i3", NOW - (9 + 10 * k) * DAY) for k in range(5)]
    rows += [("u1", "i6", NOW - 2 * DAY), ("u1", "i20", NOW - 10 * DAY)]
    rows += [("u2", "i7", NOW - 3 * DAY), ("u2", "i7", NOW - 13 * DAY), ("u9", "i3", NOW - 365 * DAY)]
    rows += [("u1", "i3", NOW + DAY)]  # after as_of: ignored
    users, items, stamps = zip(*rows, strict=True)
    n = len(rows)
    table = EventTable(
        user_id=np.array([*users, "u5"], dtype=object),
        item_id=np.array([*items, "i3"], dtype=object),
        event=np.array([PURCHASE] * n + [VIEW], np.int8),
        timestamp=np.array([*stamps, NOW - DAY], np.int64),
    )
    return table


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.create(var_dir=tmp_path / "var", models_dir=tmp_path / "models")


def test_due_customers_get_their_due_items(tmp_path, config):
    artifact = repurchase_artifact()
    write_artifact(artifact, config.models_dir, version="v1")
    out = tmp_path / "due.csv"
    summary = run_due_export(artifact, purchases(), out, DueExportOptions(as_of=NOW), config=config)
    rows = _rows(out)
    # i6: 0.8 * (1 - S(9 days)) = 0.325 by the formula of docs/repurchase.md; i20: 0.05 * ...
    assert [(r["user_id"], r["item_id"], r["rank"]) for r in rows] == [
        ("u1", "i3", "1"),
        ("u1", "i6", "2"),
        ("u2", "i7", "1"),
    ]
    assert float(rows[1]["score"]) == pytest.approx(0.325, abs=0.002)
    first = rows[0]
    assert first["segment"] == "due_for_reorder" and first["reason"] == "replenish" and first["rank"] == "1"
    assert float(first["score"]) >= config.serving.repurchase_due_probability
    assert first["times_bought"] == "5" and first["last_bought"] == "2024-06-21T00:00:00Z"
    assert first["reason_text"].startswith("bought 5 times, about every 10 days; last bought 9 days ago")
    assert 0 < float(first["due_in_days"]) < 7
    assert summary.users == 2 and summary.rows == 3
    assert summary.segment_sizes == {"due_for_reorder": 2, "customers": 4}
    assert summary.extra["horizon_days"] == 7.0


def test_cap_and_dry_run(tmp_path, config):
    artifact = repurchase_artifact()
    write_artifact(artifact, config.models_dir, version="v1")
    ledger = ExportLedger(tmp_path / "exports")
    events = purchases()
    dry = run_due_export(
        artifact, events, tmp_path / "a.csv", DueExportOptions(as_of=NOW, dry_run=True), ledger=ledger
    )
    assert dry.rows == 3 and dry.extra["dry_run"] and (tmp_path / "a.csv").exists()
    assert ledger.records() == []  # nothing recorded: nothing capped
    sent = run_due_export(artifact, events, tmp_path / "b.csv", DueExportOptions(as_of=NOW), ledger=ledger)
    assert sent.rows == 3 and len(ledger.records()) == 1
    again = run_due_export(artifact, events, tmp_path / "c.csv", DueExportOptions(as_of=NOW), ledger=ledger)
    assert again.rows == 0 and again.capped_pairs == 3 and _rows(tmp_path / "c.csv") == []
    # Over a longer horizon the same items are due, and stay capped.
    wide = run_due_export(
        artifact,
        events,
        tmp_path / "d.csv",
        DueExportOptions(as_of=NOW, horizon_days=60),
        ledger=ledger,
    )
    assert wide.capped_pairs == 3
    assert ("u1", "i3") not in {(r["user_id"], r["item_id"]) for r in _rows(tmp_path / "d.csv")}


def test_out_of_stock_items_are_not_reminded(tmp_path, config):
    artifact = repurchase_artifact()
    write_artifact(artifact, config.models_dir, version="v1")
    ids = np.array(artifact.item_ids, dtype=object)
    available = np.ones(len(ids), bool)
    available[3] = False
    catalog = Catalog(
        item_id=ids,
        title=np.array(artifact.titles, dtype=object),
        category=np.array([artifact.categories[c] for c in artifact.category], dtype=object),
        price=np.asarray(artifact.price, np.float32),
        available=available,
    )
    run_due_export(artifact, purchases(), tmp_path / "x.csv", DueExportOptions(as_of=NOW), catalog=catalog)
    assert [(r["user_id"], r["item_id"]) for r in _rows(tmp_path / "x.csv")] == [("u1", "i6"), ("u2", "i7")]


def test_a_model_without_repurchase_model_is_refused(tmp_path):
    old = make_artifact()
    write_artifact(old, tmp_path / "models", version="v0")
    with pytest.raises(ExportInputError, match="v0 has no repurchase model"):
        run_due_export(old, purchases(), tmp_path / "x.csv", DueExportOptions(as_of=NOW))
    with pytest.raises(ExportInputError, match="--horizon-days"):
        DueExportOptions(horizon_days=0)


def test_dry_run_of_a_segment_export_records_nothing(tmp_path):
    artifact = repurchase_artifact()
    write_artifact(artifact, tmp_path / "models", version="v1")
    ledger = ExportLedger(tmp_path / "exports")
    options = ExportOptions(segment="all", n=2, dry_run=True, as_of=NOW)
    summary = run_export(artifact, purchases(), tmp_path / "all.csv", options, ledger=ledger)
    assert summary.rows > 0 and summary.extra == {"dry_run": True} and ledger.records() == []


def test_the_command(tmp_path, config):
    artifact = repurchase_artifact()
    model = write_artifact(artifact, config.models_dir, version="v1")
    events_csv = tmp_path / "events.csv"
    t = purchases()
    with open(events_csv, "w") as f:
        f.write("user_id,item_id,event,timestamp\n")
        for u, i, e, ts in zip(t.user_id, t.item_id, t.event, t.timestamp, strict=True):
            f.write(f"{u},{i},{'purchase' if e == PURCHASE else 'view'},{ts}\n")
    env = {"RECSVC_VAR_DIR": str(config.var_dir), "RECSVC_MODELS_DIR": str(config.models_dir)}
    out = tmp_path / "due.jsonl"
    args = [
        "--segment",
        "due_for_reorder",
        "--events",
        str(events_csv),
        "--model",
        str(model),
        "--out",
        str(out),
    ]
    args += ["--as-of", str(NOW)]
    result = CliRunner().invoke(export, [*args, "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["segment"] == "due_for_reorder" and summary["rows"] == 3 and summary["dry_run"] is True
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["item_id"] for line in lines} == {"i3", "i6", "i7"}
    assert all(line["reason"] == "replenish" for line in lines)
    assert ExportLedger(config.var_dir / "exports").records() == []
    result = CliRunner().invoke(export, [*args, "--horizon-days", "30"], env=env)
    assert (
        result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[-1])["horizon_days"] == 30.0
    )
    assert len(ExportLedger(config.var_dir / "exports").records()) == 1
    bad = CliRunner().invoke(export, [*args, "--horizon-days", "0"], env=env)
    assert bad.exit_code == 2


def test_a_version_with_a_ranker_sends_the_due_items_in_its_order(tmp_path, config):
    from recsvc.core.repurchase import RANKER_FEATURES

    # A ranker that puts the most recently bought first: u1's i6 (2 days ago) before i3 (9 days).
    ranker = tuple(-1.0 if name == "log1p_days_since" else 0.0 for name in RANKER_FEATURES)
    artifact = repurchase_artifact(ranker=ranker)
    write_artifact(artifact, config.models_dir, version="v1")
    out = tmp_path / "due.csv"
    run_due_export(artifact, purchases(), out, DueExportOptions(as_of=NOW), config=config)
    rows = _rows(out)
    # The same due items (the threshold is on the probability), in the ranker's order.
    assert [(r["user_id"], r["item_id"], r["rank"]) for r in rows] == [
        ("u1", "i6", "1"),
        ("u1", "i3", "2"),
        ("u2", "i7", "1"),
    ]
    assert float(rows[0]["score"]) == pytest.approx(0.325, abs=0.002)
