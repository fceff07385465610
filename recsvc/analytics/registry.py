"""Experiments at serving time: stored definitions, per-user assignment, and the served log.

Definitions come from ``experiments.file`` (JSON or TOML, read-only at runtime) and from Redis
(written by the admin endpoint). :class:`ExperimentRegistry` merges both, caches them in process and
re-reads at most once per ``refresh_s``; :meth:`ExperimentRegistry.assign` gives a request its
variant and rec id. :class:`ServedLog` records what experiment answers showed, off the request path.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.analytics.experiments import (
    MAX_EXPERIMENTS,
    Experiment,
    ExperimentError,
    ExperimentFileError,
    load_experiments_file,
    parse_experiment,
)
from recsvc.analytics.recids import new_rec_id, parse_token
from recsvc.core.answers import DEGRADED
from recsvc.storage import keys

log = logging.getLogger(__name__)

#: Records kept (the newest); about 100-200 bytes each in Redis.
SERVED_MAXLEN = 1_000_000


def store_experiment(client: Any, experiment: Experiment) -> bool:
    """Save a definition in Redis; returns True when it is new.

    Raises
    ------
    ExperimentError
        When :data:`MAX_EXPERIMENTS` are stored already and this one is new.
    """
    payload = json.dumps(experiment.to_dict(), separators=(",", ":"))
    created = False

    def write(pipe: Any) -> None:
        nonlocal created
        created = not pipe.hexists(keys.EXPERIMENTS, experiment.name)
        if created and pipe.hlen(keys.EXPERIMENTS) >= MAX_EXPERIMENTS:
            raise ExperimentError(
                "name", f"{MAX_EXPERIMENTS} experiments are stored already; delete one first"
            )
        pipe.multi()
        pipe.hset(keys.EXPERIMENTS, experiment.name, payload)
        pipe.incr(keys.EXPERIMENTS_REV)

    client.transaction(write, keys.EXPERIMENTS)
    return created


def delete_stored_experiment(client: Any, name: str) -> bool:
    """Remove a stored definition; False when there was none. Events already logged stay attributable."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.EXPERIMENTS, name)
    pipe.incr(keys.EXPERIMENTS_REV)
    removed, _ = pipe.execute()
    return bool(removed)


def load_stored_experiments(client: Any) -> dict[str, Experiment]:
    """Every definition stored in Redis. A corrupt entry is skipped and logged, never fatal."""
    out: dict[str, Experiment] = {}
    for raw_name, raw_value in client.hgetall(keys.EXPERIMENTS).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        try:
            out[name] = parse_experiment(json.loads(raw_value))
        except (ValueError, TypeError) as e:
            log.error("stored experiment %r is invalid and is ignored: %s", name[:40], e)
    return out


@dataclass(frozen=True)
class Assignment:
    """What one request serves and how it is tagged.

    ``experiment``/``variant`` are None when the user is in no active experiment; then
    ``strategy`` and ``model_version`` are None too (serve as usual). ``rec_id`` is always set.
    """

    rec_id: str
    experiment: str | None = None
    variant: str | None = None
    strategy: str | None = None
    model_version: str | None = None

    def fields(self) -> dict[str, str | None]:
        """The three fields every recommendation and bundle answer carries."""
        return {"experiment": self.experiment, "variant": self.variant, "rec_id": self.rec_id}

    def untagged(self) -> Assignment:
        """The same request outside any experiment (used when a variant cannot be served as defined)."""
        return Assignment(rec_id=parse_token(self.rec_id))


