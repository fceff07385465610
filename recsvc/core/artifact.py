"""The model artifact: the one module that knows its file layout.

A version is a folder ``<models_dir>/<version>/``::

    manifest.json       version, created_at, fingerprint, params, metrics, library versions,
                        counts, trained_until, and a sha256 + size for every other file
    item_ids.json       JSON list of item ids; position = item index everywhere below
    user_ids.json       JSON list of user ids; position = user index
    item_factors.npy    float32 (n_items, factors)
    user_factors.npy    float32 (n_users, factors)
    items.npz           price float32 (NaN = unknown), available bool, category int32 (-1 = none),
                        popularity float32 -- one entry per item
    catalog.json        {"categories": [...names, index = category code], "titles": [...per item]}
    interactions.npz    CSR (n_users, n_items) float32: weighted confidence the model was fitted on
                        (before alpha), kept so fold-in can start from a user's training history
    purchases.npz       CSR (n_users, n_items) float32: purchase counts, for "already bought"
    bundles.npz         CSR (n_items, n_items): bundle candidates per anchor item, best first,
                        with float32 ``score`` and int32 ``support`` (orders containing both)
    repurchase.npz      optional (versions trained without it have none): the repurchase model
                        (:mod:`recsvc.core.repurchase`) -- per item ``rate``, ``log_interval``,
                        ``buyers``, ``repeat_buyers``; ``hyper`` = within_var, between_var, strength,
                        dispersion; per user ``pace``; and every customer's bought items as CSR
                        rows (``indptr``, ``items``, ``last``, ``count``, ``pair_log_interval``)

Everything numeric is ``.npy``/``.npz`` read with ``allow_pickle=False``; strings are JSON. A version
is written into a temporary sibling folder and renamed into place, so a crash never leaves a half
artifact where a reader would find it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core import tempfiles
from recsvc.core.ids import VERSION_PATTERN, IdMap, is_valid_id, is_valid_version
from recsvc.core.repurchase import (
    RANKER_FEATURES,
    PurchaseHistory,
    RepurchaseModel,
    RepurchaseParams,
    repurchasable_items,
)
from recsvc.core.scoring import ModelSpec, Scorer
from recsvc.core.weighting import RowRecipe, unscale

FORMAT = "recsvc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or inconsistent. The message names the file."""


