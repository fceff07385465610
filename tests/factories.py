"""Builders for small, fully valid artifacts whose contents tests can reason about."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsvc.core.artifact import Artifact, BundleCandidates


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
