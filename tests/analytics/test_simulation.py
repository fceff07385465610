"""An A/B simulation: a synthetic population with a known conversion lift (or none).

See :func:`tests.shops.simulate`. Seeds are fixed, so these tests are
deterministic; the bounds are chosen so that a correct report passes with a wide margin and a
broken one (no correction, wrong standard error, credit leaking from noise) fails.
"""

from __future__ import annotations

from recsvc.analytics.attribution import build_report
from tests.shops import simulate


def test_true_lift_is_found_inside_the_interval_and_declared():
    rates = {"A": 0.05, "B": 0.07}
    covered = 0
    for seed in range(10):
        report = build_report(simulate(seed, rates, 20_000), "sim", variants=["A", "B"])
        (comparison,) = report.results["last_click"].comparisons
        test = comparison.conversion
        covered += test.ci_low <= 0.02 <= test.ci_high
        # Power is ~99.9 % at this size: every seed must declare B.
        assert report.winner == "B", (seed, test)
        assert comparison.verdict == "better"
        # Noise is never credited: revenue is exactly 20 per converter.
        rows = {m.variant: m for m in report.results["last_click"].variants}
        assert rows["B"].revenue == 20 * rows["B"].converters
        assert rows["A"].users + rows["B"].users == 20_000
    # A 95 % interval covers the true difference in ~9.5 of 10 runs.
    assert covered >= 8


def test_no_true_difference_rarely_declares_a_winner():
    rates = {"A": 0.05, "B": 0.05}
    winners = 0
    for seed in range(100, 120):
        report = build_report(simulate(seed, rates, 10_000), "sim", variants=["A", "B"])
        winners += report.winner is not None
    # Expected 1 of 20 at alpha 0.05; P(>= 4 of 20) is 1.6 % for a correct test, while a test that
    # ignores noise (e.g. "B has the higher rate wins") would declare about 20 of 20.
    assert winners <= 3, winners
