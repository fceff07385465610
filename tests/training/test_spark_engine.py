"""The Spark engine (``recsvc train --engine spark``) against the local one, on Spark ``local[1]``.

One Spark session serves the module (it starts in 5-15 s). The engines must agree on what they
read (rejection counts), on the confidence matrix, on the split and baselines of the evaluation,
and -- within 10 % -- on recall; the Spark artifact must publish and serve, and fold-in must solve
a user exactly as Spark's last sweep did.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from recsvc.core import weighting
from recsvc.core.artifact import read_artifact
from recsvc.core.eventfiles import BadInputError, load_catalog, load_events
from recsvc.core.foldin import fold_in
from recsvc.core.scoring import PLAIN_ALS
from recsvc.core.weighting import RowRecipe
from training import spark_engine
from training.als import TrainParams
from training.pipeline import train_model
from training.synth import write_shop

pytestmark = pytest.mark.spark

T = 1_718_000_000
HEADER = ["user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id"]


@pytest.fixture(scope="module")
def spark():
    session = spark_engine.spark_session(spark_engine.SparkOptions(master="local[1]"))
    yield session
    session.stop()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The sample shop (``recsvc sample-data``'s generator), plus catalog items nobody touched."""
    folder = tmp_path_factory.mktemp("spark-shop")
    events, catalog = write_shop(folder)
    with open(catalog, "a", encoding="utf-8") as f:
        f.write(
            '"sku-unseen-1","Never viewed","hats",12.5,true\n"sku-unseen-2","Never viewed","hats",9,true\n'
        )
    return events, catalog


@pytest.fixture(scope="module")
def shop_events(spark, shop):
    """The sample shop's events, validated by Spark once for the module."""
    return spark_engine.load_events(spark, [str(shop[0])])


@pytest.fixture
def work(spark):
    folder = spark_engine._WorkDir(spark, None)
    yield folder
    folder.close()


