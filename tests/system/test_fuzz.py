"""Schemathesis against the served /openapi.json: >= 1,000 cases, 0 5xx, 0 mismatches.

bench/fuzz.py runs ``schemathesis run`` (all checks, positive and negative data; coverage, fuzzing
and stateful phases; fixed seed, deterministic generation) against a real 2-worker server and lists
every distinct mismatch; the summary lands in bench/results/fuzz-ci/summary.json and the test output.
"""

from __future__ import annotations

import json
from pathlib import Path

import fuzz
import pytest

from tests.system.conftest import KEYS, Target

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

OUT = Path(__file__).resolve().parents[2] / "bench" / "results" / "fuzz-ci"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    t = Target(tmp_path_factory.mktemp("fuzz"), workers=2)
    try:
        res = fuzz.run_fuzz(t.base, KEYS[0], OUT, max_examples=30, seed=16)
    finally:
        t.stop()
    print("\n" + fuzz.render(res))
    (OUT / "summary.json").write_text(json.dumps(res.to_json(), indent=2))
    return res


def test_at_least_1000_generated_cases_reached_every_operation(result):
    assert result.generated >= 1000, result.generated
    assert result.requests >= 1000, result.requests
    assert result.operations_tested >= 17, result.operations_tested


def test_no_5xx(result):
    assert result.n_5xx == 0, [(m.operation, m.status, m.request) for m in result.server_errors[:10]]


def test_405_answers_carry_allow(result):
    found = [m for m in result.mismatches if m.check in ("unsupported_method", "allow_header_conformance")]
    assert not found, [f"{m.method} {m.path}" for m in found]


def test_no_spec_behaviour_mismatch(result):
    assert not result.mismatches, fuzz.render(result)
