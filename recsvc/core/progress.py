"""Progress of long jobs: a bar on a terminal, a log line every few seconds everywhere else.

One helper for every long job (train, tune, evaluate, export, retrain, publish, dump, recommend)::

    with Progress("publish 20261202T1200", total=n_users, unit="users") as progress:
        for chunk in chunks:
            ...
            progress.update(len(chunk))

The mode is chosen once per process with :func:`configure` (the command line does it from
``--progress/--no-progress``): ``auto`` (the default) draws a bar when stderr is a terminal and
otherwise logs a line (logger ``recsvc.progress``) every ``interval_s`` seconds with the stage,
done, total, rate and time left -- also while nothing advances, so a long step never looks like a
hang -- and one final line; ``bar`` always draws; ``log`` always logs; ``off`` shows nothing.
:meth:`Progress.step` names the current sub-step of a job counted in steps (train: load,
evaluate, fit...).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from recsvc.core.logs import log_fields

log = logging.getLogger("recsvc.progress")

MODES = ("auto", "bar", "log", "off")
_BAR_REDRAW_S = 0.2
_BAR_WIDTH = 24


@dataclass
class _Settings:
    mode: str = "auto"
    interval_s: float = 5.0


_settings = _Settings()


def configure(mode: str | None = None, interval_s: float | None = None) -> None:
    """Set this process's progress mode (one of :data:`MODES`) and log interval (seconds)."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
        _settings.mode = mode
    if interval_s is not None:
        if not interval_s > 0:
            raise ValueError(f"progress interval must be positive, not {interval_s!r}")
        _settings.interval_s = float(interval_s)


def mode_for(flag: bool | None) -> str:
    """The mode of a ``--progress/--no-progress`` option: None (not given) is ``auto``."""
    return "auto" if flag is None else ("bar" if flag else "off")


def _fmt_count(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:,.1f}"


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Progress of one stage (see the module docstring).

    Parameters
    ----------
    stage : str
        What runs, e.g. ``"publish <version>"``, ``"fit"``, ``"export high_value"``.
    total : int, optional
        Units to do (None: unknown; the rate is still shown).
    unit : str
        What is counted (``users``, ``events``, ``iterations``...).
    stream : file, optional
        Where a bar is drawn (default stderr).
    enabled : bool
        False: show nothing whatever the mode (a caller's ``progress=False``).
    """

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        unit: str = "items",
        stream: TextIO | None = None,
        enabled: bool = True,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.stream = stream if stream is not None else sys.stderr
        mode = _settings.mode if enabled else "off"
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "log"
        self.mode = mode
        self.interval_s = _settings.interval_s
        self.done = 0
        self.current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._drawn = 0.0

    # -- use ---------------------------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self.mode in ("bar", "log"):
            self._thread = threading.Thread(target=self._tick, name=f"progress-{self.stage}", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        with self._lock:
            self.done += n
        if self.mode == "bar" and time.monotonic() - self._drawn >= _BAR_REDRAW_S:
            self._draw()

    def step(self, name: str, n: int = 1) -> None:
        """Start sub-step ``name``, counting ``n`` units for the step before it."""
        with self._lock:
            if self.current is not None:
                self.done += n
            self.current = name
        if self.mode == "bar":
            self._draw()

    def close(self, failed: bool = False) -> None:
        """Stop the periodic lines; draw or log the final state once."""
        if self.mode not in ("bar", "log"):
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.current is not None and not failed:
                self.done += 1  # the last step finished
                self.current = None
        if self.mode == "bar":
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._log(final=True, failed=failed)
        self.mode = "closed"

    # -- what is shown ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``stage, step, done, total, unit, rate, elapsed_s, eta_s`` now."""
        with self._lock:
            done, current = self.done, self.current
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done / elapsed
        left = None if self.total is None else self.total - done
        eta = left / rate if left is not None and left > 0 and rate > 0 else None
        return {
            "stage": self.stage,
            "step": current,
            "done": done,
            "total": self.total,
            "unit": self.unit,
            "rate": round(rate, 3),
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def line(self, final: bool = False) -> str:
        """One human line: ``stage [step]: done/total unit (pct), rate unit/s, elapsed, eta``."""
        s = self.snapshot()
        head = s["stage"] + (f" [{s['step']}]" if s["step"] else "")
        count = _fmt_count(s["done"])
        if s["total"] is not None:
            pct = 100.0 * s["done"] / s["total"] if s["total"] else 100.0
            count = f"{count}/{_fmt_count(s['total'])} {self.unit} ({pct:.0f}%)"
        else:
            count = f"{count} {self.unit}"
        text = f"{head}: {count}, {_fmt_count(s['rate'])} {self.unit}/s, {_fmt_seconds(s['elapsed_s'])}"
        if final:
            return f"{text} (done)"
        if s["eta_s"] is not None:
            text += f", {_fmt_seconds(s['eta_s'])} left"
        return text

    def _tick(self) -> None:
        wait = _BAR_REDRAW_S * 2.5 if self.mode == "bar" else self.interval_s
        while not self._stop.wait(wait):
            if self.mode == "bar":
                self._draw()
            else:
                self._log()

    def _log(self, final: bool = False, failed: bool = False) -> None:
        text = self.line(final=final and not failed)
        if failed:
            text += " (failed)"
        log.info(text, extra=log_fields(**self.snapshot(), final=final))

    def _draw(self) -> None:
        with self._lock:
            self._drawn = time.monotonic()
        s = self.snapshot()
        bar = ""
        if s["total"]:
            filled = int(_BAR_WIDTH * min(1.0, s["done"] / s["total"]))
            bar = "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "] "
        self.stream.write("\r\x1b[2K" + bar + self.line())
        self.stream.flush()
