"""Bundle mining: which items are bought together, and how well the mined bundles predict orders.

The pipeline calls :func:`mine_bundles_report` after fitting ALS and stores the result in the
artifact (``bundles.npz``); ``recsvc evaluate`` calls :func:`evaluate_bundles`.

How candidates are mined (defaults of :class:`MiningParams`)
-----------------------------------------------------------
1. **Baskets.** Purchase events that share a non-empty ``order_id`` form one basket. Purchases
   without an order id are grouped per user into sessions: consecutive purchases no more than
   ``basket_window_s`` apart belong to the same basket. An item counts once per basket, and only
   the first ``max_basket_items`` distinct items of a basket are kept, so one wholesale order of
   a thousand lines cannot cost a million pairs or drown everyone else's signal.
2. **Pair counts.** ``B`` is the binary baskets x items matrix; the co-purchase counts are
   ``C = B^T B`` (scipy sparse), computed in row blocks of anchor items whose size is bounded by
   ``max_pairs_per_block`` so memory stays bounded on any input.
3. **Score.** ``posterior``: the chance that a basket holding the anchor also holds the
   candidate, ``(s + m * n_b / N) / (n_a + m)`` -- the co-purchase rate shrunk towards the
   candidate's share of all baskets with the weight of ``m = prior_baskets`` baskets. Thin
   evidence leans on popularity, ties between equal counts go to the more popular candidate.
   Other measures (:data:`MEASURES`) remain available for comparison.
4. **Best-seller floor.** A pair is kept only when its posterior beats what the best seller
   (never bought with the anchor) would get: a co-purchase weaker than that is noise, and the
   popular fallback of serving proposes the best sellers anyway.
5. **ALS blend** (off by default, ``als_neighbours=0``). Each anchor can also get its
   ``als_neighbours`` nearest items by cosine of the ALS item factors (one matrix product per
   block of anchors and the exact top-k of :mod:`recsvc.core.topk`), scored
   ``evidence * co_purchase + als_weight * cosine`` with ``evidence = n / (n + evidence_baskets)``.
   It lowered the hit rate on held-out orders on the real data sets (``docs/bundles.md``).
6. **Coverage re-rank.** The first places of a row are re-ordered so companions cover different
   baskets of the anchor (:func:`rerank_for_coverage`).
7. The best ``candidates_per_item`` per anchor are kept, best first, with their float32 score
   and int32 support (co-purchase count; 0 for an ALS-only candidate).

Serving (:mod:`recsvc.core.bundles`) then applies stock, category, price and near-duplicate rules,
and falls back to popular pairings, then ALS similarity.

Cost: baskets and pairs grow with the purchases and the pairs inside baskets (``sum |b|^2``,
bounded by ``max_basket_items``), never with ``items^2``; the pair blocks hold at most
``max_pairs_per_block`` entries per thread. The evaluation mines once and then works per query
anchor, on a bounded sample of queries (:data:`EVAL_MAX_QUERIES`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recsvc.core.artifact import BundleCandidates
from recsvc.core.bundles import BundleRules, companions_for_evaluation
from recsvc.core.contract import PURCHASE
from recsvc.core.ids import as_id_map
from recsvc.core.topk import topk_for_users

#: Significance measures for a co-purchased pair (``s`` support, ``n_a``/``n_b`` baskets holding
#: each item, ``N`` baskets). Each is mapped to [0, 1] so it can be blended with a cosine.
MEASURES: dict[str, str] = {
    "posterior": "(s + m * n_b / N) / (n_a + m): P(candidate | anchor) shrunk towards the candidate's "
    "share of baskets, m = prior_baskets",
    "cosine": "s / sqrt(n_a * n_b) (Ochiai): lift tempered by the candidate's popularity",
    "npmi": "log(lift) / -log(s / N), normalised pointwise mutual information",
    "lift": "1 - 1 / lift, with lift = s * N / (n_a * n_b)",
    "confidence": "s / n_a = P(candidate | anchor); ranks like raw counts",
    "damped": "P(candidate | anchor) * lift^gamma: gamma = popularity_exponent (0 confidence, 1 lift)",
}


@dataclass(frozen=True)
class MiningParams:
    """Knobs of :func:`mine_bundles` (recorded in the manifest via :meth:`as_dict`).

    Attributes
    ----------
    basket_window_s : int
        Purchases by one user without an order id belong to one basket when no more than this
        many seconds separate consecutive purchases.
    max_basket_items : int
        Distinct items of a basket used for pairs (the first ones in event order).
    min_support : int
        Baskets that must contain a pair before it counts as bought together.
    measure : str
        One of :data:`MEASURES`.
    prior_baskets : float
        ``m`` of the ``posterior`` measure: how many baskets' worth of weight the candidate's
        popularity has against the anchor's own baskets.
    best_seller_floor : bool
        Keep a pair only when ``s + m * n_b / N`` beats ``m * n_top / N`` of the best seller (the
        most bought item that is neither of the two): a co-purchase that the popular fallback
        would beat is noise, and serving proposes the best sellers anyway.
    min_lift : float
        A pair is kept only when its lift ``s * N / (n_a * n_b)`` exceeds this (0 keeps all).
    shrinkage : float
        Support at which a pair's strength is halved: ``strength * s / (s + shrinkage)`` (all
        measures but ``posterior``, whose prior is its shrinkage).
    evidence_baskets : float
        Anchor basket count at which co-purchase data and ALS similarity weigh the same.
    als_neighbours : int
        ALS nearest neighbours per anchor blended in (0, the default, disables the blend: it cost
        hit rate on held-out orders on every real data set measured, see ``docs/bundles.md``;
        serving still falls back to ALS similarity when nothing else is left).
    als_weight : float
        Weight of the ALS cosine in the blended score.
    als_max_anchors : int
        On catalogues larger than this, ALS neighbours are computed only for this many anchors,
        those with the fewest baskets (the blend costs ``anchors * n_items * factors``).
    candidates_per_item : int
        Candidates kept per anchor item (``M``).
    max_pairs_per_block : int
        Upper bound on pair entries materialised at once per thread (memory bound of the
        ``B^T B`` step: each entry costs ~100 bytes of temporaries). 500k is as fast as 2M and
        halves the stage's peak memory (grocery-shaped 124k orders: 315 -> 182 MB; UCI
        baskets: 147 -> 84 MB).
    coverage_positions : int
        Leading places of each row re-ordered for basket coverage (0 or 1: off); see
        :func:`rerank_for_coverage`.
    coverage_pool : int
        Best candidates of a row the coverage re-ordering chooses from.
    coverage_min_baskets : int
        Anchors in fewer baskets keep their order (too little data to judge coverage).
    """

    basket_window_s: int = 3600
    max_basket_items: int = 60
    min_support: int = 1
    measure: str = "posterior"
    prior_baskets: float = 10.0
    best_seller_floor: bool = True
    popularity_exponent: float = 0.5
    min_lift: float = 0.0
    shrinkage: float = 2.0
    evidence_baskets: float = 10.0
    als_neighbours: int = 0
    als_weight: float = 0.05
    als_max_anchors: int = 20_000
    candidates_per_item: int = 50
    max_pairs_per_block: int = 500_000
    coverage_positions: int = 4
    coverage_pool: int = 20
    coverage_min_baskets: int = 5

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")
        for name in (
            "basket_window_s",
            "max_basket_items",
            "min_support",
            "candidates_per_item",
            "als_max_anchors",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("shrinkage", "evidence_baskets", "als_weight", "prior_baskets", "min_lift"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("als_neighbours", "coverage_positions"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if int(self.max_pairs_per_block) < 1000:
            raise ValueError(f"max_pairs_per_block must be >= 1000, got {self.max_pairs_per_block!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Baskets:
    """Baskets of purchased items, as a binary CSR matrix plus how it was built.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix
        int32 (n_baskets, n_items), 1 where the basket holds the item (after the size cap).
    from_orders : int
        Baskets formed by a shared order id.
    from_sessions : int
        Baskets formed from purchases of one user within the window.
    capped : int
        Baskets that had more than ``max_basket_items`` distinct items.
    unknown_items : int
        Purchase events whose item is not in the item index (ignored).
    """

    matrix: sp.csr_matrix
    from_orders: int
    from_sessions: int
    capped: int
    unknown_items: int

    @property
    def n_baskets(self) -> int:
        return int(self.matrix.shape[0])


# --------------------------------------------------------------------------------------------
# Baskets
# --------------------------------------------------------------------------------------------


def _codes(values: np.ndarray) -> np.ndarray:
    encoded = pa.array(values, type=pa.string()).dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _first_seen(codes: np.ndarray) -> np.ndarray:
    """``codes`` renumbered 0, 1, ... in order of first appearance (as a dictionary encoding of
    the values they stand for would number them)."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def _purchase_columns(
    events: Any, purchase: np.ndarray, item_index: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Of the rows ``purchase``: item positions (-1 unknown), order codes and whether an order id
    is present, and a function giving user codes of some of those rows (numbered by first
    appearance among them).

    From the table's dictionary encoding when it has one (ids are looked up once per distinct
    value), else from the id columns.
    """
    index = as_id_map(item_index)
    if hasattr(events, "codes"):
        item_codes, item_values = events.codes("item_id")
        codes = item_codes[purchase]
        item = index.positions(item_values)[codes] if len(item_values) else codes
        order_codes, order_values = events.codes("order_id")
        order = order_codes[purchase].astype(np.int64)
        has_order = (order_values != "")[order] if len(order) else np.zeros(0, dtype=bool)
        user_codes = events.codes("user_id")[0]
        return item, order, has_order, lambda rows: _first_seen(user_codes[purchase[rows]])
    item = index.positions(np.asarray(events.item_id)[purchase])
    order_id = np.asarray(events.order_id, dtype=object)[purchase]
    has_order = order_id != ""
    order = np.zeros(len(purchase), dtype=np.int64)
    if has_order.any():
        order[has_order] = _codes(order_id[has_order])
    user_id = np.asarray(events.user_id, dtype=object)
    return item, order, has_order, lambda rows: _codes(user_id[purchase[rows]])


def build_baskets(events: Any, item_index: Mapping[str, int], params: MiningParams | None = None) -> Baskets:
    """Group purchase events into baskets.

    Parameters
    ----------
    events : training.events.EventTable
        Any events; only purchases are used.
    item_index : Mapping[str, int]
        Item id -> column of the result; purchases of other items are ignored (and counted).
    params : MiningParams, optional
        ``basket_window_s`` and ``max_basket_items`` are used.

    Returns
    -------
    Baskets
    """
    params = params or MiningParams()
    n_items = len(item_index)
    purchase = np.flatnonzero(np.asarray(events.event) == PURCHASE)
    if len(purchase) == 0:
        return Baskets(sp.csr_matrix((0, n_items), dtype=np.int32), 0, 0, 0, 0)
    item, order, has_order, users_of = _purchase_columns(events, purchase, item_index)
    unknown = int((item < 0).sum())
    known = np.flatnonzero(item >= 0)
    if len(known) == 0:
        return Baskets(sp.csr_matrix((0, n_items), dtype=np.int32), 0, 0, 0, unknown)
    purchase, item, order, has_order = purchase[known], item[known], order[known], has_order[known]

    timestamp = np.asarray(events.timestamp, dtype=np.int64)[purchase]
    basket = np.empty(len(purchase), dtype=np.int64)
    n_orders = 0
    if has_order.any():
        inverse = _first_seen(order[has_order])  # orders numbered by their first purchase
        basket[has_order] = inverse
        n_orders = int(inverse.max()) + 1
    n_sessions = 0
    loose = np.flatnonzero(~has_order)
    if len(loose):
        user = users_of(known[loose])
        ts = timestamp[loose]
        order = np.lexsort((ts, user))
        user, ts = user[order], ts[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (user[1:] != user[:-1]) | (ts[1:] - ts[:-1] > int(params.basket_window_s))
        session = np.cumsum(new) - 1
        basket[loose[order]] = n_orders + session
        n_sessions = int(session[-1]) + 1

    # One entry per (basket, item), in event order within a basket so the cap keeps the first items.
    sequence = np.lexsort((np.arange(len(basket)), basket))
    basket, item = basket[sequence], item[sequence]
    key = basket * n_items + item
    _, first = np.unique(key, return_index=True)
    first.sort()
    basket, item = basket[first], item[first]
    starts = np.flatnonzero(np.r_[True, basket[1:] != basket[:-1]])
    lengths = np.diff(np.r_[starts, len(basket)])
    rank = np.arange(len(basket)) - np.repeat(starts, lengths)
    capped = int((lengths > params.max_basket_items).sum())
    keep = rank < params.max_basket_items
    basket, item = basket[keep], item[keep]
    n_baskets = n_orders + n_sessions
    matrix = sp.csr_matrix(
        (np.ones(len(basket), dtype=np.int32), (basket, item)), shape=(n_baskets, n_items), dtype=np.int32
    )
    return Baskets(matrix, n_orders, n_sessions, capped, unknown)


# --------------------------------------------------------------------------------------------
# Pair counts and significance
# --------------------------------------------------------------------------------------------


def _row_blocks(work: np.ndarray, budget: int, threads: int = 1) -> list[tuple[int, int]]:
    """Split rows into consecutive blocks whose summed ``work`` stays under ``budget``.

    With ``threads``, blocks are also small enough that every thread gets at least two.
    """
    if threads > 1:
        budget = max(1, min(budget, int(work.sum()) // (2 * threads) + 1))
    blocks, lo, acc = [], 0, 0
    for i, w in enumerate(work.tolist()):
        if acc + w > budget and i > lo:
            blocks.append((lo, i))
            lo, acc = i, 0
        acc += w
    blocks.append((lo, len(work)))
    return blocks


def _map_blocks(work: Callable[[Any], Any], blocks: Sequence[Any], threads: int) -> list[Any]:
    """``[work(block) for block in blocks]`` on up to ``threads`` threads, results in block order.

    Threads pay off because numpy and scipy release the GIL in the products and sorts of a block;
    callers give each block disjoint output, so the result does not depend on ``threads``.
    """
    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
            return list(pool.map(work, blocks))
    return [work(block) for block in blocks]


def _top_per_row(
    rows: np.ndarray, cols: np.ndarray, score: np.ndarray, keep: int, *extra: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Keep the ``keep`` highest-scoring entries per row; rows ascending, best first within a row.

    Ties are broken by the smaller column index so the result is deterministic. When rows come
    ascending (as every caller passes them), only the entries that can make their row's top
    ``keep`` are sorted: :func:`_top_small` for a small ``keep``, else the entries reaching the
    row's ``keep``-th score (:func:`_reaching_kth`). The result equals a sort of every entry.
    """
    ascending = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
    order: np.ndarray
    if not ascending or keep <= 0:
        order = np.lexsort((cols, -score, rows))
    elif keep <= _SMALL_KEEP and len(rows) > keep:
        order = _top_small(rows, cols, score, keep)
    else:
        order = np.flatnonzero(_reaching_kth(rows, score, keep))
        order = order[np.lexsort((cols[order], -score[order], rows[order]))]
    rows, cols, score = rows[order], cols[order], score[order]
    extra = tuple(e[order] for e in extra)
    sel = _rank_in_row(rows) < keep
    return (rows[sel], cols[sel], score[sel], *(e[sel] for e in extra))


