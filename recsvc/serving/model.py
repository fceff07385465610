"""The live model held in process memory, and per-request user data.

A :class:`ServingModel` is everything about one published version that does not depend on the user
(item ids, factors, metadata, popularity orders, bundle candidates). It is loaded from Redis once per
version switch and then shared, read-only, by every request thread of the process. Per-user data
(cached top-K, user factors, purchases) stays in Redis and is fetched per request by
:func:`fetch_user` in one round trip that also reads the live pointer, so a publish is noticed by the
next request without polling.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import redis
import scipy.sparse as sp

from recsvc.core.artifact import Artifact, ArtifactError, BundleCandidates, latest_version, read_artifact
from recsvc.core.config import Config
from recsvc.core.errors import NotPublished
from recsvc.core.ids import IdMap
from recsvc.core.repurchase import RepurchaseParams, UserHistory
from recsvc.core.scoring import PLAIN_ALS, ModelSpec, Scorer
from recsvc.storage import codec, keys, reads
from recsvc.storage import repurchase as repurchase_store

log = logging.getLogger(__name__)

T = TypeVar("T")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _readonly_csr(matrix: sp.csr_matrix | None) -> sp.csr_matrix | None:
    if matrix is None:
        return None
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    for arr in (matrix.data, matrix.indices, matrix.indptr):
        arr.flags.writeable = False
    return matrix


@dataclass(eq=False)
class ServingModel:
    """One model version in process memory, immutable after construction and safe to share.

    Attributes
    ----------
    version : str
        The model version.
    manifest : dict
        The artifact's manifest (params, metrics, counts, trained_until...).
    item_ids : list of str
        Item id per item index.
    item_index : dict
        Item id -> item index.
    item_factors : np.ndarray
        float32 ``(n_items, factors)``, read-only.
    price, available, category, popularity : np.ndarray
        Per item: float32 (NaN = unknown), bool, int32 code (-1 = none), float32.
    categories : list of str
        Category name per code; ``category_index`` maps name -> code.
    titles : list of str
        Title per item ("" when unknown).
    popular : np.ndarray
        int32 item indices, most popular first; ``popular_by_category[code]`` the same per category.
    bundles : BundleCandidates
        The artifact's bundle candidates per anchor item.
    spec : ModelSpec
        How the model blends ALS, item-kNN and popularity (plain ALS for older versions).
    similarity : scipy.sparse.csr_matrix or None
        Item-kNN neighbours per item (the blend's kNN part), read-only.
    prior : numpy.ndarray or None
        The blend's popularity prior per item.
    stored_scores : bool
        Whether per-user records carry their top-K scores (blends) or scores are recomputed from the
        user vector (plain ALS).
    k : int
        Length of each user's cached top-K list in Redis.
    n_buckets : int
        Number of per-user bucket hashes in Redis.
    origin : str
        ``"redis"`` (the published version) or ``"artifact"`` (a local folder, used as fallback).
    repurchase : RepurchaseParams or None
        The repurchase model's item parameters (None: the version has no repurchase model).
    """

    version: str
    manifest: dict[str, Any]
    item_ids: list[str]
    item_index: IdMap
    item_factors: np.ndarray
    price: np.ndarray
    available: np.ndarray
    category: np.ndarray
    categories: list[str]
    category_index: dict[str, int]
    titles: list[str]
    popularity: np.ndarray
    popular: np.ndarray
    popular_by_category: dict[int, np.ndarray]
    bundles: BundleCandidates
    k: int
    n_buckets: int
    n_users: int
    index_dtype: str = "<i4"  # packed dtype of item indices in per-user records
    spec: ModelSpec = PLAIN_ALS
    similarity: sp.csr_matrix | None = None
    prior: np.ndarray | None = None
    stored_scores: bool = False
    origin: str = "redis"
    repurchase: RepurchaseParams | None = None
    loaded_at: float = field(default_factory=time.time)
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    # Re-entrant: a memo builder may itself read another memoised value.
    _memo_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # Only for models built from a local artifact: user id -> index and purchases.
    _local_users: IdMap | None = field(default=None, repr=False)
    _local_artifact: Artifact | None = field(default=None, repr=False)

    # --------------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def trained_until(self) -> int | None:
        """Newest event timestamp in the training data (unix seconds), when the manifest has it."""
        value = self.manifest.get("trained_until")
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    @property
    def item_ids_array(self) -> np.ndarray:
        """Item ids as a numpy object array (fast fancy indexing when building answers)."""
        return self.memo("item_ids_array", lambda: _readonly(np.asarray(self.item_ids, dtype=object)))

    @property
    def unit_item_factors(self) -> np.ndarray:
        """Item factors scaled to unit length (cosine similarity for "similar items")."""

        def build() -> np.ndarray:
            norms = np.linalg.norm(self.item_factors, axis=1, keepdims=True)
            return _readonly((self.item_factors / np.maximum(norms, 1e-12)).astype(np.float32))

        return self.memo("unit_item_factors", build)

    @property
    def scorer(self) -> Scorer:
        """The version's :class:`~recsvc.core.scoring.Scorer` (built once, shared by threads)."""
        return self.memo("scorer", lambda: Scorer(self.spec, self.item_factors, self.similarity, self.prior))

    def memo(self, name: Hashable, build: Callable[[], T]) -> T:
        """Per-version derived data (e.g. fold-in's YtY), built once and shared by threads."""
        try:
            return self._memo[name]
        except KeyError:
            pass
        with self._memo_lock:
            if name not in self._memo:
                self._memo[name] = build()
            return self._memo[name]

    def category_codes(self, names: list[str] | tuple[str, ...]) -> np.ndarray:
        """int32 codes of known category names (unknown names have no items and are dropped)."""
        codes = [self.category_index[n] for n in names if n in self.category_index]
        return np.asarray(codes, dtype=np.int32)

    def item_indices(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        """int32 indices of the known item ids among ``ids`` (unknown ids are skipped)."""
        found = [self.item_index[i] for i in ids if i in self.item_index]
        return np.asarray(found, dtype=np.int32)

    # ---- keys of per-user data in Redis ------------------------------------------------------------
    def user_key(self, part: str, user_id: str) -> str:
        """Bucket hash holding ``user_id``'s ``topk`` (with purchases) or ``interactions`` field."""
        name = self.memo(("bucket_namer", part), lambda: keys.bucket_namer(self.version, part))
        return name(keys.user_bucket(user_id, self.n_buckets))

    def local_user(self, user_id: str) -> UserRecord | None:
        """A user's data from the local artifact (models with origin ``artifact`` only)."""
        if self._local_users is None or self._local_artifact is None:
            return None
        u = self._local_users.get(user_id)
        if u is None:
            return None
        a = self._local_artifact
        vector = a.user_factors[u]
        row = (a.interactions if self.spec.excludes_interacted else a.purchases)[u]
        return UserRecord(
            user_id, np.zeros(0, np.int32), vector, row.indices.astype(np.int32), a.item_factors
        )

    def local_history(self, user_id: str) -> UserHistory | None:
        """A customer's bought items from the local artifact (models with origin ``artifact`` only)."""
        a, users = self._local_artifact, self._local_users
        if a is None or users is None or a.repurchase is None:
            return None
        u = users.get(user_id)
        if u is None:
            return None
        history = a.repurchase.history.row(u)
        return history if len(history) else None

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, artifact: Artifact, k: int = 200) -> ServingModel:
        """Build from an in-memory artifact (tests, pure ranking, and the nothing-published fallback)."""
        popular_packed = codec.popular_lists(artifact.popularity, artifact.category, len(artifact.categories))
        n_users = artifact.n_users
        model = cls(
            version=str(artifact.manifest.get("version", "local")),
            manifest=dict(artifact.manifest),
            item_ids=list(artifact.item_ids),
            item_index=artifact.item_index(),
            item_factors=_readonly(np.ascontiguousarray(artifact.item_factors, dtype=np.float32)),
            price=_readonly(np.asarray(artifact.price, dtype=np.float32)),
            available=_readonly(np.asarray(artifact.available, dtype=bool)),
            category=_readonly(np.asarray(artifact.category, dtype=np.int32)),
            categories=list(artifact.categories),
            category_index={name: code for code, name in enumerate(artifact.categories)},
            titles=list(artifact.titles),
            popularity=_readonly(np.asarray(artifact.popularity, dtype=np.float32)),
            popular=_readonly(codec.unpack_indices(popular_packed["*"]).copy()),
            popular_by_category={
                int(name[1:]): _readonly(codec.unpack_indices(v).copy())
                for name, v in popular_packed.items()
                if name != "*"
            },
            bundles=artifact.bundles,
            k=min(k, artifact.n_items),
            n_buckets=keys.bucket_count(n_users),
            n_users=n_users,
            index_dtype=codec.index_dtype(artifact.n_items),
            spec=artifact.spec(),
            similarity=_readonly_csr(artifact.similarity),
            prior=None if artifact.prior is None else _readonly(np.asarray(artifact.prior, dtype=np.float32)),
            stored_scores=not artifact.spec().is_plain_als,
            origin="artifact",
            repurchase=artifact.repurchase.params if artifact.repurchase is not None else None,
        )
        model._local_users = artifact.user_index()
        model._local_artifact = artifact
        return model

    @classmethod
    def load(cls, client: redis.Redis, version: str) -> ServingModel:
        """Load a published version from Redis (one pipelined round trip).

        Raises
        ------
        NotPublished
            Redis has no complete version ``version``.
        """
        stored = reads.read_version(client, version)
        if not stored.complete:
            raise NotPublished(f"version {version} is not completely published in Redis")
        info, items, popular, bundles = stored.info, stored.items, stored.popular, stored.bundles
        n_items, factors = int(info["n_items"]), int(info["factors"])
        categories = json.loads(items[b"categories"])
        item_ids = json.loads(items[b"ids"])
        by_category = {}
        for raw_name, value in popular.items():
            name = raw_name.decode()
            if name.startswith("c"):
                by_category[int(name[1:])] = _readonly(codec.unpack_indices(value))
        manifest = json.loads(stored.manifest or b"{}")
        return cls(
            version=version,
            manifest=manifest,
            item_ids=item_ids,
            item_index=IdMap(item_ids),
            item_factors=_readonly(np.frombuffer(items[b"factors"], dtype="<f4").reshape(n_items, factors)),
            price=_readonly(np.frombuffer(items[b"price"], dtype="<f4")),
            available=_readonly(np.frombuffer(items[b"available"], dtype="u1").astype(bool)),
            category=_readonly(np.frombuffer(items[b"category"], dtype="<i4")),
            categories=categories,
            category_index={name: code for code, name in enumerate(categories)},
            titles=json.loads(items[b"titles"]),
            popularity=_readonly(np.frombuffer(items[b"popularity"], dtype="<f4")),
            popular=_readonly(codec.unpack_indices(popular[b"*"])),
            popular_by_category=by_category,
            bundles=BundleCandidates(
                indptr=_readonly(np.frombuffer(bundles[b"indptr"], dtype="<i8")),
                indices=_readonly(np.frombuffer(bundles[b"indices"], dtype="<i4")),
                score=_readonly(np.frombuffer(bundles[b"score"], dtype="<f4")),
                support=_readonly(np.frombuffer(bundles[b"support"], dtype="<i4")),
            ),
            k=int(info["k"]),
            n_buckets=int(info["n_buckets"]),
            n_users=int(info["n_users"]),
            index_dtype=info.get("index_dtype", "<i4"),
            spec=ModelSpec.from_mapping(manifest.get("model"), source=f"version {version}: model"),
            similarity=_readonly_csr(codec.csr_from_mapping(stored.similarity))
            if stored.similarity
            else None,
            prior=_readonly(np.frombuffer(items[b"prior"], dtype="<f4")) if b"prior" in items else None,
            stored_scores=info.get("scores") == "1",
            origin="redis",
            repurchase=repurchase_store.params_from_mapping(stored.repurchase),
        )

    def training_row(self, client: redis.Redis, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The user's training interactions (item indices, confidence before alpha) for fold-in."""
        if self.origin != "redis":
            a, users = self._local_artifact, self._local_users
            u = users.get(user_id) if users else None
            if a is None or u is None:
                return np.zeros(0, np.int32), np.zeros(0, np.float32)
            row = a.interactions[u]
            return row.indices.astype(np.int32), row.data.astype(np.float32)
        key = self.user_key("interactions", user_id)
        return codec.unpack_weighted(reads.read_field(client, key, user_id))


@dataclass(frozen=True)
class UserRecord:
    """A user's per-request data: cached top-K, user factors, excluded items (all read-only).

    ``purchased`` holds the items the user is never shown again: their purchases, or every item they
    interacted with when the model's exclusion rule says so. ``topk_scores`` are the stored scores
    (blends) or, for plain ALS, computed on first use (``item_factors[topk_items] @ vector``).
    """

    user_id: str
    topk_items: np.ndarray  # int32, best first
    vector: np.ndarray  # float32 (factors,)
    purchased: np.ndarray  # int32 item indices
    item_factors: np.ndarray | None = field(default=None, repr=False)  # the model's, for topk_scores
    stored_scores: np.ndarray | None = field(default=None, repr=False)
    # (item indices, confidence before alpha), when read with the record (explanations need it).
    training_row: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @functools.cached_property
    def topk_scores(self) -> np.ndarray:
        """float32 scores of ``topk_items``, best first."""
        if self.stored_scores is not None:
            return self.stored_scores
        assert self.item_factors is not None  # both constructors pass the model's item factors
        return (self.item_factors[self.topk_items] @ self.vector).astype(np.float32)


def fetch_history(
    client: redis.Redis, model: ServingModel, user_id: str, probe_keys: tuple[str, ...] = ()
) -> tuple[str | None, UserHistory | None, list[int]]:
    """:func:`fetch_user` for the customer's bought items (the repurchase record), one round trip.

    ``history`` is None when the customer bought nothing the model knows, or the version has no
    repurchase model.
    """
    live, value, probes = reads.read_user(
        client, model.user_key(keys.REPURCHASE_PART, user_id), user_id, probe_keys
    )
    if value is None:
        return live, None, probes
    params = model.repurchase
    with_recent = params is not None and params.ranker is not None
    return live, repurchase_store.unpack_history(value, model.index_dtype, with_recent), probes


def fetch_user(
    client: redis.Redis,
    model: ServingModel,
    user_id: str,
    probe_keys: tuple[str, ...] = (),
    *,
    with_training_row: bool = False,
) -> tuple[str | None, UserRecord | None, list[int]]:
    """The live pointer, ``user_id``'s record under ``model``'s version and ``EXISTS`` of each probe.

    One round trip. ``record`` is None when the user is unknown to ``model``; when the live version
    differs from ``model.version`` the caller should switch models and fetch again.
    ``with_training_row`` reads the user's training row in the same round trip
    (:attr:`UserRecord.training_row`; what explaining a cached list needs).
    """
    record_keys: tuple[str, ...] = (model.user_key("topk", user_id),)
    if with_training_row:
        record_keys += (model.user_key("interactions", user_id),)
    live, values, probes = reads.read_user_records(client, record_keys, user_id, probe_keys)
    value = values[0]
    if value is None:
        return live, None, probes
    items, scores, vector, purchased = codec.unpack_user(
        value, model.k, model.factors, model.index_dtype, model.stored_scores
    )
    training_row = codec.unpack_weighted(values[1]) if with_training_row else None
    record = UserRecord(user_id, items, vector, purchased, model.item_factors, scores, training_row)
    return live, record, probes


class ModelCache:
    """The process's live :class:`ServingModel`, swapped atomically when the pointer moves.

    Readers take ``cache.model`` (one attribute read: atomic under the GIL) and keep using that object
    for the whole request, so a swap in another thread never mixes two versions in one answer.
    Loading is serialised by a lock so a version switch loads the model once per process.

    Parameters
    ----------
    config : Config
        ``models_dir`` (local fallback) and ``topk_cached``.
    check_interval_s : float
        How long an endpoint without per-user data (popular, similar) trusts the model it has before
        reading the pointer again. Recommendation requests read the pointer on every request.
    keep : int
        Loaded versions kept (the live one plus recently used ones, e.g. for experiments).
    """

    def __init__(self, config: Config, check_interval_s: float = 1.0, keep: int = 3):
        self.config = config
        self.check_interval_s = check_interval_s
        self.keep = max(1, keep)
        self.model: ServingModel | None = None
        # The version this process last saw live in Redis. It stays the right answer while Redis
        # is down *or emptied*: the newest local artifact may be a rolled-back or refused model.
        self.last_live: ServingModel | None = None
        self.checked_at = 0.0
        self._by_version: OrderedDict[str, ServingModel] = OrderedDict()
        self._lock = threading.Lock()
        self._local: tuple[Path, float, ServingModel] | None = None
        self._local_lock = threading.Lock()

    def current(self) -> ServingModel | None:
        """The model in memory (no I/O); None before the first successful load."""
        return self.model

    def invalidate(self) -> None:
        """Make the next :meth:`get` read the pointer (after a publish or rollback in this process)."""
        self.checked_at = 0.0

    def get(self, client: redis.Redis, force_check: bool = False) -> ServingModel | None:
        """The live model, reading the pointer when the check interval has passed.

        Returns None when nothing is published. Redis errors propagate (the caller falls back).
        """
        model = self.model
        now = time.monotonic()
        if model is not None and not force_check and now - self.checked_at < self.check_interval_s:
            return model
        live = cast("bytes | None", client.get(keys.CURRENT))  # the client returns raw bytes
        self.checked_at = now
        if live is None:
            self.model = None
            return None
        return self.switch(client, live.decode())

    def switch(self, client: redis.Redis, version: str) -> ServingModel:
        """Make ``version`` the process's live model (loading it unless already loaded)."""
        model = self.model_for(client, version)
        self.model = self.last_live = model
        self.checked_at = time.monotonic()
        return model

    def model_for(self, client: redis.Redis, version: str) -> ServingModel:
        """A loaded published version (live or not), loading it once.

        Raises
        ------
        NotPublished
            Redis has no complete version ``version``.
        """
        model = self._by_version.get(version)
        if model is not None:
            return model
        with self._lock:
            model = self._by_version.get(version)
            if model is None:
                t0 = time.perf_counter()
                model = ServingModel.load(client, version)
                log.info(
                    "loaded model %s (%d items) in %.3fs", version, model.n_items, time.perf_counter() - t0
                )
                self._by_version[version] = model
                while len(self._by_version) > self.keep:
                    self._by_version.popitem(last=False)
            return model

    def local_fallback(self) -> ServingModel | None:
        """The newest complete local artifact under ``config.models_dir`` (popularity fallback)."""
        try:
            path = latest_version(self.config.models_dir)
        except OSError:
            return None
        if path is None:
            return None
        try:
            mtime = (path / "manifest.json").stat().st_mtime
        except OSError:
            return None
        cached = self._local
        if cached is not None and cached[0] == path and cached[1] == mtime:
            return cached[2]
        with self._local_lock:
            cached = self._local
            if cached is not None and cached[0] == path and cached[1] == mtime:
                return cached[2]
            try:
                model = ServingModel.from_artifact(read_artifact(path), k=self.config.serving.topk_cached)
            except (ArtifactError, OSError) as e:
                log.error("local fallback artifact %s is unusable: %s", path, e)
                return None
            self._local = (path, mtime, model)
            return model
