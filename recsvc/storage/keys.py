"""Every Redis key recsvc uses, in one place.

Nothing else spells a recsvc key: code asks this module for the name. The layout works unchanged on
one Redis and on a Redis Cluster: every key that a script or a ``MULTI`` touches together with
another carries the same hash tag (the part in braces decides the cluster slot), and on one node
the tags are just part of the names. Layout::

    control keys, tag {recsvc}: one slot, so the flip, rollback, deletion and experiment
    transactions touch a single node
    {recsvc}:model:current             string  the live version (the source of truth)
    {recsvc}:model:epoch               epoch of the last flip (server ms); orders the pointer copies
    {recsvc}:model:versions            zset    version -> unix time it went live (complete versions only)
    {recsvc}:model:previous            list    versions that were live before, newest first (rollback)
    {recsvc}:model:history             list    the last pointer moves (publish, rollback), newest first
    {recsvc}:publishing:<version>      string  lease held while a publish writes <version>
    {recsvc}:v:<V>:info                hash    status (writing | complete), counts, layout parameters
    {recsvc}:v:<V>:manifest            string  the artifact's manifest.json
    {recsvc}:v:<V>:items               hash    per-item arrays (ids, titles, categories, factors, ...)
    {recsvc}:v:<V>:popular             hash    "*" -> item indices by popularity; "c<code>" per category
    {recsvc}:v:<V>:bundles             hash    the bundle candidates CSR
    {recsvc}:v:<V>:repurchase          hash    the repurchase model's item parameters (buy again)
    {recsvc}:v:<V>:similarity          hash    the item-kNN similarity CSR (blended models only)
    {recsvc}:lock:events-dump, {recsvc}:events:dump:commit:<stream>   the dump's lock and commit record
    {recsvc}:lock:retrain              string  the nightly retrain's lock
    {recsvc}:experiments               hash    experiment name -> JSON definition
    {recsvc}:experiments:rev           string  bumped on every change

    per-user keys, tag {<group tag>} of the user's group g = crc32(user_id) mod GROUPS
    {G}:model:current, {G}:model:epoch the live pointer copied per group, and the flip epoch it
                                       was copied at (the request script reads it with the user)
    {G}:v:<V>:topk:<b>                 hash    user_id -> packed top-K (+ scores), user factors,
                                               the items never shown again
    {G}:v:<V>:interactions:<b>         hash    user_id -> packed training row (fold-in)
    {G}:v:<V>:repurchase:<b>           hash    user_id -> packed bought items (buy again)
    {G}:recent:<user_id>               list    a user's newest events (fold-in)
    {G}:<stream>                       stream  accepted events (one shard per group) until a dump
    {G}:events:batch:<fp>:<id>         string  a stored event batch (first id, last id, count): at
                                       most once; in the group of the batch's first user (its shard)

    single-key data, no tag (spread over the cluster)
    recsvc:ratelimit:<scope>:<fp>:<minute>   counter per API key fingerprint and minute
    recsvc:experiments:served                list    capped log of served experiment answers

Per-user data is spread over ``n_buckets`` hashes (bucket = crc32(user_id) mod n_buckets): one
``HSET`` writes hundreds of users, and Redis keeps one key per ~1000 users instead of one per user.
``n_buckets`` is a multiple of :data:`GROUPS`, so a user's bucket ``b`` lies in the user's group
``b mod GROUPS`` and its key shares the slot of the user's pointer copy and recent list: the
one-round-trip request script stays in one slot.

:data:`GROUPS` bounds how many cluster nodes per-user data can spread over. The group tags are
chosen so that group ``g`` hashes into the ``g``-th of ``GROUPS`` equal ranges of the 16384 slots:
a cluster whose masters own equal slot ranges (what ``redis-cli --cluster create`` and
``rebalance`` produce) holds equal shares of the groups.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from recsvc.core.ids import check_id, is_valid_version

PREFIX = "recsvc:"

#: Hash tag of the control keys.
CONTROL_TAG = "{recsvc}"

#: Fixed number of user groups (and event stream shards). Changing it moves every user to another
#: group: publish again and dump the stream first.
GROUPS = 16


def _group_tags(groups: int) -> tuple[str, ...]:
    """``{recsvc:<g>.<s>}`` with the smallest ``s`` that puts group ``g`` in the g-th slot range."""
    tags = []
    for g in range(groups):
        low, high = g * REDIS_CLUSTER_HASH_SLOTS // groups, (g + 1) * REDIS_CLUSTER_HASH_SLOTS // groups
        salt = 0
        while not low <= key_slot(f"recsvc:{g}.{salt}".encode()) < high:
            salt += 1
        tags.append(f"{{recsvc:{g}.{salt}}}")
    return tuple(tags)


#: Hash tag of each group, braces included.
GROUP_TAGS: tuple[str, ...] = _group_tags(GROUPS)

# --- model versions -----------------------------------------------------------------------------
CURRENT = f"{CONTROL_TAG}:model:current"
EPOCH = f"{CONTROL_TAG}:model:epoch"
VERSIONS = f"{CONTROL_TAG}:model:versions"
PREVIOUS = f"{CONTROL_TAG}:model:previous"
#: Capped list of pointer moves (publish, activate, rollback), newest first, as JSON objects.
HISTORY = f"{CONTROL_TAG}:model:history"
PUBLISHING_PREFIX = f"{CONTROL_TAG}:publishing:"
VERSION_PREFIX = f"{CONTROL_TAG}:v:"
#: SCAN pattern matching the ``info`` hash of every version in Redis.
VERSION_INFO_PATTERN = f"{VERSION_PREFIX}*:info"
#: Parts of a version stored once under the control tag (the rest is per-user buckets).
#: Part name of the repurchase model: a version-wide hash, and per-user buckets.
REPURCHASE_PART = "repurchase"
VERSION_PARTS = ("info", "manifest", "items", "popular", "bundles", "similarity", REPURCHASE_PART)
#: Parts stored per user bucket.
BUCKET_PARTS = ("topk", "interactions", REPURCHASE_PART)

# --- real-time events ----------------------------------------------------------------------------
EVENTS_STREAM = "recsvc:events"
RATE_LIMIT_PREFIX = "recsvc:ratelimit:"
EVENTS_DUMP_LOCK = f"{CONTROL_TAG}:lock:events-dump"
EVENTS_DUMP_COMMIT_PREFIX = f"{CONTROL_TAG}:events:dump:commit:"
#: Consumer group and its one consumer used by the dump (names inside the stream, not keys).
DUMP_GROUP = "recsvc-dump"
DUMP_CONSUMER = "dump"

# --- batch jobs ----------------------------------------------------------------------------------
RETRAIN_LOCK = f"{CONTROL_TAG}:lock:retrain"

# --- experiments ---------------------------------------------------------------------------------
EXPERIMENTS = f"{CONTROL_TAG}:experiments"
EXPERIMENTS_REV = f"{CONTROL_TAG}:experiments:rev"
EXPERIMENTS_SERVED = "recsvc:experiments:served"


def version(version_name: str, part: str) -> str:
    """Key of one version-wide part, e.g. ``version("v1", "items")`` -> ``{recsvc}:v:v1:items``."""
    if not is_valid_version(version_name):
        raise ValueError(f"invalid model version {version_name!r}")
    return f"{VERSION_PREFIX}{version_name}:{part}"


def version_pattern(version_name: str) -> str:
    """SCAN pattern matching every key of a version (control and per-user keys)."""
    if not is_valid_version(version_name):
        raise ValueError(f"invalid model version {version_name!r}")
    return f"*:v:{version_name}:*"


def version_of_info_key(key: str) -> str:
    """The version name inside a ``{recsvc}:v:<V>:info`` key."""
    return key[len(VERSION_PREFIX) : -len(":info")]


def publishing(version_name: str) -> str:
    """The lease a running publish of ``version_name`` holds."""
    return PUBLISHING_PREFIX + version_name


#: Users per bucket hash: large enough that one HSET carries many users, small enough that UNLINK of
#: one bucket and HGETALL for debugging stay cheap.
USERS_PER_BUCKET = 1000


def bucket_count(n_users: int) -> int:
    """Number of per-user bucket hashes of a version with ``n_users`` users (a multiple of GROUPS)."""
    wanted = max(1, -(-n_users // USERS_PER_BUCKET))
    return -(-wanted // GROUPS) * GROUPS


def user_hash(user_id: str) -> int:
    """The stable hash behind a user's bucket and group (the same in every process)."""
    return zlib.crc32(user_id.encode("utf-8"))


