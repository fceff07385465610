"""Real-time events: durable ingestion, recent history per user, rate limits, and the stream dump.

Redis layout (see docs/ARCHITECTURE.md):

* ``recsvc:events`` (``Config.events_stream``): a stream, one entry per accepted event, fields named
  as in the events contract. It is the durable log between ``POST /v1/events`` and the next
  ``recsvc events dump``; nothing trims it except a dump that has written its entries to a file.
* ``recsvc:recent:<user_id>``: a list of the user's newest events (newest first), at most
  ``Config.history_length`` entries, each ``"<timestamp>|<event code>|<item_id>"``; fold-in reads it.
  It expires ``Config.history_ttl_s`` after the user's last event so one-visit shoppers do not stay
  in memory forever.
* ``recsvc:ratelimit:events:<sha256 of the API key>:<minute>``: request counter per key and minute.
* ``recsvc:lock:events-dump`` / ``recsvc:events:dump:commit:<stream>``: the dump's lock and its commit
  record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from recsvc.core.contract import EVENT_CODE, EVENT_TYPES, ContractError, validate_event
from recsvc.core.ids import check_id

log = logging.getLogger("recsvc.realtime")

RECENT_PREFIX = "recsvc:recent:"
RATE_PREFIX = "recsvc:ratelimit:events:"
DUMP_GROUP = "recsvc-dump"
# One fixed consumer name: a crashed dump's unacknowledged entries stay pending under it, and the
# next dump (which holds the lock, so it is the only reader) reads them first.
DUMP_CONSUMER = "dump"
DUMP_LOCK = "recsvc:lock:events-dump"
DUMP_COMMIT = "recsvc:events:dump:commit"  # + ":<stream>", one commit record per stream


def dump_commit_key(stream: str) -> str:
    """Redis key of the commit record of a dump of ``stream``."""
    return f"{DUMP_COMMIT}:{stream}"


DUMP_COLUMNS: tuple[str, ...] = (
    "user_id",
    "item_id",
    "event",
    "timestamp",
    "order_id",
    "quantity",
    "price",
    "rec_id",
)
_TMP_PREFIX = ".recsvc-dump-"
_TMP_SUFFIX = ".tmp"
_RECENT_SEPARATOR = "|"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def recent_key(user_id: str) -> str:
    """Redis key of a user's recent-history list; the id is checked against the id contract first."""
    return RECENT_PREFIX + check_id(user_id, "user_id")


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


class BatchError(ValueError):
    """One event of a batch breaks the contract; nothing of the batch may be stored.

    Attributes
    ----------
    index : int or None
        Position of the first bad event in the batch (None when the body was a single event).
    field : str
        ``events[<index>].<field>`` (or just ``<field>`` for a single event / the body itself).
    reason : str
        A reason code of :data:`recsvc.contract.REASONS` (or ``too_many_events`` / ``no_events``).
    """

    def __init__(self, index: int | None, field: str, reason: str, message: str):
        super().__init__(message)
        self.index, self.field, self.reason, self.message = index, field, reason, message


def validate_batch(payload: Any, max_events: int) -> list[dict[str, Any]]:
    """Validate the body of ``POST /v1/events``: one event, a list, or ``{"events": [...]}``.

    Parameters
    ----------
    payload : Any
        The decoded JSON body.
    max_events : int
        Largest batch accepted.

    Returns
    -------
    list of dict
        The events normalised by :func:`recsvc.contract.validate_event`, in order.

    Raises
    ------
    BatchError
        For the first bad event (its index and field are named), an empty batch, or one over
        ``max_events``.
    """
    single = isinstance(payload, dict) and "events" not in payload
    if single:
        items: Any = [payload]
    elif isinstance(payload, dict):
        extra = sorted(set(payload) - {"events"})
        if extra:
            raise BatchError(None, extra[0], "unknown_field", f"unknown field {extra[0]!r} next to 'events'")
        items = payload["events"]
    else:
        items = payload
    if not isinstance(items, list):
        raise BatchError(
            None, "events", "missing_field", "body must be an event object, a list, or {'events': [...]}"
        )
    if not items:
        raise BatchError(None, "events", "no_events", "the batch has no events")
    if len(items) > max_events:
        raise BatchError(
            None, "events", "too_many_events", f"a batch holds at most {max_events} events, got {len(items)}"
        )
    out = []
    for index, raw in enumerate(items):
        try:
            out.append(validate_event(raw))
        except ContractError as e:
            if single:
                raise BatchError(None, e.field, e.reason, e.message) from None
            raise BatchError(
                index, f"events[{index}].{e.field}", e.reason, f"events[{index}]: {e.message}"
            ) from None
    return out


