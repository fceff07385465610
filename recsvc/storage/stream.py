"""The real-time event stream: durable appends, each user's recent history, and reading it back.

* The stream ``Config.events.stream`` is sharded by user group (:func:`recsvc.storage.keys.stream_shard`):
  one Redis stream per group, one entry per accepted event, fields named as in the events contract.
  It is the durable log between ``POST /v1/events`` and the next ``recsvc events dump``; nothing
  trims it except a dump that has written its entries to a file.
* ``recent:<user_id>`` (in the user's group): a list of the user's newest events (newest first), at
  most ``history_length`` entries, each ``"<timestamp>|<event code>|<item_id>"``; fold-in reads it. It
  expires ``history_ttl_s`` after the user's last event so one-visit shoppers do not stay in memory.
* ``events:batch:<fp>:<id>`` (in the group of the batch's first user): the at-most-once record of
  a stored batch (:func:`recsvc.storage.keys.event_batch`).

A batch's shard, its record and the recent lists of that group's users share one hash slot, so one
Lua script stores the batch and its users' histories at most once, on one node, on a single Redis
and on a Redis Cluster alike.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from recsvc.core.contract import EVENT_CODE, EVENT_TYPES, ContractError, validate_event
from recsvc.core.errors import Unavailable
from recsvc.core.events import EventTable
from recsvc.storage import codec, keys
from recsvc.storage.connection import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

_RECENT_SEPARATOR = "|"


def recent_key(user_id: str) -> str:
    """Redis key of a user's recent-history list; the id is checked against the id contract first."""
    return keys.recent(user_id)


class StreamFull(Unavailable):
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


#: Marks a batch key whose attempt was given up ("aborted:<attempt token>"): that attempt, if it
#: reaches Redis later, stores nothing.
_ABORTED = "aborted:"

# KEYS: batch key, stream shard, then one recent-list key per user (all in one slot). ARGV: attempt
# token, dedup ttl ms (0: no dedup), shard maxlen (0: none), history length, history ttl s, event
# count, then per event its field count and field/value pairs, then per user its entry count and
# entries. Returns {1, ids...} when stored now, {0, "first last count"} when the batch was stored
# before, {-1} when this attempt was given up, {-2} when the shard is full. Atomic: a retried or
# delayed copy of the same batch finds the batch key and stores nothing.
_STORE_BATCH = """
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  local seen = redis.call('GET', KEYS[1])
  if seen then
    if string.sub(seen, 1, 8) == 'aborted:' then
      if string.sub(seen, 9) == ARGV[1] then return {-1} end
    else
      return {0, seen}
    end
  end
end
local maxlen = tonumber(ARGV[3])
if maxlen > 0 and redis.call('XLEN', KEYS[2]) >= maxlen then return {-2} end
local pos = 7
local ids = {1}
for i = 1, tonumber(ARGV[6]) do
  local nf = tonumber(ARGV[pos])
  local fields = {}
  for j = 1, 2 * nf do fields[j] = ARGV[pos + j] end
  pos = pos + 1 + 2 * nf
  ids[#ids + 1] = redis.call('XADD', KEYS[2], '*', unpack(fields))
end
for k = 3, #KEYS do
  local ne = tonumber(ARGV[pos])
  local entries = {}
  for j = 1, ne do entries[j] = ARGV[pos + j] end
  pos = pos + 1 + ne
  redis.call('LPUSH', KEYS[k], unpack(entries))
  redis.call('LTRIM', KEYS[k], 0, tonumber(ARGV[4]) - 1)
  redis.call('EXPIRE', KEYS[k], tonumber(ARGV[5]))
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ids[2] .. ' ' .. ids[#ids] .. ' ' .. (#ids - 1), 'PX', ttl)
end
return ids
"""

# Settle an attempt whose reply was lost: either it was stored (its summary is returned), or it
# is marked given up so that it never will be. KEYS: batch key. ARGV: attempt token, ttl ms.
_SETTLE = """
local seen = redis.call('GET', KEYS[1])
if seen and string.sub(seen, 1, 8) ~= 'aborted:' then return seen end
redis.call('SET', KEYS[1], 'aborted:' .. ARGV[1], 'PX', ARGV[2])
return false
"""


@dataclass(frozen=True)
class StoredBatch:
    """What :func:`store_batch` did: the batch's stream ids (first, last, count) and whether it was
    stored by an earlier attempt (a retry of the same batch)."""

    first_id: str
    last_id: str
    count: int
    duplicate: bool = False
    ids: tuple[str, ...] = ()  # every id, when stored by this call


class BatchGivenUp(Unavailable):
    """This attempt was given up before Redis ran it: nothing of the batch was stored by it."""


def record_key(events: Sequence[Mapping[str, Any]], client_id: str, batch_id: str) -> str:
    """The at-most-once record of a batch: in the slot of the stream shard the batch goes to (the
    group of its first event's user), so the store script's keys share one slot on a cluster."""
    return keys.event_batch(client_id, batch_id, keys.user_group(events[0]["user_id"]))


