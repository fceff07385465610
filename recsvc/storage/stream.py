"""The real-time event stream: durable appends, each user's recent history, and reading it back.

* The stream ``Config.events.stream`` is sharded by user group (:func:`recsvc.storage.keys.stream_shard`):
  one Redis stream per group, one entry per accepted event, fields named as in the events contract.
  It is the durable log between ``POST /v1/events`` and the next ``recsvc events dump``; nothing
  trims it except a dump that has written its entries to a file.
* ``recent:<user_id>`` (in the user's group): a list of the user's newest events (newest first), at
  most ``history_length`` entries, each ``"<timestamp>|<event code>|<item_id>"``; fold-in reads it. It
  expires ``history_ttl_s`` after the user's last event so one-visit shoppers do not stay in memory.

A shard and the recent lists of its group share one hash slot, so one ``MULTI`` stores a batch and
its users' histories on one node, on a single Redis and on a Redis Cluster alike.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
from redis.typing import EncodableT, FieldT

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


def append_events(
    client: redis.Redis,
    events: Sequence[Mapping[str, Any]],
    *,
    stream: str,
    history_length: int,
    history_ttl_s: int,
    stream_maxlen: int | None = None,
) -> list[str]:
    """Store validated events durably: the whole batch in one stream shard, and each user's recent list.

    The batch goes to the shard of its first event's user group, in one ``MULTI``/``EXEC``
    transaction with the recent lists of that group's users (``XADD`` per event; ``LPUSH``,
    ``LTRIM`` to ``history_length``, ``EXPIRE`` per user). The function returns only after that
    ``EXEC`` succeeded, so a caller that answers afterwards never acknowledges an event Redis did
    not take. A batch mixing users of several groups (rare: a storefront batches one visitor's
    events) then updates the other groups' recent lists, one ``MULTI`` per group: those are a cache
    for fold-in, the events themselves are already durable, so a failure there is logged and the
    batch still counts as stored (those users miss real time until the next retrain).

    Parameters
    ----------
    client : redis.Redis
    events : sequence of dict
        Events already normalised by :func:`recsvc.core.contract.validate_event`.
    stream : str
        Stream name (``Config.events.stream``); its shards are :func:`recsvc.storage.keys.stream_shards`.
    history_length : int
        Entries kept per user list (``Config.history_length``).
    history_ttl_s : int
        Lifetime of a user's list after their newest event (``Config.history_ttl_s``).
    stream_maxlen : int, optional
        Refuse (:class:`StreamFull`) when the target shard already holds its share of this many
        entries (:func:`recsvc.storage.keys.shard_limit`). The stream is never trimmed by ingestion:
        an entry leaves it only once a dump wrote it to a file.

    Returns
    -------
    list of str
        The stream entry ids, in event order.

    Raises
    ------
    StreamFull
        The target shard is full.
    redis.RedisError
        Redis refused or is unreachable; nothing of the batch was applied.
    """
    if not events:
        return []
    lead = keys.user_group(events[0]["user_id"])
    shard = keys.stream_shard(stream, lead)
    if stream_maxlen is not None and client.xlen(shard) >= keys.shard_limit(stream_maxlen):
        raise StreamFull(f"event stream {stream!r} holds {stream_maxlen} undumped events")
    by_group: dict[int, dict[str, list[str]]] = {}
    pipe = client.pipeline(transaction=True)
    for event in events:
        # redis-py types the fields as a dict of any encodable (dict is invariant); ours are str.
        pipe.xadd(shard, cast("dict[FieldT, EncodableT]", _stream_fields(event)))
        user = event["user_id"]
        by_group.setdefault(keys.user_group(user), {}).setdefault(user, []).append(_recent_entry(event))
    _push_recent(pipe, by_group.pop(lead), history_length, history_ttl_s)
    results = pipe.execute()
    if by_group:
        _push_other_groups(client, by_group, history_length, history_ttl_s)
    return [codec.text(entry_id) for entry_id in results[: len(events)]]


def _push_recent(pipe: Any, by_user: dict[str, list[str]], history_length: int, ttl_s: int) -> None:
    for user_id, entries in by_user.items():
        key = recent_key(user_id)
        pipe.lpush(key, *entries)
        pipe.ltrim(key, 0, history_length - 1)
        pipe.expire(key, ttl_s)


def _push_other_groups(
    client: redis.Redis, by_group: dict[int, dict[str, list[str]]], history_length: int, ttl_s: int
) -> None:
    for by_user in by_group.values():
        try:
            pipe = client.pipeline(transaction=True)
            _push_recent(pipe, by_user, history_length, ttl_s)
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
