"""Turn events into the user x item confidence matrix that ALS is fitted on.

One implementation serves both sides: training builds the whole matrix (:func:`confidence_matrix`),
real-time fold-in rebuilds one user's row (:func:`user_confidence_row`) with the same functions and
the parameters recorded in ``manifest["params"]`` (:class:`RowRecipe`). How one entry ``c[u, i]``
is computed:

1. Every event contributes ``w_e = event_weights[event] * decay(t)`` where
   ``decay(t) = 0.5 ** (max(0, now - t) / (half_life_days * 86400))`` and ``decay = 1`` when
   ``half_life_days`` is null. ``now`` is ``manifest["trained_until"]`` (the newest training event)
   unless told otherwise. Quantity does not enter: one purchase line is one act of preference.
2. ``r[u, i] = sum of w_e`` over the user's events on the item (float64). Entries ``<= 0`` are dropped
   (an impression-only pair carries no preference).
3. Scaling of the summed value ``r``:

   * ``linear``: ``c = r``
   * ``log``:    ``c = log1p(r)``
   * ``bm25``:   ``c = r * (k1 + 1) / (r + k1 * (1 - b + b * L_u / L_avg)) * idf_i`` with
     ``L_u = sum_i r[u, i]`` (the user's row sum before scaling), ``L_avg`` the mean ``L_u`` over
     training users (``manifest["params"]["bm25_avg_length"]``), and
     ``idf_i = log(1 + (N - df_i + 0.5) / (df_i + 0.5))`` where ``N`` is the number of training
     users (``manifest["params"]["bm25_n_users"]``) and ``df_i`` the number of training users
     with ``r[u, i] > 0`` -- exactly the column counts of ``interactions.npz``, whose sparsity
     pattern is that of ``r`` (this idf is always > 0, so no entry vanishes).
4. The result is stored as float32. ``alpha`` is *not* applied here: ALS multiplies by it, as
   implicit does, so the effective confidence is ``alpha * c``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.core.contract import EVENT_CODE, EVENT_TYPES, PURCHASE
from recsvc.core.ids import as_id_map

SCALINGS = ("linear", "log", "bm25")
#: How a model's ALS regularization grows with a row (see :class:`RowRecipe`).
REGULARIZATION_SCALINGS = ("constant", "count")
SECONDS_PER_DAY = 86_400

#: Default weight per event type. Impressions only say "we showed it"; they are dropped.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "cart": 4.0,
    "purchase": 10.0,
    "impression": 0.0,
    "click": 2.0,
}


DEFAULT_SCALING = "log"
DEFAULT_ALPHA = 5.0
DEFAULT_REGULARIZATION = 1.0
DEFAULT_BM25_K1 = 1.2
DEFAULT_BM25_B = 0.75
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class WeightingParams:
    """How events become confidence values (see the module docstring for the exact formula).

    Parameters
    ----------
    event_weights : dict
        Weight per event type (``view, cart, purchase, impression, click``); missing types take
        the defaults. Weights must be finite and ``>= 0``.
    scaling : {"linear", "log", "bm25"}
        How the summed weights are scaled.
    alpha : float
        Confidence multiplier applied inside ALS (kept here because it belongs to the same recipe).
    half_life_days : float or None
        Time decay half-life; ``None`` means no decay.
    bm25_k1, bm25_b : float
        BM25 saturation and length normalisation (used only with ``scaling="bm25"``).
    """

    event_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    scaling: str = DEFAULT_SCALING
    alpha: float = DEFAULT_ALPHA
    half_life_days: float | None = None
    bm25_k1: float = DEFAULT_BM25_K1
    bm25_b: float = DEFAULT_BM25_B

    def __post_init__(self) -> None:
        unknown = sorted(set(self.event_weights) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(
                f"event_weights: unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})"
            )
        weights = {**DEFAULT_EVENT_WEIGHTS, **{k: float(v) for k, v in self.event_weights.items()}}
        for name, value in weights.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"event_weights.{name} must be a finite number >= 0, got {value!r}")
        object.__setattr__(self, "event_weights", weights)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.half_life_days is not None and not (
            math.isfinite(self.half_life_days) and self.half_life_days > 0
        ):
            raise ValueError(f"half_life_days must be > 0 or null, got {self.half_life_days!r}")
        if not (math.isfinite(self.bm25_k1) and self.bm25_k1 > 0):
            raise ValueError(f"bm25_k1 must be > 0, got {self.bm25_k1!r}")
        if not (math.isfinite(self.bm25_b) and 0 <= self.bm25_b <= 1):
            raise ValueError(f"bm25_b must be in [0, 1], got {self.bm25_b!r}")
        if all(weights[name] == 0 for name in EVENT_TYPES):
            raise ValueError("event_weights: at least one event type needs a weight > 0")

    def weight_table(self) -> np.ndarray:
        """Weights as a read-only float64 array indexed by event code (``EVENT_CODE``).

        Built once per instance: fold-in asks for it on every real-time request.
        """
        table = self.__dict__.get("_weight_table")
        if table is None:
            table = np.zeros(len(EVENT_TYPES), dtype=np.float64)
            for name, code in EVENT_CODE.items():
                table[code] = self.event_weights[name]
            table.flags.writeable = False
            self.__dict__["_weight_table"] = table
        return table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_manifest(cls, params: Mapping[str, Any]) -> WeightingParams:
        """Read the recipe recorded in ``manifest["params"]``; keys it lacks take the defaults.

        Raises
        ------
        ValueError
            A recorded value is out of range; the message names the key (``params.alpha``).
        """
        recorded = params.get("event_weights") or {}
        if not isinstance(recorded, Mapping):
            raise ValueError("params.event_weights must be a mapping of event type to weight")
        weights = {}
        for name, value in recorded.items():
            if name not in EVENT_CODE:
                raise ValueError(f"params.event_weights: unknown event type {name!r}")
            weights[name] = _finite(value, f"params.event_weights.{name}", minimum=0.0)
        scaling = str(params.get("scaling") or DEFAULT_SCALING)
        if scaling not in SCALINGS:
            raise ValueError(f"params.scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        half_life = params.get("half_life_days")
        b = _finite(params.get("bm25_b", DEFAULT_BM25_B), "params.bm25_b", minimum=0.0)
        if b > 1.0:
            raise ValueError(f"params.bm25_b must be in [0, 1], got {b!r}")
        return cls(
            event_weights=weights,
            scaling=scaling,
            alpha=_finite(params.get("alpha", DEFAULT_ALPHA), "params.alpha", above=0.0),
            half_life_days=None
            if half_life in (None, 0)
            else _finite(half_life, "params.half_life_days", above=0.0),
            bm25_k1=_finite(params.get("bm25_k1", DEFAULT_BM25_K1), "params.bm25_k1", above=0.0),
            bm25_b=b,
        )


def _finite(value: Any, name: str, minimum: float | None = None, above: float | None = None) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if above is not None and number <= above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    return number


def event_contributions(
    event: np.ndarray, timestamp: np.ndarray, params: WeightingParams, now: int | float | None
) -> np.ndarray:
    """Per-event contribution ``w_e = event_weights[event] * decay(t)`` (float64).

    Parameters
    ----------
    event : numpy.ndarray
        int8 event codes.
    timestamp : numpy.ndarray
        int64 Unix seconds.
    params : WeightingParams
        Event weights and half-life.
    now : int, float or None
        Reference time for the decay; events after ``now`` count as age 0. Ignored without decay.

    Returns
    -------
    numpy.ndarray
        float64 weight per event.
    """
    weights = params.weight_table()[np.asarray(event, dtype=np.intp)]
    if params.half_life_days is None or len(weights) == 0:
        return weights
    if now is None:
        now = int(np.max(timestamp))
    age_days = np.maximum(0.0, (float(now) - np.asarray(timestamp, dtype=np.float64)) / SECONDS_PER_DAY)
    return weights * np.exp2(-age_days / params.half_life_days)


def index_positions(values: np.ndarray, index: Mapping[str, int] | Sequence[str] | np.ndarray) -> np.ndarray:
    """Position of each of ``values`` in ``index`` (-1 when absent): :meth:`IdMap.positions`.

    ``index`` is an :class:`~recsvc.core.ids.IdMap`, a mapping id -> position or a sequence of ids
    whose order is the position.
    """
    return as_id_map(index).positions(values)


def _rows_cols(events: Any, user_index: Any, item_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row/column position of each event, through the tables' dictionary encoding when present."""
    out = []
    for column, index in (("user_id", user_index), ("item_id", item_index)):
        if hasattr(events, "codes"):
            codes, values = events.codes(column)
            out.append(index_positions(values, index)[codes])
        else:
            out.append(index_positions(getattr(events, column), index))
    return out[0], out[1]


