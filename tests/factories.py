"""Builders for small, fully valid artifacts whose contents tests can reason about, and their oracles."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsvc.core.artifact import Artifact, BundleCandidates
from recsvc.core.repurchase import PurchaseHistory, RepurchaseModel, RepurchaseParams

#: The API key every test app accepts (see tests/conftest.py).
API_KEY = "test-key-0123456789"


def make_artifact(
    n_users: int = 20,
    n_items: int = 50,
    factors: int = 8,
    seed: int = 0,
    categories: tuple[str, ...] = ("shoes", "shirts", "hats"),
) -> Artifact:
    """Random factors, a catalog cycling through ``categories``, prices 1..n_items, all in stock.

    Item ``i`` has id ``i<i>``, category ``categories[i % len]``, price ``i + 1`` and popularity
    ``n_items - i`` (so item 0 is the most popular). User ``u`` (id ``u<u>``) purchased item ``u``.
    """
    rng = np.random.default_rng(seed)
    item_ids = [f"i{i}" for i in range(n_items)]
    user_ids = [f"u{u}" for u in range(n_users)]
    rows = np.arange(n_users)
    cols = rows % n_items
    purchases = sp.csr_matrix((np.ones(n_users, np.float32), (rows, cols)), shape=(n_users, n_items))
    return Artifact(
        item_ids=item_ids,
        user_ids=user_ids,
        item_factors=rng.standard_normal((n_items, factors)).astype(np.float32),
        user_factors=rng.standard_normal((n_users, factors)).astype(np.float32),
        price=np.arange(1, n_items + 1, dtype=np.float32),
        available=np.ones(n_items, dtype=bool),
        category=(np.arange(n_items) % len(categories)).astype(np.int32),
        categories=list(categories),
        titles=[f"Item {i}" for i in range(n_items)],
        popularity=np.arange(n_items, 0, -1).astype(np.float32),
        interactions=(purchases * 10).tocsr(),
        purchases=purchases,
        bundles=BundleCandidates.empty(n_items),
        manifest={
            "data_fingerprint": f"test{seed}",
            "params": {"factors": factors, "regularization": 0.05, "alpha": 1.0},
            "metrics": {},
        },
    )


def expected_top(artifact: Artifact, user: int, n: int, allowed: np.ndarray | None = None) -> list[str]:
    """Brute-force reference: the user's best ``n`` allowed items by dot product (ties: lower index)."""
    scores = artifact.item_factors @ artifact.user_factors[user]
    mask = artifact.available.copy() if allowed is None else allowed.copy()
    mask[artifact.purchases[user].indices] = False
    candidates = np.flatnonzero(mask)
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [artifact.item_ids[i] for i in order[:n]]


def blend_artifact(
    n_users: int = 20, n_items: int = 50, seed: int = 0, exclude: str = "purchased"
) -> Artifact:
    """:func:`make_artifact` as a blend: each user also viewed 3 items (``u+1..u+3``), an item-kNN
    similarity (item ``i``'s neighbours: ``i+1`` and ``i+7``), a popularity prior (item 0 first),
    linear scaling (raw weights = stored interactions) and ``manifest["model"]`` with ``exclude``."""
    from recsvc.core.scoring import ModelSpec, popularity_prior

    a = make_artifact(n_users=n_users, n_items=n_items, seed=seed)
    rows = np.repeat(np.arange(n_users), 3)
    cols = (rows + np.tile([1, 2, 3], n_users)) % n_items
    views = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    a.interactions = (a.interactions + views).tocsr()
    anchors = np.repeat(np.arange(n_items), 2)
    neighbours = (anchors + np.tile([1, 7], n_items)) % n_items
    weights = np.tile([2.0, 1.0], n_items).astype(np.float32)
    a.similarity = sp.csr_matrix((weights, (anchors, neighbours)), shape=(n_items, n_items))
    a.prior = popularity_prior(np.arange(n_items, 0, -1))
    a.manifest["params"]["scaling"] = "linear"
    a.manifest["model"] = ModelSpec(exclude=exclude).to_dict()
    return a


def expected_blend_top(artifact: Artifact, user: int, n: int, allowed: np.ndarray | None = None) -> list[str]:
    """Brute-force reference of a blend: the model's scores minus what the user may not get again."""
    scores = artifact.scorer().score(artifact.raw_interactions()[[user]], artifact.user_factors[[user]])[0]
    mask = artifact.available.copy() if allowed is None else allowed.copy()
    never = artifact.interactions if artifact.spec().excludes_interacted else artifact.purchases
    mask[never[user].indices] = False
    candidates = np.flatnonzero(mask)
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [artifact.item_ids[i] for i in order[:n]]