@dataclass(frozen=True)
class BundleCandidates:
    """Per-anchor bundle candidates in CSR form: row ``i`` lists items that go with item ``i``."""

    indptr: np.ndarray  # int64 (n_items + 1,)
    indices: np.ndarray  # int32 candidate item indices, best first within a row
    score: np.ndarray  # float32, same length as indices
    support: np.ndarray  # int32, orders that contained both items

    @classmethod
    def empty(cls, n_items: int) -> BundleCandidates:
        return cls(
            np.zeros(n_items + 1, dtype=np.int64),
            np.zeros(0, dtype=np.int32),
            np.zeros(0, dtype=np.float32),
            np.zeros(0, dtype=np.int32),
        )

    def row(self, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(items, scores, support)`` for one anchor item."""
        lo, hi = int(self.indptr[item]), int(self.indptr[item + 1])
        return self.indices[lo:hi], self.score[lo:hi], self.support[lo:hi]

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1


@dataclass
class Artifact:
    """A trained model and everything serving needs to use it, in memory.

    All per-item arrays are indexed by the position of the item in ``item_ids``; all per-user
    rows by the position of the user in ``user_ids``.
    """

    item_ids: list[str]
    user_ids: list[str]
    item_factors: np.ndarray
    user_factors: np.ndarray
    price: np.ndarray
    available: np.ndarray
    category: np.ndarray
    categories: list[str]
    titles: list[str]
    popularity: np.ndarray
    interactions: sp.csr_matrix
    purchases: sp.csr_matrix
    bundles: BundleCandidates
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    repurchase: RepurchaseModel | None = None
    #: The blend's parts besides ALS (absent in plain-ALS models): item-kNN similarity
    #: (``similarity.npz``) and the popularity prior (``items.npz`` key ``prior``).
    similarity: sp.csr_matrix | None = None
    prior: np.ndarray | None = None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def item_index(self) -> IdMap:
        return IdMap(self.item_ids)

    def user_index(self) -> IdMap:
        return IdMap(self.user_ids)

    def repurchasable(self, min_rate: float, categories: Sequence[str] = ()) -> np.ndarray:
        """Bool mask over items exempt from "already bought" (learned rate, or one of ``categories``).

        :func:`recsvc.core.repurchase.repurchasable_items` for this version.
        """
        lookup = {name: code for code, name in enumerate(self.categories)}
        codes = np.asarray([lookup[c] for c in categories if c in lookup], dtype=np.int32)
        rate = self.repurchase.params.rate if self.repurchase is not None else None
        return repurchasable_items(rate, min_rate, self.category, codes)

    def spec(self) -> ModelSpec:
        """How this model blends its parts (``manifest["model"]``; plain ALS when absent)."""
        return ModelSpec.from_mapping(self.manifest.get("model"), source="manifest.json: model")

    def scorer(self) -> Scorer:
        """The model's :class:`~recsvc.core.scoring.Scorer` (what every list is ranked with)."""
        return Scorer(self.spec(), self.item_factors, self.similarity, self.prior)

    def raw_interactions(self) -> sp.csr_matrix:
        """Users' summed event weights before scaling (the blend's item-kNN and history input)."""
        recipe = RowRecipe.from_manifest(self.manifest.get("params") or {})
        if recipe.bm25 is not None:
            recipe = recipe.with_document_frequency(
                np.bincount(self.interactions.indices, minlength=self.n_items)
            )
        return unscale(self.interactions, recipe)

    def validate(self) -> None:
        """Raise :class:`ArtifactError` unless every array agrees with every other."""
        n_items, n_users = self.n_items, self.n_users
        _check(n_items > 0, "item_ids.json", "has no items")
        _check(len(set(self.item_ids)) == n_items, "item_ids.json", "has duplicate ids")
        _check(len(set(self.user_ids)) == n_users, "user_ids.json", "has duplicate ids")
        bad = next((i for i in self.item_ids if not is_valid_id(i)), None)
        _check(bad is None, "item_ids.json", f"has an invalid id {bad!r}")
        bad = next((u for u in self.user_ids if not is_valid_id(u)), None)
        _check(bad is None, "user_ids.json", f"has an invalid id {bad!r}")
        for name, arr, rows in (
            ("item_factors.npy", self.item_factors, n_items),
            ("user_factors.npy", self.user_factors, n_users),
        ):
            _check(arr.dtype == np.float32, name, f"dtype is {arr.dtype}, expected float32")
            _check(arr.ndim == 2 and arr.shape[0] == rows, name, f"shape {arr.shape}, expected ({rows}, k)")
            _check(bool(np.isfinite(arr).all()), name, "contains NaN or inf")
        _check(
            self.item_factors.shape[1] == self.user_factors.shape[1],
            "user_factors.npy",
            "factor count differs from item_factors.npy",
        )
        for name, arr, dtype in (
            ("price", self.price, np.float32),
            ("available", self.available, np.bool_),
            ("category", self.category, np.int32),
            ("popularity", self.popularity, np.float32),
        ):
            _check(
                arr.dtype == dtype, "items.npz", f"{name} dtype is {arr.dtype}, expected {np.dtype(dtype)}"
            )
            _check(arr.shape == (n_items,), "items.npz", f"{name} shape {arr.shape}, expected ({n_items},)")
        _check(
            bool(((self.category >= -1) & (self.category < len(self.categories))).all()),
            "items.npz",
            "category code out of range of catalog.json categories",
        )
        _check(len(self.titles) == n_items, "catalog.json", "titles length differs from item count")
        for name, mat in (("interactions.npz", self.interactions), ("purchases.npz", self.purchases)):
            _check(
                mat.shape == (n_users, n_items), name, f"shape {mat.shape}, expected ({n_users}, {n_items})"
            )
            _check(bool(np.isfinite(mat.data).all()), name, "contains NaN or inf")
        if self.similarity is not None:
            _check(
                self.similarity.shape == (n_items, n_items),
                "similarity.npz",
                f"shape {self.similarity.shape}, expected ({n_items}, {n_items})",
            )
            _check(bool(np.isfinite(self.similarity.data).all()), "similarity.npz", "contains NaN or inf")
        if self.prior is not None:
            _check(
                self.prior.dtype == np.float32 and self.prior.shape == (n_items,),
                "items.npz",
                f"prior must be float32 ({n_items},), got {self.prior.dtype} {self.prior.shape}",
            )
        try:
            self.scorer()
        except ValueError as e:
            raise ArtifactError(f"manifest.json: model: {e}") from None
        b = self.bundles
        _check(b.n_items == n_items, "bundles.npz", "indptr length differs from item count")
        _check(len(b.indices) == len(b.score) == len(b.support), "bundles.npz", "array lengths differ")
        _check(int(b.indptr[-1]) == len(b.indices), "bundles.npz", "indptr does not end at nnz")
        _check(bool((np.diff(b.indptr) >= 0).all()), "bundles.npz", "indptr is not monotone")
        if len(b.indices):
            _check(
                int(b.indices.min()) >= 0 and int(b.indices.max()) < n_items,
                "bundles.npz",
                "index out of range",
            )
        if self.repurchase is not None:
            _validate_repurchase(self.repurchase, n_users, n_items)


def _validate_repurchase(model: RepurchaseModel, n_users: int, n_items: int) -> None:
    name = "repurchase.npz"
    p, h = model.params, model.history
    for field_name in ("rate", "log_interval", "buyers", "repeat_buyers"):
        arr = getattr(p, field_name)
        _check(arr.shape == (n_items,), name, f"{field_name} shape {arr.shape}, expected ({n_items},)")
        _check(bool(np.isfinite(arr).all()), name, f"{field_name} contains NaN or inf")
    _check(bool(((p.rate >= 0) & (p.rate <= 1)).all()), name, "rate outside 0..1")
    for label, value in (("within_var", p.within_var), ("between_var", p.between_var)):
        _check(math.isfinite(value) and value > 0, name, f"{label} must be > 0")
    _check(math.isfinite(p.strength) and p.strength > 0, name, "strength must be > 0")
    _check(math.isfinite(p.dispersion) and p.dispersion > 0, name, "dispersion must be > 0")
    _check(
        h.indptr.shape == (n_users + 1,), name, f"indptr shape {h.indptr.shape}, expected ({n_users + 1},)"
    )
    _check(h.pace.shape == (n_users,), name, f"pace shape {h.pace.shape}, expected ({n_users},)")
    nnz = len(h.items)
    _check(int(h.indptr[0]) == 0 and int(h.indptr[-1]) == nnz, name, "indptr does not span the entries")
    _check(bool((np.diff(h.indptr) >= 0).all()), name, "indptr is not monotone")
    _check(len(h.last) == len(h.count) == len(h.log_interval) == nnz, name, "array lengths differ")
    if nnz:
        _check(int(h.items.min()) >= 0 and int(h.items.max()) < n_items, name, "item index out of range")
        _check(int(h.count.min()) >= 1, name, "count below 1")
    _check(bool(np.isfinite(h.log_interval).all() and np.isfinite(h.pace).all()), name, "contains NaN or inf")
    if p.ranker is not None:
        _check(len(p.ranker) == len(RANKER_FEATURES), name, f"{len(p.ranker)} ranker coefficients")
        _check(all(math.isfinite(c) for c in p.ranker), name, "ranker contains NaN or inf")
        _check(h.recent is not None, name, "a ranker without the recency-weighted occasions")
    if h.recent is not None:
        _check(len(h.recent) == nnz, name, "recent length differs")
        _check(bool(np.isfinite(h.recent).all()), name, "recent contains NaN or inf")


def _check(ok: bool, file: str, problem: str) -> None:
    if not ok:
        raise ArtifactError(f"{file}: {problem}")


def new_version(fingerprint: str = "", now: _dt.datetime | None = None) -> str:
    """A sortable, unique-enough version name: ``20261122T193000Z-<fingerprint prefix>``."""
    now = now or _dt.datetime.now(_dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{fingerprint[:8]}" if fingerprint else stamp


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("recsvc", "numpy", "scipy", "implicit"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))


def _save_csr(path: Path, mat: sp.csr_matrix) -> None:
    mat = sp.csr_matrix(mat, dtype=np.float32)
    mat.sort_indices()
    np.savez(
        path,
        indptr=mat.indptr.astype(np.int64),
        indices=mat.indices.astype(np.int32),
        data=mat.data.astype(np.float32),
        shape=np.asarray(mat.shape, dtype=np.int64),
    )


def _load_csr(path: Path) -> sp.csr_matrix:
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(x) for x in z["shape"])
        return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)