def user_bucket(user_id: str, n_buckets: int) -> int:
    """The bucket hash that holds ``user_id``'s per-user data (stable across processes)."""
    return user_hash(user_id) % n_buckets


def user_group(user_id: str) -> int:
    """The group of ``user_id``: its bucket modulo :data:`GROUPS`, whatever ``n_buckets`` is."""
    return user_hash(user_id) % GROUPS


def bucket(version_name: str, part: str, bucket_number: int) -> str:
    """Key of one per-user bucket hash: ``part`` is one of :data:`BUCKET_PARTS`."""
    if not is_valid_version(version_name):
        raise ValueError(f"invalid model version {version_name!r}")
    return f"{GROUP_TAGS[bucket_number % GROUPS]}:v:{version_name}:{part}:{bucket_number}"


def bucket_namer(version_name: str, part: str) -> Callable[[int], str]:
    """``bucket(version_name, part, b)`` as a function of ``b``, the version checked once (hot path)."""
    bucket(version_name, part, 0)  # validates
    middle = f":v:{version_name}:{part}:"
    prefixes = [tag + middle for tag in GROUP_TAGS]

    def name(bucket_number: int) -> str:
        return prefixes[bucket_number % GROUPS] + str(bucket_number)

    return name


def version_keys(version_name: str, n_buckets: int) -> list[str]:
    """Every key a complete publish of ``version_name`` with ``n_buckets`` buckets writes."""
    out = [version(version_name, part) for part in VERSION_PARTS]
    for part in BUCKET_PARTS:
        name = bucket_namer(version_name, part)
        out.extend(name(b) for b in range(n_buckets))
    return out


