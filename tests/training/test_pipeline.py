"""train_model end to end: the artifact reads back, bad input and crashes leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from recsvc.core.artifact import list_versions, read_artifact
from recsvc.core.eventfiles import BadInputError
from training.als import TrainParams
from training.pipeline import train_model
from training.synth import write_shop

REPO = Path(__file__).resolve().parents[2]
FAST = TrainParams(factors=8, iterations=4)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return write_shop(tmp_path_factory.mktemp("shop"), seed=5, n_users=400, n_items=120, days=30)


def test_artifact_written_by_train_model_reads_back(shop, tmp_path):
    events_path, catalog_path = shop
    result = train_model(
        events_path, catalog_path, models_dir=tmp_path, params=FAST, seed=7, show_progress=False
    )
    assert list_versions(tmp_path) == [result.path]
    artifact = read_artifact(result.path)  # checksums and consistency verified

    manifest = artifact.manifest
    params = manifest["params"]
    for key in (
        "factors",
        "regularization",
        "alpha",
        "iterations",
        "seed",
        "event_weights",
        "scaling",
        "half_life_days",
        "bm25_k1",
        "bm25_b",
    ):
        assert key in params, key
    assert params["seed"] == 7 and params["factors"] == 8
    assert set(params["event_weights"]) == {"view", "cart", "purchase", "impression", "click"}
    digest = hashlib.sha256(Path(events_path).read_bytes() + Path(catalog_path).read_bytes()).hexdigest()
    assert manifest["data_fingerprint"] == digest
    assert result.path.name.endswith(digest[:8])
    assert manifest["metrics"]["model"]["ndcg@10"] > 0 and "popularity" in manifest["metrics"]
    # The blend and what it excludes are recorded; its parts are in the artifact.
    assert manifest["model"]["knn"] > 0 and manifest["exclusion"]["exclude"] == "purchased"
    assert manifest["model"]["exclude"] == "purchased" and 0 <= manifest["exclusion"]["seen_share"] <= 1
    assert artifact.similarity is not None and artifact.similarity.shape == (artifact.n_items,) * 2
    assert artifact.prior is not None and artifact.prior.shape == (artifact.n_items,)
    assert params["regularization"] == pytest.approx(params["regularization_per_item"] * artifact.n_items)
    assert manifest["load_report"]["rows_rejected"] == 0
    assert manifest["trained_until"] == max(
        int(line.split(",")[3]) for line in Path(events_path).read_text().splitlines()[1:]
    )
    assert manifest["library_versions"]["implicit"] == "0.7.3"
    # Bundle mining is reported with the model, and its candidates are the artifact's.
    mining = manifest["training"]["bundles"]
    assert mining["candidates"] == len(artifact.bundles.indices) > 0 and mining["baskets"] > 0
    assert set(mining["seconds"]) == {"baskets", "pairs", "blend", "coverage"}
    assert "hit_rate@3" in manifest["metrics"]["bundles"]

    # Catalog items first, in catalog order; every catalog item is present.
    catalog_ids = [line.split(",")[0].strip('"') for line in Path(catalog_path).read_text().splitlines()[1:]]
    assert artifact.item_ids[: len(catalog_ids)] == catalog_ids
    assert artifact.item_factors.shape == (artifact.n_items, 8) and artifact.item_factors.dtype == np.float32
    assert artifact.interactions.shape == artifact.purchases.shape == (artifact.n_users, artifact.n_items)
    assert artifact.purchases.sum() > 0 and artifact.popularity.shape == (artifact.n_items,)
    assert (artifact.category >= 0).all() and "phones" in artifact.categories
    assert not math.isnan(float(artifact.price[0])) and artifact.titles[0]
    assert (~artifact.available).any()  # the sample shop has out-of-stock items
    assert result.metrics == manifest["metrics"] and result.report.rows_loaded == manifest["counts"]["events"]
    # The repurchase model: every purchasing user's bought items, consumables bought again more.
    rebuy = artifact.repurchase
    assert rebuy is not None and manifest["training"]["repurchase"]["pairs"] == len(rebuy.history.items) > 0
    assert "repurchase" in manifest["timings_s"]
    bought = np.diff(artifact.purchases.tocsr().indptr) > 0
    assert (np.diff(rebuy.history.indptr) > 0).tolist() == bought.tolist()
    consumable = np.isin(
        artifact.category, [artifact.categories.index(c) for c in ("coffee-beans", "pet-food")]
    )
    assert np.median(rebuy.params.rate[consumable]) > 1.3 * np.median(rebuy.params.rate[~consumable])


def test_same_inputs_and_seed_give_identical_factors(shop, tmp_path):
    events_path, catalog_path = shop
    kwargs = dict(models_dir=tmp_path, params=FAST, seed=3, threads=2, evaluate=False)
    a = train_model(events_path, catalog_path, **kwargs)
    b = train_model(events_path, catalog_path, **kwargs)
    assert a.path != b.path
    for name in ("item_factors.npy", "user_factors.npy", "interactions.npz", "purchases.npz", "items.npz"):
        assert a.manifest["files"][name]["sha256"] == b.manifest["files"][name]["sha256"], name


def test_bm25_records_what_fold_in_needs(shop, tmp_path):
    events_path, _ = shop
    params = FAST.replace(scaling="bm25")
    result = train_model(events_path, None, models_dir=tmp_path, params=params, evaluate=False)
    artifact = read_artifact(result.path)
    assert result.manifest["params"]["bm25_n_users"] == artifact.n_users
    assert result.manifest["params"]["bm25_avg_length"] > 0
    assert result.manifest["metrics"] == {}


def test_bad_input_writes_nothing(tmp_path):
    events = tmp_path / "events.csv"
    rows = ["user_id,item_id,event,timestamp"] + [
        f"u{i},i{i % 3},view,{1_600_000_000 + i}" for i in range(50)
    ]
    rows[10] = "u9,i1,view,not-a-time"
    events.write_text("\n".join(rows) + "\n")
    models = tmp_path / "models"
    with pytest.raises(BadInputError, match=r"events.csv:11 column timestamp"):
        train_model(events, models_dir=models, params=FAST)
    assert not models.exists() or not any(models.iterdir())
    result = train_model(events, models_dir=models, params=FAST, max_bad_fraction=0.05, evaluate=False)
    assert result.manifest["load_report"]["rejected_by_reason"] == {"invalid_timestamp": 1}


def test_failure_before_writing_leaves_no_version(shop, tmp_path, monkeypatch):
    import training.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in fit")

    monkeypatch.setattr(pipeline, "fit_parts", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        train_model(shop[0], shop[1], models_dir=tmp_path, params=FAST, evaluate=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_while_writing_leaves_no_readable_half_artifact(shop, tmp_path):
    """SIGKILL the trainer in the middle of writing the artifact: no version appears."""
    models = tmp_path / "models"
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        real_savez = np.savez
        def slow_savez(*args, **kwargs):
            real_savez(*args, **kwargs)
            print("writing", flush=True)
            time.sleep(60)
        np.savez = slow_savez
        from training.als import TrainParams
        from training.pipeline import train_model
        train_model({str(shop[0])!r}, {str(shop[1])!r}, models_dir={str(models)!r},
                    params=TrainParams(factors=4, iterations=2), evaluate=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list_versions(models) == []
    leftovers = [p.name for p in models.iterdir()]
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)
    # A later run still works and is the only version.
    result = train_model(shop[0], shop[1], models_dir=models, params=FAST, evaluate=False)
    assert list_versions(models) == [result.path]


def test_tune_records_the_search_and_saves_the_choice(shop, tmp_path):
    from training.tuning import load_choice

    result = train_model(shop[0], shop[1], models_dir=tmp_path, params=FAST, tune=True)
    tuning = result.manifest["tuning"]
    assert tuning["metric"] == "ndcg@10" and tuning["reason"]
    chosen = TrainParams.from_mapping(tuning["chosen"])
    assert chosen.model.to_dict() == result.manifest["model"] | {"exclude": chosen.model.exclude}
    assert load_choice(tmp_path)[0] == chosen  # `recsvc train` and retrain reuse it
    json.dumps(result.manifest)  # everything recorded is plain JSON


def test_timings_are_recorded(shop, tmp_path):
    start = time.perf_counter()
    result = train_model(shop[0], shop[1], models_dir=tmp_path, params=FAST, evaluate=False)
    assert set(result.manifest["timings_s"]) >= {"load", "matrix", "fit", "extras"}
    assert sum(result.manifest["timings_s"].values()) <= time.perf_counter() - start + 0.01


def test_a_log_too_short_to_split_still_trains(tmp_path):
    events = tmp_path / "events.csv"
    events.write_text(
        "user_id,item_id,event,timestamp\n"
        "u1,i1,view,1600000000\nu1,i2,purchase,1600000100\nu2,i1,purchase,1600000200\n"
    )
    result = train_model(events, models_dir=tmp_path / "models", params=FAST)
    assert "no test user" in result.manifest["metrics"]["note"]
    assert read_artifact(result.path).n_users == 2