class ExperimentRegistry:
    """Experiments from the file and from Redis, cached per process.

    Parameters
    ----------
    experiments_file : path or None
        Read at construction (errors raise :class:`ExperimentFileError` so a bad file stops the
        service at start-up) and re-read when its modification time changes (a bad edit is
        logged and the previous definitions stay).
    client : redis client or None
        Where admin-defined experiments live. Read at most once per ``refresh_s``; when Redis is
        unreachable the last definitions seen keep serving (and the next try waits ``retry_s``).
    refresh_s, retry_s : float
        Cache lifetime, and back-off after a Redis error.
    clock : callable
        Returns Unix seconds (tests pass a fake).
    """

    def __init__(
        self,
        experiments_file: str | os.PathLike | None = None,
        client: Any = None,
        *,
        refresh_s: float = 1.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.experiments_file = Path(experiments_file) if experiments_file else None
        self.client = client
        self.refresh_s, self.retry_s, self.clock = refresh_s, retry_s, clock
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._file: dict[str, Experiment] = {}
        self._stored: dict[str, Experiment] = {}
        self._stored_rev: bytes | None = None
        self._merged: tuple[Experiment, ...] = ()
        self._next_refresh = 0.0
        if self.experiments_file is not None:
            self._file = {e.name: e for e in load_experiments_file(self.experiments_file)}
            self._file_mtime = self._mtime()
        self._merge()

    # -- reading ---------------------------------------------------------------------------------

    def _mtime(self) -> float | None:
        try:
            return self.experiments_file.stat().st_mtime if self.experiments_file else None
        except OSError:
            return None

    def _merge(self) -> None:
        # A file definition wins over a stored one of the same name (the admin API refuses to
        # create such a clash; this only matters if the file gains a name later).
        merged = {**self._stored, **self._file}
        self._merged = tuple(sorted(merged.values(), key=lambda e: (e.start or 0, e.name)))

    def refresh(self, force: bool = False) -> None:
        """Re-read the file (if changed) and Redis (if its revision changed). Never raises."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is refreshing; serve what we have
        try:
            self._next_refresh = now + self.refresh_s
            if self.experiments_file is not None:
                mtime = self._mtime()
                if mtime != self._file_mtime:
                    try:
                        self._file = {e.name: e for e in load_experiments_file(self.experiments_file)}
                    except ExperimentFileError as e:
                        log.error(
                            "experiments file changed but is invalid; keeping the previous definitions: %s", e
                        )
                    self._file_mtime = mtime
            if self.client is not None:
                try:
                    rev = self.client.get(keys.EXPERIMENTS_REV)
                    if force or rev != self._stored_rev:
                        self._stored = load_stored_experiments(self.client)
                        self._stored_rev = rev
                except Exception as e:  # noqa: BLE001 - Redis down must not break serving
                    log.warning(
                        "cannot read experiments from Redis (%s); using the last definitions seen",
                        type(e).__name__,
                    )
                    self._next_refresh = now + self.retry_s
            self._merge()
        finally:
            self._lock.release()

    def all(self) -> tuple[Experiment, ...]:
        """Every known experiment (active or not), ordered by start then name."""
        self.refresh()
        return self._merged

    def get(self, name: str) -> Experiment | None:
        self.refresh()
        return next((e for e in self._merged if e.name == name), None)

    def source_of(self, name: str) -> str | None:
        """``"file"`` or ``"redis"`` (where the definition in use comes from), None when unknown."""
        if name in self._file:
            return "file"
        return "redis" if name in self._stored else None

    # -- assignment --------------------------------------------------------------------------------

    def assign(self, user_id: str | None, now: float | None = None, *, refresh: bool = True) -> Assignment:
        """Which experiment and variant serve ``user_id`` now, and a fresh rec id.

        Active experiments are tried in (start, name) order; the first whose variants own the
        user's bucket claims the user (so two overlapping experiments never both change one
        answer). Users in no experiment, and requests without a user, get an untagged rec id.
        ``user_id`` must already satisfy the id contract. ``refresh=False`` uses the definitions in
        memory without touching Redis (for when Redis is known to be down).
        """
        now = self.clock() if now is None else now
        if user_id is not None:
            if refresh:
                self.refresh()
            for experiment in self._merged:  # usually empty: then this is the whole cost
                if not experiment.is_active(now):
                    continue
                variant = experiment.variant_for(user_id)
                if variant is not None:
                    return Assignment(
                        rec_id=new_rec_id(experiment.name, variant.name, now),
                        experiment=experiment.name,
                        variant=variant.name,
                        strategy=variant.strategy,
                        model_version=variant.model_version,
                    )
        return Assignment(rec_id=new_rec_id(now=now))


class ServedLog:
    """Log experiment answers into a capped Redis list without slowing requests down.

    :meth:`record` appends a tuple to an in-process bounded queue (O(1), never raises); a daemon
    thread writes the queue every ``flush_interval_s`` with one ``RPUSH`` of compact records and
    an ``LTRIM`` that keeps the newest ``maxlen`` (one round trip, and little work while holding
    the GIL, so request threads are not held up). Each record is
    ``"<ts>\\t<rec_id>\\t<user_id>\\t<surface>\\t<item,item,...>"``; experiment and variant are in
    the rec id. When Redis is down or the queue is full, records are dropped and counted in
    :attr:`dropped` -- the rec ids in the storefront's events still carry experiment and variant,
    so attribution never depends on this log; it only adds exposure of users who sent no event.
    """

    def __init__(
        self,
        client: Any,
        *,
        key: str = keys.EXPERIMENTS_SERVED,
        maxlen: int = SERVED_MAXLEN,
        max_pending: int = 10_000,
        max_items: int = 50,
        flush_interval_s: float = 0.25,
        background: bool = True,
    ):
        self.client, self.key, self.maxlen = client, key, maxlen
        self.max_items, self.flush_interval_s, self.background = max_items, flush_interval_s, background
        self._pending: deque[tuple[int, str, str, str, Sequence[str]]] = deque(maxlen=max_pending)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._closed = False
        self._flush_lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    def record(
        self,
        assignment: Assignment,
        user_id: str,
        items: Sequence[str],
        surface: str,
        now: float | None = None,
    ) -> None:
        """Queue one served answer (experiment traffic only; others are not needed for reports)."""
        if assignment.experiment is None:
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1  # deque drops the oldest on append
        ts = int(time.time() if now is None else now)
        self._pending.append((ts, assignment.rec_id, user_id, surface, items))
        if self.background and self._pid != os.getpid():
            self._start()  # lazily, in the process that serves (gunicorn forks after import)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="recsvc-served-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a worker that exits cleanly writes what it still holds

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Stop the background thread and write what is pending (safe to call twice)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=2)
        self._thread, self._pid = None, None
        self.flush()

    def flush(self) -> int:
        """Write what is pending; returns how many records were written. Never raises."""
        with self._flush_lock:
            batch: list[str] = []
            while self._pending and len(batch) < 5000:
                ts, rec_id, user_id, surface, items = self._pending.popleft()
                batch.append(f"{ts}\t{rec_id}\t{user_id}\t{surface}\t{','.join(items[: self.max_items])}")
            if not batch:
                return 0
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.rpush(self.key, *batch)
                pipe.ltrim(self.key, -self.maxlen, -1)
                pipe.execute()
            except Exception as e:  # noqa: BLE001 - logging exposure must never break serving
                self.dropped += len(batch)
                log.warning("served log: dropped %d records (%s)", len(batch), type(e).__name__)
                return 0
            self.written += len(batch)
            return len(batch)

    @property
    def pending(self) -> int:
        return len(self._pending)


def read_served(
    client: Any, experiment: str, *, key: str = keys.EXPERIMENTS_SERVED, limit: int = SERVED_MAXLEN
) -> dict[str, np.ndarray]:
    """Served records of one experiment (the newest ``limit`` records are scanned).

    Returns
    -------
    dict with ``user_id``, ``rec_id`` (object arrays) and ``timestamp`` (int64)
    """
    users: list[str] = []
    recs: list[str] = []
    stamps: list[int] = []
    prefix = f"{experiment}."
    end = -1
    scanned = 0
    while scanned < limit:
        start = end - min(10_000, limit - scanned) + 1
        chunk = client.lrange(key, start, end)
        if not chunk:
            break
        for raw in chunk:
            parts = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).split("\t")
            if len(parts) == 5 and parts[1].startswith(prefix):
                try:
                    stamps.append(int(parts[0]))
                except ValueError:
                    continue
                recs.append(parts[1])
                users.append(parts[2])
        scanned += len(chunk)
        if len(chunk) < end - start + 1:
            break  # reached the oldest record
        end = start - 1
    return {
        "user_id": np.array(users, dtype=object),
        "rec_id": np.array(recs, dtype=object),
        "timestamp": np.array(stamps, dtype=np.int64),
    }


def served_as_defined(assignment: Assignment, body: Mapping[str, Any], *, strict: bool = True) -> bool:
    """Whether an answer is what the assignment's variant defines (else it must not count for it).

    Degraded answers (Redis down, nothing published) never are. With ``strict`` (surfaces where
    the recommender applies variants) neither are a model version other than the variant's, a
    non-popular answer for the ``popular`` strategy, nor a real-time answer for the
    ``personalized`` strategy. Surfaces that do not apply variants
    (bundles) are the same for every arm, so they stay tagged: unbiased, only diluted.
    """
    if assignment.experiment is None:
        return True
    if body.get("reason") in DEGRADED:
        return False
    if not strict:
        return True
    if assignment.model_version is not None and body.get("model_version") != assignment.model_version:
        return False
    source = body.get("source")
    if assignment.strategy == "popular" and source not in (None, "fallback"):
        return False
    return not (assignment.strategy == "personalized" and source == "realtime")
