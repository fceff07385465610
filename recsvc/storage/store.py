"""Publishing model versions into Redis, the live pointer, rollback and retention.

Redis layout (every key of a version lives under ``recsvc:v:<version>:``)::

    recsvc:model:current            string  the live version
    recsvc:model:versions           zset    version -> unix time it went live (complete versions only)
    recsvc:model:previous           list    versions that were live before, newest first (rollback)
    recsvc:publishing:<version>     string  lease held while a publish writes <version> (crash detection)

    recsvc:v:<V>:info               hash    status (writing | complete), counts, layout parameters
    recsvc:v:<V>:manifest           string  the artifact's manifest.json
    recsvc:v:<V>:items              hash    ids, titles, categories (JSON); factors, price, available,
                                            category, popularity (packed little-endian numpy bytes)
    recsvc:v:<V>:popular            hash    "*" -> int32 item indices by popularity; "c<code>" per category
    recsvc:v:<V>:bundles            hash    indptr, indices, score, support of the bundle candidates CSR
    recsvc:v:<V>:topk:<b>           hash    user_id -> top-K item indices + float32[F] user factors
                                            + indices of items bought (one field per user: one
                                            HGET per request; indices uint16 when the catalog
                                            fits, else int32 -- ``info.index_dtype``)
    recsvc:v:<V>:interactions:<b>   hash    user_id -> int32 indices + float32 confidences (fold-in)

Per-user data is spread over ``n_buckets`` hashes (bucket = crc32(user_id) mod n_buckets) so one
``HSET`` writes hundreds of users, and Redis keeps one key per ~1000 users instead of one per user.
Values are raw numpy bytes: no JSON per item, no pickle.

A publish writes the whole version, reads it back to verify it, marks it ``complete`` and only then
flips ``recsvc:model:current`` in one Lua script (atomic: a reader sees the old or the new version).
Versions beyond ``Config.keep_versions`` (never the live one) are deleted with SCAN + UNLINK.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from recsvc.core.artifact import Artifact, ArtifactError, read_artifact, resolve
from recsvc.core.config import Config
from recsvc.core.ids import is_valid_version
from recsvc.core.ranking import mask_positions

log = logging.getLogger("recsvc.storage.store")

CURRENT_KEY = "recsvc:model:current"
VERSIONS_KEY = "recsvc:model:versions"
PREVIOUS_KEY = "recsvc:model:previous"
PUBLISHING_PREFIX = "recsvc:publishing:"
VERSION_PREFIX = "recsvc:v:"

# Users per bucket hash: large enough that one HSET carries many users, small enough that
# UNLINK of one bucket and HGETALL for debugging stay cheap.
USERS_PER_BUCKET = 1000
# Users scored per matrix product at publish: bounds memory to chunk x n_items float32.
SCORE_CHUNK_ELEMENTS = 16_000_000
# A publish renews its lease while it writes; a crashed one is recognised once the lease expires.
PUBLISH_LEASE_S = 120
# Users compared byte-for-byte after writing, besides the per-bucket field counts.
VERIFY_SAMPLE_USERS = 256

# Flip the pointer only if the version is complete; remember the old live version for rollback.
_FLIP_SCRIPT = """
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
return old
"""

# Pop previous versions until one that is still published; make it live.
_ROLLBACK_SCRIPT = """
local current = redis.call('GET', KEYS[1])
while true do
  local v = redis.call('LPOP', KEYS[2])
  if not v then return false end
  if v ~= current and redis.call('ZSCORE', KEYS[3], v) then
    redis.call('SET', KEYS[1], v)
    return v
  end
