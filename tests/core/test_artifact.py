import json
import os

import numpy as np
import pytest

from recsvc.core import artifact as art
from tests.factories import make_artifact


def test_round_trip_preserves_every_array(tmp_path):
    a = make_artifact()
    a.bundles = art.BundleCandidates(
        indptr=np.r_[[0, 2], np.full(a.n_items - 1, 2)].astype(np.int64),
        indices=np.array([3, 7], np.int32),
        score=np.array([0.9, 0.5], np.float32),
        support=np.array([12, 4], np.int32),
    )
    path = art.write_artifact(a, tmp_path, version="v1")
    b = art.read_artifact(path)
    assert b.version == "v1" and b.path == path
    assert b.item_ids == a.item_ids and b.user_ids == a.user_ids
    np.testing.assert_array_equal(b.item_factors, a.item_factors)
    np.testing.assert_array_equal(b.user_factors, a.user_factors)
    for name in ("price", "available", "category", "popularity"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
    assert (b.purchases != a.purchases).nnz == 0
    assert (b.interactions != a.interactions).nnz == 0
    items, scores, support = b.bundles.row(0)
    assert items.tolist() == [3, 7] and support.tolist() == [12, 4]
    assert b.bundles.row(1)[0].size == 0
    m = b.manifest
    assert m["counts"]["items"] == 50 and m["counts"]["users"] == 20 and m["counts"]["factors"] == 8
    assert set(m["files"]) >= {"item_factors.npy", "user_factors.npy", "items.npz", "bundles.npz"}
    assert "numpy" in m["library_versions"]


def test_versions_never_collide_and_sort_by_time(tmp_path):
    first = art.write_artifact(make_artifact(), tmp_path, version="20260101T000000Z")
    second = art.write_artifact(make_artifact(), tmp_path, version="20260101T000000Z")
    assert first.name != second.name
    assert art.latest_version(tmp_path) == second
    assert art.resolve(tmp_path, "latest") == second
    assert art.resolve(tmp_path, first.name) == first


def test_tampered_file_is_rejected_by_checksum(tmp_path):
    path = art.write_artifact(make_artifact(), tmp_path)
    factors = np.load(path / "item_factors.npy")
    factors[0, 0] += 1
    np.save(path / "item_factors.npy", factors)
    with pytest.raises(art.ArtifactError, match="item_factors.npy: checksum mismatch"):
        art.read_artifact(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: setattr(a, "item_factors", a.item_factors.astype(np.float64)), "expected float32"),
        (lambda a: a.item_factors.__setitem__((0, 0), np.nan), "NaN or inf"),
        (lambda a: setattr(a, "user_factors", a.user_factors[:-1]), "user_factors.npy: shape"),
        (lambda a: a.item_ids.__setitem__(1, "i0"), "duplicate ids"),
        (lambda a: a.item_ids.__setitem__(1, "bad id!"), "invalid id"),
        (lambda a: a.category.__setitem__(0, 9), "category code out of range"),
        (lambda a: setattr(a, "titles", a.titles[:-1]), "titles length"),
    ],
)
def test_inconsistent_artifact_is_not_written(tmp_path, mutate, message):
    a = make_artifact()
    mutate(a)
    with pytest.raises(art.ArtifactError, match=message):
        art.write_artifact(a, tmp_path)
    assert os.listdir(tmp_path) == []


def test_crash_mid_write_leaves_no_visible_version(tmp_path, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        art.write_artifact(make_artifact(), tmp_path)
    assert art.list_versions(tmp_path) == []
    assert os.listdir(tmp_path) == []


def test_unpickled_loading_only(tmp_path):
    path = art.write_artifact(make_artifact(), tmp_path)
    np.save(path / "item_factors.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"].pop("item_factors.npy")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(art.ArtifactError, match="unreadable artifact"):
        art.read_artifact(path)


def test_prune_keeps_newest(tmp_path):
    names = [
        art.write_artifact(make_artifact(), tmp_path, version=f"2026010{i}T000000Z").name for i in range(1, 6)
    ]
    deleted = art.prune(tmp_path, keep=2, protect={names[0]})
    assert deleted == names[1:3]
    assert [p.name for p in art.list_versions(tmp_path)] == [names[0], *names[3:]]
