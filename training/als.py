"""Fit implicit's ALS on a confidence matrix, reproducibly, and check what comes out.

* CPU by default; implicit's CUDA ALS when ``device="gpu"``, or ``"auto"`` and CUDA is usable.
* BLAS is pinned to one thread during the fit (threadpoolctl), as implicit recommends: its own
  threads parallelise over users/items, and a multi-threaded BLAS underneath oversubscribes cores.
* Seeded: the same matrix, parameters, seed and thread count give bit-identical factors on CPU.
* The factors are checked (float32, finite, shapes) before anyone can write them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.progress import Progress
from recsvc.core.scoring import ModelSpec
from recsvc.core.weighting import (
    DEFAULT_ALPHA,
    DEFAULT_BM25_B,
    DEFAULT_BM25_K1,
    DEFAULT_EVENT_WEIGHTS,
    DEFAULT_SCALING,
    SCALINGS,
    WeightingParams,
)

DEVICES = ("auto", "cpu", "gpu")


class FitError(RuntimeError):
    """ALS produced unusable factors (NaN/inf or wrong shapes); nothing must be written."""


#: ALS regularization per catalogue item: ``regularization = 0.03 * n_items`` unless one is given.
#: The best absolute value moved by more than 100x between data sets; scaled with the catalogue
#: (as the ``Y^T Y`` term it balances is) it transfers (docs/quality.md).
DEFAULT_REGULARIZATION_PER_ITEM = 0.01


@dataclass(frozen=True)
class TrainParams:
    """Every model parameter: ALS and the confidence recipe go to ``manifest["params"]`` (with the
    seed and the effective regularization), the blend's weights to ``manifest["model"]``.

    Defaults were chosen on evidence across the public data sets and both evaluation protocols
    (docs/quality.md, ``bench/quality.py``).

    ``regularization`` is absolute when given; ``None`` (the default) means
    ``regularization_per_item * n_items`` of the catalogue being fitted (:meth:`resolved`). Resolved
    parameters keep ``regularization_per_item`` when the rule set the number (a retrain on a grown
    catalogue scales it again) and set it to None when the number was given.
    """

    factors: int = 64
    regularization: float | None = None
    regularization_per_item: float | None = DEFAULT_REGULARIZATION_PER_ITEM
    iterations: int = 15
    alpha: float = DEFAULT_ALPHA
    event_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    scaling: str = DEFAULT_SCALING
    half_life_days: float | None = None
    bm25_k1: float = DEFAULT_BM25_K1
    bm25_b: float = DEFAULT_BM25_B
    model: ModelSpec = field(default_factory=ModelSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.factors, int) or not 1 <= self.factors <= 1024:
            raise ValueError(f"factors must be an integer in 1..1024, got {self.factors!r}")
        if not isinstance(self.iterations, int) or not 1 <= self.iterations <= 200:
            raise ValueError(f"iterations must be an integer in 1..200, got {self.iterations!r}")
        if self.regularization is not None and not (
            math.isfinite(self.regularization) and self.regularization >= 0
        ):
            raise ValueError(f"regularization must be >= 0, got {self.regularization!r}")
        per_item = self.regularization_per_item
        if per_item is not None and not (math.isfinite(per_item) and per_item >= 0):
            raise ValueError(f"regularization_per_item must be >= 0, got {self.regularization_per_item!r}")
        if not isinstance(self.model, ModelSpec):
            raise ValueError("model must be a ModelSpec")
        # Validates and completes the weighting fields (unknown event types, negative weights...).
        weighting = self.weighting()
        object.__setattr__(self, "event_weights", dict(weighting.event_weights))

    def weighting(self) -> WeightingParams:
        """The confidence recipe part of these parameters."""
        return WeightingParams(
            event_weights=dict(self.event_weights),
            scaling=self.scaling,
            alpha=self.alpha,
            half_life_days=self.half_life_days,
            bm25_k1=self.bm25_k1,
            bm25_b=self.bm25_b,
        )

    def effective_regularization(self, n_items: int) -> float:
        """The regularization ALS is fitted with on a catalogue of ``n_items`` items."""
        if self.regularization is not None:
            return float(self.regularization)
        per_item = self.regularization_per_item
        return float((DEFAULT_REGULARIZATION_PER_ITEM if per_item is None else per_item) * max(1, n_items))

    def resolved(self, n_items: int) -> TrainParams:
        """These parameters with the regularization fixed for ``n_items`` (what fold-in reads)."""
        if self.regularization is not None:
            return replace(self, regularization_per_item=None)
        return replace(self, regularization=self.effective_regularization(n_items))

    def replace(self, **changes: Any) -> TrainParams:
        """A copy with some fields changed (``event_weights`` is merged, not replaced)."""
        if "event_weights" in changes:
            if changes["event_weights"] is None:
                del changes["event_weights"]
            else:
                changes["event_weights"] = {**self.event_weights, **changes["event_weights"]}
        return replace(self, **changes)

    def to_manifest(self, seed: int) -> dict[str, Any]:
        """The ``manifest["params"]`` dict (keys as in docs/ARCHITECTURE.md, "Artifact").

        Resolve the regularization first (:meth:`resolved`): fold-in needs the number ALS used.
        ``regularization_per_item`` is kept so that a retrain on a grown catalogue scales it again.
        """
        out = asdict(self)
        del out["model"]
        out["seed"] = int(seed)
        return out

    def to_config(self) -> dict[str, Any]:
        """Every parameter, the blend's included (``model``): what ``tune`` saves and train reuses."""
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "parameters") -> TrainParams:
        """Build from a dict (a config file, or ``manifest["params"]``); unknown keys are errors.

        Raises
        ------
        ValueError
            Naming ``source`` and the offending key.
        """
        known = {f.name for f in fields(cls)}
        # Present in manifests: set by the training run (engine, collection statistics), not chosen.
        ignored = {
            "seed",
            "bm25_n_users",
            "bm25_avg_length",
            "regularization_scaling",
            "regularization_per_entry",
            "confidence_floor",
        }
        values = dict(values)
        if values.get("regularization_per_item") not in (None, "") and "regularization" in values:
            # A manifest records both: the rule wins, so a grown catalogue gets a grown penalty.
            values.pop("regularization")
        unknown = sorted(set(values) - known - ignored)
        if unknown:
            raise ValueError(
                f"{source}: unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            try:
                if f.name in ("factors", "iterations"):
                    if isinstance(value, bool) or float(value) != int(value):
                        raise ValueError
                    value = int(value)
                elif f.name == "event_weights":
                    if not isinstance(value, Mapping):
                        raise ValueError
                    value = {str(k): float(v) for k, v in value.items()}
                elif f.name == "scaling":
                    value = str(value)
                    if value not in SCALINGS:
                        raise ValueError
                elif f.name == "half_life_days":
                    value = None if value in (None, "", "none", "null", 0) else float(value)
                elif f.name in ("regularization", "regularization_per_item"):
                    value = None if value in (None, "", "auto") else float(value)
                elif f.name == "model":
                    if not isinstance(value, Mapping):
                        raise ValueError
                    value = ModelSpec.from_mapping(value, source=f"{source}: model")
                else:
                    if isinstance(value, bool):
                        raise ValueError
                    value = float(value)
            except ValueError as e:
                if str(e).startswith(source):
                    raise
                raise ValueError(f"{source}: {f.name} has an invalid value {value!r}") from None
            except TypeError:
                raise ValueError(f"{source}: {f.name} has an invalid value {value!r}") from None
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainParams:
        """Read a TOML config file (top-level keys as in :class:`TrainParams`, ``[event_weights]``)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        return cls.from_mapping(values, source=str(path))


def gpu_available() -> bool:
    """True when implicit was built with CUDA and a GPU is usable."""
    try:
        import implicit.gpu

        return bool(implicit.gpu.HAS_CUDA)
    except ImportError:  # pragma: no cover - implicit is a training dependency
        return False


def _check_confidence(confidence: sp.csr_matrix) -> sp.csr_matrix:
    if not sp.issparse(confidence):
        raise TypeError("confidence must be a scipy.sparse matrix")
    matrix = sp.csr_matrix(confidence, dtype=np.float32)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"confidence matrix is empty (shape {matrix.shape}): no users or no items to train on"
        )
    if matrix.nnz == 0:
        raise ValueError("confidence matrix has no entries: no weighted events to train on")
    if not np.isfinite(matrix.data).all():
        raise ValueError("confidence matrix contains NaN or inf")
    if (matrix.data < 0).any():
        raise ValueError("confidence matrix contains negative values")
    return matrix


def check_factors(
    user_factors: np.ndarray, item_factors: np.ndarray, n_users: int, n_items: int, factors: int
) -> None:
    """Raise :class:`FitError` unless both factor matrices are float32, finite and the right shape."""
    for name, arr, rows in (("user_factors", user_factors, n_users), ("item_factors", item_factors, n_items)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise FitError(
                f"{name}: expected a float32 numpy array, "
                f"got {type(arr).__name__} {getattr(arr, 'dtype', '')}"
            )
        if arr.shape != (rows, factors):
            raise FitError(f"{name}: shape {arr.shape}, expected ({rows}, {factors})")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).any(axis=1).sum())
            raise FitError(f"{name}: {bad} rows contain NaN or inf (try a larger regularization)")


def fit_als(
    confidence: sp.csr_matrix,
    params: TrainParams,
    *,
    seed: int,
    threads: int = 0,
    show_progress: bool = False,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ALS and return ``(user_factors, item_factors)`` as float32 numpy arrays.

    Parameters
    ----------
    confidence : scipy.sparse.csr_matrix
        users x items confidence before alpha (:func:`training.weighting.confidence_matrix`).
    params : TrainParams
        ``factors, regularization, iterations, alpha`` are used.
    seed : int
        Seeds the initial factors; with the same thread count the CPU result is bit-identical.
    threads : int, default 0
        implicit's threads; 0 means one per core.
    show_progress : bool, default False
        Report the iterations through :mod:`recsvc.core.progress` (stage ``fit``).
    device : {"auto", "cpu", "gpu"}
        ``auto`` uses the GPU when implicit has CUDA, else the CPU.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n_users, factors)`` and ``(n_items, factors)`` float32.

    Raises
    ------
    ValueError
        The confidence matrix is empty, negative or not finite; or ``device="gpu"`` without CUDA.
    FitError
        The fitted factors are not finite or have the wrong shape.
    """
    from threadpoolctl import threadpool_limits

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    matrix = _check_confidence(confidence)
    regularization = params.effective_regularization(matrix.shape[1])
    use_gpu = device == "gpu" or (device == "auto" and gpu_available())
    if device == "gpu" and not gpu_available():
        raise ValueError(
            "device=gpu but implicit has no usable CUDA support (install implicit with CUDA and rmm)"
        )
    with threadpool_limits(limits=1, user_api="blas"):
        # Built inside the limit so implicit's BLAS check sees one thread and stays quiet.
        if use_gpu:
            from implicit.gpu.als import AlternatingLeastSquares as GpuALS

            model = GpuALS(
                factors=params.factors,
                regularization=regularization,
                alpha=params.alpha,
                iterations=params.iterations,
                random_state=seed,
            )
        else:
            from implicit.cpu.als import AlternatingLeastSquares

            model = AlternatingLeastSquares(
                factors=params.factors,
                regularization=regularization,
                alpha=params.alpha,
                iterations=params.iterations,
                num_threads=threads,
                random_state=seed,
            )
        with Progress("fit", total=params.iterations, unit="iterations", enabled=show_progress) as bar:
            model.fit(matrix, show_progress=False, callback=lambda *_: bar.update(1))
        if use_gpu:
            model = model.to_cpu()
    user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    check_factors(user_factors, item_factors, matrix.shape[0], matrix.shape[1], params.factors)
    return user_factors, item_factors


def recommender_from_factors(user_factors: np.ndarray, item_factors: np.ndarray, threads: int = 0) -> Any:
    """An implicit CPU ALS model holding saved factors, for its batched ``recommend``.

    Nothing is fitted: the model only scores ``user_factors @ item_factors.T`` and keeps the top N
    with implicit's multi-threaded top-k.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(factors=item_factors.shape[1], num_threads=threads)
    model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    return model