def store_batch(
    client: redis.Redis,
    events: Sequence[Mapping[str, Any]],
    *,
    batch_key: str,
    attempt: str,
    stream: str,
    history_length: int,
    history_ttl_s: int,
    stream_maxlen: int | None = None,
    dedup_ttl_s: int = 0,
) -> StoredBatch:
    """Store validated events durably, all or nothing, at most once per ``batch_key``.

    The batch goes whole to the stream shard of its first event's user group. One Lua script
    appends the events there (``XADD``), pushes them onto the recent list of each of that group's
    users (``LPUSH``, ``LTRIM`` to ``history_length``, ``EXPIRE``) and, with ``dedup_ttl_s``,
    records the batch under ``batch_key`` for that long. A second run of the same batch (the
    client's retry with the same idempotency key, or a copy of the command that Redis runs late
    after a timeout) finds the record and stores nothing again.

    A batch mixing users of several groups (rare: a storefront batches one visitor's events) then
    updates the other groups' recent lists, one ``MULTI`` per group, only when this call stored
    it: those lists are a cache for fold-in and the events are already durable, so a failure
    there is logged and the batch still counts as stored (those users miss real time until the
    next retrain).

    Parameters
    ----------
    client : redis.Redis
    events : sequence of dict
        Events already normalised by :func:`recsvc.core.contract.validate_event`.
    batch_key : str
        :func:`record_key` of the batch (its record lives in the slot of the batch's shard).
    attempt : str
        A random token of this attempt (see :func:`settle_batch`).
    stream, history_length, history_ttl_s
        The stream name (``Config.events.stream``; its shards are
        :func:`recsvc.storage.keys.stream_shards`), entries kept per user list, and a list's
        lifetime after its newest event.
    stream_maxlen : int, optional
        Refuse (:class:`StreamFull`) when the target shard already holds its share of this many
        entries (:func:`recsvc.storage.keys.shard_limit`). The stream is never trimmed by
        ingestion: an entry leaves it only once a dump wrote it to a file.
    dedup_ttl_s : int
        How long the batch is remembered (0: not at all).

    Raises
    ------
    StreamFull
        The target shard is full.
    BatchGivenUp
        :func:`settle_batch` gave this attempt up before Redis ran it.
    redis.RedisError
        Redis refused or is unreachable; call :func:`settle_batch` to learn what happened.
    """
    lead = keys.user_group(events[0]["user_id"])
    shard = keys.stream_shard(stream, lead)
    shard_maxlen = keys.shard_limit(stream_maxlen) if stream_maxlen else 0
    by_group: dict[int, dict[str, list[str]]] = {}
    args: list[Any] = [attempt, int(dedup_ttl_s * 1000), shard_maxlen, history_length, history_ttl_s]
    args.append(len(events))
    for event in events:
        fields = _stream_fields(event)
        args.append(len(fields))
        for name, value in fields.items():
            args += (name, value)
        user = event["user_id"]
        by_group.setdefault(keys.user_group(user), {}).setdefault(user, []).append(_recent_entry(event))
    lead_users = by_group.pop(lead)
    for entries in lead_users.values():
        args.append(len(entries))
        args += entries
    user_keys = [recent_key(user_id) for user_id in lead_users]
    reply = client.eval(_STORE_BATCH, 2 + len(user_keys), batch_key, shard, *user_keys, *args)
    code = int(reply[0])
    if code == -2:
        raise StreamFull(f"event stream {stream!r} holds {stream_maxlen} undumped events")
    if code == -1:
        raise BatchGivenUp("this attempt was given up; nothing of it was stored")
    if code == 0:
        return _summary(codec.text(reply[1]), duplicate=True)
    if by_group:
        _push_other_groups(client, by_group, history_length, history_ttl_s)
    ids = tuple(codec.text(i) for i in reply[1:])
    return StoredBatch(ids[0], ids[-1], len(ids), False, ids)


def settle_batch(client: redis.Redis, batch_key: str, attempt: str, dedup_ttl_s: int) -> StoredBatch | None:
    """After a lost reply: the batch as stored (by this attempt or an earlier one), or None when
    nothing was stored -- and then this attempt is marked given up, so it never will be.

    Raises
    ------
    redis.RedisError
        Redis is still unreachable: the outcome is unknown.
    """
    seen = client.eval(_SETTLE, 1, batch_key, attempt, int(max(1, dedup_ttl_s) * 1000))
    return _summary(codec.text(seen), duplicate=False) if seen else None


def _summary(text: str, duplicate: bool) -> StoredBatch:
    first, last, count = text.split(" ")
    return StoredBatch(first, last, int(count), duplicate)


