"""Prometheus metrics of the service, correct across gunicorn workers.

What is counted (every name starts with ``recsvc_``; docs/operations.md#metrics has the table):
requests per endpoint, method and status with their latency (a histogram; its ``_count`` is the
request count), answers per endpoint, ``source`` and fallback ``reason``, fold-ins, Redis round
trips per command with their latency and errors, events accepted and event requests refused,
rate-limit refusals, answers served per experiment variant; and, computed when scraped, whether
Redis answers and the live model's version and age.

**Several workers.** Each gunicorn worker is a process with its own counters. With
``PROMETHEUS_MULTIPROC_DIR`` set (``recsvc serve`` sets one per instance and empties it at start),
prometheus-client keeps each worker's values in a memory-mapped file there and a scrape, answered
by any worker, sums the files of all of them. When a worker exits, the master folds its counts
into one archive file and deletes its file (:func:`fold_dead_worker`), so restarts do not pile
files up and no count is lost; scrapes and folds exclude each other with a file lock.

**Cheap on the request path.** A request only adds to plain per-process tallies
(:meth:`Metrics.count`, :meth:`Metrics.observe`: a dict update under an uncontended lock); a
background thread writes them to the metric files every ``flush_s`` seconds
(``RECSVC_METRICS_FLUSH_S``, 1), as does a scrape (for its own worker) and a worker's normal exit.
Writing each value through prometheus-client on the request path cost ~25 µs of a ~400 µs request
(bench/observability.py). So a scrape sees the other workers' counts at most ``flush_s``
old, and a worker killed with SIGKILL loses at most its last ``flush_s`` of counts.

Without the variable (tests, ``--dev``) the values are this process's only.

What a request counts is decided by :mod:`recsvc.web.observe` (the request hook).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Request latency buckets, seconds: a storefront widget is slow beyond 0.1 s.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Redis round-trip buckets, seconds: the request path gives up after the 0.1 s socket timeout.
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_LOCK_FILE = ".lock"
# Counters, histograms and summaries add up across processes: their files can be folded.
_ADDITIVE = ("counter", "histogram", "summary")
_ARCHIVE = "archive"


class Metrics:
    """The metric objects of one app (one per worker process).

    Parameters
    ----------
    metrics_dir : Path or None
        prometheus-client's multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``); None: this process only.
    flush_s : float
        How often the tallies of this process are written to the metric files (multiprocess only;
        otherwise at each scrape).
    """

    def __init__(self, metrics_dir: Path | None, flush_s: float = 1.0):
        self.metrics_dir = metrics_dir
        self._lock = threading.Lock()
        self._counts: dict[tuple[Any, tuple[str, ...]], float] = {}
        self._hists: dict[tuple[Any, tuple[str, ...]], list[float]] = {}
        if metrics_dir is not None:
            metrics_dir.mkdir(parents=True, exist_ok=True)
            # prometheus-client chooses where values live when it is first imported; `recsvc serve`
            # imports it before it chooses the folder, so the choice is made again here, per worker.
            if not getattr(values.ValueClass, "_multiprocess", False):
                values.ValueClass = values.MultiProcessValue()
        # Multiprocess values are collected from the files, never from a registry of this process.
        registry = None if metrics_dir is not None else CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.requests = Histogram(
            "recsvc_http_request_duration_seconds",
            "HTTP requests by route, method and status, and their latency (_count: requests).",
            ["endpoint", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.answers = Counter(
            "recsvc_answers",
            "Item answers by route, source and fallback reason (reason 'none': not a fallback).",
            ["endpoint", "source", "reason"],
            registry=registry,
        )
        self.foldins = Counter(
            "recsvc_foldins",
            "Answers computed by folding a visitor's new events into the model (source realtime).",
            ["endpoint"],
            registry=registry,
        )
        self.redis_seconds = Histogram(
            "recsvc_redis_command_duration_seconds",
            "Redis round trips of the request path by command (PIPELINE/MULTI: one batch).",
            ["command"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "recsvc_redis_errors",
            "Redis round trips of the request path that failed, by command and error.",
            ["command", "error"],
            registry=registry,
        )
        self.events_accepted = Counter(
            "recsvc_events_accepted", "Events stored by POST /v1/events.", registry=registry
        )
        self.events_rejected = Counter(
            "recsvc_event_requests_rejected",
            "POST /v1/events requests that stored nothing, by status (400 invalid, 429, 503...).",
            ["status"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "recsvc_rate_limited", "Requests refused with 429 by a rate limit, by route.", ["endpoint"],
            registry=registry,
        )  # fmt: skip
        self.assignments = Counter(
            "recsvc_experiment_answers",
            "Answers served under an A/B experiment, by experiment and variant.",
            ["experiment", "variant"],
            registry=registry,
        )
        if metrics_dir is not None:
            threading.Thread(
                target=self._flush_every, args=(flush_s,), name="metrics-flush", daemon=True
            ).start()

    # -- the request path: tallies only ------------------------------------------------------------

    def count(self, metric: Counter, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        """Add ``amount`` to ``metric{labels}`` (written to the files by :meth:`flush`)."""
        key = (metric, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + amount

    def observe(
        self, metric: Histogram, bounds: tuple[float, ...], labels: tuple[str, ...], value: float
    ) -> None:
        """Observe ``value`` in histogram ``metric{labels}`` whose bucket bounds are ``bounds``."""
        key = (metric, labels)
        slot = bisect.bisect_left(bounds, value)  # bucket i counts values <= bounds[i]; the last: +Inf
        with self._lock:
            tally = self._hists.get(key)
            if tally is None:
                tally = self._hists[key] = [0.0] * (len(bounds) + 2)  # buckets, +Inf, then the sum
            tally[slot] += 1
            tally[-1] += value

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.observe(self.requests, REQUEST_BUCKETS, (endpoint, method, str(status)), seconds)

    def observe_answer(self, endpoint: str, source: str | None, reason: str | None) -> None:
        self.count(self.answers, (endpoint, source or "none", reason or "none"))
        if source == "realtime":
            self.count(self.foldins, (endpoint,))

    def observe_redis(self, command: str, seconds: float, error: BaseException | None) -> None:
        """Called by the request-path Redis client after every round trip."""
        self.observe(self.redis_seconds, REDIS_BUCKETS, (command,), seconds)
        if error is not None:
            self.count(self.redis_errors, (command, type(error).__name__))

    # -- to the metric objects (and their files) -------------------------------------------------

    def flush(self) -> None:
        """Write this process's tallies to the metric objects (the files in multiprocess mode)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            hists, self._hists = self._hists, {}
        for (metric, labels), amount in counts.items():
            (metric.labels(*labels) if labels else metric).inc(amount)
        for (metric, labels), tally in hists.items():
            child = metric.labels(*labels) if labels else metric
            # prometheus-client has no public "add n observations to bucket i": its bucket values
            # are what `observe` increments (non-cumulative per bucket, summed when collected).
            for slot, n in enumerate(tally[:-1]):
                if n:
                    child._buckets[slot].inc(n)
            child._sum.inc(tally[-1])

    def _flush_every(self, flush_s: float) -> None:
        while True:
            time.sleep(flush_s)
            self.flush()

    def render(self, extra: Collector | None = None) -> bytes:
        """The Prometheus text of every worker (or of this process), plus ``extra``'s families."""
        self.flush()
        scrape = CollectorRegistry(auto_describe=False)
        if extra is not None:
            scrape.register(extra)
        if self.metrics_dir is None:
            assert self.registry is not None
            return generate_latest(self.registry) + generate_latest(scrape)
        multiprocess.MultiProcessCollector(scrape, path=str(self.metrics_dir))
        with _dir_lock(self.metrics_dir, fcntl.LOCK_SH):
            return generate_latest(scrape)