#: Up to this many entries per row, :func:`_top_per_row` selects by passes instead of sorting.
_SMALL_KEEP = 8


def _reaching_kth(rows: np.ndarray, score: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the entries scoring at least their row's ``keep``-th best (grouped ``rows``).

    Rows longer than ``keep`` are padded into a 2-D array per power-of-two length (at most twice
    their entries) and ``np.partition`` finds each row's ``keep``-th score in linear time.
    """
    n = len(rows)
    mask = np.ones(n, dtype=bool)
    if n <= keep:
        return mask
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lengths = np.diff(np.r_[starts, n])
    long = np.flatnonzero(lengths > keep)
    if len(long) == 0:
        return mask
    threshold = np.full(len(starts), -np.inf)
    width_of = np.ceil(np.log2(lengths[long])).astype(np.int64)
    value = np.asarray(score, dtype=np.float64)
    for exponent in np.unique(width_of).tolist():
        which = long[width_of == exponent]
        width = 1 << exponent
        offset = np.arange(width)
        valid = offset[None, :] < lengths[which][:, None]
        padded = np.full((len(which), width), -np.inf)
        padded[valid] = value[(starts[which][:, None] + offset[None, :])[valid]]
        threshold[which] = np.partition(padded, width - keep, axis=1)[:, width - keep]
    return value >= np.repeat(threshold, lengths)


def _rank_in_row(rows: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal ``rows`` (0 for the first of a row)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    return np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))


#: Up to this many entries per row, :func:`_top_per_row` selects by passes instead of sorting.
_SMALL_KEEP = 8


def _top_small(rows: np.ndarray, cols: np.ndarray, score: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the best ``keep`` entries of each row (grouped rows), in (row, rank) order.

    Each pass takes, per row, the highest score among the entries not taken yet and the smallest
    column among those tied (columns are distinct within a row): exactly the first ``keep``
    entries of ``lexsort((cols, -score, rows))``.
    """
    n = len(rows)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    segment = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    alive = np.ones(n, dtype=bool)
    value = np.asarray(score, dtype=np.float64)
    picks: list[np.ndarray] = []
    no_col = np.iinfo(np.int64).max
    for _ in range(keep):
        best = np.maximum.reduceat(np.where(alive, value, -np.inf), starts)
        tied = alive & (value == best[segment])
        first = np.minimum.reduceat(np.where(tied, cols, no_col), starts)
        hit = np.flatnonzero(tied & (cols == first[segment]))
        if len(hit) == 0:
            break
        picks.append(hit)
        alive[hit] = False
    taken = np.concatenate(picks)
    rounds = np.repeat(np.arange(len(picks)), [len(p) for p in picks])
    return taken[np.lexsort((rounds, segment[taken]))]


def significance(
    support: np.ndarray,
    n_anchor: np.ndarray,
    n_candidate: np.ndarray,
    n_baskets: int,
    measure: str,
    gamma: float = 0.5,
    min_lift: float = 1.0,
    prior_baskets: float = 10.0,
) -> np.ndarray:
    """Strength in [0, 1] of pairs bought together ``support`` times (vectorised).

    Parameters
    ----------
    support : numpy.ndarray
        Baskets holding both items.
    n_anchor, n_candidate : numpy.ndarray
        Baskets holding the anchor, and the candidate.
    n_baskets : int
        All baskets.
    measure : str
        One of :data:`MEASURES`.
    gamma : float
        Exponent of the ``damped`` measure.
    min_lift : float
        Pairs with a lift at or below this get 0.
    prior_baskets : float
        ``m`` of the ``posterior`` measure.

    Returns
    -------
    numpy.ndarray
        float64, 0 where the lift is at or below ``min_lift``.
    """
    s = np.asarray(support, dtype=np.float64)
    na = np.asarray(n_anchor, dtype=np.float64)
    nb = np.asarray(n_candidate, dtype=np.float64)
    lift = s * float(n_baskets) / np.maximum(na * nb, 1.0)
    if measure == "posterior":
        m = float(prior_baskets)
        value = (s + m * nb / max(n_baskets, 1)) / np.maximum(na + m, 1e-12)
    elif measure == "cosine":
        value = s / np.sqrt(np.maximum(na * nb, 1.0))
    elif measure == "npmi":
        joint = np.clip(s / max(n_baskets, 1), 1e-300, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.where(joint < 1.0, np.log(np.maximum(lift, 1e-300)) / -np.log(joint), 1.0)
    elif measure == "lift":
        value = 1.0 - 1.0 / np.maximum(lift, 1.0)
    elif measure == "confidence":
        value = s / np.maximum(na, 1.0)
    elif measure == "damped":
        value = s / np.maximum(na, 1.0) * np.maximum(lift, 1e-12) ** gamma
    else:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    return np.where(lift > min_lift, np.maximum(value, 0.0), 0.0)


@dataclass
class PairCounts:
    """Top co-purchase partners per anchor, as parallel COO arrays (rows ascending)."""

    rows: np.ndarray  # int64 anchor
    cols: np.ndarray  # int64 candidate
    strength: np.ndarray  # float64 significance after shrinkage, in [0, 1]
    support: np.ndarray  # int64 co-purchase count
    item_baskets: np.ndarray  # int64 per item: baskets holding it
    n_baskets: int
    pairs_counted: int  # distinct ordered pairs with support >= 1


def count_pairs(
    baskets: Baskets,
    params: MiningParams | None = None,
    keep: int | None = None,
    threads: int = 1,
    anchors: np.ndarray | None = None,
) -> PairCounts:
    """Co-purchase counts ``B^T B`` in bounded row blocks, filtered and scored.

    Parameters
    ----------
    baskets : Baskets
        From :func:`build_baskets`.
    params : MiningParams, optional
        ``min_support``, ``measure``, ``shrinkage`` and ``max_pairs_per_block`` are used.
    keep : int, optional
        Partners kept per anchor (default ``params.candidates_per_item``).
    threads : int, default 1
        Row blocks counted at once (the sparse product and the per-row sort release the GIL:
        ~2x with 2 threads); the result does not depend on it.
    anchors : numpy.ndarray, optional
        Count only these anchors' rows (the evaluation needs the rows of its queries only);
        each row is the same as in a count of every anchor.

    Returns
    -------
    PairCounts
    """
    params = params or MiningParams()
    keep = params.candidates_per_item if keep is None else keep
    matrix = baskets.matrix
    item_baskets = np.asarray(matrix.sum(axis=0), dtype=np.int64).ravel()
    sizes = np.diff(matrix.indptr)
    multi = matrix[sizes >= 2]  # a single-item basket holds no pair
    by_item = multi.T.tocsr()  # items x baskets
    # Entries row i of B^T B can have at most: the summed sizes of the baskets holding i.
    work = np.asarray(by_item @ np.diff(multi.indptr).astype(np.int64), dtype=np.int64).ravel()

    floor = _best_seller_floor(item_baskets, baskets.n_baskets, params) if params.best_seller_floor else None
    posterior = params.measure == "posterior"

    targets = None if anchors is None else np.unique(np.asarray(anchors, dtype=np.int64))
    if targets is not None:
        work = work[targets]

    def one_block(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        if targets is None:
            block = (by_item[lo:hi] @ multi).tocoo()
            rows = block.row.astype(np.int64) + lo
        else:
            block = (by_item[targets[lo:hi]] @ multi).tocoo()
            rows = targets[lo:hi][block.row]
        cols = block.col.astype(np.int64)
        support = block.data.astype(np.int64)
        off_diagonal = rows != cols
        counted = int(off_diagonal.sum())
        ok = off_diagonal & (support >= params.min_support)
        if floor is not None:
            ok &= floor(rows, cols, support)
        rows, cols, support = rows[ok], cols[ok], support[ok]
        strength = significance(
            support,
            item_baskets[rows],
            item_baskets[cols],
            baskets.n_baskets,
            params.measure,
            params.popularity_exponent,
            params.min_lift,
            params.prior_baskets,
        )
        positive = strength > 0
        rows, cols, strength, support = _top_per_row(
            rows[positive], cols[positive], strength[positive], keep, support[positive]
        )
        # Relative to the anchor's best partner (first of each row), so every anchor's scale is
        # [0, 1] and blends with a cosine; thin evidence is then shrunk towards zero. The
        # posterior is a probability already, shrunk by its prior.
        if len(rows) and not posterior:
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            best = np.repeat(strength[starts], np.diff(np.r_[starts, len(rows)]))
            strength = strength / best * (support / (support + float(params.shrinkage)))
        return rows, cols, strength, support, counted

    blocks = _row_blocks(work, int(params.max_pairs_per_block), threads)
    blocks = [(lo, hi) for lo, hi in blocks if work[lo:hi].sum() > 0]
    parts = _map_blocks(lambda block: one_block(*block), blocks, threads)

    def cat(i: int, dtype: Any) -> np.ndarray:
        return np.concatenate([part[i] for part in parts]).astype(dtype) if parts else np.zeros(0, dtype)

    return PairCounts(
        rows=cat(0, np.int64),
        cols=cat(1, np.int64),
        strength=cat(2, np.float64),
        support=cat(3, np.int64),
        item_baskets=item_baskets,
        n_baskets=baskets.n_baskets,
        pairs_counted=sum(part[4] for part in parts),
    )


def _best_seller_floor(
    item_baskets: np.ndarray, n_baskets: int, params: MiningParams
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """``keep(rows, cols, support)``: the pair beats the best seller's prior (``best_seller_floor``).

    With ``m = prior_baskets``, a pair bought together ``s`` times is kept when
    ``s + m * n_b / N > m * n_top / N``, ``n_top`` counting the baskets of the most bought item
    other than the anchor and the candidate: the pair's posterior beats what the best seller,
    never bought with the anchor, would get.
    """
    n_items = len(item_baskets)
    top = np.lexsort((np.arange(n_items), -item_baskets))[:3]
    m = float(params.prior_baskets) / max(int(n_baskets), 1)

    def keep(rows: np.ndarray, cols: np.ndarray, support: np.ndarray) -> np.ndarray:
        reference = np.zeros(len(rows), dtype=np.float64)
        pending = np.ones(len(rows), dtype=bool)
        for item in top.tolist():  # the first of the top three that is neither of the pair
            use = pending & (rows != item) & (cols != item)
            reference[use] = item_baskets[item]
            pending &= ~use
        return support + m * item_baskets[cols] > m * reference

    return keep


# --------------------------------------------------------------------------------------------
# ALS neighbours
# --------------------------------------------------------------------------------------------


def als_neighbours(
    item_factors: np.ndarray,
    k: int,
    anchors: np.ndarray | None = None,
    block_rows: int | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` items per anchor by cosine of the factors (positive cosines only).

    Items whose factors are all zero (never seen in training) have no neighbours and are never
    anyone's neighbour. Each block of anchors is one matrix product against every item followed by
    the exact, deterministic top-k of :func:`recsvc.core.topk.topk_for_users` (ties: the lower
    item index), so memory is ``threads * block_rows * n_items`` floats and time
    ``len(anchors) * n_items * factors``: bounded by the anchors asked for.

    Parameters
    ----------
    item_factors : numpy.ndarray
        (n_items, factors).
    k : int
        Neighbours per anchor.
    anchors : numpy.ndarray, optional
        Item indices to find neighbours for (default: every item).
    block_rows : int, optional
        Anchors per block (default: as many as fit in ~32M similarities, at most 2048).
    threads : int, default 1
        Blocks computed at once. numpy releases the GIL in the product and the selection, so
        threads scale; the result does not depend on the count.

    Returns
    -------
    (rows, cols, cosine)
        int64, int64, float64 COO arrays, rows ascending, best first within a row.
    """
    factors = np.asarray(item_factors, dtype=np.float32)
    n_items = factors.shape[0]
    anchors = (
        np.arange(n_items, dtype=np.int64) if anchors is None else np.unique(np.asarray(anchors, np.int64))
    )
    if k <= 0 or n_items < 2 or len(anchors) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    norms = np.linalg.norm(factors, axis=1)
    # Items without factors have a cosine of 0 with everything: neither anchors nor neighbours.
    # Leaving them out also keeps ties at 0 away from the top-k (which sorts tied rows in full).
    live = np.flatnonzero(norms > 0)
    anchors = anchors[norms[anchors] > 0]
    if len(live) < 2 or len(anchors) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    unit = factors[live] / norms[live, None]
    position = np.full(n_items, -1, dtype=np.int64)
    position[live] = np.arange(len(live))
    k = min(k, len(live) - 1)
    if block_rows is None:
        block_rows = int(min(2048, max(8, (32 << 20) // len(live))))

    def one_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # k + 1: the anchor itself is (almost always) its own best match and is dropped below.
        _, idx, cos = next(topk_for_users(unit[position[block]], unit, k + 1, chunk_rows=len(block)))
        rows = np.repeat(block, idx.shape[1])
        cols, cos = live[idx.ravel()], cos.astype(np.float64).ravel()
        ok = (cols != rows) & (cos > 0)
        rows, cols, cos = rows[ok], cols[ok], cos[ok]
        # Keep k per anchor (one more survives where the anchor was not among its own k + 1).
        sel = _rank_in_row(rows) < k
        return rows[sel], cols[sel], cos[sel]

    blocks = [anchors[lo : lo + block_rows] for lo in range(0, len(anchors), block_rows)]
    from threadpoolctl import threadpool_limits

    # One BLAS thread per block: the blocks are the parallelism, BLAS threads would oversubscribe.
    with threadpool_limits(limits=1 if threads > 1 else None, user_api="blas"):
        parts = _map_blocks(one_block, blocks, threads)
    rows, cols, cos = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return rows, cols, cos


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


def mine_bundles(
    events: Any,
    item_index: Mapping[str, int],
    item_factors: np.ndarray,
    category: np.ndarray,
    params: MiningParams | Mapping[str, Any] | None = None,
) -> BundleCandidates:
    """Mine bundle candidates for every item (see the module docstring for the method).

    Parameters
    ----------
    events : training.events.EventTable
        The training events; purchases are grouped into baskets.
    item_index : Mapping[str, int]
        Item id -> row of ``item_factors`` (and of the result).
    item_factors : numpy.ndarray
        float32 (n_items, factors) ALS item factors.
    category : numpy.ndarray
        int32 category code per item (-1 unknown). Mining does not filter by category (serving
        prefers other categories at assembly time); it is validated for shape only.
    params : MiningParams or mapping, optional
        Defaults to ``MiningParams()``; a mapping overrides some of its fields.

    Returns
    -------
    recsvc.core.artifact.BundleCandidates
        Row ``i`` lists up to ``candidates_per_item`` items for anchor ``i``, best first, with a
        float32 ``score`` and int32 ``support`` (baskets holding both; 0 for ALS-only candidates).

    Raises
    ------
    ValueError
        Shapes disagree, or a parameter is out of range.
    """
    return mine_bundles_report(events, item_index, item_factors, category, params)[0]


def mine_bundles_report(
    events: Any,
    item_index: Mapping[str, int],
    item_factors: np.ndarray,
    category: np.ndarray,
    params: MiningParams | Mapping[str, Any] | None = None,
    *,
    threads: int = 1,
) -> tuple[BundleCandidates, dict[str, Any]]:
    """:func:`mine_bundles` plus a report for the manifest (parameters, counts, seconds).

    ``threads`` parallelises pair counting, the ALS blend and the coverage re-rank (the result does
    not depend on it).

    Returns
    -------
    (BundleCandidates, dict)
        The candidates, and ``{"params": {...}, "baskets", "baskets_from_orders",
        "baskets_from_sessions", "baskets_capped", "unknown_items", "pairs_counted",
        "significant_pairs", "anchors_with_candidates", "candidates", "seconds": {...}}``.
    """
    params = _params(params)
    start = time.perf_counter()
    baskets = build_baskets(events, item_index, params)
    seconds = {"baskets": round(time.perf_counter() - start, 3)}
    return mine_baskets_report(baskets, item_factors, category, params, threads=threads, seconds=seconds)


def mine_baskets_report(
    baskets: Baskets,
    item_factors: np.ndarray,
    category: np.ndarray,
    params: MiningParams | Mapping[str, Any] | None = None,
    *,
    threads: int = 1,
    seconds: dict[str, float] | None = None,
) -> tuple[BundleCandidates, dict[str, Any]]:
    """:func:`mine_bundles_report` on baskets built already (:func:`build_baskets`).

    Training builds the baskets while it still holds the events and mines them once the events
    are gone; ``seconds`` holds the timings of the stages before (``baskets``) for the report.
    """
    params = _params(params)
    n_items = int(baskets.matrix.shape[1])
    item_factors = np.asarray(item_factors)
    if item_factors.ndim != 2 or item_factors.shape[0] != n_items:
        raise ValueError(f"item_factors has shape {item_factors.shape}, expected ({n_items}, factors)")
    if np.asarray(category).shape != (n_items,):
        raise ValueError(f"category has shape {np.asarray(category).shape}, expected ({n_items},)")
    seconds = dict(seconds or {})
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    candidates, counts = _mine(baskets, item_factors, params, threads, lap)
    report = {
        "params": params.as_dict(),
        "baskets": baskets.n_baskets,
        "baskets_from_orders": baskets.from_orders,
        "baskets_from_sessions": baskets.from_sessions,
        "baskets_capped": baskets.capped,
        "unknown_items": baskets.unknown_items,
        **counts,
        "anchors_with_candidates": int((np.diff(candidates.indptr) > 0).sum()),
        "candidates": int(len(candidates.indices)),
        "seconds": seconds,
    }
    return candidates, report


def _mine(
    baskets: Baskets,
    item_factors: np.ndarray,
    params: MiningParams,
    threads: int,
    lap: Callable[[str], None] = lambda name: None,
) -> tuple[BundleCandidates, dict[str, int]]:
    """Pairs, blend and coverage re-rank on built baskets; the pair counts for the report.

    The pair arrays are dropped as soon as the blend has consumed them, so the baskets matrix and
    the candidates are all that stays alive during the coverage stage.
    """
    pairs = count_pairs(baskets, params, threads=threads)
    counts = {"pairs_counted": pairs.pairs_counted, "significant_pairs": int(len(pairs.rows))}
    lap("pairs")
    candidates = blend(pairs, item_factors, params, threads=threads)
    del pairs
    lap("blend")
    candidates = rerank_for_coverage(candidates, baskets, params, threads=threads)
    lap("coverage")
    return candidates, counts


def blend(
    pairs: PairCounts, item_factors: np.ndarray, params: MiningParams, threads: int = 1
) -> BundleCandidates:
    """Combine co-purchase strength with ALS cosine and keep the best candidates per anchor.

    ``threads`` is passed to :func:`als_neighbours` (the result does not depend on it).
    """
    n_items = int(item_factors.shape[0])
    evidence = pairs.item_baskets / (pairs.item_baskets + float(params.evidence_baskets) + 1e-12)
    co_score = evidence[pairs.rows] * pairs.strength
    if params.als_neighbours > 0 and params.als_weight > 0:
        anchors = None
        if n_items > params.als_max_anchors:
            # Bounded work on big catalogues: the items with the fewest baskets need the blend
            # most; the others lean on co-purchases (and serving computes similarity on demand).
            anchors = np.argsort(pairs.item_baskets, kind="stable")[: int(params.als_max_anchors)]
        a_rows, a_cols, a_cos = als_neighbours(
            item_factors, int(params.als_neighbours), anchors, threads=threads
        )
        a_score = float(params.als_weight) * a_cos
    else:
        a_rows = a_cols = np.zeros(0, dtype=np.int64)
        a_score = np.zeros(0, dtype=np.float64)
    if len(a_rows) == 0:
        # Co-purchases alone: PairCounts rows are best first already, and the per-row evidence
        # factor keeps that order, so only the length of each row is left to bound.
        rank = _rank_in_row(pairs.rows)
        sel = rank < int(params.candidates_per_item)
        rows, cols, score, support = pairs.rows[sel], pairs.cols[sel], co_score[sel], pairs.support[sel]
    else:
        # Sum the two sources per (anchor, candidate): a pair that is both co-purchased and
        # similar in taste gets both contributions.
        rows = np.concatenate([pairs.rows, a_rows])
        cols = np.concatenate([pairs.cols, a_cols])
        score = np.concatenate([co_score, a_score])
        support = np.concatenate([pairs.support, np.zeros(len(a_rows), dtype=np.int64)])
        key = rows * n_items + cols
        unique, inverse = np.unique(key, return_inverse=True)
        score = np.bincount(inverse, weights=score, minlength=len(unique))
        support = np.bincount(inverse, weights=support, minlength=len(unique)).astype(np.int64)
        rows, cols = unique // n_items, unique % n_items
        rows, cols, score, support = _top_per_row(rows, cols, score, int(params.candidates_per_item), support)
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_items), out=indptr[1:])
    return BundleCandidates(
        indptr=indptr,
        indices=cols.astype(np.int32),
        score=score.astype(np.float32),
        support=np.minimum(support, np.iinfo(np.int32).max).astype(np.int32),
    )


def rerank_for_coverage(
    candidates: BundleCandidates, baskets: Baskets, params: MiningParams, threads: int = 1
) -> BundleCandidates:
    """Re-order the head of each row so the first few companions cover different baskets.

    Two companions that are always bought in the same baskets are redundant in a bundle: if one
    is wanted, so is the other, and if not, neither is. For each anchor with at least
    ``coverage_min_baskets`` baskets, the first ``coverage_positions`` places are chosen greedily
    among the row's ``coverage_pool`` best candidates: each next companion is the one found in
    the most of the anchor's baskets that no companion chosen so far is in (ties: the row's
    order). This is the classic greedy for maximum coverage; it only re-orders candidates that
    already passed the significance filter. Scores are then made non-increasing along the row
    (a running minimum), so "best first" holds for the score too.

    All anchors of a block are done at once: the membership of every candidate in every basket
    of its anchor is looked up once (``anchor baskets x pool`` booleans, blocks bounded by
    ``max_pairs_per_block``), then each greedy step is a few vectorised numpy operations.
    Blocks touch disjoint rows, so ``threads`` of them run at once (same result for any count).
    """
    positions = int(params.coverage_positions)
    if positions <= 1 or len(candidates.indices) == 0:
        return candidates
    matrix = baskets.matrix
    multi = matrix[np.diff(matrix.indptr) >= 2].tocsr()
    if multi.shape[0] == 0:
        return candidates
    multi.sort_indices()
    by_item = multi.T.tocsr()
    indptr = candidates.indptr
    lengths = np.diff(indptr)
    item_baskets = np.diff(by_item.indptr)
    min_baskets = max(1, int(params.coverage_min_baskets))  # >= 1: reduceat needs non-empty rows
    eligible = np.flatnonzero((item_baskets >= min_baskets) & (lengths >= 2))
    if len(eligible) == 0:
        return candidates
    indices = candidates.indices.copy()
    score = candidates.score.copy()
    support = candidates.support.copy()
    pool = int(params.coverage_pool)
    offset = np.arange(pool)

    def one_block(lo: int, hi: int) -> None:
        anchors = eligible[lo:hi]
        n = len(anchors)
        width = np.minimum(lengths[anchors], pool)
        # (n, pool) candidate table, -1 padded, in the row's order.
        valid = offset[None, :] < width[:, None]
        table = np.full((n, pool), -1, dtype=np.int64)
        table[valid] = indices[(indptr[anchors][:, None] + offset[None, :])[valid]]
        # One entry per (anchor, basket of the anchor); member[e, j]: that basket holds candidate j.
        spans = by_item[anchors]  # CSR: the anchors' baskets, row by row (every row non-empty)
        starts = spans.indptr[:-1]
        row = np.repeat(np.arange(n, dtype=np.int64), np.diff(spans.indptr))
        basket = spans.indices.astype(np.int64)
        member = _pool_membership(multi, row, basket, table)
        uncovered = np.ones(len(row), dtype=bool)
        free = valid.copy()
        chosen = np.full((n, positions), -1, dtype=np.int64)  # positions in the row
        active = np.ones(n, dtype=bool)
        for step in range(min(positions, pool)):
            # Baskets of each anchor still uncovered, per candidate: one segmented sum.
            gain = np.add.reduceat(member & uncovered[:, None], starts, axis=0, dtype=np.int64).astype(float)
            # Earlier (better-scored) candidates win ties; taken and padding slots are out.
            gain = np.where(free, gain - offset[None, :] * 1e-6, -np.inf)
            best = np.argmax(gain, axis=1)
            best_gain = gain[np.arange(n), best]
            if step > 0:
                active &= best_gain > 0
            active &= np.isfinite(best_gain)
            if not active.any():
                break
            chosen[active, step] = best[active]
            free[np.flatnonzero(active), best[active]] = False
            # Baskets holding the picked item are now covered for that anchor.
            uncovered &= ~(member[np.arange(len(row)), best[row]] & active[row])
        for r in np.flatnonzero(chosen[:, 0] >= 0).tolist():
            picks = [int(c) for c in chosen[r] if c >= 0]
            top = int(width[r])
            order = np.array(picks + [i for i in range(top) if i not in picks], dtype=np.int64)
            a_lo = int(indptr[anchors[r]])
            indices[a_lo : a_lo + top] = indices[a_lo : a_lo + top][order]
            support[a_lo : a_lo + top] = support[a_lo : a_lo + top][order]
            score[a_lo : a_lo + top] = np.minimum.accumulate(score[a_lo : a_lo + top][order])

    blocks = _row_blocks(item_baskets[eligible] * pool, int(params.max_pairs_per_block), threads)
    _map_blocks(lambda block: one_block(*block), blocks, threads)
    return BundleCandidates(indptr=indptr, indices=indices, score=score, support=support)


def _pool_membership(
    multi: sp.csr_matrix, row: np.ndarray, basket: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """``member[e, j]``: basket ``basket[e]`` holds candidate ``table[row[e], j]``.

    When baskets are short, every item of every entry's basket is expanded once and matched
    against the small sorted table of ``(anchor, candidate)`` keys -- far cheaper than one random
    sparse lookup per entry and pool slot, which is used for long baskets.
    """
    n, pool = table.shape
    n_items = multi.shape[1]
    lengths = np.diff(multi.indptr)[basket]
    if int(lengths.sum()) * 2 > len(row) * pool:  # crossover measured on UCI baskets vs synthetic
        # Long baskets (wholesale orders): one sparse lookup per entry and slot is cheaper.
        member = np.zeros((len(row), pool), dtype=bool)
        for j in range(pool):
            cand = table[row, j]
            ok = cand >= 0
            if ok.any():
                member[ok, j] = np.asarray(multi[basket[ok], cand[ok]]).ravel() > 0
        return member
    entry = np.repeat(np.arange(len(row), dtype=np.int64), lengths)
    first = np.repeat(multi.indptr[basket] - (np.cumsum(lengths) - lengths), lengths)
    items = multi.indices[first + np.arange(len(entry), dtype=np.int64)].astype(np.int64)
    keys = row[entry] * n_items + items
    table_keys = np.where(table >= 0, np.arange(n, dtype=np.int64)[:, None] * n_items + table, -1).ravel()
    order = np.argsort(table_keys, kind="stable")
    sorted_keys = table_keys[order]
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    hit = sorted_keys[at] == keys
    member = np.zeros((len(row), pool), dtype=bool)
    member[entry[hit], order[at[hit]] % pool] = True
    return member


def _params(params: MiningParams | Mapping[str, Any] | None) -> MiningParams:
    if params is None:
        return MiningParams()
    if isinstance(params, MiningParams):
        return params
    unknown = sorted(set(params) - set(MiningParams.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown bundle mining parameter {unknown[0]!r}")
    return replace(MiningParams(), **dict(params))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


#: Queries the evaluation scores by default (a seeded sample when there are more): the 95%
#: interval of a hit rate near 0.5 is then about +-1.4 points, whatever the size of the data.
EVAL_MAX_QUERIES = 5_000
_BOOTSTRAP_DRAWS = 2000


def evaluate_bundles(
    train: Any,
    test: Any,
    item_index: Mapping[str, int],
    item_factors: np.ndarray,
    category: np.ndarray,
    size: int = 3,
    params: MiningParams | Mapping[str, Any] | None = None,
    rules: Any = None,
    *,
    max_queries: int | None = EVAL_MAX_QUERIES,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Hit rate@size of bundles on held-out orders, against two baselines, in one run.

    For every held-out basket with at least two known items, each of its items is an anchor
    (query); the query is a hit when the ``size - 1`` companions the method proposes contain
    another item of the same basket. Methods: ``bundles`` (mined from ``train`` and assembled by
    the serving code, :func:`recsvc.core.bundles.companions_for_evaluation`), ``cooccurrence``
    (raw co-purchase counts, every pair, ties by item index, padded with popular items),
    ``popularity`` (the most bought items).

    Cost: mining the training baskets (as :func:`mine_bundles`), then per query anchor one
    assembly and one row of pair counts -- so at most ``max_queries`` of each, however large the
    data set: by default a seeded sample of ``max_queries`` queries is scored and
    ``queries_total`` says how many there were.

    Parameters
    ----------
    train, test : training.events.EventTable
        Events before the split, and purchases after it.
    item_index, item_factors, category
        As for :func:`mine_bundles` (the model fitted on ``train``).
    size : int
        Bundle size including the anchor.
    params : MiningParams or mapping, optional
        Mining parameters.
    rules : recsvc.core.bundles.BundleRules, optional
        Assembly rules (default ``BundleRules(size=size)``: the served defaults).
    max_queries : int or None
        Queries scored (a uniform sample without replacement, seeded by ``seed``); None scores
        every query.
    seed : int
        Seeds the query sample and the bootstrap.
    threads : int
        Threads for mining and pair counting (the result does not depend on it).

    Returns
    -------
    dict
        ``{"size", "train_baskets", "test_orders", "queries", "queries_total",
        "hit_rate@<size>", "cooccurrence_hit_rate@<size>", "popularity_hit_rate@<size>",
        "lift_vs_cooccurrence", "lift_vs_popularity", "ci95", "seed", "seconds"}`` plus
        ``"any_category_hit_rate@<size>"`` (the same bundles with ``same_category`` rules) when
        items have categories. ``ci95`` holds a bootstrap 95% interval over queries for each hit
        rate and for each lift (paired: the same resampled queries for both methods). Hit rates
        are None when there is no query.
    """

    if size < 2:
        raise ValueError(f"size must be >= 2, got {size!r}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {max_queries!r}")
    params = _params(params)
    start = time.perf_counter()
    n_items = len(item_index)
    k = size - 1
    train_baskets = build_baskets(train, item_index, params)
    test_baskets = build_baskets(test, item_index, params).matrix
    test_baskets = test_baskets[np.diff(test_baskets.indptr) >= 2]
    anchors = test_baskets.indices.astype(np.int64)
    query_basket = np.repeat(np.arange(test_baskets.shape[0], dtype=np.int64), np.diff(test_baskets.indptr))
    rng = np.random.default_rng(seed)
    if max_queries is not None and len(anchors) > max_queries:
        pick = np.sort(rng.choice(len(anchors), size=int(max_queries), replace=False))
        anchors, query_basket = anchors[pick], query_basket[pick]
    key = f"@{size}"
    result: dict[str, Any] = {
        "size": size,
        "train_baskets": train_baskets.n_baskets,
        "test_orders": int(test_baskets.shape[0]),
        "queries": int(len(anchors)),
        "queries_total": int(test_baskets.nnz),
    }
    if len(anchors) == 0:
        result.update(
            {f"hit_rate{key}": None, f"cooccurrence_hit_rate{key}": None, f"popularity_hit_rate{key}": None}
        )
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    popularity = np.asarray(train_baskets.matrix.sum(axis=0), dtype=np.float64).ravel()
    popular_order = np.lexsort((np.arange(n_items), -popularity))
    unique_anchors = np.unique(anchors)
    factors = np.asarray(item_factors, dtype=np.float32)
    category = np.asarray(category)
    rules = rules or BundleRules(size=size)

    # Served bundles: mined like training does, assembled by the serving code for each anchor.
    candidates, _ = _mine(train_baskets, factors, params, threads)
    tables = [
        ("", companions_for_evaluation(unique_anchors, candidates, factors, category, popularity, k, rules))
    ]
    # Raw counts baseline: the most co-purchased partners, every pair, no test, no blend.
    raw_params = replace(
        params, min_support=1, measure="confidence", shrinkage=0.0, min_lift=0.0, best_seller_floor=False
    )
    raw = count_pairs(train_baskets, raw_params, keep=k, threads=threads, anchors=unique_anchors)
    tables.append(("cooccurrence_", _padded_table(raw.rows, raw.cols, unique_anchors, k, popular_order)))
    del raw
    none = np.zeros(0, np.int64)
    tables.append(("popularity_", _padded_table(none, none, unique_anchors, k, popular_order)))
    if (category >= 0).any():
        # What the category rule costs in hit rate is worth knowing: the same bundles without it.
        anyway = rules.with_(size=size, same_category=True)
        table = companions_for_evaluation(
            unique_anchors, candidates, factors, category, popularity, k, anyway
        )
        tables.append(("any_category_", table))
    position = np.searchsorted(unique_anchors, anchors)
    hits = {name: _hits(table[position], query_basket, test_baskets) for name, table in tables}
    ci: dict[str, list[float]] = {}
    for name, hit in hits.items():
        result[f"{name}hit_rate{key}"] = float(hit.mean())
        ci[f"{name}hit_rate{key}"] = _bootstrap_ci(rng, hit)
    for base in ("cooccurrence", "popularity"):
        ours, theirs = hits[""], hits[f"{base}_"]
        result[f"lift_vs_{base}"] = round(float(ours.mean() / theirs.mean()), 3) if theirs.any() else None
        if theirs.any():
            ci[f"lift_vs_{base}"] = _bootstrap_ci(rng, ours, theirs)
    result["ci95"] = ci
    result["seed"] = seed
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _bootstrap_ci(rng: np.random.Generator, hits: np.ndarray, base: np.ndarray | None = None) -> list[float]:
    """95% bootstrap interval over queries of ``hits.mean()``, or of ``hits.mean() / base.mean()``.

    Resampling n queries with replacement only changes how many fall in each cell of
    (hit, base hit), so the draws are multinomial over those cells: exact, and O(draws) instead
    of O(draws x queries). The ratio is paired: both methods see the same resampled queries.
    """
    n = len(hits)
    if base is None:
        rates = rng.binomial(n, float(hits.mean()), size=_BOOTSTRAP_DRAWS) / n
    else:
        cells = np.array(
            [(hits & base).sum(), (hits & ~base).sum(), (~hits & base).sum(), (~hits & ~base).sum()]
        )
        draws = rng.multinomial(n, cells / n, size=_BOOTSTRAP_DRAWS)
        rates = (draws[:, 0] + draws[:, 1]) / np.maximum(draws[:, 0] + draws[:, 2], 1)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _padded_table(
    rows: np.ndarray, cols: np.ndarray, anchors: np.ndarray, k: int, popular_order: np.ndarray
) -> np.ndarray:
    """(len(anchors), k) companions: the given partners first, then popular items, never the anchor.

    ``rows``/``cols`` are partners best first within each row (rows ascending).
    """
    n_items = len(popular_order)
    table = np.full((len(anchors), k), -1, dtype=np.int64)
    lookup = np.full(n_items, -1, dtype=np.int64)
    lookup[anchors] = np.arange(len(anchors))
    slot = lookup[rows] if len(rows) else np.zeros(0, np.int64)
    ok = slot >= 0
    rows, cols, slot = rows[ok], cols[ok], slot[ok]
    rank = _rank_in_row(rows)
    sel = rank < k
    table[slot[sel], rank[sel]] = cols[sel]
    # Fill the free slots from the best sellers: skipping the anchor and the row's partners
    # (at most k of them), so the first 2k + 1 best sellers always suffice.
    head = popular_order[: 2 * k + 1]
    taken = (head[None, :] == anchors[:, None]) | (head[None, :, None] == table[:, None, :]).any(axis=2)
    filled = (table >= 0).sum(axis=1)
    free_rank = np.cumsum(~taken, axis=1) - 1
    target = filled[:, None] + free_rank
    r, c = np.nonzero(~taken & (target < k))
    table[r, target[r, c]] = head[c]
    return table


def _hits(companions: np.ndarray, query_basket: np.ndarray, baskets: sp.csr_matrix) -> np.ndarray:
    """Per query: do its companions include an item of the query's own basket?"""
    n_items = baskets.shape[1]
    keys = np.repeat(np.arange(baskets.shape[0], dtype=np.int64), np.diff(baskets.indptr)) * n_items
    keys = np.sort(keys + baskets.indices.astype(np.int64))
    wanted = query_basket[:, None] * n_items + companions
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return ((keys[at] == wanted) & (companions >= 0)).any(axis=1)
