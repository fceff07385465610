"""CPUs from the container's quota and the affinity mask; the worker count that follows."""

from __future__ import annotations

import pytest

from recsvc.core.cpus import (
    available_cpus,
    cgroup_quota,
    default_workers,
    quota_from_cfs,
    quota_from_cpu_max,
)


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("max 100000", None),
        ("150000 100000", 1.5),
        ("200000 100000\n", 2.0),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_cgroup_v2_cpu_max(text, cpus):
    assert quota_from_cpu_max(text) == cpus


def test_cgroup_v1_cfs():
    assert quota_from_cfs("-1", "100000") is None
    assert quota_from_cfs("50000\n", "100000\n") == 0.5


def test_quota_is_read_from_a_cgroup_tree(tmp_path):
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert cgroup_quota(tmp_path) == 3.0
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_quota(v1) == 2.5
    assert cgroup_quota(tmp_path / "nothing-here") is None


def test_the_quota_wins_over_the_cores_and_rounds_up():
    assert available_cpus(quota=1.5, affinity=96) == 2
    assert available_cpus(quota=None, affinity=96) == 96
    assert available_cpus(quota=64, affinity=4) == 4
    assert available_cpus(quota=0.1, affinity=8) == 1
    assert available_cpus() >= 1  # this machine, whatever it is


def test_workers_are_two_per_cpu_capped_and_never_fail_on_big_hosts():
    assert default_workers(1, 16) == 2
    assert default_workers(3, 16) == 6
    assert default_workers(96, 16) == 16
    assert default_workers(96, 256) == 192
    assert default_workers(8, 1) == 1
