"""The locks by role: the service installs no training or test tool; every pin has hashes and
matches pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_AND_TEST_TOOLS = {
    "implicit", "threadpoolctl", "tqdm", "pytest", "pytest-timeout", "ruff", "mypy", "import-linter",
    "schemathesis", "locust", "matplotlib", "pip-tools", "pyspark", "py4j", "pandas",
}  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(role: str) -> dict[str, str]:
    """name -> version of every requirement in requirements/<role>.lock; each must carry hashes."""
    text = (ROOT / "requirements" / f"{role}.lock").read_text()
    out = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.splitlines()[0]
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\]+)", first)
        if not m:
            continue
        assert "--hash=sha256:" in block, f"{role}.lock: {first} has no hash"
        out[_norm(m.group(1))] = m.group(2)
    return out


def direct(extra: str | None) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {_norm(s.split("==")[0]): s.split("==")[1] for s in specs}


def test_the_service_lock_holds_no_training_or_test_tool():
    assert not TRAINING_AND_TEST_TOOLS & set(pins("service"))


@pytest.mark.parametrize(
    "role, extras",
    [
        ("service", [None]),
        ("train", [None, "train"]),
        ("spark", [None, "train", "spark"]),
        ("dev", [None, "train", "spark", "dev"]),
    ],
)
def test_each_lock_pins_its_roles_direct_needs_at_the_declared_version(role, extras):
    locked = pins(role)
    for extra in extras:
        for name, version in direct(extra).items():
            assert locked.get(name) == version, f"{role}.lock: {name} {locked.get(name)} != {version}"


def test_unused_direct_pins_are_gone():
    declared = set(direct(None)) | set(direct("train")) | set(direct("dev"))
    assert "tqdm" not in declared  # progress is recsvc.core.progress
    assert "psutil" not in set(direct(None))  # only the test harness uses it (dev)
