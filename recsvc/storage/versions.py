"""Model versions in Redis: publish, verify, the live pointer, rollback and retention.

A publish writes the whole version (key layout: :mod:`recsvc.storage.keys`), reads it back to verify
it, marks it ``complete`` and only then flips the live pointer in one Lua script on the control
slot. The pointer is then copied into every user group (one slot each on a Redis Cluster), each copy
guarded by the flip's epoch so a late copy of an older flip never overwrites a newer one. A request
reads its group's copy together with the user's record in one script, so it sees the old or the new
version, never a mix; for the few milliseconds of the copy, users of different groups may be on
different versions. Versions beyond ``keep_versions`` are deleted, never the live one nor one a
pointer copy still names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import redis
import scipy.sparse as sp
from redis.typing import EncodableT, FieldT

from recsvc.core.artifact import Artifact, ArtifactError, read_artifact, resolve
from recsvc.core.config import Config
from recsvc.core.ids import is_valid_version
from recsvc.core.topk import SCORE_CHUNK_ELEMENTS
from recsvc.storage import codec, holders, keys
from recsvc.storage import repurchase as repurchase_store
from recsvc.storage.codec import (
    PackedRows,
    array_bytes,
    csr_mapping,
    index_dtype,
    items_mapping,
    pack_user_rows,
    popular_lists,
    unpack_user,
)
from recsvc.storage.connection import masters, node_clients_for

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger(__name__)


# A publish renews its lease while it writes; a crashed one is recognised once the lease expires.
PUBLISH_LEASE_S = 120
# Users compared byte-for-byte after writing, besides the per-bucket field counts.
VERIFY_SAMPLE_USERS = 256

# The next flip epoch: the server's clock in milliseconds, or one more than the last epoch when the
# clock has not moved past it. Clock-based so that a control slot that lost its epoch key (a
# failover) still orders new flips after the copies' old epochs.
_NEXT_EPOCH = """
local function next_epoch(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last = tonumber(redis.call('GET', key) or '0')
  local epoch = now
  if epoch <= last then epoch = last + 1 end
  redis.call('SET', key, string.format('%d', epoch))
  return epoch
end
"""

#: Pointer moves kept in ``keys.HISTORY`` (the console's publish/rollback history).
HISTORY_LENGTH = 200

# One entry of the pointer's history, written in the same script as the move it records.
_RECORD = """
local function record(key, action, version, previous, at)
  local entry = cjson.encode({action = action, version = version, previous = previous or cjson.null,
                              at = tonumber(at)})
  redis.call('LPUSH', key, entry)
  redis.call('LTRIM', key, 0, {last})
end
""".replace("{last}", str(HISTORY_LENGTH - 1))

# Flip the pointer only if the version is complete; remember the old live version for rollback;
# record the move; take a new epoch for the pointer copies. Returns {old version or false, epoch}.
_FLIP_SCRIPT = (
    _NEXT_EPOCH
    + _RECORD
    + """
if redis.call('HGET', KEYS[4], 'status') ~= 'complete' then
  return redis.error_reply('version ' .. ARGV[1] .. ' is not completely published')
end
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[1] then
  redis.call('LREM', KEYS[2], 0, old)
  redis.call('LPUSH', KEYS[2], old)
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
record(KEYS[6], ARGV[3], ARGV[1], old, ARGV[2])
return {old, next_epoch(KEYS[5])}
"""
)

# Pop previous versions until one that is still published; make it live; record the move.
# Returns {version, epoch}.
_ROLLBACK_SCRIPT = (
    _NEXT_EPOCH
    + _RECORD
    + """
local current = redis.call('GET', KEYS[1])
while true do
  local v = redis.call('LPOP', KEYS[2])
  if not v then return false end
  if v ~= current and redis.call('ZSCORE', KEYS[3], v) then
    redis.call('SET', KEYS[1], v)
    record(KEYS[5], 'rollback', v, current, ARGV[1])
    return {v, next_epoch(KEYS[4])}
  end
end
"""
)

# One group's copy of the pointer: written only by a flip newer than the one it holds.
_COPY_SCRIPT = """
local held = tonumber(redis.call('GET', KEYS[2]) or '-1')
if held < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_COPY_SHA = hashlib.sha1(_COPY_SCRIPT.encode()).hexdigest()


class PublishError(RuntimeError):
    """A publish could not complete; the live version is unchanged."""


class RollbackError(RuntimeError):
    """There is no earlier published version to switch back to."""


# ------------------------------------------------------------------------------------------------
# Reading the pointer and the list of versions
# ------------------------------------------------------------------------------------------------


def current_version(client: redis.Redis) -> str | None:
    """The live version, or None when nothing is published."""
    return codec.text(client.get(keys.CURRENT))


def list_published(client: redis.Redis) -> list[dict[str, Any]]:
    """Published versions, newest first: ``version``, ``published_at`` (unix s), ``live``, counts."""
    live = current_version(client)
    entries = cast("list[tuple[bytes | str, float]]", client.zrevrange(keys.VERSIONS, 0, -1, withscores=True))
    pipe = client.pipeline(transaction=False)
    for version, _ in entries:
        pipe.hgetall(keys.version(codec.text(version), "info"))
    infos = pipe.execute() if entries else []
    out = []
    for (version, score), info in zip(entries, infos, strict=True):
        name = codec.text(version)
        info = {codec.text(k): codec.text(v) for k, v in info.items()}
        out.append(
            {
                "version": name,
                "published_at": float(score),
                "live": name == live,
                "users": int(info.get("n_users", 0)),
                "items": int(info.get("n_items", 0)),
                "created_at": info.get("created_at"),
            }
        )
    return out


def history(client: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The last ``limit`` moves of the live pointer, newest first.

    Each is ``{"action": "publish" | "activate" | "rollback", "version", "previous", "at"}`` (``at``:
    unix seconds), recorded by the same script that moved the pointer, so none is missing or
    invented; at most :data:`HISTORY_LENGTH` are kept.
    """
    out = []
    for raw in client.lrange(keys.HISTORY, 0, max(0, min(limit, HISTORY_LENGTH)) - 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def read_manifest(client: redis.Redis, version: str) -> dict[str, Any] | None:
    """The manifest a published version was written with (None when Redis has none)."""
    raw = client.get(keys.version(version, "manifest"))
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def pointer_copies(client: redis.Redis) -> list[str | None]:
    """The live pointer as each user group sees it (index = group)."""
    pipe = client.pipeline(transaction=False)
    for group in range(keys.GROUPS):
        pipe.get(keys.current_copy(group))
    return [codec.text(v) for v in pipe.execute()]


def named_versions(client: redis.Redis) -> set[str]:
    """Versions some request may be reading: the live one and every pointer copy's."""
    return {v for v in [current_version(client), *pointer_copies(client)] if v is not None}


def read_info(client: redis.Redis, version: str) -> dict[str, str]:
    """The ``info`` hash of a version (empty when the version is not in Redis)."""
    return {codec.text(k): codec.text(v) for k, v in client.hgetall(keys.version(version, "info")).items()}


# ------------------------------------------------------------------------------------------------
# Packing (pure numpy; the serving side decodes with the same layout)
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Publish
# ------------------------------------------------------------------------------------------------


@dataclass
class PublishStats:
    """What one publish did, for logs and the CLI."""

    version: str
    users: int
    items: int
    buckets: int
    seconds: float  # the whole publish: load, score, write, verify, flip, prune
    write_seconds: float  # packing and writing to Redis (pipelined), excluding top-K scoring
    score_seconds: float = 0.0  # matrix products and top-K selection
    reused: bool = False

    @property
    def users_per_second(self) -> float:
        """End-to-end rate."""
        return self.users / self.seconds if self.seconds else float("inf")

    @property
    def write_users_per_second(self) -> float:
        """Rate of the Redis write path alone (packing + pipelined HSETs)."""
        return self.users / self.write_seconds if self.write_seconds else float("inf")


def _load(artifact_or_path: Artifact | str | os.PathLike, config: Config) -> Artifact:
    if isinstance(artifact_or_path, Artifact):
        if "version" not in artifact_or_path.manifest:
            raise ArtifactError(
                "artifact has no version: write it with recsvc.core.artifact.write_artifact first"
            )
        artifact_or_path.validate()
        return artifact_or_path
    return read_artifact(resolve(config.models_dir, artifact_or_path))


def publish(
    client: redis.Redis,
    artifact_or_path: Artifact | str | os.PathLike,
    config: Config,
    *,
    progress: Callable[[int], None] | None = None,
    stats: list[PublishStats] | None = None,
) -> str:
    """Write a whole model version into Redis, verify it, flip the live pointer; return the version.

    Parameters
    ----------
    client : redis.Redis
        A client with generous timeouts (``recsvc.storage.connection.connect_admin``).
    artifact_or_path : Artifact or path-like or str
        An :class:`~recsvc.core.artifact.Artifact` that was written (has a version), a version folder, a
        version name under ``config.models_dir``, or ``"latest"``.
    config : Config
        ``topk_cached`` (K per user) and ``keep_versions`` (retention) are used.
    progress : callable, optional
        Called with the number of users written after each chunk (e.g. ``Progress.update``).
    stats : list, optional
        A :class:`PublishStats` is appended to it.

    Returns
    -------
    str
        The version now live.

    Raises
    ------
    ArtifactError
        The artifact is missing, corrupt or inconsistent (nothing was written).
    PublishError
        Writing or verification failed; what was written is removed and the live version is unchanged.

    Notes
    -----
    Publishing a version that Redis already holds completely does not rewrite it (it may be live and
    serving); it is verified and made live again.
    """
    started = time.perf_counter()
    artifact = _load(artifact_or_path, config)
    version = artifact.version
    if not is_valid_version(version):
        raise ArtifactError(f"manifest.json: version {version!r} is not a valid version name")
    cleanup_orphans(client)

    info = read_info(client, version)
    reused = info.get("status") == "complete"
    write_seconds = 0.0
    timing = {"score_seconds": 0.0}
    if not reused:
        lease = _Lease(client, version)
        lease.acquire()
        try:
            _delete_version_keys(client, version)  # leftovers of an earlier failed attempt
            t0 = time.perf_counter()
            _write_version(client, artifact, config, lease, progress, timing)
            write_seconds = time.perf_counter() - t0 - timing["score_seconds"]
            verify_version(client, artifact, config)
            client.hset(keys.version(version, "info"), "status", "complete")
        except BaseException as e:
            _delete_version_keys(client, version)
            lease.release()
            if isinstance(e, ArtifactError | PublishError):
                raise
            if isinstance(e, redis.RedisError):
                raise PublishError(
                    f"publish of {version} failed ({type(e).__name__}: {e}); live version unchanged"
                ) from e
            raise
        lease.release()
    else:
        verify_version(client, artifact, config)

    _flip(client, version)
    deleted = prune_versions(client, config.serving.keep_versions)
    seconds = time.perf_counter() - started
    log.info(
        "published %s: %d users, %d items in %.2fs%s%s",
        version,
        artifact.n_users,
        artifact.n_items,
        seconds,
        " (already in Redis, re-activated)" if reused else "",
        f"; deleted old versions {', '.join(deleted)}" if deleted else "",
    )
    if stats is not None:
        stats.append(
            PublishStats(
                version=version,
                users=artifact.n_users,
                items=artifact.n_items,
                buckets=keys.bucket_count(artifact.n_users),
                seconds=seconds,
                write_seconds=write_seconds,
                score_seconds=timing["score_seconds"],
                reused=reused,
            )
        )
    return version


class _Lease:
    """A short-lived key that says "a publish is writing this version" (renewed while writing)."""

    def __init__(self, client: redis.Redis, version: str):
        self.client, self.version, self.token = client, version, holders.holder_token()
        self.key = keys.publishing(version)
        self.renewed = 0.0

    def acquire(self) -> None:
        if not self.client.set(self.key, self.token, nx=True, ex=PUBLISH_LEASE_S):
            # A publish killed on this host: its lease is freed now rather than in PUBLISH_LEASE_S.
            dead = holders.take_over_if_dead(self.client, self.key)
            if dead is None or not self.client.set(self.key, self.token, nx=True, ex=PUBLISH_LEASE_S):
                raise PublishError(f"another publish of {self.version} is running")
            log.warning("took over the lease of a publish of %s that died (%s)", self.version, dead)
        self.renewed = time.monotonic()

    def renew(self) -> None:
        if time.monotonic() - self.renewed > PUBLISH_LEASE_S / 4:
            self.client.expire(self.key, PUBLISH_LEASE_S)
            self.renewed = time.monotonic()

    def release(self) -> None:
        try:
            if codec.text(self.client.get(self.key)) == self.token:
                self.client.delete(self.key)
        except redis.RedisError:  # the lease expires by itself
            pass


def _write_version(
    client: redis.Redis,
    artifact: Artifact,
    config: Config,
    lease: _Lease,
    progress: Callable[[int], None] | None,
    timing: dict[str, float],
) -> None:
    version = artifact.version
    n_users, n_items = artifact.n_users, artifact.n_items
    factors = int(artifact.item_factors.shape[1])
    k = min(config.serving.topk_cached, n_items)
    n_buckets = keys.bucket_count(n_users)
    manifest = artifact.manifest
    scorer = artifact.scorer()
    store_scores = not scorer.spec.is_plain_als
    dtype = index_dtype(n_items)
    info: dict[FieldT, EncodableT] = {
        "status": "writing",
        "version": version,
        "n_users": n_users,
        "n_items": n_items,
        "factors": factors,
        "k": k,
        "index_dtype": dtype,
        "scores": int(store_scores),
        "n_buckets": n_buckets,
        "n_categories": len(artifact.categories),
        "created_at": str(manifest.get("created_at", "")),
        "trained_until": str(manifest.get("trained_until", "")),
        "started_at": time.time(),
    }
    client.hset(keys.version(version, "info"), mapping=info)
    client.set(keys.version(version, "manifest"), json.dumps(manifest, sort_keys=True, default=str))
    # redis-py types hash fields as any encodable, and Mapping is invariant in its key: ours are str.
    client.hset(
        keys.version(version, "items"), mapping=cast("Mapping[FieldT, EncodableT]", items_mapping(artifact))
    )
    popular = popular_lists(artifact.popularity, artifact.category, len(artifact.categories))
    client.hset(keys.version(version, "popular"), mapping=cast("Mapping[FieldT, EncodableT]", popular))
    b = artifact.bundles
    client.hset(
        keys.version(version, "bundles"),
        mapping={
            "indptr": array_bytes(b.indptr, "<i8"),
            "indices": array_bytes(b.indices, "<i4"),
            "score": array_bytes(b.score, "<f4"),
            "support": array_bytes(b.support, "<i4"),
        },
    )
    if artifact.similarity is not None:
        client.hset(
            keys.version(version, "similarity"),
            mapping=cast("Mapping[FieldT, EncodableT]", csr_mapping(artifact.similarity)),
        )
    repurchase_store.write_params(client, artifact)

    if n_users == 0:
        return
    user_names = [u.encode("utf-8") for u in artifact.user_ids]
    buckets = np.fromiter(
        (keys.user_bucket(u, n_buckets) for u in artifact.user_ids), dtype=np.int64, count=n_users
    )
    # Process users grouped by bucket so each chunk touches few bucket hashes: one HSET per
    # (chunk, bucket) carries many users.
    order = np.argsort(buckets, kind="stable")
    user_factors = np.ascontiguousarray(artifact.user_factors[order])
    raw = artifact.raw_interactions()[order]
    never = _never_again(artifact)
    # Items bought again (the learned rate, the operator's categories) stay in the lists: serving
    # exempts them from "already bought" by the same rule (core.repurchase.repurchasable_items).
    exempt = artifact.repurchasable(config.serving.repurchase_min_rate, config.serving.repurchase_categories)
    excluded = PackedRows(never, dtype, weighted=False)
    blocked = never[order]
    blocked.data = (~exempt[blocked.indices]).astype(np.float32)
    blocked.eliminate_zeros()
    weighted = PackedRows(artifact.interactions, "<i4", weighted=True)
    topk_keys = [keys.bucket(version, "topk", b).encode() for b in range(n_buckets)]
    inter_keys = [keys.bucket(version, "interactions", b).encode() for b in range(n_buckets)]
    chunk_rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, n_items))

    # Scoring (numpy, GIL released) of the next chunk overlaps with sending this one to Redis.
    with _RawWriter(client) as writer:
        for start in range(0, n_users, chunk_rows):
            t0 = time.perf_counter()
            stop = min(n_users, start + chunk_rows)
            idx, top_scores = scorer.top_k(raw[start:stop], user_factors[start:stop], k, blocked[start:stop])
            timing["score_seconds"] += time.perf_counter() - t0
            rows = pack_user_rows(idx, top_scores if store_scores else None, user_factors[start:stop], dtype)
            row_len, packed = rows.shape[1], rows.tobytes()
            chunk_users = order[start:stop]
            chunk_buckets = buckets[chunk_users]
            cuts = np.flatnonzero(np.diff(chunk_buckets)) + 1
            bounds = np.concatenate(([0], cuts, [len(chunk_users)])).tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                bucket = int(chunk_buckets[lo])
                members = chunk_users[lo:hi].tolist()
                names = [user_names[u] for u in members]
                values = [
                    packed[row_len * j : row_len * (j + 1)] + excluded.row(u)
                    for j, u in enumerate(members, start=lo)
                ]
                writer.hset(topk_keys[bucket], names, values)
                history = [(name, weighted.row(u)) for u, name in zip(members, names, strict=True)]
                history = [(name, row) for name, row in history if row]
                if history:
                    writer.hset(inter_keys[bucket], [h[0] for h in history], [h[1] for h in history])
            writer.flush()
            lease.renew()
            if progress is not None:
                progress(stop - start)
        repurchase_store.write(writer.hset, artifact, n_buckets, index_dtype(n_items), writer.flush)