end
"""


class PublishError(RuntimeError):
    """A publish could not complete; the live version is unchanged."""


class RollbackError(RuntimeError):
    """There is no earlier published version to switch back to."""


# ------------------------------------------------------------------------------------------------
# Key names (the only place that spells them)
# ------------------------------------------------------------------------------------------------


def version_key(version: str, part: str) -> str:
    """Key of one part of a version, e.g. ``version_key("v1", "items")`` -> ``recsvc:v:v1:items``."""
    if not is_valid_version(version):
        raise ValueError(f"invalid model version {version!r}")
    return f"{VERSION_PREFIX}{version}:{part}"


def user_bucket(user_id: str, n_buckets: int) -> int:
    """The bucket hash that holds ``user_id``'s per-user data (stable across processes)."""
    return zlib.crc32(user_id.encode("utf-8")) % n_buckets


def bucket_key(version: str, part: str, bucket: int) -> str:
    """Key of one per-user bucket hash: ``part`` is ``topk`` or ``interactions``."""
    return version_key(version, f"{part}:{bucket}")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------
# Reading the pointer and the list of versions
# ------------------------------------------------------------------------------------------------


def current_version(client: redis.Redis) -> str | None:
    """The live version, or None when nothing is published."""
    return _text(client.get(CURRENT_KEY))