def raw_matrix(
    events: Any,
    user_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    item_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    params: WeightingParams,
    now: int | float | None = None,
) -> sp.csr_matrix:
    """Summed event weights ``r[u, i]`` (steps 1-2), float64 CSR, entries ``<= 0`` removed.

    Events whose user or item is not in the index are ignored.
    """
    n_users, n_items = len(user_index), len(item_index)
    rows, cols = _rows_cols(events, user_index, item_index)
    weights = event_contributions(events.event, events.timestamp, params, now)
    keep = (rows >= 0) & (cols >= 0) & (weights > 0)
    matrix = sp.csr_matrix(
        (weights[keep], (rows[keep], cols[keep])), shape=(n_users, n_items), dtype=np.float64
    )  # duplicates (several events on one pair) are summed here
    matrix.sum_duplicates()
    matrix.data[~np.isfinite(matrix.data)] = 0.0
    matrix.eliminate_zeros()
    return matrix


@dataclass(frozen=True)
class Bm25Stats:
    """What BM25 scaling needs besides a user's own row: stored in ``manifest["params"]``."""

    n_users: int
    avg_length: float
    # int64 per item: users with r[u, i] > 0 (None in a recipe read from a manifest until attached)
    document_frequency: np.ndarray | None


def bm25_stats(raw: sp.csr_matrix) -> Bm25Stats:
    """Collection statistics of a raw (summed, unscaled) matrix."""
    lengths = np.asarray(raw.sum(axis=1)).ravel()
    avg = float(lengths.mean()) if len(lengths) else 1.0
    df = np.bincount(raw.indices, minlength=raw.shape[1]).astype(np.int64)
    return Bm25Stats(n_users=raw.shape[0], avg_length=avg if avg > 0 else 1.0, document_frequency=df)