def _never_again(artifact: Artifact) -> sp.csr_matrix:
    """Per user, the items their list never holds: their purchases, or every item they interacted
    with when the model's exclusion rule says so (``manifest["exclusion"]``)."""
    spec = artifact.spec()
    return (artifact.interactions if spec.excludes_interacted else artifact.purchases).tocsr()


class _RawWriter:
    """Bulk ``HSET`` for publish: commands encoded straight to RESP, sent by background threads.

    redis-py's generic command packing costs several microseconds per argument, which made it the
    bottleneck at ~100k users x 2 fields; the payload here is plain ``bytes`` (user ids and packed
    numpy rows), so encoding it directly is simple. Commands are batched per node -- one batch on a
    single Redis, one per master owning the keys' slots on a cluster -- and the batches of one
    flush are sent in parallel, one thread per node, while the caller scores the next chunk. Each
    HSET's reply (the number of new fields) is checked against the fields sent: every field must be
    new, because the version was empty before the write. A redirection (a slot moved while
    publishing) fails the publish, which then removes what it wrote.
    """

    def __init__(self, client: redis.Redis):
        from concurrent.futures import ThreadPoolExecutor

        self.client = client
        self._nodes: list[redis.Redis] = []  # distinct node clients, in first-use order
        self._node_of_key: dict[bytes, int] = {}
        self.parts: dict[int, list[bytes]] = {}
        self.expected: dict[int, list[int]] = {}
        workers = max(1, len(masters(client)))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recsvc-publish")
        self._inflight: list[Future[None]] = []

    def __enter__(self) -> _RawWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
                self._wait()
            else:
                for inflight in self._inflight:
                    inflight.exception()  # let it finish; the caller's error wins
        finally:
            self._pool.shutdown(wait=True)

    def _node(self, key: bytes) -> int:
        node = self._node_of_key.get(key)
        if node is None:
            client = node_clients_for(self.client, [key])[0]
            node = next((i for i, known in enumerate(self._nodes) if known is client), len(self._nodes))
            if node == len(self._nodes):
                self._nodes.append(client)
            self._node_of_key[key] = node
        return node

    def hset(self, key: bytes, names: list[bytes], values: list[bytes]) -> None:
        node = self._node(key)
        parts = self.parts.setdefault(node, [])
        parts.append(b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 + 2 * len(names), len(key), key))
        for name, value in zip(names, values, strict=True):
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(value), value))
        self.expected.setdefault(node, []).append(len(names))

    def flush(self) -> None:
        """Hand the queued commands to the senders (after the previous batches were acknowledged)."""
        if not self.expected:
            return
        batches = [(node, b"".join(self.parts[node]), expected) for node, expected in self.expected.items()]
        self.parts, self.expected = {}, {}
        self._wait()
        self._inflight = [
            self._pool.submit(self._send, self._nodes[node], payload, expected)
            for node, payload, expected in batches
        ]

    def _wait(self) -> None:
        inflight, self._inflight = self._inflight, []
        errors = [f.exception() for f in inflight]
        for error in errors:
            if error is not None:
                raise error

    @staticmethod
    def _send(node: redis.Redis, payload: bytes, expected: list[int]) -> None:
        pool = node.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([payload])
            replies = [conn.read_response() for _ in expected]
        except BaseException:
            conn.disconnect()  # a half-read connection must never go back to the pool
            raise
        finally:
            pool.release(conn)
        for reply, want in zip(replies, expected, strict=True):
            if isinstance(reply, Exception):
                raise PublishError(f"HSET failed: {reply}")
            if reply != want:
                raise PublishError(f"HSET stored {reply} new fields, expected {want}")