# ------------------------------------------------------------------------------------------------
# Ingestion
# ------------------------------------------------------------------------------------------------


class StreamFull(RuntimeError):
    """The stream holds ``events_stream_maxlen`` undumped entries: refuse rather than drop any."""


def _stream_fields(event: Mapping[str, Any]) -> dict[str, str]:
    fields = {
        "user_id": event["user_id"],
        "item_id": event["item_id"],
        "event": event["event"],
        "timestamp": str(int(event["timestamp"])),
    }
    for name in ("order_id", "rec_id"):
        if event.get(name):
            fields[name] = event[name]
    for name in ("quantity", "price"):
        if event.get(name) is not None:
            fields[name] = repr(float(event[name]))
    return fields


def _recent_entry(event: Mapping[str, Any]) -> str:
    parts = (str(int(event["timestamp"])), str(EVENT_CODE[event["event"]]), event["item_id"])
    return _RECENT_SEPARATOR.join(parts)


def append_events(
    client: redis.Redis,
    events: Sequence[Mapping[str, Any]],
    *,
    stream: str,
    history_length: int,
    history_ttl_s: int,
    stream_maxlen: int | None = None,
) -> list[str]:
    """Store validated events durably: the stream and each user's recent list, all or nothing.

    Everything goes in one ``MULTI``/``EXEC`` transaction: the events are appended to ``stream``
    (``XADD``) and pushed onto ``recsvc:recent:<user_id>`` (``LPUSH``, ``LTRIM`` to
    ``history_length``, ``EXPIRE``). The function returns only after ``EXEC`` succeeded, so a
    caller that answers afterwards never acknowledges an event Redis did not take.

    Parameters
    ----------
    client : redis.Redis
    events : sequence of dict
        Events already normalised by :func:`recsvc.contract.validate_event`.
    stream : str
        Stream key (``Config.events_stream``).
    history_length : int
        Entries kept per user list (``Config.history_length``).
    history_ttl_s : int
        Lifetime of a user's list after their newest event (``Config.history_ttl_s``).
    stream_maxlen : int, optional
        Refuse (:class:`StreamFull`) when the stream already holds this many entries. The stream is
        never trimmed by ingestion: an entry leaves it only once a dump wrote it to a file.

    Returns
    -------
    list of str
        The stream entry ids, in event order.

    Raises
    ------
    StreamFull
        The stream is at ``stream_maxlen``.
    redis.RedisError
        Redis refused or is unreachable; nothing of the batch was applied.
    """
    if not events:
        return []
    if stream_maxlen is not None and client.xlen(stream) >= stream_maxlen:
        raise StreamFull(f"event stream {stream!r} holds {stream_maxlen} undumped events")
    by_user: dict[str, list[str]] = {}
    pipe = client.pipeline(transaction=True)
    for event in events:
        pipe.xadd(stream, _stream_fields(event))
        by_user.setdefault(event["user_id"], []).append(_recent_entry(event))
    for user_id, entries in by_user.items():
        key = recent_key(user_id)
        pipe.lpush(key, *entries)
        pipe.ltrim(key, 0, history_length - 1)
        pipe.expire(key, history_ttl_s)
    results = pipe.execute()
    return [_text(entry_id) for entry_id in results[: len(events)]]


