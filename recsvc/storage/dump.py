"""Move accepted events from the Redis stream into an events file, exactly once.

The dump reads every shard of the stream (one per user group, :func:`recsvc.storage.keys.stream_shards`)
through a consumer group, writes one temporary file, records a commit (file name, sha256 and the last
entry id of each shard) in Redis, renames the file into place and only then acknowledges and deletes
the entries shard by shard, so an interrupted dump is finished or redone by the next one without
losing or duplicating events: exactly once per shard, and so for the whole stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from recsvc.core.artifact import sha256_file
from recsvc.storage import codec, holders, keys

log = logging.getLogger(__name__)


def dump_commit_key(stream: str) -> str:
    """Redis key of the commit record of a dump of ``stream``."""
    return keys.events_dump_commit(stream)


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
    """Length of the stream (all shards), entries a crashed dump left pending, the dump lock's life."""
    shards = keys.stream_shards(stream)
    pipe = client.pipeline(transaction=False)
    for shard in shards:
        pipe.xlen(shard)
    lengths = [int(n) for n in pipe.execute()]
    pending = 0
    for shard, length in zip(shards, lengths, strict=True):
        if length:
            try:
                pending += int(client.xpending(shard, keys.DUMP_GROUP)["pending"])
            except redis.ResponseError:  # no group yet: nothing was ever dumped from this shard
                pass
    lock_ms = int(client.pttl(keys.EVENTS_DUMP_LOCK))  # -2: no lock; -1: a lock without expiry (set by hand)
    return {
        "stream": stream,
        "shards": len(shards),
        "length": sum(lengths),
        "pending_from_interrupted_dump": pending,
        # Held by a running dump, or by one that died: it expires after its timeout.
        "dump_lock_ttl_s": None if lock_ms == -1 else max(0.0, lock_ms / 1000.0),
        "commit_record": client.get(dump_commit_key(stream)) is not None,
    }


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _ensure_group(client: redis.Redis, shard: str) -> None:
    try:
        client.xgroup_create(shard, keys.DUMP_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _acknowledge_through(client: redis.Redis, shard: str, last_id: str, chunk: int = 1000) -> int:
    """XACK + XDEL every entry of ``shard`` pending for the dump consumer with id <= ``last_id``."""
    done = 0
    while True:
        pending = client.xpending_range(
            shard, keys.DUMP_GROUP, "-", last_id, chunk, consumername=keys.DUMP_CONSUMER
        )
        ids = [codec.text(cast("bytes | str", p["message_id"])) for p in pending]
        if not ids:
            return done
        pipe = client.pipeline(transaction=True)  # one key
        pipe.xack(shard, keys.DUMP_GROUP, *ids)
        pipe.xdel(shard, *ids)
        pipe.execute()
        done += len(ids)


def _recover(client: redis.Redis, stream: str) -> int:
    """Finish a dump that crashed after its commit record was written; return entries acknowledged.

    The record names the file, its sha256 and the last entry id written from each shard. If that
    file is in place, the rename happened and its entries only await acknowledgement: acknowledge
    and delete them, shard by shard. If not, the crash came before the rename: the entries are
    still pending and this run writes them again.
    """
    raw = client.get(dump_commit_key(stream))
    if raw is None:
        return 0
    record = json.loads(codec.text(raw))
    path = Path(record["path"])
    done = 0
    if path.is_file() and sha256_file(path) == record["sha256"]:
        for shard, last_id in record["last_ids"].items():
            done += _acknowledge_through(client, shard, last_id)
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
    return {codec.text(k): codec.text(v) for k, v in fields.items()}


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
    stream: str = keys.EVENTS_STREAM,
    batch_size: int = 10_000,
    max_events: int | None = None,
    fmt: str | None = None,
    lock_timeout_s: float = 300.0,
    on_batch: Callable[[int], None] | None = None,
) -> DumpResult:
    """Move accepted events from the stream into an events file that ``recsvc train`` reads.

    Exactly once: entries of every shard are read through a consumer group, written to one
    temporary file in the target folder, flushed and fsynced; a commit record (file name + sha256 +
    the last entry id of each shard) is stored in Redis;
    the file is renamed into place (never over an existing file) and the folder fsynced; only then
    are the entries acknowledged (``XACK``) and deleted (``XDEL``). A crash before the rename leaves
    the entries pending, and the next dump writes them (the temporary file is removed). A crash
    after the rename is finished by the next dump, which finds the file named in the commit record
    and acknowledges its entries without writing them again.

    Parameters
    ----------
    client : redis.Redis
        A client with generous timeouts (:func:`recsvc.storage.connection.connect_admin`).
    out_path : path
        The file to create (``.csv``, or ``.parquet``); must not exist. An existing folder gets
        ``events-<UTC stamp>.csv`` inside it.
    stream : str
        Stream name (``Config.events.stream``); every shard of it is dumped.
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

    lock = client.lock(keys.EVENTS_DUMP_LOCK, timeout=lock_timeout_s, blocking=False, thread_local=False)
    token = holders.holder_token()
    if not lock.acquire(token=token):
        # A dump killed on this host frees its lock now rather than when it expires.
        if holders.take_over_if_dead(client, keys.EVENTS_DUMP_LOCK) is None or not lock.acquire(token=token):
            raise DumpLocked(
                f"another dump holds {keys.EVENTS_DUMP_LOCK} (expires within {lock_timeout_s:.0f}s)"
            )
    try:
        recovered = _recover(client, stream)
        for shard in keys.stream_shards(stream):
            _ensure_group(client, shard)
        # Leftovers of crashed dumps in this folder: we hold the lock, so no writer owns them.
        for stale in out.parent.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        result = _dump_locked(client, out, stream, batch_size, max_events, fmt, lock, on_batch)
        result.recovered = recovered
        result.remaining = sum(int(client.xlen(shard)) for shard in keys.stream_shards(stream))
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
    tmp = out.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}{_TMP_SUFFIX}"
    writer = _Writer(tmp, fmt)
    count = 0
    read: dict[str, tuple[str, str]] = {}  # shard -> (first, last) entry id read
    try:
        for shard in keys.stream_shards(stream):
            if max_events is not None and count >= max_events:
                break
            left = None if max_events is None else max_events - count
            shard_count, first_last = _read_shard(client, shard, writer, batch_size, left, lock, on_batch)
            count += shard_count
            if first_last is not None:
                read[shard] = first_last
        if not read:
            writer.abort()
            tmp.unlink(missing_ok=True)
            return DumpResult(count=0, path=None)
        first_id = min((ids[0] for ids in read.values()), key=_id_key)
        last_id = max((ids[1] for ids in read.values()), key=_id_key)
        if count == 0:
            # Only deleted entries were pending: acknowledge them, write nothing.
            writer.abort()
            tmp.unlink(missing_ok=True)
            for shard, (_, last) in read.items():
                _acknowledge_through(client, shard, last)
            return DumpResult(count=0, path=None, first_id=first_id, last_id=last_id)
        writer.close()
        record = {
            "path": str(out.resolve()),
            "sha256": sha256_file(tmp),
            "last_ids": {shard: last for shard, (_, last) in read.items()},
            "stream": stream,
        }
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
    for shard, (_, last) in read.items():
        _acknowledge_through(client, shard, last)
    client.delete(dump_commit_key(stream))
    return DumpResult(count=count, path=out, first_id=first_id, last_id=last_id)


def _read_shard(
    client: redis.Redis,
    shard: str,
    writer: _Writer,
    batch_size: int,
    max_events: int | None,
    lock: Any,
    on_batch: Callable[[int], None] | None,
) -> tuple[int, tuple[str, str] | None]:
    """Write one shard's entries: ``(events written, (first, last) entry id read or None)``."""
    # Entry ids are never None here (redis-py's StreamEntry allows it for deleted entries).
    newest = cast("list[tuple[bytes | str, Any]]", client.xrevrange(shard, count=1))
    end_key = _id_key(codec.text(newest[0][0])) if newest else (0, 0)
    count = 0
    first_id: str | None = None
    last_id: str | None = None
    # First what an interrupted dump read but never acknowledged ("0" = our pending entries, from
    # the start), then new entries (">"), up to the newest entry when we started so a busy
    # storefront cannot keep the dump running forever.
    for phase in ("pending", "new"):
        cursor = "0" if phase == "pending" else ">"
        while max_events is None or count < max_events:
            want = batch_size if max_events is None else min(batch_size, max_events - count)
            # RESP2 reply: [[stream, [(id, fields), ...]]] (redis-py's type also covers RESP3's dict).
            reply: Any = client.xreadgroup(keys.DUMP_GROUP, keys.DUMP_CONSUMER, {shard: cursor}, count=want)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            rows = []
            for raw_id, fields in entries:
                entry_id = codec.text(raw_id)
                if fields:  # None/empty: deleted from the stream after it was read; skip
                    rows.append(_entry_fields(fields))
                first_id = first_id or entry_id
                last_id = entry_id
            writer.write(rows)
            count += len(rows)
            if on_batch is not None:
                on_batch(len(rows))
            lock.extend(lock.timeout, replace_ttl=True)
            assert last_id is not None  # entries is not empty
            if phase == "pending":
                cursor = last_id
            elif _id_key(last_id) >= end_key:
                break
    if first_id is None or last_id is None:
        return count, None
    return count, (first_id, last_id)