def verify_version(client: redis.Redis, artifact: Artifact, config: Config) -> None:
    """Read a written version back and compare it with the artifact; raise :class:`PublishError`.

    Checks every item field byte for byte, the number of users in each bucket, and the packed rows of
    a deterministic sample of users (first, last and evenly spaced).
    """
    version = artifact.version
    info = read_info(client, version)
    if not info:
        raise PublishError(f"verify {version}: info missing")
    expected_items = items_mapping(artifact)
    stored = client.hgetall(keys.version(version, "items"))
    for name, value in expected_items.items():
        want = value.encode("utf-8") if isinstance(value, str) else value
        if stored.get(name.encode()) != want:
            raise PublishError(f"verify {version}: items field {name!r} differs from the artifact")
    n_buckets = int(info["n_buckets"])
    k = int(info["k"])
    factors = int(info["factors"])
    if artifact.n_users:
        pipe = client.pipeline(transaction=False)
        for b in range(n_buckets):
            pipe.hlen(keys.bucket(version, "topk", b))
        counts = pipe.execute()
        if sum(counts) != artifact.n_users:
            raise PublishError(
                f"verify {version}: {sum(counts)} users in Redis, artifact has {artifact.n_users}"
            )
        sample = np.unique(
            np.linspace(0, artifact.n_users - 1, min(VERIFY_SAMPLE_USERS, artifact.n_users)).astype(int)
        )
        users = [artifact.user_ids[u] for u in sample]
        pipe = client.pipeline(transaction=False)
        for user in users:
            pipe.hget(keys.bucket(version, "topk", keys.user_bucket(user, n_buckets)), user)
        values = pipe.execute()
        never = _never_again(artifact)
        dtype = info["index_dtype"]
        with_scores = info.get("scores") == "1"
        fixed = np.dtype(dtype).itemsize * k + (4 * k if with_scores else 0) + 4 * factors
        for u, user, value in zip(sample, users, values, strict=True):
            excluded = never.indices[never.indptr[u] : never.indptr[u + 1]]
            if value is None or len(value) != fixed + np.dtype(dtype).itemsize * len(excluded):
                raise PublishError(f"verify {version}: record of user {user!r} missing or truncated")
            _, _, vector, stored_excluded = unpack_user(value, k, factors, dtype, with_scores)
            if not np.array_equal(vector, artifact.user_factors[u]):
                raise PublishError(f"verify {version}: user factors of {user!r} differ from the artifact")
            if not np.array_equal(stored_excluded, excluded):
                raise PublishError(f"verify {version}: excluded items of {user!r} differ from the artifact")
        pipe = client.pipeline(transaction=False)
        for b in range(n_buckets):
            pipe.hlen(keys.bucket(version, "interactions", b))
        with_history = int(np.count_nonzero(np.diff(artifact.interactions.tocsr().indptr)))
        if sum(pipe.execute()) != with_history:
            raise PublishError(
                f"verify {version}: interaction rows differ from the artifact's {with_history}"
            )
    popular = client.hget(keys.version(version, "popular"), "*")
    if popular is None or len(popular) != 4 * artifact.n_items:
        raise PublishError(f"verify {version}: popularity list missing")
    problem = repurchase_store.verify(client, artifact, n_buckets, info["index_dtype"])
    if problem is not None:
        raise PublishError(f"verify {version}: {problem}")