@dataclass(frozen=True)
class RecentEvents:
    """A user's recent events, newest first, as parallel arrays."""

    item_ids: list[str]
    events: np.ndarray  # int64 event codes
    timestamps: np.ndarray  # int64 Unix seconds

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def newest(self) -> int | None:
        """Timestamp of the newest event (None when empty)."""
        return int(self.timestamps.max()) if len(self.timestamps) else None

    def take(self, mask: np.ndarray) -> RecentEvents:
        keep = np.flatnonzero(mask)
        return RecentEvents([self.item_ids[i] for i in keep], self.events[keep], self.timestamps[keep])


def parse_recent(entries: Iterable[bytes | str]) -> RecentEvents:
    """Decode ``recsvc:recent:*`` list entries; malformed ones are skipped, not trusted."""
    items, codes, stamps = [], [], []
    for raw in entries:
        parts = _text(raw).split(_RECENT_SEPARATOR, 2)
        if len(parts) != 3:
            continue
        stamp, code, item = parts
        if not (stamp.isdigit() and code.isdigit() and int(code) < len(EVENT_TYPES)):
            continue
        items.append(item)
        codes.append(int(code))
        stamps.append(int(stamp))
    return RecentEvents(items, np.asarray(codes, dtype=np.int64), np.asarray(stamps, dtype=np.int64))


def recent_events(client: redis.Redis, user_id: str, limit: int) -> RecentEvents:
    """Read up to ``limit`` of a user's newest events (``LRANGE``), newest first."""
    if limit <= 0:
        return parse_recent([])
    return parse_recent(client.lrange(recent_key(user_id), 0, limit - 1))


# ------------------------------------------------------------------------------------------------
# Rate limit
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateDecision:
    """Outcome of :func:`rate_limit`."""

    allowed: bool
    count: int  # requests of this key in the current window, this one included
    limit: int
    retry_after_s: int  # seconds until the window resets


