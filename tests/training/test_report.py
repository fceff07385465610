"""The training report and the segments document beside a version: written after it, outside its
checksums, readable by the console, and never able to fail a training run."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from recsvc.core.artifact import (
    ArtifactError,
    read_artifact,
    read_document,
    read_item_counts,
    verify_checksums,
    write_artifact,
    write_document,
)
from recsvc.core.events import EventTable
from tests.factories import blend_artifact
from training import report
from training.segments import SEGMENTS, compute_segments, segments_document


@pytest.fixture
def version(models_dir):
    a = blend_artifact(seed=2)
    a.manifest["metrics"] = {
        "model": {
            "ndcg@10": 0.3,
            "ndcg@10_ci": [0.25, 0.35],
            "buckets": {"3-9": {"ndcg@10": 0.3, "users": 9}},
        },
        "item_knn": {"ndcg@10": 0.2, "ndcg@10_ci": [0.15, 0.25], "buckets": {"3-9": {"ndcg@10": 0.2}}},
        "comparison": {
            "model": 0.3,
            "baseline": 0.2,
            "best_baseline": "item_knn",
            "ratio": 1.5,
            "ratio_ci": [1.1, 1.9],
        },
        "warnings": ["<script>alert(1)</script>"],
    }
    a.manifest["timings_s"] = {"load": 0.1, "fit": 0.5}
    return write_artifact(a, models_dir), a


def test_the_report_is_self_contained_with_its_plots(version):
    path, artifact = version
    assert report.write_report(path, artifact) == path / "report.html"
    page = (path / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6  # metrics, buckets, scores, coverage, popularity, timings
    assert "<script" not in page and "&lt;script&gt;" in page  # manifest text is escaped
    assert "ratio 1.5 [1.1, 1.9]" in page and 'src="http' not in page
    # Coverage of the sampled lists, from the lists themselves.
    lists = report.sample_lists(artifact)
    covered = len(np.unique(lists["items"][lists["items"] >= 0])) / artifact.n_items
    assert f"{covered:.1%}</strong> of the catalogue" in page


def test_sampled_lists_are_the_scorers_without_what_a_user_bought(version):
    _, artifact = version
    lists = report.sample_lists(artifact, sample=5, seed=1)
    for row, user in enumerate(lists["users"]):
        scores = artifact.scorer().score(artifact.raw_interactions()[[user]], artifact.user_factors[[user]])[
            0
        ]
        scores[artifact.purchases[user].indices] = -np.inf
        assert lists["items"][row].tolist() == np.lexsort((np.arange(50), -scores))[:10].tolist()


def test_sampled_lists_scored_in_blocks_equal_one_block(version, monkeypatch):
    # The sample is ranked a block of users at a time (memory bounded by the catalogue's width);
    # a block of 3 users on the 50-item test catalogue must give what one block gives.
    _, artifact = version
    whole = report.sample_lists(artifact, sample=20, seed=3)
    monkeypatch.setattr(report, "_BLOCK_FLOATS", 3 * artifact.n_items)
    blocks = report.sample_lists(artifact, sample=20, seed=3)
    assert len(whole["users"]) == 20
    assert (blocks["users"] == whole["users"]).all() and (blocks["items"] == whole["items"]).all()
    np.testing.assert_array_equal(blocks["scores"], whole["scores"])


def test_documents_leave_the_version_intact(version):
    path, artifact = version
    report.write_report(path, artifact)
    write_document(path, "segments.npz", b"x")
    verify_checksums(path)
    assert "report.html" not in read_artifact(path).manifest["files"]
    assert read_document(path, "report.html").startswith(b"<!doctype html>")
    with pytest.raises(ArtifactError):
        write_document(path, "../escape.html", b"x")
    with pytest.raises(ArtifactError):
        write_document(path.parent, "report.html", b"x")  # not a version folder


def test_a_failing_report_only_warns(version, monkeypatch, caplog):
    path, artifact = version

    def broken(*args, **kwargs):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(report, "render_report", broken)
    assert report.write_report(path, artifact) is None
    assert "no plotting today" in caplog.text and not (path / "report.html").exists()


def test_item_counts_count_buyers_units_and_users(version):
    path, artifact = version
    counts = read_item_counts(path)
    item = int(artifact.purchases.indices[0])
    column = artifact.purchases[:, item].toarray().ravel()
    assert counts["buyers"][item] == np.count_nonzero(column)
    assert counts["units"][item] == round(column.sum())
    assert counts["users"][item] == artifact.interactions[:, item].nnz


def test_segments_document_follows_the_versions_user_order():
    events = EventTable.from_records(
        [
            {"user_id": "b", "item_id": "i1", "event": "purchase", "timestamp": 1_000},
            {"user_id": "a", "item_id": "i2", "event": "view", "timestamp": 1_000},
            {"user_id": "c", "item_id": "i1", "event": "purchase", "timestamp": 10},
        ]
    )
    table = compute_segments(events, as_of=1_000 + 100 * 86_400)
    data = segments_document(table, ["c", "a", "zz"])
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        names = z["names"].tolist()
        got = [names[c] if c >= 0 else None for c in z["codes"].tolist()]
    assert names == list(SEGMENTS)
    expected = dict(zip(table.user_ids.tolist(), (SEGMENTS[s] for s in table.segment), strict=True))
    assert got == [expected["c"], expected["a"], None]
    assert expected["a"] == "new" and expected["c"] == "dormant"
