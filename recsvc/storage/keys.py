"""Every Redis key recsvc uses, in one place.

Nothing else spells a ``recsvc:*`` key: code asks this module for the name. Layout::

    recsvc:model:current             string  the live version
    recsvc:model:versions            zset    version -> unix time it went live (complete versions only)
    recsvc:model:previous            list    versions that were live before, newest first (rollback)
    recsvc:publishing:<version>      string  lease held while a publish writes <version>
    recsvc:v:<V>:info                hash    status (writing | complete), counts, layout parameters
    recsvc:v:<V>:manifest            string  the artifact's manifest.json
    recsvc:v:<V>:items               hash    per-item arrays (ids, titles, categories, factors, ...)
    recsvc:v:<V>:popular             hash    "*" -> item indices by popularity; "c<code>" per category
    recsvc:v:<V>:bundles             hash    the bundle candidates CSR
    recsvc:v:<V>:repurchase          hash    the repurchase model's item parameters
    recsvc:v:<V>:topk:<b>            hash    user_id -> packed top-K, user factors, purchases
    recsvc:v:<V>:interactions:<b>    hash    user_id -> packed training row (fold-in)
    recsvc:v:<V>:repurchase:<b>      hash    user_id -> packed bought items (buy again)
    recsvc:events                    stream  accepted events until a dump writes them to a file
    recsvc:recent:<user_id>          list    a user's newest events (fold-in)
    recsvc:events:batch:<fp>:<id>    string  a stored event batch (first id, last id, count): at most once
    recsvc:ratelimit:<scope>:<fp>:<minute>   counter per API key fingerprint and minute
    recsvc:lock:events-dump, recsvc:events:dump:commit:<stream>   the dump's lock and commit record
    recsvc:lock:retrain              string  the nightly retrain's lock
    recsvc:experiments               hash    experiment name -> JSON definition
    recsvc:experiments:rev           string  bumped on every change
    recsvc:experiments:served        list    capped log of served experiment answers

Per-user data is spread over ``n_buckets`` hashes (bucket = crc32(user_id) mod n_buckets): one
``HSET`` writes hundreds of users, and Redis keeps one key per ~1000 users instead of one per user.
"""

from __future__ import annotations

import zlib

from recsvc.core.ids import check_id, is_valid_version

PREFIX = "recsvc:"

# --- model versions -----------------------------------------------------------------------------
CURRENT = "recsvc:model:current"
VERSIONS = "recsvc:model:versions"
PREVIOUS = "recsvc:model:previous"
PUBLISHING_PREFIX = "recsvc:publishing:"
VERSION_PREFIX = "recsvc:v:"
#: SCAN pattern matching the ``info`` hash of every version in Redis.
VERSION_INFO_PATTERN = f"{VERSION_PREFIX}*:info"

#: Part name of the repurchase model: the version hash and the per-user buckets.
REPURCHASE_PART = "repurchase"

# --- real-time events ----------------------------------------------------------------------------
EVENTS_STREAM = "recsvc:events"
RECENT_PREFIX = "recsvc:recent:"
RATE_LIMIT_PREFIX = "recsvc:ratelimit:"
EVENTS_DUMP_LOCK = "recsvc:lock:events-dump"
EVENTS_DUMP_COMMIT_PREFIX = "recsvc:events:dump:commit:"
#: Consumer group and its one consumer used by the dump (names inside the stream, not keys).
DUMP_GROUP = "recsvc-dump"
DUMP_CONSUMER = "dump"

# --- batch jobs ----------------------------------------------------------------------------------
RETRAIN_LOCK = "recsvc:lock:retrain"

# --- experiments ---------------------------------------------------------------------------------
EXPERIMENTS = "recsvc:experiments"
EXPERIMENTS_REV = "recsvc:experiments:rev"
EXPERIMENTS_SERVED = "recsvc:experiments:served"


def version(version_name: str, part: str) -> str:
    """Key of one part of a version, e.g. ``version("v1", "items")`` -> ``recsvc:v:v1:items``."""
    if not is_valid_version(version_name):
        raise ValueError(f"invalid model version {version_name!r}")
    return f"{VERSION_PREFIX}{version_name}:{part}"


def version_pattern(version_name: str) -> str:
    """SCAN pattern matching every key of a version."""
    return version(version_name, "*")


def version_of_info_key(key: str) -> str:
    """The version name inside a ``recsvc:v:<V>:info`` key."""
    return key[len(VERSION_PREFIX) : -len(":info")]


def publishing(version_name: str) -> str:
    """The lease a running publish of ``version_name`` holds."""
    return PUBLISHING_PREFIX + version_name


#: Users per bucket hash: large enough that one HSET carries many users, small enough that UNLINK of
#: one bucket and HGETALL for debugging stay cheap.
USERS_PER_BUCKET = 1000


def bucket_count(n_users: int) -> int:
    """Number of per-user bucket hashes of a version with ``n_users`` users."""
    return max(1, -(-n_users // USERS_PER_BUCKET))


def user_bucket(user_id: str, n_buckets: int) -> int:
    """The bucket hash that holds ``user_id``'s per-user data (stable across processes)."""
    return zlib.crc32(user_id.encode("utf-8")) % n_buckets


def bucket(version_name: str, part: str, bucket_number: int) -> str:
    """Key of one per-user bucket hash: ``part`` is ``topk``, ``interactions`` or ``repurchase``."""
    return version(version_name, f"{part}:{bucket_number}")


def recent(user_id: str) -> str:
    """A user's recent-history list; the id is checked against the id contract first."""
    return RECENT_PREFIX + check_id(user_id, "user_id")


EVENT_BATCH_PREFIX = "recsvc:events:batch:"


def event_batch(fingerprint: str, batch_id: str) -> str:
    """The at-most-once record of an event batch, per API key fingerprint (ids checked first)."""
    return f"{EVENT_BATCH_PREFIX}{check_id(fingerprint, 'fingerprint')}:{check_id(batch_id, 'batch_id')}"


def rate_limit(scope: str, fingerprint: str, window: int) -> str:
    """Counter of one rate-limit ``scope`` (e.g. ``events``) for a key fingerprint and minute."""
    return f"{RATE_LIMIT_PREFIX}{scope}:{fingerprint}:{window}"


def events_dump_commit(stream: str) -> str:
    """The commit record of a dump of ``stream``."""
    return EVENTS_DUMP_COMMIT_PREFIX + stream