class LiveState(Collector):
    """Gauges computed when scraped: Redis reachable, and the live model's version and age."""

    def __init__(self, redis_up: Any, live_model: Any):
        self._redis_up, self._live_model = redis_up, live_model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("recsvc_redis_up", "1 when Redis answered a PING at this scrape.")
        up.add_metric([], 1.0 if self._redis_up() else 0.0)
        yield up
        model = self._live_model()
        info = GaugeMetricFamily(
            "recsvc_model_info", "The model version answers come from (1), and its origin.",
            labels=["version", "origin", "degraded"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            "recsvc_model_age_seconds", "Seconds since the served model version was trained."
        )
        if model is not None:
            version, origin, degraded, created = model
            info.add_metric([version, origin, "true" if degraded else "false"], 1.0)
            if created is not None:
                age.add_metric([], max(0.0, time.time() - created))
        yield info
        yield age


# ------------------------------------------------------------------------------------------------
# The multiprocess folder (used by `recsvc serve`'s gunicorn master)
# ------------------------------------------------------------------------------------------------


def prepare_dir(path: Path) -> None:
    """An empty metrics folder for a new server instance.

    Files left by an earlier run would be counted again (and a reused pid would add to them).
    """
    path.mkdir(parents=True, exist_ok=True)
    with _dir_lock(path, fcntl.LOCK_EX):
        for f in path.glob("*.db"):
            f.unlink()


def fold_dead_worker(path: Path, pid: int) -> int:
    """Fold the files of exited worker ``pid`` into the archive files; return the files removed.

    Counters and histograms keep every request the worker counted; its gauge files are dropped
    (prometheus-client's ``mark_process_dead``).
    """
    removed = 0
    with _dir_lock(path, fcntl.LOCK_EX):
        multiprocess.mark_process_dead(pid, str(path))
        for kind in _ADDITIVE:
            dead = path / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            archive = MmapedDict(str(path / f"{kind}_{_ARCHIVE}.db"))
            try:
                for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(dead)):
                    current, _ = archive.read_value(key)
                    archive.write_value(key, current + value, 0.0)
            finally:
                archive.close()
            dead.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def _dir_lock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