def bm25_idf(document_frequency: np.ndarray, n_users: int) -> np.ndarray:
    """``log(1 + (N - df + 0.5) / (df + 0.5))``: positive for every df in ``0..N``."""
    df = np.asarray(document_frequency, dtype=np.float64)
    return np.log1p((n_users - df + 0.5) / (df + 0.5))


def _bm25_values(
    values: np.ndarray, row_lengths: np.ndarray, idf: np.ndarray, k1: float, b: float, avg_length: float
) -> np.ndarray:
    """BM25 of raw values given each value's row length and item idf (one formula for both sides)."""
    norm = k1 * (1.0 - b + b * row_lengths / avg_length)
    return values * (k1 + 1.0) / (values + norm) * idf


def scale(raw: sp.csr_matrix, params: WeightingParams, stats: Bm25Stats | None = None) -> sp.csr_matrix:
    """Apply the scaling step (3) to a raw matrix; returns a new float64 CSR with the same pattern.

    For BM25, ``stats`` defaults to the statistics of ``raw`` itself (training).
    """
    out = raw.copy()
    if params.scaling == "linear":
        return out
    if params.scaling == "log":
        out.data = scale_values(out.data, params)
        return out
    stats = stats or bm25_stats(raw)
    lengths = np.asarray(raw.sum(axis=1)).ravel()
    row_of = np.repeat(np.arange(raw.shape[0]), np.diff(raw.indptr))
    if stats.document_frequency is None:
        raise ValueError("bm25 scaling needs the training document frequencies (with_document_frequency)")
    idf = bm25_idf(stats.document_frequency, stats.n_users)
    out.data = scale_values(
        out.data, params, row_lengths=lengths[row_of], idf=idf[out.indices], avg_length=stats.avg_length
    )
    return out