def _flip(client: redis.Redis, version: str, action: str = "publish") -> None:
    try:
        reply = client.eval(
            _FLIP_SCRIPT,
            6,
            keys.CURRENT,
            keys.PREVIOUS,
            keys.VERSIONS,
            keys.version(version, "info"),
            keys.EPOCH,
            keys.HISTORY,
            version,
            time.time(),
            action,
        )
    except redis.ResponseError as e:
        raise PublishError(str(e)) from e
    _copy_pointer(client, version, int(reply[1]))


def _copy_pointer(client: redis.Redis, version: str, epoch: int) -> None:
    """Write ``version`` into every group's pointer copy, unless a newer flip got there first.

    One pipeline per node (a cluster client does not pipeline scripts): one round trip on a single
    Redis, one per master on a cluster.
    """
    copies = [keys.current_copy(group) for group in range(keys.GROUPS)]
    by_node: dict[int, tuple[redis.Redis, list[int]]] = {}
    for group, node in enumerate(node_clients_for(client, copies)):
        by_node.setdefault(id(node), (node, []))[1].append(group)
    for node, groups in by_node.values():
        for attempt in range(2):
            pipe = node.pipeline(transaction=False)
            for group in groups:
                pipe.evalsha(_COPY_SHA, 2, copies[group], keys.epoch_copy(group), version, epoch)
            try:
                pipe.execute()
                break
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                node.script_load(_COPY_SCRIPT)


