"""Scheduled retraining: dump -> train -> evaluate -> gate -> publish -> prune, under a Redis lock.

``recsvc retrain --events PATH... --catalog PATH [--dump-stream] [--gate-tolerance 0.02] [--force]``

One command for cron, a systemd timer, Airflow or a Kubernetes CronJob. It prints one JSON line on
stdout (for the scheduler) and logs each step on stderr, and exits with a code from
:class:`ExitCode`:

* 0 -- a new version was published;
* 1 -- internal error (a bug, Redis unreachable...): the live model is untouched, unless the error
  came after publishing (in prune; ``live_after`` in the summary says so);
* 2 -- bad input (events/catalog file unusable, bad option);
* 3 -- the quality gate refused the new model; it stays on disk with the reason in its manifest
  (until retention prunes it like any other version);
* 4 -- another retrain holds the lock (or this run lost it before publishing, or a stream dump is
  running).

Crash safety: the new artifact is written to a temp folder and renamed (``recsvc.core.artifact``), and
the live pointer only moves inside ``publish`` after the whole version is in Redis; so a crash at
any step leaves the live model serving. ``RECSVC_RETRAIN_CRASH_AFTER=<step>`` makes the process
SIGKILL itself right after that step; the tests use it to prove the point.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsvc.core.artifact import ArtifactError, prune, read_manifest, update_manifest
from recsvc.core.config import Config
from recsvc.core.errors import ExitCode
from recsvc.core.eventfiles import BadInputError
from recsvc.core.progress import Progress
from recsvc.core.scoring import PLAIN_ALS
from recsvc.storage import keys, versions
from recsvc.storage.connection import connect_admin
from recsvc.storage.dump import DumpLocked, dump_events
from recsvc.storage.embedded import ensure_redis
from recsvc.storage.versions import current_version, publish
from training.als import TrainParams
from training.pipeline import train_model
from training.segments import expand_event_paths
from training.tuning import TUNING_FILE, choice_age_days, load_choice

log = logging.getLogger("recsvc.retrain")

LOCK_KEY = keys.RETRAIN_LOCK
STEPS: tuple[str, ...] = ("lock", "dump", "train", "gate", "publish", "prune")
CRASH_ENV = "RECSVC_RETRAIN_CRASH_AFTER"
GATE_METRIC = "ndcg@10"
MAX_TOLERANCE = 1.0
MIN_LOCK_TTL_S, MAX_LOCK_TTL_S = 10, 24 * 3600
MAX_KEEP = 1000


# ------------------------------------------------------------------------------------------------
# The gate (pure)
# ------------------------------------------------------------------------------------------------


@dataclass
class GateDecision:
    """Whether a new model may replace the live one, and why. Stored in the manifest as ``gate``."""

    passed: bool
    reason: str
    metric: str
    new: float | None
    live: float | None
    popularity: float | None
    live_version: str | None
    tolerance: float
    floor: float | None  # the least the new model had to reach against the live one
    forced: bool = False


def _metric(metrics: dict[str, Any] | None, model: str, metric: str) -> float | None:
    try:
        value = float(metrics[model][metric])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def gate_decision(
    metrics: dict[str, Any] | None,
    tolerance: float,
    live_version: str | None = None,
    metric: str = GATE_METRIC,
) -> GateDecision:
    """Decide whether the new model may be published, from one evaluation run.

    ``metrics`` is the new manifest's: the candidate (``metrics["model"]``), the popularity
    baseline and -- when a version is live -- the live version's configuration (``metrics["live"]``)
    were all fitted on the same training part and scored on the same held-out users in the same run.
    The rule: the candidate must beat popularity, and must not be worse than the live configuration
    by more than ``tolerance``, *relative*: ``new >= live * (1 - tolerance)``. So 0.02 allows the new
    model to be at most 2% worse (a nightly job must not freeze on noise) while a real regression
    (a bad re-tune, a changed configuration) is stopped.

    Parameters
    ----------
    metrics : dict
        The new manifest's ``metrics``.
    tolerance : float
        Allowed relative shortfall against the live configuration, 0..1.
    live_version : str, optional
        The live version (None: nothing is published yet).
    metric : str

    Returns
    -------
    GateDecision
    """
    if not 0.0 <= tolerance <= MAX_TOLERANCE:
        raise ValueError(f"tolerance must be in 0..{MAX_TOLERANCE}, got {tolerance}")
    new = _metric(metrics, "model", metric)
    popularity = _metric(metrics, "popularity", metric)
    live = _metric(metrics, "live", metric)
    floor = None if live is None else live * (1.0 - tolerance)

    def decide(passed: bool, reason: str) -> GateDecision:
        return GateDecision(passed, reason, metric, new, live, popularity, live_version, tolerance, floor)

    if new is None:
        return decide(False, f"the new model has no {metric} (evaluation did not run or had no test users)")
    if popularity is None:
        return decide(False, f"the new manifest has no popularity {metric} to compare with")
    if new <= popularity:
        return decide(False, f"new {metric} {new:.4f} does not beat popularity {popularity:.4f}")
    if live_version is None:
        return decide(True, f"new {metric} {new:.4f} beats popularity {popularity:.4f}; nothing live yet")
    if live is None:
        return decide(
            True,
            f"new {metric} {new:.4f} beats popularity {popularity:.4f}; the configuration of live "
            f"{live_version} is unknown here, so it was not scored",
        )
    assert floor is not None  # live is not None here
    if new < floor:
        return decide(
            False,
            f"new {metric} {new:.4f} is worse than live {live_version}'s {live:.4f} on the same split "
            f"by more than {tolerance:.1%} (needed >= {floor:.4f})",
        )
    return decide(
        True,
        f"new {metric} {new:.4f} >= {floor:.4f} (live {live_version} {live:.4f} on the same split "
        f"- {tolerance:.1%}) and beats popularity {popularity:.4f}",
    )


# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------


class RetrainLock:
    """A Redis lock with expiry that a heartbeat keeps alive while the run works.

    redis-py's :class:`redis.lock.Lock` does ``SET key token NX PX ttl`` and releases/extends with
    compare-and-delete / compare-and-pexpire Lua scripts, so only the holder's token can free it.
    The token carries who holds it (host, pid, start), shown to a second run. A SIGKILLed holder's
    lock expires after ``ttl_s``; a live holder renews it every ``ttl_s / 3``.
    """

    def __init__(self, client: Any, ttl_s: float, key: str = LOCK_KEY):
        self.client, self.ttl_s, self.key = client, float(ttl_s), key
        self.token = json.dumps(
            {
                "run": uuid.uuid4().hex,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        self._lock = client.lock(key, timeout=self.ttl_s, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> bool:
        if not self._lock.acquire(blocking=False, token=self.token):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name="retrain-lock", daemon=True)
        self._thread.start()
        return True

    def holder(self) -> str:
        raw = self.client.get(self.key)
        ttl_ms = self.client.pttl(self.key)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return f"{text} (expires in {max(ttl_ms, 0) / 1000:.0f}s)"

    def _heartbeat(self) -> None:
        from redis.exceptions import LockError, RedisError

        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._lock.extend(self.ttl_s, replace_ttl=True)
            except LockError:
                self.lost = True
                log.error("lost the retrain lock %s (expired or taken over)", self.key)
                return
            except RedisError as e:  # transient: try again at the next beat; owned() decides later
                log.warning("could not renew the retrain lock: %s", e)

    def still_held(self) -> bool:
        """Ask Redis, not memory: is the key still ours? Checked right before publishing."""
        return not self.lost and self._lock.owned()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._lock.release()
        except Exception as e:  # noqa: BLE001 - expired or Redis gone: it frees itself at its TTL
            log.warning("retrain lock not released cleanly (%s); it expires on its own", e)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class RetrainSummary:
    """The one JSON line printed on stdout."""

    status: str = "error"  # published | refused | locked | bad_input | error
    exit_code: int = int(ExitCode.FAILED)
    version: str | None = None  # the newly trained version (if training finished)
    live_before: str | None = None
    live_after: str | None = None
    forced: bool = False
    gate: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    params_source: str | None = None  # config | live | defaults
    dumped_events: int | None = None
    event_files: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


def _crash_point(step: str, crash_after: str | None) -> None:
    """Fault injection (``training.retrain_crash_after``): SIGKILL this process after ``step``."""
    if crash_after == step:
        log.warning("%s=%s: killing this process now (test hook)", CRASH_ENV, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class _Step:
    def __init__(
        self, summary: RetrainSummary, name: str, crash_after: str | None, progress: Progress | None = None
    ):
        self.summary, self.name, self.crash_after = summary, name, crash_after
        self.progress = progress

    def __enter__(self) -> _Step:
        self.start = time.perf_counter()
        log.info("step %s: start", self.name)
        if self.progress is not None:
            self.progress.step(self.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.summary.steps_s[self.name] = round(time.perf_counter() - self.start, 3)
        if exc_type is None:
            log.info("step %s: done in %.1fs", self.name, self.summary.steps_s[self.name])
            _crash_point(self.name, self.crash_after)


def _live_manifest(config: Config, live_version: str | None) -> dict[str, Any] | None:
    """The live version's manifest, from its folder in ``models_dir`` (None if not found)."""
    if not live_version:
        return None

    try:
        return read_manifest(Path(config.models_dir) / live_version)
    except ArtifactError as e:
        log.warning("live version %s has no readable manifest here (%s)", live_version, e)
        return None


