"""Reading published versions and per-user records on the request path.

One request reads, in one round trip, the live pointer, the user's record under the version the
process holds and ``EXISTS`` of optional probe keys (e.g. the user's recent-events list): a Lua
script, because one command costs the client far less than a pipeline of three. The pointer it reads
is the copy in the user's group (:func:`recsvc.storage.keys.live_pointer`), which shares the slot of
the user's bucket and recent list, so the script runs on one node of a Redis Cluster too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import redis

from recsvc.storage import codec, keys

_FETCH_SCRIPT = """
local records = tonumber(ARGV[2])
local out = {redis.call('GET', KEYS[1])}
for i = 2, records + 1 do out[i] = redis.call('HGET', KEYS[i], ARGV[1]) end
for i = records + 2, #KEYS do out[i] = redis.call('EXISTS', KEYS[i]) end
return out
"""
_FETCH_SHA = hashlib.sha1(_FETCH_SCRIPT.encode()).hexdigest()


def read_user_records(
    client: redis.Redis, record_keys: tuple[str, ...], user_id: str, probe_keys: tuple[str, ...] = ()
) -> tuple[str | None, list[bytes | None], list[int]]:
    """The live version, ``user_id``'s field in each of ``record_keys`` and ``EXISTS`` of each probe.

    ``record_keys`` are bucket hashes of the user and ``probe_keys`` keys of the same user (built
    from validated ids by :mod:`recsvc.storage.keys`): all of them share the user's hash slot.
    """
    request_keys = (keys.live_pointer(user_id), *record_keys, *probe_keys)
    n_keys, n_records = len(request_keys), len(record_keys)
    try:
        replies = client.evalsha(_FETCH_SHA, n_keys, *request_keys, user_id, n_records)
    except redis.exceptions.NoScriptError:  # first call, or Redis restarted and lost its script cache
        client.script_load(_FETCH_SCRIPT)
        replies = client.evalsha(_FETCH_SHA, n_keys, *request_keys, user_id, n_records)
    split = 1 + n_records
    return codec.text(replies[0]), list(replies[1:split]), [int(x) for x in replies[split:]]


def read_user(
    client: redis.Redis, record_key: str, user_id: str, probe_keys: tuple[str, ...] = ()
) -> tuple[str | None, bytes | None, list[int]]:
    """The live version, ``user_id``'s packed record in ``record_key`` and ``EXISTS`` of each probe
    (:func:`read_user_records` with one record)."""
    live, (value,), probes = read_user_records(client, (record_key,), user_id, probe_keys)
    return live, value, probes


@dataclass(frozen=True)
class StoredVersion:
    """The raw parts of one published version, as :func:`read_version` found them."""

    info: dict[str, str]
    manifest: bytes | None
    items: dict[bytes, bytes]
    popular: dict[bytes, bytes]
    bundles: dict[bytes, bytes]
    similarity: dict[bytes, bytes]  # empty for models without an item-kNN part
    repurchase: dict[bytes, bytes] = field(default_factory=dict)  # empty: no repurchase model

    @property
    def complete(self) -> bool:
        return self.info.get("status") == "complete" and bool(self.items) and self.manifest is not None


def read_version(client: redis.Redis, version: str) -> StoredVersion:
    """Everything about ``version`` that does not depend on the user (one pipelined round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.version(version, "info"))
    pipe.get(keys.version(version, "manifest"))
    pipe.hgetall(keys.version(version, "items"))
    pipe.hgetall(keys.version(version, "popular"))
    pipe.hgetall(keys.version(version, "bundles"))
    pipe.hgetall(keys.version(version, "similarity"))
    pipe.hgetall(keys.version(version, keys.REPURCHASE_PART))
    info, manifest, items, popular, bundles, similarity, repurchase = pipe.execute()
    return StoredVersion(
        info={codec.text(k): codec.text(v) for k, v in info.items()},
        manifest=manifest,
        items=items,
        popular=popular,
        bundles=bundles,
        similarity=similarity,
        repurchase=repurchase,
    )


def read_field(client: redis.Redis, key: str, field: str) -> Any:
    """One hash field (a user's packed training row, for fold-in)."""
    return client.hget(key, field)