def scale_values(
    raw: np.ndarray,
    params: WeightingParams,
    *,
    row_lengths: np.ndarray | None = None,
    idf: np.ndarray | None = None,
    avg_length: float | None = None,
) -> np.ndarray:
    """The scaling step (3) on a flat array of raw entries (float64), wherever they are stored.

    BM25 needs, per entry, the row length of its user (``row_lengths``) and the idf of its item
    (``idf``), plus ``avg_length``; a distributed engine computes those and calls this on each
    partition, so every engine scales with this one formula.
    """
    values = np.asarray(raw, dtype=np.float64)
    if params.scaling == "linear":
        return values.copy()
    if params.scaling == "log":
        return np.log1p(values)
    if row_lengths is None or idf is None or avg_length is None:
        raise ValueError("bm25 scaling needs row_lengths, idf and avg_length")
    return _bm25_values(values, row_lengths, idf, params.bm25_k1, params.bm25_b, avg_length)


def confidence_matrix(
    events: Any,
    user_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    item_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    params: WeightingParams,
    now: int | float | None = None,
) -> sp.csr_matrix:
    """The confidence matrix ALS is fitted on, before alpha (float32 CSR, users x items).

    Parameters
    ----------
    events : EventTable
        Events (any object with ``user_id, item_id, event, timestamp`` arrays works).
    user_index, item_index : mapping id -> position, or sequence of ids
        Row and column order. Events of users/items not in them are ignored.
    params : WeightingParams
        Event weights, decay and scaling.
    now : int or float, optional
        Reference time for decay; defaults to the newest event.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, sorted indices, no explicit zeros.
    """
    if now is None and len(events.timestamp):
        now = int(np.max(events.timestamp))
    raw = raw_matrix(events, user_index, item_index, params, now)
    return to_float32(scale(raw, params))