def write_artifact(artifact: Artifact, models_dir: str | os.PathLike, version: str | None = None) -> Path:
    """Validate ``artifact`` and write it as ``<models_dir>/<version>/``; return that folder.

    The manifest given in ``artifact.manifest`` is completed with format, version, created_at,
    library versions, counts and checksums. Nothing is visible under the final name until every
    file is written and flushed.
    """
    artifact.validate()
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = str(artifact.manifest.get("data_fingerprint", ""))
    base = version or new_version(fingerprint)
    if not is_valid_version(base):
        raise ArtifactError(f"version {base!r} does not match {VERSION_PATTERN.pattern}")
    version, n = base, 1
    while (models_dir / version).exists():
        n += 1
        version = f"{base}.{n}"

    sweep_leftovers(models_dir)
    tmp = models_dir / f"{_TMP_PREFIX}{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lock = tempfiles.hold(tmp)  # a later run removes the folder at once if this process dies
    try:
        _write_json(tmp / "item_ids.json", list(artifact.item_ids))
        _write_json(tmp / "user_ids.json", list(artifact.user_ids))
        np.save(tmp / "item_factors.npy", np.ascontiguousarray(artifact.item_factors), allow_pickle=False)
        np.save(tmp / "user_factors.npy", np.ascontiguousarray(artifact.user_factors), allow_pickle=False)
        items: dict[str, Any] = {
            "price": artifact.price,
            "available": artifact.available,
            "category": artifact.category,
            "popularity": artifact.popularity,
        }
        if artifact.prior is not None:
            items["prior"] = artifact.prior
        np.savez(tmp / "items.npz", **items)
        if artifact.similarity is not None:
            _save_csr(tmp / "similarity.npz", artifact.similarity)
        _write_json(
            tmp / "catalog.json", {"categories": list(artifact.categories), "titles": list(artifact.titles)}
        )
        _save_csr(tmp / "interactions.npz", artifact.interactions)
        _save_csr(tmp / "purchases.npz", artifact.purchases)
        b = artifact.bundles
        np.savez(
            tmp / "bundles.npz",
            indptr=b.indptr.astype(np.int64),
            indices=b.indices.astype(np.int32),
            score=b.score.astype(np.float32),
            support=b.support.astype(np.int32),
        )
        if artifact.repurchase is not None:
            _save_repurchase(tmp / REPURCHASE_FILE, artifact.repurchase)
        files = {}
        for path in sorted(tmp.iterdir()):
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = dict(artifact.manifest)
        manifest.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            version=version,
            created_at=manifest.get("created_at") or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            library_versions=manifest.get("library_versions") or library_versions(),
            files=files,
        )
        counts = dict(manifest.get("counts", {}))
        counts.update(
            items=artifact.n_items,
            users=artifact.n_users,
            factors=int(artifact.item_factors.shape[1]),
            interactions=int(artifact.interactions.nnz),
            purchases=int(artifact.purchases.nnz),
            bundle_candidates=len(artifact.bundles.indices),
        )
        if artifact.repurchase is not None:
            counts["repurchase_pairs"] = len(artifact.repurchase.history.items)
        manifest["counts"] = counts
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, models_dir / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tempfiles.release(lock)
    sweep_leftovers(models_dir)  # also those of writers that died while this one ran
    artifact.manifest = manifest
    artifact.path = models_dir / version
    return models_dir / version