#: anchor -> [(candidate, support)], best first. Categories cycle shoes/shirts/hats (i % 3);
#: item i costs i + 1. Anchor 0 (shoes) goes with 1 (shirts), 4 (shirts), 3 (shoes), 2 (hats).
BUNDLE_ROWS: dict[int, list[tuple[int, int]]] = {
    0: [(1, 12), (4, 10), (3, 9), (2, 8)],
    1: [(0, 12), (2, 5)],
    2: [(0, 8), (1, 5)],
    4: [(0, 10)],
}


def bundle_candidates(n_items: int) -> BundleCandidates:
    """Mined bundle candidates exactly as in :data:`BUNDLE_ROWS` (score = support / 20)."""
    indptr, indices, score, support = [0], [], [], []
    for anchor in range(n_items):
        for item, sup in BUNDLE_ROWS.get(anchor, []):
            indices.append(item)
            support.append(sup)
            score.append(sup / 20.0)
        indptr.append(len(indices))
    return BundleCandidates(
        np.asarray(indptr, np.int64),
        np.asarray(indices, np.int32),
        np.asarray(score, np.float32),
        np.asarray(support, np.int32),
    )


def bundle_artifact() -> Artifact:
    """A 20-user, 50-item artifact with :data:`BUNDLE_ROWS` as bundle candidates; item 5 out of stock."""
    a = make_artifact(n_users=20, n_items=50, seed=2)
    a.bundles = bundle_candidates(a.n_items)
    a.available[5] = False
    return a


#: "Now" of :func:`repurchase_model`'s histories: 2024-06-30T00:00:00Z.
REPURCHASE_NOW = 1_719_705_600
DAY = 86_400

#: Hand-made histories: user index -> [(item, occasions, days since the last one, own mean
#: interval in days)]. Items 0-9 are bought again (rate 0.8), the others rarely (0.05); every item's
#: typical interval is 10 days.
REPURCHASE_HISTORIES: dict[int, list[tuple[int, int, float, float]]] = {
    1: [(3, 5, 9.0, 10.0), (6, 1, 2.0, 0.0), (20, 1, 10.0, 0.0), (12, 3, 40.0, 10.0)],
    2: [(7, 2, 3.0, 10.0)],
    3: [(3, 4, 9.0, 10.0)],
    4: [(11, 6, 1.0, 2.0), (2, 1, 9.0, 0.0)],
}


def repurchase_model(n_users: int, n_items: int, ranker: tuple[float, ...] | None = None) -> RepurchaseModel:
    """A repurchase model with :data:`REPURCHASE_HISTORIES` (variances 0.1, strength 2); with a
    ``ranker``, each pair's recency-weighted occasions are ``1 + (occasions - 1) / 2``."""
    rate = np.full(n_items, 0.05, np.float32)
    rate[:10] = 0.8
    params = RepurchaseParams(
        rate=rate,
        log_interval=np.full(n_items, np.log(10.0), np.float32),
        buyers=np.full(n_items, 10, np.int32),
        repeat_buyers=np.where(np.arange(n_items) < 10, 8, 1).astype(np.int32),
        within_var=0.1,
        between_var=0.1,
        strength=2.0,
        ranker=ranker,
    )
    indptr, items, last, count, log_interval = [0], [], [], [], []
    for user in range(n_users):
        for item, occasions, ago, own in REPURCHASE_HISTORIES.get(user, []):
            items.append(item)
            count.append(occasions)
            last.append(REPURCHASE_NOW - int(ago * DAY))
            log_interval.append(np.log(own) if occasions > 1 else 0.0)
        indptr.append(len(items))
    history = PurchaseHistory(
        indptr=np.asarray(indptr, np.int64),
        items=np.asarray(items, np.int32),
        last=np.asarray(last, np.int64),
        count=np.asarray(count, np.int32),
        log_interval=np.asarray(log_interval, np.float32),
        pace=np.zeros(n_users, np.float32),
        recent=None if ranker is None else (1.0 + (np.asarray(count, np.float32) - 1.0) / 2.0),
    )
    return RepurchaseModel(params, history)


def repurchase_artifact(seed: int = 1, ranker: tuple[float, ...] | None = None) -> Artifact:
    """:func:`make_artifact` (20 users, 50 items) with :func:`repurchase_model` (without a ranker:
    a version trained before it existed)."""
    a = make_artifact(n_users=20, n_items=50, seed=seed)
    a.repurchase = repurchase_model(a.n_users, a.n_items, ranker)
    return a