def to_float32(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """float32 copy with sorted indices; values that would underflow to 0 are kept at the smallest
    normal float32, so the sparsity pattern (which BM25's document frequencies rely on) survives."""
    out = sp.csr_matrix(matrix, dtype=np.float32)
    np.maximum(out.data, np.finfo(np.float32).tiny, out=out.data)
    out.sort_indices()
    return out


def bm25_manifest_params(raw: sp.csr_matrix, params: WeightingParams) -> dict[str, Any]:
    """Extra ``manifest["params"]`` keys fold-in needs for BM25 (empty for other scalings).

    ``raw`` is the summed, unscaled matrix of the training users (:func:`raw_matrix`).
    """
    if params.scaling != "bm25":
        return {}
    stats = bm25_stats(raw)
    return {"bm25_n_users": stats.n_users, "bm25_avg_length": stats.avg_length}


def popularity_scores(
    events: Any,
    item_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    params: WeightingParams,
    now: int | float | None = None,
    half_life_days: float = 14.0,
) -> np.ndarray:
    """Recency-aware, purchase-weighted popularity per item (float32), the serving fallback.

    Each event adds ``event_weights[event] / event_weights["purchase"]`` (so a purchase counts 1)
    times ``0.5 ** (age_days / half_life_days)``, age measured from ``now`` (default: newest event).
    """
    n_items = len(item_index)
    if len(events.timestamp) == 0:
        return np.zeros(n_items, dtype=np.float32)
    if now is None:
        now = int(np.max(events.timestamp))
    if hasattr(events, "codes"):
        codes, values = events.codes("item_id")
        cols = index_positions(values, item_index)[codes]
    else:
        cols = index_positions(events.item_id, item_index)
    contribution = popularity_contributions(events.event, events.timestamp, params, now, half_life_days)
    keep = cols >= 0
    return np.bincount(cols[keep], weights=contribution[keep], minlength=n_items).astype(np.float32)


def popularity_contributions(
    event: np.ndarray, timestamp: np.ndarray, params: WeightingParams, now: int | float, half_life_days: float
) -> np.ndarray:
    """What each event adds to its item's popularity (float64; see :func:`popularity_scores`)."""
    purchase_weight = params.event_weights["purchase"] or max(params.event_weights.values())
    table = params.weight_table() / purchase_weight
    age_days = np.maximum(0.0, (float(now) - np.asarray(timestamp).astype(np.float64)) / SECONDS_PER_DAY)
    return table[np.asarray(event).astype(np.intp)] * np.exp2(-age_days / half_life_days)


def purchase_counts(
    events: Any,
    user_index: Mapping[str, int] | Sequence[str] | np.ndarray,
    item_index: Mapping[str, int] | Sequence[str] | np.ndarray,
) -> sp.csr_matrix:
    """Purchase events per (user, item) as float32 CSR: what "already bought" means in serving."""
    rows, cols = _rows_cols(events, user_index, item_index)
    keep = (rows >= 0) & (cols >= 0) & (np.asarray(events.event) == PURCHASE)
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])),
        shape=(len(user_index), len(item_index)),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    return matrix


