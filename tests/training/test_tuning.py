"""Model selection: bounded, seeded, never worse than where it started, and saved for reuse."""

from __future__ import annotations

import json

import pytest

from recsvc.core.eventfiles import load_catalog, load_events
from training.als import TrainParams
from training.synth import write_shop
from training.tuning import (
    MIN_VALIDATION_USERS,
    SEARCH_SPACE,
    STRUCTURE_CANDIDATES,
    TUNING_FILE,
    choice_age_days,
    load_choice,
    save_choice,
    tune,
)

START = TrainParams(factors=16, iterations=6)
WEIGHT_TRIALS = len(SEARCH_SPACE["popularity_boost"]) * len(SEARCH_SPACE["knn"])


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    events_path, catalog_path = write_shop(tmp_path_factory.mktemp("shop"), seed=5, n_users=1200, n_items=300)
    return load_events(events_path)[0], load_catalog(catalog_path)[0]


@pytest.fixture(scope="module")
def result(shop):
    events, catalog = shop
    return tune(events, catalog, START, seed=0, time_budget_s=3600)


def test_every_trial_is_recorded_and_the_choice_is_justified(result):
    regs = len(SEARCH_SPACE["regularization_per_item"])
    weights = [t for t in result.trials if "change" not in t]
    changes = [t["change"] for t in result.trials if "change" in t]
    assert len(weights) == regs * WEIGHT_TRIALS
    assert sorted(changes) == sorted(name for name, _ in STRUCTURE_CANDIDATES)  # one fit each
    assert result.validation["scored_test_users"] >= MIN_VALIDATION_USERS
    assert [t["ndcg@10"] for t in result.trials] == sorted(
        (t["ndcg@10"] for t in result.trials), reverse=True
    )
    if result.best == START:
        assert result.reason.startswith("no candidate beat")
        assert result.best_score == result.default_score
    else:  # accepted only with a paired interval above 1
        chosen = next(t for t in result.trials if t["ndcg@10"] == result.best_score)
        assert chosen["ratio_ci"][0] > 1.0
        assert result.best_score > result.default_score
    # The factors, iterations and weights of the start are kept.
    assert (result.best.factors, result.best.iterations) == (16, 6)


def test_the_search_is_seeded(shop, result):
    events, catalog = shop
    again = tune(events, catalog, START, seed=0, time_budget_s=3600)
    assert again.best == result.best and again.trials == result.trials


def test_the_time_budget_stops_new_fits(shop):
    events, catalog = shop
    quick = tune(events, catalog, START, seed=0, time_budget_s=0.001)
    # The first regularization is always fitted and scored; none after the budget.
    assert len(quick.trials) <= WEIGHT_TRIALS


def test_too_few_validation_users_keep_the_current_parameters(shop):
    events, catalog = shop
    few = events.take(events.user_id < "u0005")  # a handful of users
    kept = tune(few, catalog, START, seed=0)
    assert kept.best == START and "validation users" in kept.reason and kept.trials == []


def test_the_choice_is_saved_and_read_back(tmp_path, result):
    path = save_choice(tmp_path, result, fingerprint="abc")
    assert path == tmp_path / TUNING_FILE
    document = json.loads(path.read_text())
    assert document["data_fingerprint"] == "abc" and document["reason"] == result.reason
    params, record = load_choice(tmp_path)
    assert params == result.best and record["trials"] == json.loads(json.dumps(result.trials))
    assert 0 <= choice_age_days(record) < 0.01
    assert choice_age_days(record, now=path.stat().st_mtime + 3 * 86_400) == pytest.approx(3, abs=0.01)
    assert load_choice(tmp_path / "nothing") is None
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unusable tuning record"):
        load_choice(tmp_path)