def list_published(client: redis.Redis) -> list[dict[str, Any]]:
    """Published versions, newest first: ``version``, ``published_at`` (unix s), ``live``, counts."""
    live = current_version(client)
    entries = client.zrevrange(VERSIONS_KEY, 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for version, _ in entries:
        pipe.hgetall(version_key(_text(version), "info"))
    infos = pipe.execute() if entries else []
    out = []
    for (version, score), info in zip(entries, infos, strict=True):
        name = _text(version)
        info = {_text(k): _text(v) for k, v in info.items()}
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


def read_info(client: redis.Redis, version: str) -> dict[str, str]:
    """The ``info`` hash of a version (empty when the version is not in Redis)."""
    return {_text(k): _text(v) for k, v in client.hgetall(version_key(version, "info")).items()}


# ------------------------------------------------------------------------------------------------
# Packing (pure numpy; the serving side decodes with the same layout)
# ------------------------------------------------------------------------------------------------


def _top_columns(scores: np.ndarray, wide: int) -> np.ndarray:
    """Column indices of the ``wide`` highest scores of each row (unordered), shape ``(rows, wide)``.

    ``argpartition`` over the whole catalog is the cost of publishing; most rows are served by a
    cheaper route: a threshold taken from every ``stride``-th column is a lower bound on the
    ``wide``-th best score whenever at least ``wide`` scores reach it (checked per row), so only the
    columns at or above it are partitioned. Rows where the sample was unlucky take the exact route.
    """
    rows, n = scores.shape
    out = np.empty((rows, wide), dtype=np.int64)
    stride = min(8, n // (4 * wide))
    ok = np.zeros(rows, dtype=bool)
    if stride >= 2:
        sample = scores[:, ::stride]
        n_sample = sample.shape[1]
        # Aim for ~1.5x wide candidates so that almost every row has enough.
        kth = min(n_sample - 1, int(1.5 * wide / stride) + 4)
        threshold = np.partition(sample, n_sample - kth, axis=1)[:, n_sample - kth]
        mask = scores >= threshold[:, None]
        counts = mask.sum(axis=1)
        ok = counts >= wide
        if ok.any():
            sub_mask, sub_scores, sub_counts = mask[ok], scores[ok], counts[ok]
            r, c = mask_positions(sub_mask)
            starts = np.concatenate(([0], np.cumsum(sub_counts)[:-1]))
            pos = np.arange(len(c)) - np.repeat(starts, sub_counts)
            width = int(sub_counts.max())
            cand = np.zeros((len(sub_counts), width), dtype=np.int64)
            vals = np.full((len(sub_counts), width), -np.inf, dtype=np.float32)
            cand[r, pos] = c
            vals[r, pos] = sub_scores[r, c]
            sel = np.argpartition(vals, width - wide, axis=1)[:, width - wide :]
            out[ok] = np.take_along_axis(cand, sel, axis=1)
    exact = ~ok
    if exact.any():
        out[exact] = np.argpartition(scores[exact], n - wide, axis=1)[:, n - wide :]
    return out


def topk_for_users(
    user_factors: np.ndarray, item_factors: np.ndarray, k: int, chunk_rows: int | None = None
) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first_row, indices, scores)`` of the top ``k`` items per user, in chunks of users.

    Scores are ``user_factors @ item_factors.T``; each chunk is one matrix product, then only the
    best columns are kept (:func:`_top_columns`) and sorted. Equal scores are ordered by the lower
    item index, so the result is deterministic and equals a full stable sort of each row.

    Parameters
    ----------
    user_factors : np.ndarray
        float32 ``(n_users, f)``.
    item_factors : np.ndarray
        float32 ``(n_items, f)``.
    k : int
        Items kept per user; clipped to ``n_items``.
    chunk_rows : int, optional
        Users per matrix product; by default ``SCORE_CHUNK_ELEMENTS // n_items``.
    """
    n_users, n_items = user_factors.shape[0], item_factors.shape[0]
    k = min(k, n_items)
    # A few extra columns beyond k let ties at the k-th score be resolved by item index; rows
    # where even those are all tied are sorted in full (exact, and rare: duplicate item vectors).
    wide = min(n_items, k + 16)
    chunk_rows = chunk_rows or max(1, SCORE_CHUNK_ELEMENTS // max(1, n_items))
    item_t = np.ascontiguousarray(item_factors.T)
    for start in range(0, n_users, chunk_rows):
        scores = user_factors[start : start + chunk_rows] @ item_t
        if wide < n_items:
            part = _top_columns(scores, wide)
        else:
            part = np.broadcast_to(np.arange(n_items), scores.shape)
        # Sort the kept columns by index first, then stably by score: equal scores stay in index
        # order, so the result is deterministic.
        part = np.sort(part, axis=1)
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)[:, :k].astype(np.int32)
        if wide < n_items:
            top = np.take_along_axis(part_scores, order, axis=1)
            for row in np.flatnonzero(top[:, k - 1] == top[:, -1]):
                idx[row] = np.argsort(-scores[row], kind="stable")[:k]
        yield start, idx, np.take_along_axis(scores, idx, axis=1).astype(np.float32)


def index_dtype(n_items: int) -> str:
    """Packed dtype of item indices: 2 bytes while the catalog fits, else 4 (little-endian)."""
    return "<u2" if n_items <= 65_536 else "<i4"


def pack_user_rows(indices: np.ndarray, vectors: np.ndarray, dtype: str) -> np.ndarray:
    """One row of bytes per user: the top-K item indices (``dtype``) then the float32 user factors.

    The stored value of a user is this row followed by the indices of the items they bought
    (variable length, same ``dtype``), so one ``HGET`` returns everything a request needs. Scores are
    not stored: ``item_factors[indices] @ vector`` recomputes them exactly at request time, which
    keeps a user at ~0.7 KB instead of ~1.9 KB for K = 200.
    """
    parts = [
        np.ascontiguousarray(indices, dtype=dtype).view(np.uint8),
        np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8),
    ]
    return np.concatenate([p.reshape(len(indices), -1) for p in parts], axis=1)


def unpack_user(
    value: bytes, k: int, factors: int, dtype: str = "<i4"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of the per-user value: ``(top-K item indices, user vector, purchased item indices)``.

    Indices come back as int32 whatever their packed ``dtype``.
    """
    width = np.dtype(dtype).itemsize
    # copy=False: with 4-byte indices these stay read-only views of ``value`` (no copy per request).
    indices = np.frombuffer(value, dtype=dtype, count=k).astype(np.int32, copy=False)
    vector = np.frombuffer(value, dtype="<f4", count=factors, offset=width * k)
    purchased = np.frombuffer(value, dtype=dtype, offset=width * k + 4 * factors).astype(np.int32, copy=False)
    return indices, vector, purchased


def unpack_indices(value: bytes | None) -> np.ndarray:
    """int32 item indices packed by publish (an absent field means none)."""
    if not value:
        return np.zeros(0, dtype=np.int32)
    return np.frombuffer(value, dtype="<i4")


def unpack_weighted(value: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 indices, float32 weights)`` of a user's packed interactions row."""
    if not value:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    n = len(value) // 8
    indices = np.frombuffer(value, dtype="<i4", count=n)
    return indices, np.frombuffer(value, dtype="<f4", count=n, offset=4 * n)


def _array_bytes(arr: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Item indices by popularity, most popular first; ties by lower index (stable)."""
    return np.argsort(-popularity.astype(np.float64), kind="stable").astype(np.int32)


def popular_lists(popularity: np.ndarray, category: np.ndarray, n_categories: int) -> dict[str, bytes]:
    """Packed popularity orders: ``"*"`` overall and ``"c<code>"`` for each category with items."""
    order = popularity_order(popularity)
    out = {"*": _array_bytes(order, "<i4")}
    cats = category[order]
    for code in range(n_categories):
        members = order[cats == code]
        if len(members):
            out[f"c{code}"] = _array_bytes(members, "<i4")
    return out


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


def _n_buckets(n_users: int) -> int:
    return max(1, -(-n_users // USERS_PER_BUCKET))


def _load(artifact_or_path: Artifact | str | os.PathLike, config: Config) -> Artifact:
    if isinstance(artifact_or_path, Artifact):
        if "version" not in artifact_or_path.manifest:
            raise ArtifactError("artifact has no version: write it with recsvc.artifact.write_artifact first")
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
        A client with generous timeouts (``recsvc.redis_conn.connect_admin``).
    artifact_or_path : Artifact or path-like or str
        An :class:`~recsvc.artifact.Artifact` that was written (has a version), a version folder, a
        version name under ``config.models_dir``, or ``"latest"``.
    config : Config
        ``topk_cached`` (K per user) and ``keep_versions`` (retention) are used.
    progress : callable, optional
        Called with the number of users written after each chunk (e.g. ``tqdm.update``).
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
            client.hset(version_key(version, "info"), "status", "complete")
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
    deleted = prune_versions(client, config.keep_versions)
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
                buckets=_n_buckets(artifact.n_users),
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
        self.client, self.key, self.token = client, PUBLISHING_PREFIX + version, uuid.uuid4().hex
        self.renewed = 0.0

    def acquire(self) -> None:
        if not self.client.set(self.key, self.token, nx=True, ex=PUBLISH_LEASE_S):
            raise PublishError(f"another publish of {self.key[len(PUBLISHING_PREFIX) :]} is running")
        self.renewed = time.monotonic()

    def renew(self) -> None:
        if time.monotonic() - self.renewed > PUBLISH_LEASE_S / 4:
            self.client.expire(self.key, PUBLISH_LEASE_S)
            self.renewed = time.monotonic()

    def release(self) -> None:
        try:
            if _text(self.client.get(self.key)) == self.token:
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
    k = min(config.topk_cached, n_items)
    n_buckets = _n_buckets(n_users)
    manifest = artifact.manifest
    info = {
        "status": "writing",
        "version": version,
        "n_users": n_users,
        "n_items": n_items,
        "factors": factors,
        "k": k,
        "index_dtype": index_dtype(n_items),
        "n_buckets": n_buckets,
        "n_categories": len(artifact.categories),
        "created_at": str(manifest.get("created_at", "")),
        "trained_until": str(manifest.get("trained_until", "")),
        "started_at": time.time(),
    }
    client.hset(version_key(version, "info"), mapping=info)
    client.set(version_key(version, "manifest"), json.dumps(manifest, sort_keys=True, default=str))
    client.hset(version_key(version, "items"), mapping=_items_mapping(artifact))
    client.hset(
        version_key(version, "popular"),
        mapping=popular_lists(artifact.popularity, artifact.category, len(artifact.categories)),
    )
    b = artifact.bundles
    client.hset(
        version_key(version, "bundles"),
        mapping={
            "indptr": _array_bytes(b.indptr, "<i8"),
            "indices": _array_bytes(b.indices, "<i4"),
            "score": _array_bytes(b.score, "<f4"),
            "support": _array_bytes(b.support, "<i4"),
        },
    )

    if n_users == 0:
        return
    user_names = [u.encode("utf-8") for u in artifact.user_ids]
    buckets = np.fromiter(
        (user_bucket(u, n_buckets) for u in artifact.user_ids), dtype=np.int64, count=n_users
    )
    # Process users grouped by bucket so each chunk touches few bucket hashes: one HSET per
    # (chunk, bucket) carries many users.
    order = np.argsort(buckets, kind="stable")
    user_factors = np.ascontiguousarray(artifact.user_factors[order])
    item_factors = np.ascontiguousarray(artifact.item_factors)
    bought = _PackedRows(artifact.purchases, index_dtype(n_items), weighted=False)
    weighted = _PackedRows(artifact.interactions, "<i4", weighted=True)
    topk_keys = [bucket_key(version, "topk", b).encode() for b in range(n_buckets)]
    inter_keys = [bucket_key(version, "interactions", b).encode() for b in range(n_buckets)]

    # Scoring (numpy, GIL released) of the next chunk overlaps with sending this one to Redis.
    with _RawWriter(client) as writer:
        chunks = topk_for_users(user_factors, item_factors, k)
        while True:
            t0 = time.perf_counter()
            try:
                start, idx, _scores = next(chunks)
            except StopIteration:
                break
            timing["score_seconds"] += time.perf_counter() - t0
            stop = start + len(idx)
            rows = pack_user_rows(idx, user_factors[start:stop], index_dtype(n_items))
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
                    packed[row_len * j : row_len * (j + 1)] + bought.row(u)
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


class _PackedRows:
    """Rows of a CSR matrix as packed bytes: indices (+ float32 values when weighted).

    The arrays are turned into ``bytes`` once; a row is then two slices of those (much cheaper per
    user than slicing numpy arrays and calling ``tobytes``).
    """

    def __init__(self, mat, dtype: str, weighted: bool):
        mat = mat.tocsr()
        self.indptr = mat.indptr.tolist()
        self.width = np.dtype(dtype).itemsize
        self.indices = np.ascontiguousarray(mat.indices, dtype=dtype).tobytes()
        self.data = np.ascontiguousarray(mat.data, dtype="<f4").tobytes() if weighted else None

    def row(self, r: int) -> bytes:
        lo, hi = self.indptr[r], self.indptr[r + 1]
        if self.data is None:
            return self.indices[self.width * lo : self.width * hi]
        return self.indices[self.width * lo : self.width * hi] + self.data[4 * lo : 4 * hi]


class _RawWriter:
    """Bulk ``HSET`` for publish: commands encoded straight to RESP, sent by a background thread.

    redis-py's generic command packing costs several microseconds per argument, which made it the
    bottleneck at ~100k users x 2 fields; the payload here is plain ``bytes`` (user ids and packed
    numpy rows), so encoding it directly is simple. One batch is in flight while the caller scores
    the next chunk. Each HSET's reply (the number of new fields) is checked against the fields sent:
    every field must be new, because the version was empty before the write.
    """

    def __init__(self, client: redis.Redis):
        from concurrent.futures import ThreadPoolExecutor

        self.client = client
        self.parts: list[bytes] = []
        self.expected: list[int] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsvc-publish")
        self._inflight = None

    def __enter__(self) -> _RawWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
                self._wait()
            elif self._inflight is not None:
                self._inflight.exception()  # let it finish; the caller's error wins
        finally:
            self._pool.shutdown(wait=True)

    def hset(self, key: bytes, names: list[bytes], values: list[bytes]) -> None:
        parts = self.parts
        parts.append(b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 + 2 * len(names), len(key), key))
        for name, value in zip(names, values, strict=True):
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(value), value))
        self.expected.append(len(names))

    def flush(self) -> None:
        """Hand the queued commands to the sender (after the previous batch was acknowledged)."""
        if not self.expected:
            return
        payload, expected = b"".join(self.parts), self.expected
        self.parts, self.expected = [], []
        self._wait()
        self._inflight = self._pool.submit(self._send, payload, expected)

    def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()

    def _send(self, payload: bytes, expected: list[int]) -> None:
        pool = self.client.connection_pool
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


def _items_mapping(artifact: Artifact) -> dict[str, bytes | str]:
    return {
        "ids": json.dumps(list(artifact.item_ids), separators=(",", ":")),
        "titles": json.dumps(list(artifact.titles), ensure_ascii=False, separators=(",", ":")),
        "categories": json.dumps(list(artifact.categories), ensure_ascii=False, separators=(",", ":")),
        "factors": _array_bytes(artifact.item_factors, "<f4"),
        "price": _array_bytes(artifact.price, "<f4"),
        "available": _array_bytes(artifact.available, "u1"),
        "category": _array_bytes(artifact.category, "<i4"),
        "popularity": _array_bytes(artifact.popularity, "<f4"),
    }


def verify_version(client: redis.Redis, artifact: Artifact, config: Config) -> None:
    """Read a written version back and compare it with the artifact; raise :class:`PublishError`.

    Checks every item field byte for byte, the number of users in each bucket, and the packed rows of
    a deterministic sample of users (first, last and evenly spaced).
    """
    version = artifact.version
    info = read_info(client, version)
    if not info:
        raise PublishError(f"verify {version}: info missing")
    expected_items = _items_mapping(artifact)
    stored = client.hgetall(version_key(version, "items"))
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
            pipe.hlen(bucket_key(version, "topk", b))
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
            pipe.hget(bucket_key(version, "topk", user_bucket(user, n_buckets)), user)
        values = pipe.execute()
        purchases = artifact.purchases.tocsr()
        dtype = info["index_dtype"]
        width = np.dtype(dtype).itemsize
        for u, user, value in zip(sample, users, values, strict=True):
            bought = purchases.indices[purchases.indptr[u] : purchases.indptr[u + 1]]
            if value is None or len(value) != width * (k + len(bought)) + 4 * factors:
                raise PublishError(f"verify {version}: record of user {user!r} missing or truncated")
            _, vector, stored_bought = unpack_user(value, k, factors, dtype)
            if not np.array_equal(vector, artifact.user_factors[u]):
                raise PublishError(f"verify {version}: user factors of {user!r} differ from the artifact")
            if not np.array_equal(stored_bought, bought):
                raise PublishError(f"verify {version}: purchases of {user!r} differ from the artifact")
        pipe = client.pipeline(transaction=False)
        for b in range(n_buckets):
            pipe.hlen(bucket_key(version, "interactions", b))
        with_history = int(np.count_nonzero(np.diff(artifact.interactions.tocsr().indptr)))
        if sum(pipe.execute()) != with_history:
            raise PublishError(
                f"verify {version}: interaction rows differ from the artifact's {with_history}"
            )
    popular = client.hget(version_key(version, "popular"), "*")
    if popular is None or len(popular) != 4 * artifact.n_items:
        raise PublishError(f"verify {version}: popularity list missing")


def _flip(client: redis.Redis, version: str) -> None:
    try:
        client.eval(
            _FLIP_SCRIPT,
            4,
            CURRENT_KEY,
            PREVIOUS_KEY,
            VERSIONS_KEY,
            version_key(version, "info"),
            version,
            time.time(),
        )
    except redis.ResponseError as e:
        raise PublishError(str(e)) from e


def activate(client: redis.Redis, version: str) -> str:
    """Make an already published (complete) version live again; return it."""
    if not is_valid_version(version):
        raise PublishError(f"invalid model version {version!r}")
    if client.zscore(VERSIONS_KEY, version) is None:
        raise PublishError(f"version {version} is not published")
    _flip(client, version)
    return version


def rollback(client: redis.Redis, config: Config) -> str:
    """Switch the live pointer back to the version that was live before; return it.

    Raises
    ------
    RollbackError
        No earlier version is still published (only one version was ever live, or the older ones
        were deleted by retention).
    """
    previous = client.eval(_ROLLBACK_SCRIPT, 3, CURRENT_KEY, PREVIOUS_KEY, VERSIONS_KEY)
    if not previous:
        raise RollbackError("no previous published version to roll back to")
    version = _text(previous)
    log.info("rolled back to %s", version)
    return version


# ------------------------------------------------------------------------------------------------
# Retention and cleanup
# ------------------------------------------------------------------------------------------------


def _delete_version_keys(client: redis.Redis, version: str, batch: int = 500) -> int:
    """UNLINK every key of ``version`` (SCAN in batches; UNLINK frees memory off the main thread)."""
    deleted = 0
    pattern = f"{VERSION_PREFIX}{version}:*"
    keys: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=batch):
        keys.append(key)
        if len(keys) >= batch:
            deleted += client.unlink(*keys)
            keys = []
    if keys:
        deleted += client.unlink(*keys)
    return deleted


def delete_version(client: redis.Redis, version: str) -> int:
    """Remove a version that is not live from Redis; return how many keys were deleted."""
    if current_version(client) == version:
        raise PublishError(f"version {version} is live; publish or roll back to another first")
    pipe = client.pipeline(transaction=True)
    pipe.zrem(VERSIONS_KEY, version)
    pipe.lrem(PREVIOUS_KEY, 0, version)
    pipe.execute()
    return _delete_version_keys(client, version)


def prune_versions(client: redis.Redis, keep: int) -> list[str]:
    """Delete published versions beyond ``keep``; return their names.

    Kept, in this order until ``keep`` are chosen: the live version, the versions rollback would go
    back to (most recent first), then the most recently published others.
    """
    keep = max(1, keep)
    live = current_version(client)
    newest_first = [_text(v) for v in client.zrevrange(VERSIONS_KEY, 0, -1)]
    rollback_chain = [_text(v) for v in client.lrange(PREVIOUS_KEY, 0, -1)]
    # Keep what rollback reaches first (the live version, then the versions live before it), then
    # the most recently published.
    kept: list[str] = []
    for v in [live, *rollback_chain, *newest_first]:
        if len(kept) >= keep:
            break
        if v is not None and v in newest_first and v not in kept:
            kept.append(v)
    doomed = [v for v in newest_first if v not in kept]
    for v in doomed:
        delete_version(client, v)
    return doomed


def cleanup_orphans(client: redis.Redis) -> list[str]:
    """Delete versions a crashed publish left half-written (not published, no live lease)."""
    published = {_text(v) for v in client.zrange(VERSIONS_KEY, 0, -1)}
    orphans = []
    for key in client.scan_iter(match=f"{VERSION_PREFIX}*:info", count=500):
        version = _text(key)[len(VERSION_PREFIX) : -len(":info")]
        if version in published or not is_valid_version(version):
            continue
        if client.exists(PUBLISHING_PREFIX + version):
            continue  # another publish is writing it right now
        if _text(client.hget(key, "status")) == "complete" and version == current_version(client):
            continue
        orphans.append(version)
    for version in orphans:
        log.warning("removing half-published version %s left by a crashed publish", version)
        _delete_version_keys(client, version)
    return orphans


def version_memory(client: redis.Redis, version: str, sample: int = 50) -> int:
    """Approximate bytes Redis uses for a version (MEMORY USAGE of every key)."""
    total = 0
    for key in client.scan_iter(match=f"{VERSION_PREFIX}{version}:*", count=500):
        total += int(client.memory_usage(key, samples=sample) or 0)
    return total


def resolve_ref(config: Config, ref: str | os.PathLike) -> Path:
    """``latest``, a version name under ``config.models_dir`` or a folder -> version folder."""
    return resolve(config.models_dir, ref)