def id_maps(
    events: Any, params: WeightingParams, catalog_item_ids: Sequence[str] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The row and column order of a model: ``(user_ids, item_ids)`` as object arrays.

    Users are every user with at least one event of positive weight (an impression-only visitor
    has nothing to learn from), sorted. Items are the catalog's, in catalog order, followed by
    items that appear in events but not in the catalog, sorted. Both orders depend only on the
    data, never on row order, so training is reproducible.
    """
    weights = params.weight_table()[np.asarray(events.event, dtype=np.intp)]
    if hasattr(events, "codes"):
        codes, values = events.codes("user_id")
        used = np.bincount(codes[weights > 0], minlength=len(values)) > 0
        users = values[used]
        codes, values = events.codes("item_id")
        items_seen = values[np.bincount(codes, minlength=len(values)) > 0]
    else:
        users = np.unique(np.asarray(events.user_id, dtype=object)[weights > 0])
        items_seen = np.unique(np.asarray(events.item_id, dtype=object))
    users = np.sort(np.asarray(users, dtype=object))
    if catalog_item_ids is None or len(catalog_item_ids) == 0:
        return users, np.sort(np.asarray(items_seen, dtype=object))
    catalog_ids = np.asarray(catalog_item_ids, dtype=object)
    extra = items_seen[index_positions(items_seen, catalog_ids) < 0]
    return users, np.concatenate([catalog_ids, np.sort(np.asarray(extra, dtype=object))])


# --------------------------------------------------------------------------------------------
# One user's row (real-time fold-in): the same recipe, applied to a single user's events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRecipe:
    """The confidence recipe of one model version, for rebuilding a single user's row.

    Build it with :meth:`from_manifest`; for ``scaling="bm25"`` also attach the training document
    frequencies with :meth:`with_document_frequency` (the column counts of the model's
    ``interactions`` matrix).

    Attributes
    ----------
    weighting : WeightingParams
        Event weights, decay, scaling and alpha, as recorded in the manifest.
    regularization : float
        ALS regularization (the fold-in solve uses it).
    bm25 : Bm25Stats or None
        Training statistics BM25 scaling needs (``None`` for other scalings).
    """

    weighting: WeightingParams
    regularization: float
    bm25: Bm25Stats | None = None
    #: ``constant`` (implicit: every row gets ``regularization``) or ``count`` (Spark ML: a row with
    #: ``n`` entries gets ``regularization_per_entry * n``).
    regularization_scaling: str = "constant"
    regularization_per_entry: float = 0.0
    #: Lowest effective confidence ``alpha * c`` of an entry (Spark ML's ``1 + alpha * r`` with
    #: ``r >= 0`` never goes below 1); 0 = none.
    confidence_floor: float = 0.0

    @property
    def alpha(self) -> float:
        return self.weighting.alpha

    @property
    def scaling(self) -> str:
        return self.weighting.scaling

    @classmethod
    def from_manifest(cls, params: Mapping[str, Any]) -> RowRecipe:
        """Read ``manifest["params"]``; keys it lacks take the training defaults.

        Raises
        ------
        ValueError
            A recorded value is out of range; the message names the key.
        """
        weighting = WeightingParams.from_manifest(params)
        regularization = _finite(
            params.get("regularization", DEFAULT_REGULARIZATION), "params.regularization", minimum=0.0
        )
        scaling = str(params.get("regularization_scaling") or "constant")
        if scaling not in REGULARIZATION_SCALINGS:
            raise ValueError(
                f"params.regularization_scaling must be one of {', '.join(REGULARIZATION_SCALINGS)}, "
                f"got {scaling!r}"
            )
        per_entry = _finite(
            params.get("regularization_per_entry", 0.0), "params.regularization_per_entry", minimum=0.0
        )
        floor = _finite(params.get("confidence_floor", 0.0), "params.confidence_floor", minimum=0.0)
        stats = None
        if weighting.scaling == "bm25":
            n_users, avg_length = params.get("bm25_n_users"), params.get("bm25_avg_length")
            if n_users is None or avg_length is None:
                raise ValueError("params: scaling is bm25 but bm25_n_users/bm25_avg_length are missing")
            stats = Bm25Stats(
                n_users=int(_finite(n_users, "params.bm25_n_users", above=0.0)),
                avg_length=_finite(avg_length, "params.bm25_avg_length", above=0.0),
                document_frequency=None,
            )
        return cls(weighting, regularization, stats, scaling, per_entry, floor)

    def solve_terms(self, confidence: np.ndarray) -> tuple[np.ndarray, float]:
        """The confidences (before alpha) and the regularization of one row's fold-in solve.

        They are what the engine that trained the model used for a row like this one, so a
        folded-in user lands where a training sweep would have put them: implicit's constant
        regularization, or Spark ML's regularization per entry of the row and its confidence floor.
        """
        conf = np.asarray(confidence, dtype=np.float32)
        if self.confidence_floor > 0:
            conf = np.maximum(conf, np.float32(self.confidence_floor / self.alpha))
        if self.regularization_scaling == "count":
            return conf, self.regularization_per_entry * int(np.count_nonzero(conf > 0))
        return conf, self.regularization

    def with_document_frequency(self, document_frequency: np.ndarray) -> RowRecipe:
        """A copy carrying BM25's document frequency per item (training users per item)."""
        if self.bm25 is None:
            return self
        df = np.asarray(document_frequency, dtype=np.int64)
        return replace(self, bm25=replace(self.bm25, document_frequency=df))

    def idf(self) -> np.ndarray:
        """BM25 idf per item (float64), built once."""
        cached = self.__dict__.get("_idf")
        if cached is None:
            if self.bm25 is None or self.bm25.document_frequency is None:
                raise ValueError(
                    "bm25 scaling needs the training document frequencies (with_document_frequency)"
                )
            cached = self.__dict__["_idf"] = bm25_idf(self.bm25.document_frequency, self.bm25.n_users)
        return cached


def raw_user_row(
    item_positions: np.ndarray,
    event_codes: np.ndarray,
    timestamps: np.ndarray,
    recipe: RowRecipe,
    now: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed event weights per item (steps 1-2 of the recipe) for one user.

    Parameters
    ----------
    item_positions : numpy.ndarray
        Item index of each event; negative = item unknown to the model (ignored).
    event_codes : numpy.ndarray
        int event code of each event.
    timestamps : numpy.ndarray
        Unix seconds of each event.
    recipe : RowRecipe
    now : float or None
        Reference time of the decay (training uses ``manifest["trained_until"]``).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted unique item indices (int64) and their summed weights (float64, all > 0).
    """
    items = np.asarray(item_positions, dtype=np.int64)
    weights = event_contributions(event_codes, timestamps, recipe.weighting, now)
    # As in training: events of unknown items and zero-weight events (impressions) are dropped
    # before summing, so they neither add entries nor count in BM25's row length.
    keep = (items >= 0) & (weights > 0)
    if not keep.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    unique, inverse = np.unique(items[keep], return_inverse=True)
    sums = np.bincount(inverse, weights=weights[keep], minlength=len(unique))
    ok = np.isfinite(sums) & (sums > 0)
    return unique[ok], sums[ok]


def scale_row(indices: np.ndarray, raw: np.ndarray, recipe: RowRecipe) -> np.ndarray:
    """Scaling (step 3) and the float32 storage step (4) of one user's raw row.

    Returns
    -------
    numpy.ndarray
        float32 confidences before alpha, same order as ``indices``.
    """
    raw = np.asarray(raw, dtype=np.float64)
    w = recipe.weighting
    if w.scaling == "linear":
        out = raw.copy()
    elif w.scaling == "log":
        out = np.log1p(raw)
    else:
        idf = recipe.idf()[np.asarray(indices, dtype=np.intp)]
        out = _bm25_values(raw, raw.sum(), idf, w.bm25_k1, w.bm25_b, _bm25_avg(recipe))
    # Same floor as training's float32 conversion: the sparsity pattern must survive.
    return np.maximum(out, _FLOAT32_TINY).astype(np.float32)


def unscale_row(indices: np.ndarray, confidence: np.ndarray, recipe: RowRecipe) -> np.ndarray:
    """Invert :func:`scale_row`: the raw summed weights behind a stored confidence row.

    Used to add new events to a user's training row the way a retrain would (scale of the *sum*,
    not sum of scales). ``linear`` and ``log`` invert exactly (up to float32 rounding). BM25 inverts
    in closed form: with ``s_i = c_i / idf_i`` and ``S = sum s_i / (k1 + 1 - s_i)`` the row length is
    ``L = k1 (1 - b) S / (1 - k1 b S / L_avg)`` and ``r_i = s_i * norm(L) / (k1 + 1 - s_i)``. When
    ``b = 1`` the scaling forgets the row's magnitude, so the length is taken as ``L_avg``.

    Returns
    -------
    numpy.ndarray
        float64 raw weights, > 0.
    """
    c = np.asarray(confidence, dtype=np.float64)
    w = recipe.weighting
    if w.scaling == "linear":
        return c.copy()
    if w.scaling == "log":
        return np.expm1(c)
    k1, b, avg = w.bm25_k1, w.bm25_b, _bm25_avg(recipe)
    s = c / recipe.idf()[np.asarray(indices, dtype=np.intp)]
    # s < k1 + 1 always holds for a scaled value; rounding can push it onto the bound.
    s = np.minimum(s, (k1 + 1.0) * (1.0 - 1e-6))
    ratio = s / (k1 + 1.0 - s)
    total = float(ratio.sum())
    denominator = 1.0 - k1 * b * total / avg
    if b >= 1.0 or denominator <= 1e-9:
        length = avg
    else:
        length = k1 * (1.0 - b) * total / denominator
    norm = k1 * (1.0 - b + b * length / avg)
    return np.maximum(ratio * norm, np.finfo(np.float64).tiny)


def unscale(confidence: sp.csr_matrix, recipe: RowRecipe) -> sp.csr_matrix:
    """:func:`unscale_row` of every row: the summed raw weights behind a confidence matrix (float32)."""
    out = sp.csr_matrix(confidence, dtype=np.float64, copy=True)
    scaling = recipe.weighting.scaling
    if scaling == "log":
        out.data = np.expm1(out.data)
    elif scaling == "bm25":
        for u in range(out.shape[0]):
            lo, hi = out.indptr[u], out.indptr[u + 1]
            if hi > lo:
                out.data[lo:hi] = unscale_row(out.indices[lo:hi], out.data[lo:hi], recipe)
    return sp.csr_matrix(out, dtype=np.float32)


def _bm25_avg(recipe: RowRecipe) -> float:
    if recipe.bm25 is None:
        raise ValueError("bm25 scaling needs params.bm25_avg_length")
    return float(recipe.bm25.avg_length)


def add_raw_rows(
    indices_a: np.ndarray, raw_a: np.ndarray, indices_b: np.ndarray, raw_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum two sparse raw rows; returns sorted unique indices (int64) and float64 sums."""
    indices = np.concatenate([np.asarray(indices_a, np.int64), np.asarray(indices_b, np.int64)])
    values = np.concatenate([np.asarray(raw_a, np.float64), np.asarray(raw_b, np.float64)])
    if len(indices) == 0:
        return indices, values
    unique, inverse = np.unique(indices, return_inverse=True)
    return unique, np.bincount(inverse, weights=values, minlength=len(unique))


def user_confidence_row(
    events_for_user: Iterable[Mapping[str, Any]] | Any,
    item_index: Mapping[str, int],
    recipe: RowRecipe,
    now: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One user's confidence row (before alpha), as :func:`confidence_matrix` builds it.

    Parameters
    ----------
    events_for_user : iterable of mappings, or a table with arrays
        Events of one user: mappings with ``item_id``, ``event`` (a name of
        :data:`recsvc.core.contract.EVENT_TYPES` or its int code) and ``timestamp`` (Unix seconds),
        or any object with ``item_id``, ``event`` (codes) and ``timestamp`` arrays such as an
        :class:`~recsvc.core.events.EventTable`.
    item_index : mapping
        Item id -> item index of the model; events on other items are ignored.
    recipe : RowRecipe
        From the model's ``manifest["params"]``.
    now : float or None
        Decay reference time; training uses ``manifest["trained_until"]``. None = newest event.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted item indices (int32) and float32 confidences, equal to the user's row of
        :func:`confidence_matrix` over the same events.
    """
    items, codes, stamps = _event_arrays(events_for_user, item_index)
    indices, raw = raw_user_row(items, codes, stamps, recipe, now)
    return indices.astype(np.int32), scale_row(indices, raw, recipe)


def _event_arrays(events: Any, item_index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if hasattr(events, "item_id") and hasattr(events, "timestamp"):
        items = np.fromiter((item_index.get(i, -1) for i in events.item_id), dtype=np.int64)
        return items, np.asarray(events.event, dtype=np.int64), np.asarray(events.timestamp, dtype=np.int64)
    items_list, codes_list, stamps_list = [], [], []
    for event in events:
        items_list.append(item_index.get(event["item_id"], -1))
        kind = event["event"]
        codes_list.append(EVENT_CODE[kind] if isinstance(kind, str) else int(kind))
        stamps_list.append(int(event["timestamp"]))
    return (
        np.asarray(items_list, dtype=np.int64),
        np.asarray(codes_list, dtype=np.int64),
        np.asarray(stamps_list, dtype=np.int64),
    )