def sync_pointer_copies(client: redis.Redis) -> str | None:
    """Bring every group's pointer copy to the live version (after a flip that died half-way).

    Returns the live version (None when nothing is published).
    """
    pipe = client.pipeline(transaction=True)  # both keys are in the control slot
    pipe.get(keys.CURRENT)
    pipe.get(keys.EPOCH)
    live, epoch = pipe.execute()
    if live is None:
        return None
    _copy_pointer(client, codec.text(live), int(epoch or 0))
    return codec.text(live)


def activate(client: redis.Redis, version: str) -> str:
    """Make an already published (complete) version live again; return it."""
    if not is_valid_version(version):
        raise PublishError(f"invalid model version {version!r}")
    if client.zscore(keys.VERSIONS, version) is None:
        raise PublishError(f"version {version} is not published")
    _flip(client, version, action="activate")
    return version


def rollback(client: redis.Redis, config: Config) -> str:
    """Switch the live pointer back to the version that was live before; return it.

    Raises
    ------
    RollbackError
        No earlier version is still published (only one version was ever live, or the older ones
        were deleted by retention).
    """
    reply = client.eval(
        _ROLLBACK_SCRIPT, 5, keys.CURRENT, keys.PREVIOUS, keys.VERSIONS, keys.EPOCH, keys.HISTORY, time.time()
    )
    if not reply:
        raise RollbackError("no previous published version to roll back to")
    version = codec.text(reply[0])
    _copy_pointer(client, version, int(reply[1]))
    log.info("rolled back to %s", version)
    return version


