"""Experiment definitions: validation, files, deterministic and sticky assignment, rec ids (no Redis)."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsvc.analytics import experiments as ex
from recsvc.analytics import recids
from recsvc.analytics import registry as reg
from recsvc.core.ids import is_valid_id

REPO = Path(__file__).resolve().parents[2]


def two(second: dict, first_share: float = 50) -> dict:
    """``variants`` with A at ``first_share`` and B as given (the shape most cases vary)."""
    return {"variants": [{"name": "A", "share": first_share}, {"name": "B", **second}]}


def definition(**overrides):
    base = {
        "name": "new-model",
        "variants": [{"name": "A", "share": 50}, {"name": "B", "share": 50, "model_version": "v2"}],
    }
    base.update(overrides)
    return base


# --- validation ---------------------------------------------------------------------------------


def test_valid_definition_round_trips_through_its_canonical_form():
    e = ex.parse_experiment(definition(start="2024-01-01T00:00:00Z", end=1_706_745_600, description="d"))
    assert e.start == 1_704_067_200 and e.end == 1_706_745_600
    assert e.control == "A" and e.salt == "new-model"
    assert [v.buckets for v in e.variants] == [((0, 5000),), ((5000, 10000),)]
    assert e.variants[1].strategy == "personalized" and e.variants[1].model_version == "v2"
    again = ex.parse_experiment(json.loads(json.dumps(e.to_dict())))
    assert again.to_dict() == e.to_dict()


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"name": "has space"}, "name", "1-32 characters"),
        ({"name": "a.b"}, "name", "1-32 characters"),  # dots would make rec ids ambiguous
        ({"variants": [{"name": "A", "share": 100}]}, "variants", "2 to 10"),
        (two({"share": 50}, 60), "variants", "more than 100"),
        (two({"share": 0}, 0), "variants", "above 0"),
        (two({"name": "A", "share": 50}), "variants[1].name", "duplicate"),
        (two({"share": "50"}), "variants[1].share", "number"),
        (two({"share": -1}), "variants[1].share", "between"),
        (two({"share": 33.333}), "variants[1].share", "0.01"),
        (two({}), "variants[1].share", "required"),
        (two({"share": 50, "strategy": "x"}), "variants[1].strategy", "one of"),
        (two({"share": 50, "model_version": "../x"}), "variants[1].model_version", "version"),
        (two({"share": 50, "sahre": 1}), "variants[1].sahre", "unknown field"),
        ({"strat": "2024-01-01"}, "strat", "unknown field"),
        ({"start": "yesterday"}, "start", "ISO-8601"),
        ({"start": 1_704_067_200, "end": 1_704_067_200}, "end", "after start"),
        ({"control": "C"}, "control", "names no variant"),
        ({"description": "x" * 501}, "description", "at most 500"),
        ({"salt": ""}, None, None),  # empty salt falls back to the name: valid
    ],
)  # fmt: skip
def test_invalid_definitions_name_the_field(change, field, fragment):
    if field is None:
        assert ex.parse_experiment(definition(**change)).salt == "new-model"
        return
    with pytest.raises(ex.ExperimentError) as info:
        ex.parse_experiment(definition(**change))
    assert info.value.field == field
    assert fragment in info.value.message


def test_explicit_buckets_are_checked_and_used():
    e = ex.parse_experiment(
        definition(
            variants=[
                {"name": "A", "buckets": [[0, 100], [9000, 10000]]},
                {"name": "B", "buckets": [[100, 1200]]},
            ]
        )
    )
    assert e.variants[0].share == 11.0 and e.variants[1].share == 11.0
    assert e.owner[50] == 0 and e.owner[9500] == 0 and e.owner[150] == 1 and e.owner[5000] == -1
    with pytest.raises(ex.ExperimentError, match="overlap"):
        ex.parse_experiment(
            definition(variants=[{"name": "A", "buckets": [[0, 100]]}, {"name": "B", "buckets": [[50, 150]]}])
        )
    with pytest.raises(ex.ExperimentError, match="share says"):
        ex.parse_experiment(
            definition(
                variants=[
                    {"name": "A", "share": 2, "buckets": [[0, 100]]},
                    {"name": "B", "buckets": [[100, 200]]},
                ]
            )
        )
    with pytest.raises(ex.ExperimentError, match="every variant or for none"):
        ex.parse_experiment(
            definition(variants=[{"name": "A", "buckets": [[0, 100]]}, {"name": "B", "share": 1}])
        )


def test_name_in_path_must_match_body():
    assert ex.parse_experiment({"variants": definition()["variants"]}, name="x").name == "x"
    with pytest.raises(ex.ExperimentError) as info:
        ex.parse_experiment(definition(), name="other")
    assert info.value.field == "name"


# --- files --------------------------------------------------------------------------------------


def test_json_and_toml_files_load(tmp_path):
    j = tmp_path / "e.json"
    j.write_text(json.dumps({"experiments": [definition(), definition(name="second", salt="s2")]}))
    assert [e.name for e in ex.load_experiments_file(j)] == ["new-model", "second"]
    t = tmp_path / "e.toml"
    t.write_text(
        """