def current_copy(group: int) -> str:
    """The copy of the live pointer that requests of users in ``group`` read."""
    return f"{GROUP_TAGS[group]}:model:current"


def epoch_copy(group: int) -> str:
    """The flip epoch ``current_copy(group)`` was written at (a copy never goes back in time)."""
    return f"{GROUP_TAGS[group]}:model:epoch"


def live_pointer(user_id: str) -> str:
    """The live pointer copy in ``user_id``'s group (same slot as the user's bucket and list)."""
    return current_copy(user_group(user_id))


def recent(user_id: str) -> str:
    """A user's recent-history list; the id is checked against the id contract first."""
    return f"{GROUP_TAGS[user_group(check_id(user_id, 'user_id'))]}:recent:{user_id}"


def recent_pattern() -> str:
    """SCAN pattern matching every recent-history list."""
    return "{recsvc:*}:recent:*"


def stream_shard(stream: str, group: int) -> str:
    """Shard ``group`` of the event stream named ``stream`` (``Config.events.stream``).

    A leading ``recsvc:`` of the configured name is dropped: the tag already says whose key it is.
    """
    if "{" in stream or "}" in stream:
        raise ValueError(f"stream name {stream!r} must not contain braces (the shard adds its hash tag)")
    return f"{GROUP_TAGS[group]}:{stream.removeprefix(PREFIX)}"


def stream_shards(stream: str) -> list[str]:
    """Every shard of the event stream, in group order."""
    return [stream_shard(stream, g) for g in range(GROUPS)]


def shard_limit(stream_maxlen: int) -> int:
    """Undumped entries one shard may hold when the whole stream may hold ``stream_maxlen``."""
    return max(1, -(-int(stream_maxlen) // GROUPS))


def event_batch(fingerprint: str, batch_id: str, group: int) -> str:
    """The at-most-once record of an event batch, per API key fingerprint (ids checked first).

    It lives in ``group``, the group of the stream shard the batch is stored in (its first event's
    user): the store script touches the record, the shard and that group's recent lists together.
    """
    fingerprint, batch_id = check_id(fingerprint, "fingerprint"), check_id(batch_id, "batch_id")
    return f"{GROUP_TAGS[group]}:events:batch:{fingerprint}:{batch_id}"


def rate_limit(scope: str, fingerprint: str, window: int) -> str:
    """Counter of one rate-limit ``scope`` (e.g. ``events``) for a key fingerprint and minute."""
    return f"{RATE_LIMIT_PREFIX}{scope}:{fingerprint}:{window}"


def events_dump_commit(stream: str) -> str:
    """The commit record of a dump of ``stream``."""
    return EVENTS_DUMP_COMMIT_PREFIX + stream