# ------------------------------------------------------------------------------------------------
# Retention and cleanup
# ------------------------------------------------------------------------------------------------


def _delete_version_keys(client: redis.Redis, version: str, batch: int = 500) -> int:
    """UNLINK every key of ``version`` (UNLINK frees memory off the main thread).

    The keys are known from the version's ``info`` (its bucket count); without it (a publish that
    died before writing it) a SCAN of every master finds them. On a cluster the UNLINKs are split
    per slot.
    """
    info = read_info(client, version)
    if info.get("n_buckets", "").isdigit():
        names: list[Any] = keys.version_keys(version, int(info["n_buckets"]))
        names.remove(keys.version(version, "info"))
        names.append(keys.version(version, "info"))  # last: a crash half-way can still find the rest
    else:
        names = list(client.scan_iter(match=keys.version_pattern(version), count=batch))
    deleted = 0
    for start in range(0, len(names), batch):
        deleted += client.unlink(*names[start : start + batch])
    return deleted


def delete_version(client: redis.Redis, version: str) -> int:
    """Remove a version no request reads from Redis; return how many keys were deleted."""
    if version in named_versions(client):
        raise PublishError(f"version {version} is live; publish or roll back to another first")
    pipe = client.pipeline(transaction=True)  # both in the control slot
    pipe.zrem(keys.VERSIONS, version)
    pipe.lrem(keys.PREVIOUS, 0, version)
    pipe.execute()
    return _delete_version_keys(client, version)