def _bad_rows_csv(path) -> None:
    """Good rows, exact duplicates, and at least one row of every rejection reason."""
    good = [
        [f"u{k % 7}", f"sku-{k % 11}", ["view", "cart", "purchase"][k % 3], T + k, "", "", "", ""]
        for k in range(300)
    ]
    bad = [
        ["", "sku-1", "view", T, "", "", "", ""],  # missing_field
        ["u1", "sku-1", "", T, "", "", "", ""],  # missing_field (event)
        ["bad id", "sku-1", "view", T, "", "", "", ""],  # invalid_user_id
        ["u,1", "sku-1", "view", T, "", "", "", ""],  # invalid_user_id, quoted comma
        ["u1", "sku 1", "view", T, "", "", "", ""],  # invalid_item_id
        ["u1", "sku-1", "like", T, "", "", "", ""],  # unknown_event
        ["u1", "sku-1", "view", "yesterday", "", "", "", ""],  # invalid_timestamp
        ["u1", "sku-1", "view", T * 1000, "", "", "", ""],  # milliseconds: read as seconds by both
        ["u1", "sku-1", "view", "0", "", "", "", ""],  # invalid_timestamp (before 1970-01-01T00:00:01)
        ["u1", "sku-1", "purchase", T, "o 1", "1", "2", ""],  # invalid_order_id
        ["u1", "sku-1", "click", T, "", "", "", "r#1"],  # invalid_rec_id
        ["u1", "sku-1", "purchase", T, "o1", "-1", "2", ""],  # invalid_quantity
        ["u1", "sku-1", "purchase", T, "o1", "many", "2", ""],  # invalid_quantity
        ["u1", "sku-1", "purchase", T, "o1", "1", "-2", ""],  # invalid_price
        ["u1", "sku-1", "purchase", T, "o1", "1", "free", ""],  # invalid_price
    ]
    iso = [
        ["u2", "sku-2", "view", "2024-06-10T06:13:20Z", "", "", "", ""],
        ["u2", "sku-3", "view", "2024-06-10 06:13:20", "", "", "", ""],
        ["u2", "sku-4", "view", "2024-06-10T06:13:20.250+02:00", "", "", "", ""],
        ["u2", "sku-5", "cart", "2024-06-10", "", "", "", ""],
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(good + bad + iso + good[:9])  # nine exact duplicates
        f.write("u1,sku-1,view\n")  # malformed: too few columns
        f.write(f"u1,sku-1,view,{T},,,,,extra\n")  # malformed: too many
        f.write("\n")  # an empty line is no row for either reader


def test_rejection_counts_equal_the_local_loader(spark, tmp_path):
    path = tmp_path / "bad.csv"
    _bad_rows_csv(path)
    _, local = load_events(path, max_bad_fraction=1.0)
    got = spark_engine.load_events(spark, [str(path)], max_bad_fraction=1.0)
    report = got.report
    assert report.rejected_by_reason == local.rejected_by_reason
    assert set(local.rejected_by_reason) >= {
        "malformed_row", "missing_field", "invalid_user_id", "invalid_item_id", "unknown_event",
        "invalid_timestamp", "invalid_order_id", "invalid_rec_id", "invalid_quantity", "invalid_price",
    }  # fmt: skip
    assert (report.rows_read, report.rows_loaded, report.duplicates_dropped) == (
        local.rows_read,
        local.rows_loaded,
        local.duplicates_dropped,
    )
    assert local.duplicates_dropped == 9
    # Examples name the file and the column (Spark does not know line numbers).
    example = report.examples["invalid_price"][0]
    assert example.file.endswith("bad.csv") and example.column == "price" and example.line is None
    assert report.examples["malformed_row"][0].column is None
    # The loaded rows are the same rows.
    frame = got.frame.toArrow()
    table, _ = load_events(path, max_bad_fraction=1.0)
    assert sorted(
        zip(frame.column("user_id").to_pylist(), frame.column("timestamp").to_pylist(), strict=True)
    ) == sorted(zip(table.user_id.tolist(), table.timestamp.tolist(), strict=True))

    # The same rows as typed Parquet (ints, floats, nulls) count the same.
    good = [r for r in csv.DictReader(open(path, encoding="utf-8")) if None not in r.values() and len(r) == 8]
    typed = pa.table({name: pa.array([r[name] for r in good]) for name in HEADER})
    pq.write_table(typed, tmp_path / "bad.parquet")
    _, local_pq = load_events(tmp_path / "bad.parquet", max_bad_fraction=1.0)
    spark_pq = spark_engine.load_events(spark, [str(tmp_path / "bad.parquet")], max_bad_fraction=1.0).report
    assert spark_pq.rejected_by_reason == local_pq.rejected_by_reason
    assert (spark_pq.rows_loaded, spark_pq.duplicates_dropped) == (
        local_pq.rows_loaded,
        local_pq.duplicates_dropped,
    )


def test_bad_input_is_refused_naming_file_and_column(spark, tmp_path):
    path = tmp_path / "bad.csv"
    _bad_rows_csv(path)
    with pytest.raises(BadInputError, match=r"bad\.csv.*more than the allowed 1\.00%"):
        spark_engine.load_events(spark, [str(path)], max_bad_fraction=0.01)
    (tmp_path / "nouser.csv").write_text("item_id,event,timestamp\nsku-1,view,1718000000\n")
    with pytest.raises(BadInputError, match="column user_id: required column is missing") as info:
        spark_engine.load_events(spark, [str(tmp_path / "nouser.csv")])
    assert info.value.column == "user_id"
    with pytest.raises(BadInputError, match="cannot read"):
        spark_engine.load_events(spark, [str(tmp_path / "missing.csv")])


@pytest.mark.parametrize(
    "params",
    [
        weighting.WeightingParams(),
        weighting.WeightingParams(scaling="log", half_life_days=7.0),
        weighting.WeightingParams(scaling="bm25", event_weights={"impression": 0.5}),
    ],
    ids=["linear", "log+decay", "bm25"],
)
def test_the_confidence_matrix_equals_the_local_one(spark, shop, shop_events, work, params):
    events_path, catalog_path = shop
    table, _ = load_events(events_path)
    catalog, _ = load_catalog(catalog_path)
    now = int(table.timestamp.max())
    user_ids, item_ids = weighting.id_maps(table, params, catalog.item_id)
    raw = weighting.raw_matrix(table, user_ids, item_ids, params, now=now)
    local = weighting.to_float32(weighting.scale(raw, params))

    events = shop_events
    matrix = spark_engine.weighted_matrix(spark, events.frame, params, catalog.item_id, now, work)
    assert matrix.user_ids.tolist() == user_ids.tolist() and matrix.item_ids.tolist() == item_ids.tolist()
    got = matrix.confidence(work, "confidence")
    assert got.nnz == local.nnz > 0
    np.testing.assert_array_equal(got.indptr, local.indptr)
    np.testing.assert_array_equal(got.indices, local.indices)
    np.testing.assert_allclose(got.data, local.data, rtol=1e-6)  # float64 sums in another order
    expected = weighting.bm25_manifest_params(raw, params)  # empty unless bm25
    assert matrix.extra_params.keys() == expected.keys()
    for key, value in expected.items():
        assert matrix.extra_params[key] == pytest.approx(value, rel=1e-12)
    popularity = spark_engine.popularity_vector(matrix, events.frame, params, now)
    np.testing.assert_allclose(
        popularity, weighting.popularity_scores(table, item_ids, params, now=now), rtol=1e-6
    )
    purchases = spark_engine.purchase_matrix(matrix, events.frame, work, "purchases")
    assert (purchases != weighting.purchase_counts(table, user_ids, item_ids)).nnz == 0


def test_spark_training_matches_the_local_engine_and_serves(spark, shop, tmp_path, redis_client, make_config):
    """Same artifact format, recall within 10 %, same baselines; publish, serve and fold-in work."""
    from recsvc.storage import versions
    from recsvc.web.app import create_app

    events_path, catalog_path = shop
    params = TrainParams()
    # The local engine's ALS alone, on the split both engines cut (Spark trains the ALS core).
    local = train_model(
        events_path, catalog_path, models_dir=tmp_path / "local", params=params, seed=7, show_progress=False,
        split="global", compare={"als": params.replace(model=PLAIN_ALS)},
    )  # fmt: skip
    result = spark_engine.train_model_spark(
        str(events_path),
        str(catalog_path),
        models_dir=tmp_path / "spark",
        params=params,
        seed=7,
        spark=spark,
    )
    ours, theirs = result.manifest["metrics"], local.manifest["metrics"]
    assert ours["split"]["test_users"] == theirs["split"]["test_users"] > 100
    assert ours["split"]["cold_test_users"] == theirs["split"]["cold_test_users"]
    for baseline in ("popularity", "recent_popularity"):  # deterministic: the same split, the same matrix
        means = {k: v for k, v in theirs[baseline].items() if isinstance(v, float)}
        assert {k: ours[baseline][k] for k in means} == pytest.approx(means, abs=1e-9)
        assert ours[baseline]["buckets"] == theirs[baseline]["buckets"]
    recall, local_recall = ours["model"]["recall@20"], theirs["als"]["recall@20"]
    assert abs(recall - local_recall) <= 0.10 * local_recall, (recall, local_recall)

    spark_artifact, local_artifact = (
        read_artifact(result.path),
        read_artifact(local.path),
    )  # checksums verified
    assert (
        spark_artifact.user_ids == local_artifact.user_ids
        and spark_artifact.item_ids == local_artifact.item_ids
    )
    assert (spark_artifact.interactions != local_artifact.interactions).nnz == 0
    assert (spark_artifact.purchases != local_artifact.purchases).nnz == 0
    np.testing.assert_allclose(spark_artifact.popularity, local_artifact.popularity, rtol=1e-6)
    unseen = [spark_artifact.item_ids.index(f"sku-unseen-{k}") for k in (1, 2)]
    assert not spark_artifact.item_factors[unseen].any()  # Spark never saw them: zero rows
    assert spark_artifact.item_factors.dtype == np.float32 and np.isfinite(spark_artifact.user_factors).all()
    assert len(spark_artifact.bundles.indices) > 0
    manifest = result.manifest
    assert manifest["training"]["engine"] == "spark" and local.manifest["training"]["engine"] == "local"
    assert manifest["params"]["regularization_scaling"] == "count"
    assert manifest["model"] == PLAIN_ALS.to_dict()  # served as plain ALS
    assert manifest["load_report"]["rows_loaded"] == local.manifest["load_report"]["rows_loaded"]

    # Fold-in, with the recorded regularization per entry and confidence floor, solves a user as
    # Spark's last sweep did (Spark updates users after items); a constant regularization does not.
    recipe = RowRecipe.from_manifest(manifest["params"])
    factors = spark_artifact.item_factors
    worse = 0
    for u in range(0, len(spark_artifact.user_ids), 97):
        row = spark_artifact.interactions[u]
        conf, reg = recipe.solve_terms(row.data)
        assert reg == pytest.approx(manifest["params"]["regularization_per_entry"] * row.nnz)
        vector = fold_in(factors, row.indices, conf, reg, recipe.alpha)
        np.testing.assert_allclose(vector, spark_artifact.user_factors[u], rtol=2e-3, atol=2e-4)
        constant = fold_in(factors, row.indices, row.data, recipe.regularization, recipe.alpha)
        worse += np.abs(constant - spark_artifact.user_factors[u]).max() > 1e-2
    assert worse > 0

    # Downstream cannot tell the engines apart: publish and serve, real time included.
    config = make_config(models_dir=tmp_path / "spark", topk_cached=50)
    assert versions.publish(redis_client, result.path, config) == result.path.name
    client = create_app(config).test_client()
    user = spark_artifact.user_ids[3]
    body = client.get(f"/v1/users/{user}/recommendations?n=5").get_json()
    assert body["source"] == "personalized" and len(body["items"]) == 5
    event = {
        "user_id": "visitor-1",
        "item_id": spark_artifact.item_ids[0],
        "event": "cart",
        "timestamp": T * 2,
    }
    headers = {"Authorization": f"Bearer {config.api_keys[0]}"}
    assert client.post("/v1/events", json=event, headers=headers).status_code == 202
    assert client.get("/v1/users/visitor-1/recommendations?n=5").get_json()["source"] == "realtime"


def test_command_line(spark, shop, tmp_path):
    from recsvc.cli import main

    events_path, catalog_path = shop
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa_csv.read_csv(events_path), parquet)
    args = ["train", "--engine", "spark", "--events", str(parquet), "--catalog", str(catalog_path)]
    args += ["--models-dir", str(tmp_path / "m"), "--no-evaluate", "--factors", "8", "--iterations", "3"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    manifest = json.loads(
        (tmp_path / "m" / done.output.strip().splitlines()[-1].split("/")[-1] / "manifest.json").read_text()
    )
    assert manifest["training"]["engine"] == "spark" and manifest["params"]["factors"] == 8
    refused = CliRunner().invoke(main, [*args[:7], "--tune"])
    assert refused.exit_code == 2 and "local engine" in refused.output
    _bad_rows_csv(tmp_path / "bad.csv")
    bad = CliRunner().invoke(main, ["train", "--engine", "spark", "--events", str(tmp_path / "bad.csv")])
    assert bad.exit_code == 2 and "bad.csv" in bad.output and "column" in bad.output
