"""How many CPUs this process may really use: the container's quota, then the CPU affinity mask.

``os.cpu_count()`` counts the host's cores: a container limited to 2 CPUs on a 96-core host would
start 192 gunicorn workers (and as many ALS threads). The quota comes from cgroup v2
(``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; the affinity mask
from ``os.sched_getaffinity``; the smaller wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_from_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"max 100000"`` or ``"150000 100000"``)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_from_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: no limit)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when there is none (or none readable)."""
    for path in _own_cgroup_dirs(root):
        try:
            found = quota_from_cpu_max((path / "cpu.max").read_text())
        except OSError:
            found = None
        if found is not None:
            return found
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            found = quota_from_cfs(
                (v1 / "cpu.cfs_quota_us").read_text(), (v1 / "cpu.cfs_period_us").read_text()
            )
        except OSError:
            continue
        if found is not None:
            return found
    return None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """The cgroup v2 folder of this process (from /proc/self/cgroup) and the root folder."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, relative = rest.partition(":")
            if hierarchy == "0" and controllers == "" and relative not in ("", "/"):
                dirs.append(root / relative.lstrip("/"))
    except OSError:
        pass
    dirs.append(root)
    return dirs


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the mask is not available)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus(quota: float | None = None, affinity: int | None = None) -> int:
    """CPUs this process may use: ``min(ceil(cgroup quota), affinity mask)``, at least 1.

    ``quota`` and ``affinity`` are read from the system when not given (tests pass them).
    """
    quota = cgroup_quota() if quota is None else quota
    affinity = affinity_cpus() if affinity is None else affinity
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cpus)


def default_workers(cpus: int, cap: int) -> int:
    """gunicorn workers for ``cpus`` CPUs: 2 per CPU, at least 2, at most ``cap`` (>= 1)."""
    return min(max(2, 2 * cpus), max(1, cap))