REPURCHASE_FILE = "repurchase.npz"


def _save_repurchase(path: Path, model: RepurchaseModel) -> None:
    p, h = model.params, model.history
    arrays: dict[str, Any] = {
        "rate": p.rate.astype(np.float32),
        "log_interval": p.log_interval.astype(np.float32),
        "buyers": p.buyers.astype(np.int32),
        "repeat_buyers": p.repeat_buyers.astype(np.int32),
        "hyper": np.asarray([p.within_var, p.between_var, p.strength, p.dispersion], dtype=np.float64),
        "indptr": h.indptr.astype(np.int64),
        "items": h.items.astype(np.int32),
        "last": h.last.astype(np.int64),
        "count": h.count.astype(np.int32),
        "pair_log_interval": h.log_interval.astype(np.float32),
        "pace": h.pace.astype(np.float32),
    }
    # Both optional: a version trained before the ranker has neither, and loads as it did.
    if p.ranker is not None:
        arrays["ranker"] = np.asarray(p.ranker, dtype=np.float64)
    if h.recent is not None:
        arrays["pair_recent"] = h.recent.astype(np.float32)
    np.savez(path, **arrays)


def _load_repurchase(path: Path) -> RepurchaseModel | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        hyper = [float(x) for x in z["hyper"]]
        params = RepurchaseParams(
            rate=z["rate"],
            log_interval=z["log_interval"],
            buyers=z["buyers"],
            repeat_buyers=z["repeat_buyers"],
            within_var=hyper[0],
            between_var=hyper[1],
            strength=hyper[2],
            dispersion=hyper[3],
            ranker=tuple(float(x) for x in z["ranker"]) if "ranker" in z.files else None,
        )
        history = PurchaseHistory(
            indptr=z["indptr"],
            items=z["items"],
            last=z["last"],
            count=z["count"],
            log_interval=z["pair_log_interval"],
            pace=z["pace"],
            recent=z["pair_recent"] if "pair_recent" in z.files else None,
        )
    return RepurchaseModel(params, history)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path / MANIFEST}: not found (is {path} a model folder?)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path / MANIFEST}: format {manifest.get('format')!r} v{manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    return manifest


def verify_checksums(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise ArtifactError(f"{file}: missing")
        if sha256_file(file) != meta["sha256"]:
            raise ArtifactError(f"{file}: checksum mismatch (file changed after it was written)")


def read_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Load a version folder. With ``verify`` (the default) checksums and consistency are checked."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_checksums(path, manifest)
    try:
        with open(path / "item_ids.json", encoding="utf-8") as f:
            item_ids = json.load(f)
        with open(path / "user_ids.json", encoding="utf-8") as f:
            user_ids = json.load(f)
        with open(path / "catalog.json", encoding="utf-8") as f:
            catalog = json.load(f)
        item_factors = np.load(path / "item_factors.npy", allow_pickle=False)
        user_factors = np.load(path / "user_factors.npy", allow_pickle=False)
        with np.load(path / "items.npz", allow_pickle=False) as z:
            items = {k: z[k] for k in ("price", "available", "category", "popularity")}
            prior = z["prior"] if "prior" in z.files else None
        similarity = _load_csr(path / "similarity.npz") if (path / "similarity.npz").exists() else None
        with np.load(path / "bundles.npz", allow_pickle=False) as z:
            bundles = BundleCandidates(z["indptr"], z["indices"], z["score"], z["support"])
        artifact = Artifact(
            item_ids=item_ids,
            user_ids=user_ids,
            item_factors=item_factors,
            user_factors=user_factors,
            categories=catalog["categories"],
            titles=catalog["titles"],
            interactions=_load_csr(path / "interactions.npz"),
            purchases=_load_csr(path / "purchases.npz"),
            bundles=bundles,
            manifest=manifest,
            path=path,
            repurchase=_load_repurchase(path / REPURCHASE_FILE),
            similarity=similarity,
            prior=prior,
            **items,
        )
    except (OSError, KeyError, ValueError, IndexError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{path}: unreadable artifact ({type(e).__name__}: {e})") from None
    if verify:
        artifact.validate()
    return artifact


def list_versions(models_dir: str | os.PathLike) -> list[Path]:
    """Complete version folders under ``models_dir``, oldest first (names sort by time)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(
        p
        for p in models_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and is_valid_version(p.name) and (p / MANIFEST).exists()
    )


def latest_version(models_dir: str | os.PathLike) -> Path | None:
    versions = list_versions(models_dir)
    return versions[-1] if versions else None


def resolve(models_dir: str | os.PathLike, ref: str | os.PathLike) -> Path:
    """Turn ``latest``, a version name, or a folder path into a version folder path."""
    if str(ref) == "latest":
        path = latest_version(models_dir)
        if path is None:
            raise ArtifactError(f"{models_dir}: no model versions found (run `recsvc train` first)")
        return path
    path = Path(ref)
    if not path.exists() and is_valid_version(str(ref)):
        path = Path(models_dir) / str(ref)
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: not a model version folder (no {MANIFEST})")
    return path


def resolve_name(models_dir: str | os.PathLike, name: str) -> Path:
    """``latest`` or a version *name* inside ``models_dir`` -- never a path, never another folder.

    For callers that must not let a request make the process read other files (the admin API).
    """
    if name != "latest" and not is_valid_version(name):
        raise ArtifactError(f"{name!r} is not a version name")
    path = resolve(models_dir, name) if name == "latest" else Path(models_dir) / name
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: not a model version folder (no {MANIFEST})")
    return path


def prune(
    models_dir: str | os.PathLike, keep: int, protect: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Delete all but the newest ``keep`` versions (and any in ``protect``); return deleted names."""
    versions = list_versions(models_dir)
    doomed = [p for p in versions[: max(0, len(versions) - keep)] if p.name not in protect]
    for p in doomed:
        shutil.rmtree(p)
    sweep_leftovers(models_dir)
    return [p.name for p in doomed]


def sweep_leftovers(models_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary version folders of writers that died (never readable versions)."""
    return tempfiles.sweep(Path(models_dir).glob(f"{_TMP_PREFIX}*"))


# ------------------------------------------------------------------------------------------------
# Added for the batch jobs (training/retrain.py): record facts about a version after it is written
# (the retrain gate's decision). Nothing above changes.
# ------------------------------------------------------------------------------------------------

# Fields that describe the files themselves; changing them would make the manifest lie.
_MANIFEST_FIXED = frozenset({"format", "format_version", "version", "files", "counts"})


def update_manifest(path: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Set top-level fields of an existing version's manifest; return the new manifest.

    ``manifest.json`` is rewritten through a temporary file, fsynced and renamed, so a reader sees
    the old or the new manifest, never half of one. The checksums in ``files`` cover the other
    files only, so they stay valid.

    Raises
    ------
    ArtifactError
        ``path`` is not a version folder, or a field that describes the files is given.
    """
    path = Path(path)
    fixed = sorted(_MANIFEST_FIXED.intersection(fields))
    if fixed:
        raise ArtifactError(f"{path / MANIFEST}: field(s) {', '.join(fixed)} cannot be updated")
    manifest = read_manifest(path)
    manifest.update(fields)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default)
    _replace_atomically(path / MANIFEST, text.encode("utf-8"))
    return manifest


def _replace_atomically(target: Path, data: bytes) -> None:
    """Write ``target`` through a temporary sibling, fsynced and renamed: readers see the old or the
    new file, never half of one."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# Documents beside a version: written after it, never part of what is served or checksummed
# ------------------------------------------------------------------------------------------------

#: Files a version folder may hold besides those its manifest lists: the training report
#: (``report.html``, self-contained) and customer segments (``segments.npz``: ``codes`` int8 per
#: user of ``user_ids.json``, -1 = none, and ``names``). They describe a version; none is read to
#: serve it, so they are written after the version (a failure to make one never costs the model),
#: are not in ``manifest["files"]`` (the checksums cover what serving reads) and are replaced
#: atomically.
DOCUMENTS = ("report.html", "segments.npz")


def write_document(path: str | os.PathLike, name: str, data: bytes) -> Path:
    """Write document ``name`` (one of :data:`DOCUMENTS`) into version folder ``path`` atomically."""
    path = Path(path)
    if name not in DOCUMENTS:
        raise ArtifactError(f"{name!r} is not a version document ({', '.join(DOCUMENTS)})")
    read_manifest(path)  # only into a real version folder
    _replace_atomically(path / name, data)
    return path / name


def read_document(path: str | os.PathLike, name: str) -> bytes | None:
    """Document ``name`` of version folder ``path``, or None when the version has none."""
    if name not in DOCUMENTS:
        raise ArtifactError(f"{name!r} is not a version document ({', '.join(DOCUMENTS)})")
    try:
        return (Path(path) / name).read_bytes()
    except FileNotFoundError:
        return None


def read_item_counts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per item of version folder ``path``: ``buyers`` (distinct), ``units`` bought and ``users``
    who interacted with it, from the training matrices (int64 arrays, one entry per item)."""
    path = Path(path)
    manifest = read_manifest(path)
    n_items = int(manifest.get("counts", {}).get("items", 0))
    try:
        purchases = _load_csr(path / "purchases.npz")
        interactions = _load_csr(path / "interactions.npz")
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable training matrices ({type(e).__name__}: {e})") from None
    n_items = n_items or purchases.shape[1]
    bought = purchases.data > 0
    return {
        "buyers": np.bincount(purchases.indices[bought], minlength=n_items).astype(np.int64),
        "units": np.rint(np.bincount(purchases.indices, weights=purchases.data, minlength=n_items)).astype(
            np.int64
        ),
        "users": np.bincount(interactions.indices, minlength=n_items).astype(np.int64),
    }