def prune_versions(client: redis.Redis, keep: int) -> list[str]:
    """Delete published versions beyond ``keep``; return their names.

    Kept, in this order until ``keep`` are chosen: the live version, the versions rollback would go
    back to (most recent first), then the most recently published others. A version a pointer copy
    still names is never deleted, even beyond ``keep`` (a flip that died half-way).
    """
    keep = max(1, keep)
    live = current_version(client)
    named = named_versions(client)
    newest_first = [codec.text(v) for v in cast("list[bytes | str]", client.zrevrange(keys.VERSIONS, 0, -1))]
    rollback_chain = [codec.text(v) for v in client.lrange(keys.PREVIOUS, 0, -1)]
    # Keep what rollback reaches first (the live version, then the versions live before it), then
    # the most recently published.
    kept: list[str] = []
    for v in [live, *rollback_chain, *newest_first]:
        if len(kept) >= keep:
            break
        if v is not None and v in newest_first and v not in kept:
            kept.append(v)
    doomed = [v for v in newest_first if v not in kept and v not in named]
    for v in doomed:
        delete_version(client, v)
    return doomed


def cleanup_orphans(client: redis.Redis) -> list[str]:
    """Delete versions a crashed publish left half-written (not published, no live lease)."""
    published = {codec.text(v) for v in cast("list[bytes | str]", client.zrange(keys.VERSIONS, 0, -1))}
    named: set[str] | None = None
    orphans = []
    for key in client.scan_iter(match=keys.VERSION_INFO_PATTERN, count=500):
        version = keys.version_of_info_key(codec.text(key))
        if version in published or not is_valid_version(version):
            continue
        if client.exists(keys.publishing(version)):
            continue  # another publish is writing it right now
        if named is None:
            named = named_versions(client)
        if codec.text(client.hget(key, "status")) == "complete" and version in named:
            continue
        orphans.append(version)
    for version in orphans:
        log.warning("removing half-published version %s left by a crashed publish", version)
        _delete_version_keys(client, version)
    return orphans


def version_memory(client: redis.Redis, version: str, sample: int = 50) -> int:
    """Approximate bytes Redis uses for a version (MEMORY USAGE of every key)."""
    info = read_info(client, version)
    if info.get("n_buckets", "").isdigit():
        names: list[Any] = keys.version_keys(version, int(info["n_buckets"]))
    else:
        names = list(client.scan_iter(match=keys.version_pattern(version), count=500))
    pipe = client.pipeline(transaction=False)
    for key in names:
        pipe.memory_usage(key, samples=sample)
    return sum(int(size or 0) for size in pipe.execute())


def resolve_ref(config: Config, ref: str | os.PathLike) -> Path:
    """``latest``, a version name under ``config.models_dir`` or a folder -> version folder."""
    return resolve(config.models_dir, ref)
