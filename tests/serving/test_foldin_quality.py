"""Fold-in is correct on a real model trained on the synthetic shop.

* Training users: folding in each user's training history (rebuilt from raw events with the
  manifest recipe) reproduces the trained user factors' ranking: mean top-20 overlap >= 0.9.
* Held-out users (never seen in training): fold-in from the first half of their events beats
  popularity on the purchases of the second half.
"""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.contract import PURCHASE
from recsvc.core.foldin import fold_in, gramian
from recsvc.core.weighting import RowRecipe, user_confidence_row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from recsvc.core.eventfiles import load_events
    from recsvc.core.weighting import id_maps, raw_matrix, scale, to_float32
    from training.als import TrainParams, fit_als
    from training.synth import write_shop

    events_path, _ = write_shop(tmp_path_factory.mktemp("shop"), seed=3, n_users=2000, n_items=400, days=40)
    events, _ = load_events(events_path)
    users = np.unique(events.user_id)
    held = set(np.random.default_rng(0).choice(users, size=len(users) // 5, replace=False))
    is_held = np.fromiter((u in held for u in events.user_id), dtype=bool, count=len(events))
    train = events.take(~is_held)

    params = TrainParams(factors=32)
    weighting = params.weighting()
    trained_until = int(train.timestamp.max())
    user_ids, item_ids = id_maps(train, weighting)
    raw = raw_matrix(train, user_ids, item_ids, weighting, now=trained_until)
    confidence = to_float32(scale(raw, weighting))
    params = params.resolved(len(item_ids))  # the regularization fold-in must use
    user_factors, item_factors = fit_als(confidence, params, seed=1, threads=1)
    return {
        "events": events,
        "train": train,
        "held": sorted(held),
        "user_ids": user_ids,
        "item_index": {item: i for i, item in enumerate(item_ids)},
        "confidence": confidence,
        "user_factors": user_factors,
        "item_factors": item_factors,
        "params": RowRecipe.from_manifest(params.to_manifest(1)),
        "trained_until": trained_until,
    }


def test_fold_in_reproduces_training_users_rankings(shop):
    params, y = shop["params"], shop["item_factors"]
    yty = gramian(y)
    overlaps = []
    for u in range(0, len(shop["user_ids"]), 5):
        mine = shop["train"].take(shop["train"].user_id == shop["user_ids"][u])
        indices, conf = user_confidence_row(mine, shop["item_index"], params, shop["trained_until"])
        lo, hi = shop["confidence"].indptr[u], shop["confidence"].indptr[u + 1]
        np.testing.assert_array_equal(indices, shop["confidence"].indices[lo:hi])  # the same row...
        x = fold_in(y, indices, conf, params.regularization, params.alpha, yty=yty)
        trained = set(np.argsort(-(y @ shop["user_factors"][u]))[:20])
        folded = set(np.argsort(-(y @ x))[:20])
        overlaps.append(len(trained & folded) / 20)  # ...gives the same top 20
    assert len(overlaps) >= 250
    assert np.mean(overlaps) >= 0.9, np.mean(overlaps)
    assert np.median(overlaps) >= 0.9


def test_fold_in_beats_popularity_for_held_out_users(shop):
    params, y, item_index = shop["params"], shop["item_factors"], shop["item_index"]
    yty = gramian(y)
    train = shop["train"]
    cols = np.fromiter((item_index.get(i, -1) for i in train.item_id), dtype=np.int64, count=len(train))
    bought = (train.event == PURCHASE) & (cols >= 0)
    popularity = np.bincount(cols[bought], minlength=len(item_index)).astype(np.float64)

    events = shop["events"]
    recall_fold_in, recall_popularity = [], []
    for user in shop["held"]:
        mine = events.take(events.user_id == user)
        mine = mine.take(np.argsort(mine.timestamp, kind="stable"))
        half = len(mine) // 2
        history, later = mine.take(np.arange(half)), mine.take(np.arange(half, len(mine)))
        indices, conf = user_confidence_row(history, item_index, params, shop["trained_until"])
        targets = {item_index[i] for i in later.item_id[later.event == PURCHASE] if i in item_index}
        targets -= set(indices.tolist())  # only new items count: both rankers exclude the history
        if not targets or len(indices) == 0:
            continue
        scores = y @ fold_in(y, indices, conf, params.regularization, params.alpha, yty=yty)
        scores[indices] = -np.inf
        popular = popularity.copy()
        popular[indices] = -np.inf
        k = min(20, len(targets))
        recall_fold_in.append(len(set(np.argsort(-scores)[:20]) & targets) / k)
        recall_popularity.append(len(set(np.argsort(-popular)[:20]) & targets) / k)
    assert len(recall_fold_in) >= 100
    assert np.mean(recall_fold_in) > 1.2 * np.mean(recall_popularity), (
        np.mean(recall_fold_in),
        np.mean(recall_popularity),
    )