def _live_params(live_manifest: dict[str, Any] | None) -> TrainParams | None:
    """The configuration the live version was trained with (its blend included), or None."""
    if not live_manifest or not isinstance(live_manifest.get("params"), dict):
        return None
    values = dict(live_manifest["params"])
    # Versions trained before blends record no "model": they are plain ALS.
    values["model"] = live_manifest.get("model") or PLAIN_ALS.to_dict()
    try:
        return TrainParams.from_mapping(values, source="live manifest params")
    except ValueError as e:
        log.warning("cannot read the live model's parameters (%s)", e)
        return None


def _choose_params(
    given: Any, config: Config, live_params: TrainParams | None
) -> tuple[TrainParams, str, bool]:
    """The candidate's parameters, where they came from, and whether to re-run model selection.

    ``--config`` if given; else the choice saved by model selection (``tuning.json``), re-tuned
    once it is older than ``retune_days`` (or missing); else the live model's; else the defaults.
    """
    if given is not None:
        return given, "config", False
    retune_days = config.training.retune_days
    saved = load_choice(config.models_dir)
    if saved is not None:
        params, document = saved
        age = choice_age_days(document)
        if retune_days > 0 and age > retune_days:
            log.info("the saved model choice is %.0f days old (> %g): re-tuning", age, retune_days)
            return params, TUNING_FILE + " (re-tuned)", True
        return params, TUNING_FILE, False
    if retune_days > 0:
        log.info("no saved model choice: tuning (RECSVC_RETUNE_DAYS=0 turns this off)")
        return live_params or TrainParams(), "tuned", True
    if live_params is not None:
        return live_params, "live", False
    return TrainParams(), "defaults", False