def key_fingerprint(api_key: str) -> str:
    """A stable, non-reversible name for an API key, safe to use in Redis keys and logs."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def rate_limit(
    client: redis.Redis, api_key: str, limit_per_min: int, now: float | None = None
) -> RateDecision:
    """Count one request of ``api_key`` in its fixed one-minute window (``INCR`` + ``EXPIRE``).

    The Redis key holds a hash of the API key, never the key itself.
    """
    now = time.time() if now is None else now
    window = int(now // 60)
    key = f"{RATE_PREFIX}{key_fingerprint(api_key)}:{window}"
    pipe = client.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 120)
    count = int(pipe.execute()[0])
    retry_after = max(1, int((window + 1) * 60 - now + 0.999))
    return RateDecision(count <= limit_per_min, count, limit_per_min, retry_after)


# ------------------------------------------------------------------------------------------------
# Dump: stream -> events file, exactly once
# ------------------------------------------------------------------------------------------------


class DumpLocked(RuntimeError):
    """Another dump holds the lock."""


class DumpError(RuntimeError):
    """The dump cannot run (output exists, bad format...); nothing was read or acknowledged."""


@dataclass
class DumpResult:
    """What :func:`dump_events` did."""

    count: int  # events written to ``path`` (0: no file written)
    path: Path | None
    first_id: str | None = None
    last_id: str | None = None
    recovered: int = 0  # entries of a previous, interrupted dump that were acknowledged now
    remaining: int = 0  # entries left in the stream (newer than this dump, or over max_events)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = None if self.path is None else str(self.path)
        return out


def stream_status(client: redis.Redis, stream: str) -> dict[str, Any]:
    """Length of the stream, entries a crashed dump left pending, and the dump lock's remaining life."""
    length = int(client.xlen(stream))
    pending = 0
    if length:
        try:
            pending = int(client.xpending(stream, DUMP_GROUP)["pending"])
        except redis.ResponseError:  # no group yet: nothing was ever dumped
            pending = 0
    lock_ms = int(client.pttl(DUMP_LOCK))  # -2: no lock; -1: a lock without expiry (set by hand)
    return {
        "stream": stream,
        "length": length,
        "pending_from_interrupted_dump": pending,
        # Held by a running dump, or by one that died: it expires after its timeout.
        "dump_lock_ttl_s": None if lock_ms == -1 else max(0.0, lock_ms / 1000.0),
        "commit_record": client.get(dump_commit_key(stream)) is not None,
    }


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        client.xgroup_create(stream, DUMP_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _acknowledge_through(client: redis.Redis, stream: str, last_id: str, chunk: int = 1000) -> int:
    """XACK + XDEL every entry pending for the dump consumer with id <= ``last_id``."""
    done = 0
    while True:
        pending = client.xpending_range(stream, DUMP_GROUP, "-", last_id, chunk, consumername=DUMP_CONSUMER)
        ids = [_text(p["message_id"]) for p in pending]
        if not ids:
            return done
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, DUMP_GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        done += len(ids)


def _recover(client: redis.Redis, stream: str) -> int:
    """Finish a dump that crashed after its commit record was written; return entries acknowledged.

    The record names the file and its sha256. If that file is in place, the rename happened and its
    entries only await acknowledgement: acknowledge and delete them. If not, the crash came before
    the rename: the entries are still pending and this run writes them again.
    """
    raw = client.get(dump_commit_key(stream))
    if raw is None:
        return 0
    record = json.loads(_text(raw))
    path = Path(record["path"])
    done = 0
    if path.is_file() and _sha256(path) == record["sha256"]:
        done = _acknowledge_through(client, stream, record["last_id"])
        log.warning("recovered interrupted dump %s: acknowledged %d entries", path, done)
    client.delete(dump_commit_key(stream))
    return done


class _Writer:
    """Writes batches of stream entries as CSV or Parquet through pyarrow, opened on first use."""

    def __init__(self, path: Path, fmt: str):
        import pyarrow as pa

        self.path, self.fmt = path, fmt
        self.schema = pa.schema(
            [
                ("user_id", pa.string()),
                ("item_id", pa.string()),
                ("event", pa.string()),
                ("timestamp", pa.int64()),
                ("order_id", pa.string()),
                ("quantity", pa.float64()),
                ("price", pa.float64()),
                ("rec_id", pa.string()),
            ]
        )
        self.file: Any = None
        self.writer: Any = None

    def write(self, rows: list[dict[str, str]]) -> None:
        import pyarrow as pa

        if not rows:
            return
        columns = {
            "user_id": [r["user_id"] for r in rows],
            "item_id": [r["item_id"] for r in rows],
            "event": [r["event"] for r in rows],
            "timestamp": [int(r["timestamp"]) for r in rows],
            "order_id": [r.get("order_id", "") for r in rows],
            "quantity": [float(r["quantity"]) if "quantity" in r else None for r in rows],
            "price": [float(r["price"]) if "price" in r else None for r in rows],
            "rec_id": [r.get("rec_id", "") for r in rows],
        }
        table = pa.table(columns, schema=self.schema)
        if self.writer is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self.writer = pq.ParquetWriter(self.file, self.schema)
            else:
                import pyarrow.csv as pa_csv

                self.writer = pa_csv.CSVWriter(self.file, self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        """Finish the file and make it durable (flush + fsync) before anyone renames it."""
        if self.writer is not None:
            self.writer.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.writer = self.file = None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        self.writer = self.file = None


def _entry_fields(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _place(tmp: Path, final: Path) -> None:
    """Move the finished file to its name without ever replacing an existing file."""
    try:
        os.link(tmp, final)  # fails with FileExistsError instead of overwriting
    except FileExistsError:
        raise DumpError(f"{final}: already exists; choose another --out (nothing was acknowledged)") from None
    except OSError:
        if final.exists():
            raise DumpError(f"{final}: already exists; choose another --out") from None
        os.rename(tmp, final)  # file systems without hard links
    else:
        tmp.unlink()
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a power cut before we acknowledge
    finally:
        os.close(fd)


def dump_events(
    client: redis.Redis,
    out_path: str | os.PathLike,
    *,
    stream: str = "recsvc:events",
    batch_size: int = 10_000,
    max_events: int | None = None,
    fmt: str | None = None,
    lock_timeout_s: float = 300.0,
    on_batch: Callable[[int], None] | None = None,
) -> DumpResult:
    """Move accepted events from the stream into an events file that ``recsvc train`` reads.

    Exactly once: entries are read through a consumer group, written to a temporary file in the
    target folder, flushed and fsynced; a commit record (file name + sha256) is stored in Redis;
    the file is renamed into place (never over an existing file) and the folder fsynced; only then
    are the entries acknowledged (``XACK``) and deleted (``XDEL``). A crash before the rename leaves
    the entries pending, and the next dump writes them (the temporary file is removed). A crash
    after the rename is finished by the next dump, which finds the file named in the commit record
    and acknowledges its entries without writing them again.

    Parameters
    ----------
    client : redis.Redis
        A client with generous timeouts (:func:`recsvc.redis_conn.connect_admin`).
    out_path : path
        The file to create (``.csv``, or ``.parquet``); must not exist. An existing folder gets
        ``events-<UTC stamp>.csv`` inside it.
    stream : str
        Stream key (``Config.events_stream``).
    batch_size : int
        Entries read and written per round trip.
    max_events : int, optional
        Stop after about this many events (whole batches); the rest stays for the next dump.
    fmt : {"csv", "parquet"}, optional
        Default: from the file suffix (``.parquet``/``.pq`` = Parquet, anything else CSV).
    lock_timeout_s : float
        Lifetime of the dump lock; renewed after every batch.
    on_batch : callable, optional
        Called with the number of entries of each batch written (progress bars).

    Returns
    -------
    DumpResult
        ``count`` events written to ``path``; ``count == 0`` writes no file and ``path`` is None.

    Raises
    ------
    DumpLocked
        Another dump is running.
    DumpError
        The output exists, or its folder does not.
    redis.RedisError
        Redis failed; whatever was read stays pending and is written by the next dump.
    """
    if batch_size < 1:
        raise DumpError("batch_size must be >= 1")
    out = Path(out_path)
    if out.is_dir():
        out = out / f"events-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv"
    if out.exists():
        raise DumpError(f"{out}: already exists; choose another --out")
    if not out.parent.is_dir():
        raise DumpError(f"{out.parent}: folder does not exist")
    fmt = fmt or ("parquet" if out.suffix.lower() in (".parquet", ".pq") else "csv")
    if fmt not in ("csv", "parquet"):
        raise DumpError(f"format must be csv or parquet, got {fmt!r}")

    lock = client.lock(DUMP_LOCK, timeout=lock_timeout_s, blocking=False, thread_local=False)
    if not lock.acquire():
        raise DumpLocked(f"another dump holds {DUMP_LOCK} (expires within {lock_timeout_s:.0f}s)")
    try:
        recovered = _recover(client, stream)
        _ensure_group(client, stream)
        # Leftovers of crashed dumps in this folder: we hold the lock, so no writer owns them.
        for stale in out.parent.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        result = _dump_locked(client, out, stream, batch_size, max_events, fmt, lock, on_batch)
        result.recovered = recovered
        result.remaining = int(client.xlen(stream))
        return result
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def _dump_locked(
    client: redis.Redis,
    out: Path,
    stream: str,
    batch_size: int,
    max_events: int | None,
    fmt: str,
    lock: Any,
    on_batch: Callable[[int], None] | None,
) -> DumpResult:
    newest = client.xrevrange(stream, count=1)
    end_key = _id_key(_text(newest[0][0])) if newest else (0, 0)
    tmp = out.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}{_TMP_SUFFIX}"
    writer = _Writer(tmp, fmt)
    count, first_id, last_id = 0, None, None
    try:
        # First what an interrupted dump read but never acknowledged ("0" = our pending entries,
        # from the start), then new entries (">"), up to the newest entry when we started so a
        # busy storefront cannot keep the dump running forever.
        for phase in ("pending", "new"):
            cursor = "0" if phase == "pending" else ">"
            while max_events is None or count < max_events:
                want = batch_size if max_events is None else min(batch_size, max_events - count)
                reply = client.xreadgroup(DUMP_GROUP, DUMP_CONSUMER, {stream: cursor}, count=want)
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                rows = []
                for entry_id, fields in entries:
                    entry_id = _text(entry_id)
                    if fields:  # None/empty: deleted from the stream after it was read; skip
                        rows.append(_entry_fields(fields))
                    first_id = first_id or entry_id
                    last_id = entry_id
                writer.write(rows)
                count += len(rows)
                if on_batch is not None:
                    on_batch(len(rows))
                lock.extend(lock.timeout, replace_ttl=True)
                if phase == "pending":
                    cursor = last_id
                elif _id_key(last_id) >= end_key:
                    break
        if last_id is None:
            writer.abort()
            tmp.unlink(missing_ok=True)
            return DumpResult(count=0, path=None)
        if count == 0:
            # Only deleted entries were pending: acknowledge them, write nothing.
            writer.abort()
            tmp.unlink(missing_ok=True)
            _acknowledge_through(client, stream, last_id)
            return DumpResult(count=0, path=None, first_id=first_id, last_id=last_id)
        writer.close()
        record = {"path": str(out.resolve()), "sha256": _sha256(tmp), "last_id": last_id, "stream": stream}
        client.set(dump_commit_key(stream), json.dumps(record))
        _place(tmp, out)
    except BaseException:
        writer.abort()
        tmp.unlink(missing_ok=True)
        # A commit record whose file never appeared is harmless (the next dump drops it), but
        # clear it when Redis still answers so the state stays obvious.
        with contextlib.suppress(Exception):
            if not out.exists():
                client.delete(dump_commit_key(stream))
        raise
    _acknowledge_through(client, stream, last_id)
    client.delete(dump_commit_key(stream))
    return DumpResult(count=count, path=out, first_id=first_id, last_id=last_id)


# ------------------------------------------------------------------------------------------------
# Fold-in at request time
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldInState:
    """What fold-in needs from one model version, built once per version (see :func:`foldin_state`).

    ``params`` is None when this version cannot be folded in against (``reason`` says why); the
    recommendation path then keeps its usual answer.
    """

    params: Any  # recsvc.foldin.FoldInParams | None
    yty: np.ndarray | None
    reason: str | None = None


def _build_state(model: Any) -> FoldInState:
    from recsvc.core.foldin import FoldInParams, gramian

    try:
        params = FoldInParams.from_manifest(model.manifest.get("params") or {})
    except ValueError as e:
        log.warning("model %s: fold-in disabled: %s", model.version, e)
        return FoldInState(None, None, str(e))
    if params.scaling == "bm25":
        frequency = getattr(model, "document_frequency", None)
        local = getattr(model, "_local_artifact", None)
        if frequency is None and local is not None:
            frequency = np.bincount(local.interactions.indices, minlength=model.n_items)
        if frequency is None:
            reason = "bm25 scaling needs the training document frequency per item, which is not published"
            log.warning("model %s: fold-in disabled: %s", model.version, reason)
            return FoldInState(None, None, reason)
        params = params.with_document_frequency(np.asarray(frequency))
    return FoldInState(params, gramian(model.item_factors))


def foldin_state(model: Any) -> FoldInState:
    """The fold-in parameters and ``Y^T Y`` of ``model``'s version, computed once and shared.

    Kept in the model's per-version memo (:meth:`recsvc.serving.ServingModel.memo`), so a version
    switch computes it once per process and every thread reuses it.
    """
    return model.memo("realtime.foldin", lambda: _build_state(model))


@dataclass(frozen=True)
class RealtimeVector:
    """A folded-in user vector and what went into it.

    Attributes
    ----------
    vector : numpy.ndarray
        float32 ``(factors,)``.
    purchased : numpy.ndarray
        int32 item indices the user bought in the events used (added to "already bought").
    events_used : int
        Recent events considered: all of them for an unknown user, those newer than the model's
        ``trained_until`` for a known one (events on unknown items and zero-weight events included).
    known_user : bool
        The model has the user: their training row was part of the solve.
    """

    vector: np.ndarray
    purchased: np.ndarray
    events_used: int
    known_user: bool


def realtime_vector(
    model: Any,
    recent: RecentEvents,
    train_indices: np.ndarray,
    train_confidence: np.ndarray,
    known_user: bool,
) -> RealtimeVector | None:
    """Fold a user in from their training row plus their recent events (pure numpy).

    Parameters
    ----------
    model : ServingModel
        The live model: ``item_factors``, ``item_index``, ``manifest`` (params, trained_until).
    recent : RecentEvents
        The user's recent events (``recsvc:recent:<user_id>``).
    train_indices, train_confidence : numpy.ndarray
        The user's training row (``interactions``, before alpha); empty for an unknown user.
    known_user : bool
        Whether the model has the user. Then only events newer than ``trained_until`` count (older
        ones are already in the training row), and without any the answer is None: the cached
        personalised list is current.

    Returns
    -------
    RealtimeVector or None
        None when real time does not apply: nothing new, no event on an item the model knows, or a
        model version fold-in cannot use.
    """
    from recsvc.core.contract import PURCHASE
    from recsvc.core.foldin import add_raw_rows, fold_in, raw_user_row, scale_row, unscale_row

    state = foldin_state(model)
    if state.params is None or len(recent) == 0:
        return None
    trained_until = model.manifest.get("trained_until")
    trained_until = int(trained_until) if trained_until not in (None, "") else None
    if known_user and trained_until is not None:
        recent = recent.take(recent.timestamps > trained_until)
        if len(recent) == 0:
            return None
    positions = np.fromiter(
        (model.item_index.get(item, -1) for item in recent.item_ids), dtype=np.int64, count=len(recent)
    )
    # Training's decay clock is trained_until; new events after it count at full weight, as a
    # retrain at that moment would weigh them.
    new_indices, new_raw = raw_user_row(
        positions, recent.events, recent.timestamps, state.params, trained_until
    )
    if len(new_indices) == 0:
        return None
    if len(train_indices):
        # Add in raw space, then scale the sum: the row a retrain would build from both histories.
        train_raw = unscale_row(train_indices, train_confidence, state.params)
        indices, raw = add_raw_rows(train_indices, train_raw, new_indices, new_raw)
    else:
        indices, raw = new_indices, new_raw
    confidence = scale_row(indices, raw, state.params)
    vector = fold_in(
        model.item_factors,
        indices,
        confidence,
        state.params.regularization,
        state.params.alpha,
        yty=state.yty,
    )
    bought = positions[(recent.events == PURCHASE) & (positions >= 0)]
    return RealtimeVector(
        vector=vector,
        purchased=np.unique(bought).astype(np.int32),
        events_used=len(recent),
        known_user=known_user,
    )


def user_vector_for(
    model: Any,
    client: redis.Redis,
    user_id: str,
    known_user: bool | None = None,
    history_length: int = 200,
    recent_entries: Sequence[bytes | str] | None = None,
) -> RealtimeVector | None:
    """The folded-in vector of ``user_id`` under ``model``, or None when real time does not apply.

    One Redis round trip reads the user's recent events and (for a known user) their training row.
    A caller that already read the recent list in its own pipeline passes ``recent_entries``; then
    Redis is asked for the training row only when the user is known and has new events, so a user
    without new events costs no round trip at all. A Redis failure returns None: the caller keeps
    its non-real-time answer.

    Parameters
    ----------
    model : ServingModel
    client : redis.Redis
    user_id : str
        Checked against the id contract before it touches a key.
    known_user : bool, optional
        Whether the model has the user (the caller knows from its own lookup); None = find out from
        the training row.
    history_length : int
        Most recent events read (``Config.history_length``).
    recent_entries : sequence, optional
        The raw ``LRANGE recsvc:recent:<user_id> 0 history_length-1`` reply, when already read.
    """
    from recsvc.serving import REDIS_DOWN_ERRORS
    from recsvc.storage import store

    key = recent_key(user_id)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    remote = getattr(model, "origin", "redis") == "redis"
    try:
        if recent_entries is not None:
            recent = parse_recent(recent_entries[:history_length])
            if not _may_apply(model, recent, known_user):
                return None
            train = empty
            if known_user is not False:
                train = _training_row(client, model, user_id, remote)
        elif remote:
            pipe = client.pipeline(transaction=False)
            pipe.lrange(key, 0, history_length - 1)
            if known_user is not False:
                pipe.hget(model.user_key("interactions", user_id), user_id)
            replies = pipe.execute()
            recent = parse_recent(replies[0])
            train = store.unpack_weighted(replies[1]) if len(replies) > 1 else empty
        else:
            recent = parse_recent(client.lrange(key, 0, history_length - 1))
            train = _training_row(client, model, user_id, remote) if known_user is not False else empty
    except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
        log.warning("real-time lookup for a user failed, answering without it: %s", type(e).__name__)
        return None
    if known_user is None:
        known_user = len(train[0]) > 0
    return realtime_vector(model, recent, train[0], train[1], known_user)


def _may_apply(model: Any, recent: RecentEvents, known_user: bool | None) -> bool:
    """Cheap pre-check before any Redis work: are there events, and new ones for a known user?"""
    if len(recent) == 0:
        return False
    trained_until = model.manifest.get("trained_until")
    if known_user is True and trained_until not in (None, ""):
        return bool((recent.timestamps > int(trained_until)).any())
    return True


def _training_row(
    client: redis.Redis, model: Any, user_id: str, remote: bool
) -> tuple[np.ndarray, np.ndarray]:
    from recsvc.serving import fetch_interactions
    from recsvc.storage import store

    if remote:
        return store.unpack_weighted(client.hget(model.user_key("interactions", user_id), user_id))
    return fetch_interactions(client, model, user_id)


def recommend(
    model: Any,
    client: redis.Redis,
    user_id: str,
    filters: Any,
    n: int,
    *,
    known_user: bool | None = None,
    history_length: int = 200,
    recent_entries: Sequence[bytes | str] | None = None,
) -> tuple[np.ndarray, np.ndarray, RealtimeVector] | None:
    """Real-time top ``n`` for the recommendations endpoint, or None when real time does not apply.

    The one call the endpoint makes: fold in (:func:`user_vector_for`), add the user's new
    purchases to "already bought", and rank every item with
    :func:`recsvc.ranking.recommend_for_vector` under the request's filters.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, RealtimeVector) or None
        int32 item indices and float32 scores, best first, and the vector used.
    """
    folded = user_vector_for(
        model,
        client,
        user_id,
        known_user=known_user,
        history_length=history_length,
        recent_entries=recent_entries,
    )
    if folded is None:
        return None
    items, scores = rank_folded(model, folded, filters, n)
    return items, scores, folded


def rank_folded(model: Any, folded: RealtimeVector, filters: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Score every item for a folded-in vector and keep the top ``n`` under ``filters`` (pure numpy).

    The user's new purchases join ``filters.purchased``, so "already bought" (and its repurchase
    exemption by category) covers them like purchases the model was trained on.
    """
    from recsvc.core import ranking

    if len(folded.purchased):
        purchased = np.concatenate((np.asarray(filters.purchased, dtype=np.int32), folded.purchased))
        filters = dataclasses.replace(filters, purchased=purchased)
    return ranking.recommend_for_vector(model, folded.vector, filters, n)