[[experiments]]
name = "bundles"
start = 2024-03-01T00:00:00Z
control = "off"

[[experiments.variants]]
name = "off"
share = 90
strategy = "personalized"

[[experiments.variants]]
name = "pop"
share = 10
strategy = "popular"
"""
    )
    (e,) = ex.load_experiments_file(t)
    assert e.start == 1_709_251_200 and e.control == "off"
    assert e.variants[1].strategy == "popular" and e.variants[1].buckets == ((9000, 10000),)


def test_file_errors_name_file_line_and_column(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"experiments": [\n  {"name": "x",,}\n]}')
    with pytest.raises(ex.ExperimentFileError) as info:
        ex.load_experiments_file(bad_json)
    assert (info.value.line, info.value.column) == (2, 16)
    assert str(info.value).startswith(f"{bad_json}:2:16: invalid JSON")

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[experiments]]\nname = "x"\nshare = \n')
    with pytest.raises(ex.ExperimentFileError) as info:
        ex.load_experiments_file(bad_toml)
    assert info.value.line == 3 and str(bad_toml) in str(info.value)

    semantic = tmp_path / "rule.json"
    semantic.write_text(
        json.dumps({"experiments": [definition(), definition(name="b", variants=[{"name": "A"}])]})
    )
    with pytest.raises(ex.ExperimentFileError, match=r"experiments\[1\]\.variants: must be a list of 2"):
        ex.load_experiments_file(semantic)

    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"experiments": [definition(), definition()]}))
    with pytest.raises(ex.ExperimentFileError, match="duplicate experiment"):
        ex.load_experiments_file(dup)
    with pytest.raises(ex.ExperimentFileError, match="not found"):
        ex.load_experiments_file(tmp_path / "missing.json")
    other = tmp_path / "e.yaml"
    other.write_text("experiments: []")
    with pytest.raises(ex.ExperimentFileError, match=".json or .toml"):
        ex.load_experiments_file(other)


# --- assignment ---------------------------------------------------------------------------------


def test_bucket_is_blake2b_of_salt_and_user():
    import hashlib

    expected = int.from_bytes(hashlib.blake2b(b"new-model\x1fu42", digest_size=8).digest(), "big") % 10_000
    assert ex.bucket_of("new-model", "u42") == expected


def test_assignment_is_stable_across_processes():
    users = [f"user{i}" for i in range(200)]
    here = [ex.bucket_of("exp", u) for u in users]
    code = (
        "import json; from recsvc.analytics.experiments import bucket_of; "
        "print(json.dumps([bucket_of('exp', f'user{i}') for i in range(200)]))"
    )
    # A different PYTHONHASHSEED changes Python's hash(); it must not change buckets.
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert json.loads(out.stdout) == here


def test_shares_are_respected_and_experiments_are_independent():
    e = ex.parse_experiment(definition(variants=[{"name": "A", "share": 20}, {"name": "B", "share": 30}]))
    users = [f"u{i}" for i in range(20_000)]
    names = [getattr(e.variant_for(u), "name", None) for u in users]
    counts = {k: names.count(k) for k in ("A", "B", None)}
    assert abs(counts["A"] / 20_000 - 0.2) < 0.015
    assert abs(counts["B"] / 20_000 - 0.3) < 0.015
    assert abs(counts[None] / 20_000 - 0.5) < 0.015  # the rest is not in the experiment
    other = ex.parse_experiment(definition(name="other"))
    both = np.array([[ex.bucket_of("new-model", u) < 5000, ex.bucket_of("other", u) < 5000] for u in users])
    # independent salts: being in A of one says nothing about the other (about 25 % in both)
    assert abs(both.all(axis=1).mean() - 0.25) < 0.015
    assert other.variant_for("u1") is not None


def test_rebalance_moves_only_the_buckets_that_change_owner():
    previous = {"A": ((0, 3300),), "B": ((3300, 6600),), "C": ((6600, 10000),)}
    new = ex.rebalance(previous, {"A": 5000, "B": 2500, "C": 2500})

    def owners(layout):
        owner = np.full(10_000, "", dtype=object)
        for name, ranges in layout.items():
            for s, e in ranges:
                owner[s:e] = name
        return owner

    before, after = owners(previous), owners(new)
    assert {k: sum(e - s for s, e in r) for k, r in new.items()} == {"A": 5000, "B": 2500, "C": 2500}
    # The minimum possible: A must gain 1700 buckets; nothing else may move.
    assert int((before != after).sum()) == 1700
    for name, old_count in (("A", 3300), ("B", 3300), ("C", 3400)):
        kept = int(((before == name) & (after == name)).sum())
        assert kept == min(old_count, {"A": 5000, "B": 2500, "C": 2500}[name])


def test_rebalance_handles_removed_added_and_unallocated_variants():
    new = ex.rebalance({"A": ((0, 5000),), "B": ((5000, 10000),)}, {"A": 4000, "C": 1000})
    assert new == {"A": ((0, 4000),), "C": ((4000, 5000),)}
    with pytest.raises(ValueError, match="at most"):
        ex.rebalance({}, {"A": 6000, "B": 5000})


def test_updating_shares_keeps_users_whose_bucket_did_not_move():
    users = [f"u{i}" for i in range(5000)]
    v1 = ex.parse_experiment(
        definition(
            variants=[{"name": "A", "share": 34}, {"name": "B", "share": 33}, {"name": "C", "share": 33}]
        )
    )
    v2 = ex.parse_experiment(
        definition(
            variants=[{"name": "A", "share": 50}, {"name": "B", "share": 25}, {"name": "C", "share": 25}]
        ),
        previous=v1,
    )
    moved = 0
    for u in users:
        before, after = v1.variant_for(u).name, v2.variant_for(u).name
        if before != after:
            moved += 1
            assert after == "A"  # only A grew; B and C only lost users
    assert abs(moved / 5000 - 0.16) < 0.03
    # A new salt reshuffles everyone (the way to restart an experiment from scratch).
    shares_only = [{"name": v.name, "share": v.share} for v in v2.variants]
    v3 = ex.parse_experiment(definition(salt="rerun", variants=shares_only), previous=v2)
    assert v3.variants[0].buckets == ((0, 5000),)


def test_status_and_activity_window():
    e = ex.parse_experiment(definition(start=1_704_067_200, end=1_704_153_600))
    assert e.status(1_704_067_199) == "scheduled" and not e.is_active(1_704_067_199)
    assert e.status(1_704_067_200) == "active" and e.is_active(1_704_100_000)
    assert e.status(1_704_153_600) == "ended"


# --- rec ids ------------------------------------------------------------------------------------


def test_rec_ids_are_valid_unique_and_decodable():
    ids = {recids.new_rec_id("new-model", "B", 1_704_067_200) for _ in range(10_000)}
    assert len(ids) == 10_000
    sample = next(iter(ids))
    assert is_valid_id(sample) and sample.startswith("new-model.B.") and len(sample) <= 89
    info = recids.parse_rec_id(sample)
    assert (info.experiment, info.variant, info.served_at) == ("new-model", "B", 1_704_067_200)
    plain = recids.new_rec_id(now=1_704_067_200)
    assert "." not in plain and recids.parse_rec_id(plain) == recids.RecIdInfo(None, None, 1_704_067_200)
    assert recids.parse_rec_id("storefront-123") is None
    assert recids.parse_token(sample) == sample.rsplit(".", 1)[1]
    # The second's digits are cached: a new second must give new digits.
    assert recids.parse_rec_id(recids.new_rec_id(now=1_704_067_201)).served_at == 1_704_067_201
    assert recids.parse_rec_id(recids.new_rec_id(now=1_704_067_200)).served_at == 1_704_067_200


def test_rec_id_random_part_is_base32_of_the_random_bytes():
    rng = random.Random(5)
    for raw in [bytes(10), b"\xff" * 10, *(rng.randbytes(10) for _ in range(1000))]:
        assert recids._b32_80(raw) == base64.b32encode(raw).decode("ascii").lower()


def test_registry_assigns_first_active_experiment_that_claims_the_user(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(
        json.dumps(
            {
                "experiments": [
                    # earlier start: tried first, but only claims 10 % of users
                    definition(
                        name="small",
                        start=1_700_000_000,
                        variants=[{"name": "A", "share": 5}, {"name": "B", "share": 5}],
                    ),
                    definition(name="big", start=1_700_000_100),
                    definition(name="ended", start=1_600_000_000, end=1_600_000_100),
                ]
            }
        )
    )
    registry = reg.ExperimentRegistry(path, clock=lambda: 1_700_000_200)
    seen = {}
    for i in range(2000):
        a = registry.assign(f"u{i}")
        assert a.experiment in ("small", "big")
        seen[a.experiment] = seen.get(a.experiment, 0) + 1
        assert recids.parse_rec_id(a.rec_id).experiment == a.experiment
        assert a.fields() == {"experiment": a.experiment, "variant": a.variant, "rec_id": a.rec_id}
    assert 100 < seen["small"] < 300
    anonymous = registry.assign(None)
    assert anonymous.experiment is None and recids.parse_rec_id(anonymous.rec_id).experiment is None
    before = registry.assign("u1", now=1_699_000_000)
    assert before.experiment is None and before.strategy is None
    b = registry.assign("u1")
    assert b.model_version in (None, "v2") and b.strategy == "personalized"
    assert b.untagged().experiment is None and b.untagged().rec_id == recids.parse_token(b.rec_id)


def test_rebalance_moves_the_boundary_between_neighbours():
    grown = ex.rebalance({"A": ((0, 5000),), "B": ((5000, 10000),)}, {"A": 7000, "B": 3000})
    assert grown == {"A": ((0, 7000),), "B": ((7000, 10000),)}
    back = ex.rebalance(grown, {"A": 5000, "B": 5000})
    assert back == {"A": ((0, 5000),), "B": ((5000, 10000),)}
    # Ramp-up with a holdout: 10/10 of users -> 25/25; each variant grows next to its own range.
    ramp = ex.rebalance({"A": ((0, 1000),), "B": ((1000, 2000),)}, {"A": 2500, "B": 2500})
    assert sum(e - s for s, e in ramp["A"]) == 2500 and ramp["A"][0] == (0, 1000)
    assert ramp["B"][0][0] <= 1000 < ramp["B"][0][1]
