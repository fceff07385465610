"""Offline evaluation: the model against the baselines on one split, with intervals and warnings."""

from __future__ import annotations

import pytest

from recsvc.core.eventfiles import load_catalog, load_events
from recsvc.core.events import EventTable
from recsvc.core.scoring import PLAIN_ALS
from training.als import TrainParams
from training.evaluation import BASELINES, evaluate, format_table
from training.synth import write_shop

FAST = TrainParams(factors=16, iterations=6)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    events_path, catalog_path = write_shop(
        tmp_path_factory.mktemp("shop"), seed=11, n_users=1500, n_items=400
    )
    events, _ = load_events(events_path)
    catalog, _ = load_catalog(catalog_path)
    return events, catalog


@pytest.fixture(scope="module")
def metrics(shop):
    events, catalog = shop
    return evaluate(events, catalog, FAST, seed=1, bundles=False)


def test_the_model_clearly_beats_popularity_with_intervals_and_buckets(metrics):
    split = metrics["split"]
    assert split["protocol"] == "global" and split["scored_test_users"] == split["test_users"] > 100
    assert split["exclude"] == "purchased"  # synthetic shoppers buy what they looked at
    model, popularity = metrics["model"], metrics["popularity"]
    for k in (10, 20):
        assert model[f"ndcg@{k}"] > 1.5 * popularity[f"ndcg@{k}"]
        assert model[f"ndcg@{k}"] > 1.5 * metrics["recent_popularity"][f"ndcg@{k}"]
        low, high = model[f"ndcg@{k}_ci"]
        assert low < model[f"ndcg@{k}"] < high
    # Every activity bucket with users is reported, and their users add up to the test users.
    assert sum(b["users"] for b in model["buckets"].values()) == split["scored_test_users"]
    assert model["buckets"]["10+"]["ndcg@10"] > popularity["buckets"]["10+"]["ndcg@10"]
    comparison = metrics["comparison"]
    assert comparison["best_baseline"] in BASELINES
    best = max(metrics[b]["ndcg@10"] for b in BASELINES)
    assert comparison["baseline"] == best
    assert comparison["ratio"] == pytest.approx(model["ndcg@10"] / best, abs=1e-4)
    low, high = comparison["ratio_ci"]
    assert low <= comparison["ratio"] <= high
    assert metrics["cold_users"]["served"] == "popularity"
    assert metrics["cold_users"]["users"] == split["cold_test_users"]


def test_the_table_shows_the_split_every_method_and_the_verdict(metrics):
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].startswith("split global at ") and "test users" in lines[0]
    assert lines[1].split()[:3] == ["method", "ndcg@10", "recall@20"]
    for method in ("model", "popularity", "recent_popularity", "item_knn", "implicit_als"):
        assert any(line.startswith(method + " ") for line in lines)
    assert "model ndcg@10 by activity:" in table
    assert "vs the best baseline" in table
    assert "cold purchasers (served popularity)" in table


def test_seeded_runs_repeat_and_other_configurations_share_the_split(shop, metrics):
    events, catalog = shop
    again = evaluate(
        events,
        catalog,
        FAST,
        seed=1,
        methods=("model",),
        bundles=False,
        compare={"live": FAST, "plain": FAST.replace(model=PLAIN_ALS)},
    )
    assert again["model"] == metrics["model"]
    assert again["live"]["same_as"] == "model" and again["live"]["ndcg@10"] == again["model"]["ndcg@10"]
    assert again["plain"]["ndcg@10"] != again["model"]["ndcg@10"]
    assert again["split"]["cutoff"] == metrics["split"]["cutoff"]


def test_baselines_scored_alone_equal_those_that_reuse_the_models_matrix_and_knn(shop, metrics, monkeypatch):
    # Next to the model, the baselines take its training matrix and (same matrix, same K) its kNN
    # part instead of building them again; alone they build their own: the figures must not move.
    import training.evaluation as evaluation

    events, catalog = shop
    fits = []
    real_fit = evaluation.fit_similarity
    monkeypatch.setattr(evaluation, "fit_similarity", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    alone = evaluate(events, catalog, FAST, seed=1, bundles=False, methods=("item_knn", "implicit_als"))
    assert len(fits) == 1  # alone: the baseline's own fit
    for method in ("item_knn", "implicit_als"):
        assert alone[method]["ndcg@10"] == pytest.approx(metrics[method]["ndcg@10"], abs=1e-12)
        assert alone[method]["recall@20"] == pytest.approx(metrics[method]["recall@20"], abs=1e-12)
    fits.clear()
    evaluate(events, catalog, FAST, seed=1, bundles=False, methods=("model", "item_knn"))
    assert not fits  # the baseline took the kNN part the model fitted (in training.model)


def test_a_sample_of_test_users_is_scored_and_said(shop):
    events, catalog = shop
    sampled = evaluate(
        events, catalog, FAST, seed=1, bundles=False, max_test_users=60, methods=("popularity",)
    )
    assert sampled["split"]["scored_test_users"] == 60 and sampled["split"]["sampled"]
    assert "a seeded sample" in format_table(sampled)


def test_a_model_that_loses_to_a_baseline_is_warned_about(shop):
    events, catalog = shop
    weak = TrainParams(factors=1, iterations=1, model=PLAIN_ALS)
    result = evaluate(events, catalog, weak, seed=1, bundles=False, methods=("model", "item_knn"))
    assert result["comparison"]["ratio"] < 1
    assert any(w.startswith("the model loses to item_knn") for w in result["warnings"])


def test_a_degenerate_split_is_warned_about(shop):
    events, catalog = shop
    result = evaluate(events, catalog, FAST, split="days:0.05", bundles=False, methods=("popularity",))
    assert any(w.startswith("degenerate split: only") for w in result["warnings"])
    assert result["split"]["degenerate"]


def test_no_test_user_is_reported_not_crashed():
    t0 = 1_700_000_000
    table = EventTable.from_records(
        [
            {"user_id": "u1", "item_id": "a", "event": "view", "timestamp": t0},
            {"user_id": "u2", "item_id": "b", "event": "purchase", "timestamp": t0 + 10 * 86_400},
        ]
    )
    metrics = evaluate(table, None, TrainParams(factors=2), split="days:2")
    assert "model" not in metrics and "no test user" in metrics["note"]
    assert metrics["split"]["cold_test_users"] == 1
    assert "no test user" in format_table(metrics)


def test_bad_arguments_are_named(shop):
    events, catalog = shop
    with pytest.raises(ValueError, match="unknown method 'als'"):
        evaluate(events, catalog, FAST, methods=("als",))
    with pytest.raises(ValueError, match="positive cut-offs"):
        evaluate(events, catalog, FAST, k=(0,))