def _published_versions(client: Any) -> set[str]:
    """Versions Redis still holds for rollback: never pruned from disk."""
    return {entry["version"] for entry in versions.list_published(client)}


def run_retrain(
    config: Config,
    event_paths: Sequence[str | os.PathLike],
    catalog_path: str | os.PathLike | None = None,
    *,
    dump_stream: bool = False,
    tolerance: float = 0.02,
    force: bool = False,
    keep: int | None = None,
    lock_ttl_s: float = 300.0,
    params: Any = None,
    client: Any = None,
) -> RetrainSummary:
    """Run the whole job once; never raises -- the outcome is in the returned summary.

    Parameters
    ----------
    config : Config
        ``models_dir``, ``var_dir`` (stream dumps), ``keep_versions``, Redis settings.
    event_paths : sequence of paths
        Event files to train on (the dump, if any, is added).
    catalog_path : path, optional
    dump_stream : bool
        First dump the real-time events stream to ``<var_dir>/events/`` and train on it too.
    tolerance : float
        Relative tolerance of the gate (:func:`gate_decision`).
    force : bool
        Publish even if the gate refuses (logged as a warning and recorded in the manifest).
    keep : int, optional
        Model folders kept on disk by the prune step (default ``max(config.serving.keep_versions, 3)``);
        the live version, the one it replaced and every version Redis holds are never pruned.
    lock_ttl_s : float
        Lock expiry; renewed every third of it while the run is alive.
    params : TrainParams, optional
        Training parameters. Default: the choice saved by model selection (``tuning.json``), re-tuned
        when older than ``config.training.retune_days`` or missing (unless that is 0); else the live
        version's parameters; else the defaults of :class:`training.als.TrainParams`.
    client : redis.Redis, optional
        Default: ``connect_admin(ensure_redis(config))``.

    Returns
    -------
    RetrainSummary
    """
    started = time.perf_counter()
    summary = RetrainSummary(event_files=[str(p) for p in event_paths])
    keep = max(config.serving.keep_versions, 3) if keep is None else keep
    lock: RetrainLock | None = None
    own_client = client is None
    # One line every few seconds (stage retrain, the current step) while a step runs long.
    progress = Progress("retrain", total=5 if dump_stream else 4, unit="steps").__enter__()

    try:
        if not 0 <= tolerance <= MAX_TOLERANCE:
            raise _BadInput(f"--gate-tolerance must be in 0..{MAX_TOLERANCE}, got {tolerance}")
        if own_client:
            client = connect_admin(ensure_redis(config))

        candidate = RetrainLock(client, lock_ttl_s)
        if not candidate.acquire():
            summary.status, summary.exit_code = "locked", int(ExitCode.LOCKED)
            summary.error = f"another retrain holds {LOCK_KEY}: {candidate.holder()}"
            log.error("%s", summary.error)
            return summary
        lock = candidate
        log.info("step lock: acquired %s (ttl %ss, renewed while running)", LOCK_KEY, lock_ttl_s)
        _crash_point("lock", config.training.retrain_crash_after)

        summary.live_before = _decode(current_version(client))
        paths = expand_event_paths(event_paths)

        if dump_stream:
            with _Step(summary, "dump", config.training.retrain_crash_after, progress):
                dump_path, dumped = _dump_stream(client, config)
                summary.dumped_events = dumped
                if dumped and dump_path not in paths:  # --events may already name the dump folder
                    assert dump_path is not None  # a dump that wrote events names its file
                    paths.append(dump_path)

        if not paths:
            raise _BadInput(f"no events file in {', '.join(str(p) for p in event_paths)}")
        summary.event_files = [str(p) for p in paths]

        with _Step(summary, "train", config.training.retrain_crash_after, progress):
            live_manifest = _live_manifest(config, summary.live_before)
            live_params = _live_params(live_manifest)
            try:
                params, summary.params_source, retune = _choose_params(params, config, live_params)
                result = train_model(
                    [str(p) for p in paths],
                    str(catalog_path) if catalog_path else None,
                    models_dir=config.models_dir,
                    params=params,
                    evaluate=True,
                    tune=retune,
                    tune_time_budget_s=config.training.tune_budget_s,
                    # The live configuration is fitted and scored on the candidate's split.
                    compare={"live": live_params} if live_params is not None else None,
                    params_source=summary.params_source,
                    show_progress=True,
                    echo=lambda line: log.info("train: %s", line),
                )
            except ValueError as e:  # documented: bad parameters or nothing to train on
                raise _BadInput(str(e)) from None
            new_path = Path(result.path)
            summary.version = new_path.name
            summary.metrics = _metric_summary(
                result.manifest.get("metrics") or getattr(result, "metrics", None)
            )
            log.info("trained %s: %s", summary.version, json.dumps(summary.metrics))

        with _Step(summary, "gate", config.training.retrain_crash_after, progress):
            new_metrics = result.manifest.get("metrics") or getattr(result, "metrics", None)
            decision = gate_decision(new_metrics, tolerance, summary.live_before)
            if not decision.passed and force:
                decision.forced = True
                log.warning("gate REFUSED (%s) but --force given: publishing anyway", decision.reason)
            elif decision.passed:
                log.info("gate passed: %s", decision.reason)
            else:
                log.error(
                    "gate refused: %s; %s keeps serving", decision.reason, summary.live_before or "nothing"
                )
            summary.forced = decision.forced
            summary.gate = asdict(decision)
            update_manifest(new_path, gate={**asdict(decision), "decided_at": _now_iso()})

        if not (decision.passed or decision.forced):
            summary.live_after = summary.live_before
            with _Step(summary, "prune", config.training.retrain_crash_after, progress):
                # A refused version is kept like any other (for a look at why) and pruned like any
                # other, so refusals night after night do not fill the disk.
                summary.pruned = _prune(client, config, keep, summary)
            summary.status, summary.exit_code = "refused", int(ExitCode.GATE_REFUSED)
            return summary

        with _Step(summary, "publish", config.training.retrain_crash_after, progress):
            if not lock.still_held():
                summary.status, summary.exit_code = "locked", int(ExitCode.LOCKED)
                summary.error = "lost the retrain lock before publishing; nothing published"
                summary.live_after = summary.live_before
                log.error("%s", summary.error)
                return summary
            published = _decode(publish(client, new_path, config)) or summary.version
            summary.live_after = published
            log.info("published %s (was %s)", published, summary.live_before)

        with _Step(summary, "prune", config.training.retrain_crash_after, progress):
            summary.pruned = _prune(client, config, keep, summary)

        summary.status, summary.exit_code = "published", int(ExitCode.OK)
        return summary
    except _Locked as e:
        summary.status, summary.exit_code, summary.error = "locked", int(ExitCode.LOCKED), str(e)
        log.error("%s", e)
        return summary
    except (BadInputError, _BadInput) as e:
        summary.status, summary.exit_code, summary.error = "bad_input", int(ExitCode.BAD_INPUT), str(e)
        log.error("bad input: %s", e)
        return summary
    except Exception as e:  # noqa: BLE001 - the scheduler needs a code and a line, not a traceback only
        summary.status, summary.exit_code = "error", int(ExitCode.FAILED)
        summary.error = f"{type(e).__name__}: {e}"
        if summary.live_after and summary.live_after != summary.live_before:
            outcome = f"{summary.live_after} was published before the error"
        else:
            outcome = f"the live model ({summary.live_before or 'none'}) is unchanged"
        log.error("internal error; %s\n%s", outcome, traceback.format_exc())
        return summary
    finally:
        progress.close(failed=summary.status not in ("published", "refused"))
        if lock is not None:
            lock.release()
        if own_client and client is not None:
            client.close()
        summary.seconds = round(time.perf_counter() - started, 3)


