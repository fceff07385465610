"""The real-time event stream: durable appends, each user's recent history, and reading it back.

* ``recsvc:events``: a stream, one entry per accepted event, fields named as in the events contract.
  It is the durable log between ``POST /v1/events`` and the next ``recsvc events dump``; nothing
  trims it except a dump that has written its entries to a file.
* ``recsvc:recent:<user_id>``: a list of the user's newest events (newest first), at most
  ``history_length`` entries, each ``"<timestamp>|<event code>|<item_id>"``; fold-in reads it. It
  expires ``history_ttl_s`` after the user's last event so one-visit shoppers do not stay in memory.
"""

from __future__ import annotations

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
    """Store validated events durably: the stream and each user's recent list, all or nothing.

    Everything goes in one ``MULTI``/``EXEC`` transaction: the events are appended to ``stream``
    (``XADD``) and pushed onto ``recsvc:recent:<user_id>`` (``LPUSH``, ``LTRIM`` to
    ``history_length``, ``EXPIRE``). The function returns only after ``EXEC`` succeeded, so a
    caller that answers afterwards never acknowledges an event Redis did not take.

    Parameters
    ----------
    client : redis.Redis
    events : sequence of dict
        Events already normalised by :func:`recsvc.core.contract.validate_event`.
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
        # redis-py types the fields as a dict of any encodable (dict is invariant); ours are str.
        pipe.xadd(stream, cast("dict[FieldT, EncodableT]", _stream_fields(event)))
        by_user.setdefault(event["user_id"], []).append(_recent_entry(event))
    for user_id, entries in by_user.items():
        key = recent_key(user_id)
        pipe.lpush(key, *entries)
        pipe.ltrim(key, 0, history_length - 1)
        pipe.expire(key, history_ttl_s)
    results = pipe.execute()
    return [codec.text(entry_id) for entry_id in results[: len(events)]]


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
    that can reach Redis); invalid ones are skipped.

    Returns
    -------
    (EventTable, int)
        The events, oldest first, and how many invalid entries were skipped.
    """
    rows: list[dict[str, Any]] = []
    skipped = 0
    upper = "+"
    while len(rows) + skipped < limit:
        chunk = client.xrevrange(
            stream, max=upper, min="-", count=min(_STREAM_CHUNK, limit - len(rows) - skipped)
        )
        if not chunk:
            break
        for _entry_id, fields in chunk:
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
        upper = "(" + codec.text(chunk[-1][0])
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
