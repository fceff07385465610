"""The train / evaluate / recommend / sample-data commands through click, as a user runs them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.cli import main
from recsvc.core.artifact import list_versions, read_artifact

FAST = ["--factors", "8", "--iterations", "4"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    result = CliRunner().invoke(
        main,
        ["sample-data", "--out", str(out), "--users", "300", "--items", "100", "--days", "30", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "events.csv" in result.output
    return out


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--events",
            str(sample / "events.csv"),
            "--catalog",
            str(sample / "catalog.csv"),
            "--models-dir",
            str(models),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    return models, result


def test_train_prints_version_folder_and_metrics_table(trained):
    models, result = trained
    (version,) = list_versions(models)
    lines = result.stdout.splitlines()
    assert lines[0] == str(version)
    assert any(line.startswith("model ") for line in lines) and any(
        line.startswith("popularity ") for line in lines
    )
    assert "loaded" in result.stderr  # the load report goes to stderr
    assert read_artifact(version).manifest["params"]["factors"] == 8


def test_recommend_writes_top_n_without_purchased_items(trained, tmp_path):
    models, _ = trained
    out = tmp_path / "recs.csv"
    result = CliRunner().invoke(
        main, ["recommend", "--model", "latest", "--models-dir", str(models), "--n", "5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    artifact = read_artifact(list_versions(models)[0])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["user_id", "rank", "item_id", "title", "category", "price", "score"]
    users = {r["user_id"] for r in rows}
    assert users == set(artifact.user_ids)
    item_index, user_index = artifact.item_index(), artifact.user_index()
    spec = artifact.spec()
    # What a list never holds: purchases, or everything touched when the shop's rule says so.
    bought = (artifact.interactions if spec.excludes_interacted else artifact.purchases).tocsr()
    unavailable = {artifact.item_ids[i] for i in np.flatnonzero(~artifact.available)}
    per_user: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        u, i = user_index[r["user_id"]], item_index[r["item_id"]]
        assert bought[u, i] == 0, "purchased item recommended"
        assert r["item_id"] not in unavailable
        code, price = int(artifact.category[i]), float(artifact.price[i])
        assert r["title"] == artifact.titles[i]
        assert r["category"] == (artifact.categories[code] if code >= 0 else "")
        assert r["price"] == "" if price != price else float(r["price"]) == pytest.approx(price)
        per_user.setdefault(r["user_id"], []).append((int(r["rank"]), float(r["score"])))
    for ranked in per_user.values():
        assert [rank for rank, _ in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) == 5
        scores = [score for _, score in ranked]
        assert scores == sorted(scores, reverse=True)
    # The first user's list equals the model's own scoring, as publishing ranks.
    u = user_index[rows[0]["user_id"]]
    scores = artifact.scorer().score(artifact.raw_interactions()[[u]], artifact.user_factors[[u]])[0]
    scores[bought[u].indices] = -np.inf
    scores[~artifact.available] = -np.inf
    expected = [artifact.item_ids[i] for i in np.argsort(-scores)[:5]]
    assert [r["item_id"] for r in rows if r["user_id"] == rows[0]["user_id"]] == expected

    kept = tmp_path / "all.csv"
    result = CliRunner().invoke(
        main,
        [
            "recommend",
            "--models-dir",
            str(models),
            "--n",
            "100",
            "--out",
            str(kept),
            "--include-purchased",
            "--include-unavailable",
        ],
    )
    assert result.exit_code == 0
    with open(kept, newline="") as f:
        assert sum(1 for _ in f) - 1 == artifact.n_users * 100


def test_bad_events_exit_2_with_location_and_write_nothing(tmp_path):
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,event,timestamp\nu1,i1,view,1600000000\nu2,i2,teleport,1600000001\n")
    models = tmp_path / "models"
    result = CliRunner().invoke(main, ["train", "--events", str(events), "--models-dir", str(models)])
    assert result.exit_code == 2
    assert f"{events}:3 column event" in result.output and "nothing was written" in result.output
    assert not models.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "view=lots"], "non-numeric"),
        (["--weights", "like=1"], "unknown event type"),
        (["--config", "missing.toml"], "config file not found"),
    ],
)
def test_bad_parameters_exit_2(sample, tmp_path, args, message):
    result = CliRunner().invoke(
        main, ["train", "--events", str(sample / "events.csv"), "--models-dir", str(tmp_path), *args]
    )
    assert result.exit_code == 2 and message in result.output


def test_recommend_unknown_model_exits_2(tmp_path):
    result = CliRunner().invoke(
        main, ["recommend", "--models-dir", str(tmp_path), "--out", str(tmp_path / "r.csv")]
    )
    assert result.exit_code == 2 and "no model versions" in result.output
    assert not (tmp_path / "r.csv").exists()


def test_evaluate_prints_table_and_writes_json(sample, tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--events",
            str(sample / "events.csv"),
            "--catalog",
            str(sample / "catalog.csv"),
            "--split-days",
            "4",
            "--scaling",
            "log",
            "--json-out",
            str(out),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("split days at ") and "item_knn" in result.stdout
    document = json.loads(out.read_text())
    assert document["params"]["scaling"] == "log"
    assert document["metrics"]["model"]["ndcg@10"] >= 0
    # Four days leave fewer than 50 test users: a warning, and --strict makes it a failure.
    assert "degenerate split: only" in result.stdout
    strict = CliRunner().invoke(
        main,
        ["evaluate", "--events", str(sample / "events.csv"), "--split", "days:4", "--strict", *FAST],
    )
    assert strict.exit_code == 1 and "--strict: " in strict.output


def test_evaluate_dataset_needs_its_files(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--dataset", "taobao", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "UserBehavior" in result.output