def append_events(
    client: redis.Redis,
    events: Sequence[Mapping[str, Any]],
    *,
    stream: str,
    history_length: int,
    history_ttl_s: int,
    stream_maxlen: int | None = None,
) -> list[str]:
    """Store validated events (no idempotency record); return their stream ids, in event order.

    See :func:`store_batch`; ``POST /v1/events`` goes through
    :class:`~recsvc.serving.ingest.EventIngest`, which adds the at-most-once record.
    """
    if not events:
        return []
    token = os.urandom(8).hex()
    stored = store_batch(
        client,
        events,
        batch_key=record_key(events, "local", token),
        attempt=token,
        stream=stream,
        history_length=history_length,
        history_ttl_s=history_ttl_s,
        stream_maxlen=stream_maxlen,
    )
    return list(stored.ids)


def _push_other_groups(
    client: redis.Redis, by_group: dict[int, dict[str, list[str]]], history_length: int, ttl_s: int
) -> None:
    for by_user in by_group.values():
        try:
            pipe = client.pipeline(transaction=True)
            for user_id, entries in by_user.items():
                key = recent_key(user_id)
                pipe.lpush(key, *entries)
                pipe.ltrim(key, 0, history_length - 1)
                pipe.expire(key, ttl_s)
            pipe.execute()
        except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
            log.warning(
                "stored a batch, but the recent lists of %d user(s) in another group failed (%s): "
                "they get real time again after the next retrain",
                len(by_user),
                type(e).__name__,
            )


def stream_length(client: redis.Redis, stream: str) -> int:
    """Undumped entries over every shard of ``stream``."""
    pipe = client.pipeline(transaction=False)
    for shard in keys.stream_shards(stream):
        pipe.xlen(shard)
    return sum(int(n) for n in pipe.execute())


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
    """Decode recent-history list entries; malformed ones are skipped, not trusted."""
    items, codes, stamps = [], [], []
    for raw in entries:
        parts = codec.text(raw).split(_RECENT_SEPARATOR, 2)
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


DEFAULT_STREAM_LIMIT = 1_000_000


_STREAM_CHUNK = 10_000


def read_stream_events(client: Any, stream: str, limit: int = DEFAULT_STREAM_LIMIT) -> tuple[EventTable, int]:
    """The newest ``limit`` events of the live stream (fields as written by ``POST /v1/events``).

    Entries are validated again with the events contract (a stream can be written by anything
    that can reach Redis); invalid ones are skipped. The shards are read newest first and merged by
    entry id (milliseconds, then sequence), so ``limit`` takes the newest events over all shards.

    Returns
    -------
    (EventTable, int)
        The events, oldest first, and how many invalid entries were skipped.
    """
    cursors: dict[str, str | None] = {shard: "+" for shard in keys.stream_shards(stream)}
    buffers: dict[str, list[tuple[Any, Any]]] = {shard: [] for shard in cursors}
    heap: list[tuple[tuple[int, int], str]] = []

    def refill(shard: str) -> None:
        upper = cursors[shard]
        if upper is None or buffers[shard]:
            return
        chunk = client.xrevrange(shard, max=upper, min="-", count=min(_STREAM_CHUNK, max(1, limit)))
        if not chunk:
            cursors[shard] = None
            return
        buffers[shard] = list(reversed(chunk))  # pop() from the end: newest first
        cursors[shard] = "(" + codec.text(chunk[-1][0])
        heapq.heappush(heap, (_negated_id(buffers[shard][-1][0]), shard))

    for shard in list(cursors):
        refill(shard)
    rows: list[dict[str, Any]] = []
    skipped = 0
    while heap and len(rows) + skipped < limit:
        _, shard = heapq.heappop(heap)
        _entry_id, fields = buffers[shard].pop()
        if buffers[shard]:
            heapq.heappush(heap, (_negated_id(buffers[shard][-1][0]), shard))
        else:
            refill(shard)
        raw = {codec.text(k): codec.text(v) for k, v in fields.items()}
        for name in ("quantity", "price"):
            if name in raw:
                try:
                    raw[name] = float(raw[name])
                except ValueError:
                    pass  # validate_event rejects it
        try:
            rows.append(validate_event(raw))
        except ContractError:
            skipped += 1
    rows.reverse()  # oldest first, like a file
    table = EventTable(
        user_id=np.array([r["user_id"] for r in rows], dtype=object),
        item_id=np.array([r["item_id"] for r in rows], dtype=object),
        event=np.array([EVENT_CODE[r["event"]] for r in rows], dtype=np.int8),
        timestamp=np.array([r["timestamp"] for r in rows], dtype=np.int64),
        order_id=np.array([r.get("order_id", "") for r in rows], dtype=object),
        quantity=np.array([r.get("quantity", 1.0) for r in rows], dtype=np.float32),
        price=np.array([r.get("price", np.nan) for r in rows], dtype=np.float32),
        rec_id=np.array([r.get("rec_id", "") for r in rows], dtype=object),
    )
    return table, skipped


def _negated_id(entry_id: Any) -> tuple[int, int]:
    """Heap key of a stream entry id: the newest entry sorts first."""
    ms, _, seq = codec.text(entry_id).partition("-")
    return -int(ms), -int(seq or 0)
