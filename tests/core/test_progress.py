"""Progress of long jobs: periodic log lines with stage, done, total and rate; a bar on a terminal."""

from __future__ import annotations

import io
import logging
import time

import pytest

from recsvc.core import progress
from recsvc.core.progress import Progress


@pytest.fixture
def mode():
    def set_mode(name: str, interval_s: float = 0.05) -> None:
        progress.configure(name, interval_s)

    yield set_mode
    progress.configure("auto", 5.0)


def _lines(caplog):
    return [r for r in caplog.records if r.name == "recsvc.progress"]


def test_log_mode_writes_a_line_every_interval_even_while_nothing_advances(mode, caplog):
    mode("log", 0.05)
    with caplog.at_level(logging.INFO), Progress("publish v1", total=100, unit="users") as p:
        p.update(40)
        time.sleep(0.3)  # a long chunk: lines keep coming
        p.update(60)
    lines = _lines(caplog)
    assert len(lines) >= 3
    periodic = lines[0].fields
    assert periodic["stage"] == "publish v1" and periodic["done"] == 40 and periodic["total"] == 100
    assert periodic["unit"] == "users" and periodic["rate"] > 0 and periodic["eta_s"] is not None
    final = lines[-1]
    assert final.fields["final"] and final.fields["done"] == 100 and "(done)" in final.getMessage()
    assert "publish v1: 40/100 users (40%)" in lines[0].getMessage()


def test_steps_name_the_current_stage_and_count_when_the_next_starts(mode, caplog):
    mode("log", 0.05)
    with caplog.at_level(logging.INFO), Progress("train", total=3, unit="stages") as p:
        p.step("load")
        p.step("fit")
        time.sleep(0.15)
        assert p.snapshot()["done"] == 1 and p.snapshot()["step"] == "fit"
        p.step("write")
    lines = _lines(caplog)
    assert any(r.fields["step"] == "fit" and "train [fit]: 1/3" in r.getMessage() for r in lines)
    assert lines[-1].fields["done"] == 3


def test_a_failure_is_logged_as_such(mode, caplog):
    mode("log", 10)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError), Progress("export", total=10) as p:
        p.update(3)
        raise RuntimeError("disk full")
    assert "(failed)" in _lines(caplog)[-1].getMessage()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_draws_a_bar_on_a_terminal_and_logs_nothing(mode, caplog):
    mode("auto", 0.05)
    screen = _Tty()
    with caplog.at_level(logging.INFO), Progress("dump", total=4, unit="events", stream=screen) as p:
        for _ in range(4):
            p.update(1)
    assert "[########################] dump: 4/4 events (100%)" in screen.getvalue()
    assert screen.getvalue().endswith("\n") and not _lines(caplog)


def test_off_and_disabled_show_nothing(mode, caplog):
    mode("off")
    screen = _Tty()
    with caplog.at_level(logging.INFO), Progress("x", total=2, stream=screen) as p:
        p.update(2)
    mode("log", 0.01)
    with caplog.at_level(logging.INFO), Progress("y", total=2, enabled=False) as p:
        p.update(2)
    assert screen.getvalue() == "" and not _lines(caplog)
    with pytest.raises(ValueError):
        progress.configure("loud")