def _prune(client: Any, config: Config, keep: int, summary: RetrainSummary) -> list[str]:
    """Delete model folders beyond ``keep``; never the live one, the one it replaced, or any
    version Redis still holds for rollback."""
    protect = {v for v in (summary.live_before, summary.live_after) if v}
    protect |= _published_versions(client)
    pruned = prune(config.models_dir, keep, protect=protect)
    if pruned:
        log.info("pruned %s", ", ".join(pruned))
    return pruned


class _BadInput(ValueError):
    pass


class _Locked(RuntimeError):
    pass


def _decode(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _metric_summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(metrics, dict):
        return None
    out = {}
    for model in ("model", "live", "popularity"):
        value = _metric(metrics, model, GATE_METRIC)
        if value is not None:
            out[f"{model}_{GATE_METRIC}"] = round(value, 6)
    return out


def _dump_stream(client: Any, config: Config) -> tuple[Path | None, int]:
    """Move the real-time stream into ``<var_dir>/events/events-<UTC time>.csv``: ``(path, count)``.

    :func:`recsvc.storage.dump.dump_events` is exactly-once (consumer group, fsync, commit record, then
    XACK/XDEL), so a crash here loses nothing: the next dump writes or finishes what was read.
    """

    out_dir = Path(config.var_dir) / "events"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Our own name, to the microsecond: a dump made the same second (by hand, or an earlier run)
    # must not collide, and names still sort by time.
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    try:
        result = dump_events(client, out_dir / f"events-{stamp}.csv", stream=config.events.stream)
    except DumpLocked as e:
        raise _Locked(f"cannot dump the event stream: {e}") from None
    if result.count:
        log.info(
            "dumped %d events to %s (%d left in the stream)", result.count, result.path, result.remaining
        )
    else:
        log.info("the event stream is empty: nothing to dump")
    return result.path, int(result.count)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
