"""Real-time personalisation at request time: fold a user in from their recent events.

A user with events newer than the model (or a visitor the model has never seen) gets a user vector
solved against the live item factors (:mod:`recsvc.core.foldin`) from their training row plus
their recent events, rebuilt with the model's own confidence recipe (:mod:`recsvc.core.weighting`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from recsvc.core import ranking
from recsvc.core.contract import PURCHASE
from recsvc.core.foldin import fold_in, gramian
from recsvc.core.scoring import PLAIN_ALS
from recsvc.core.weighting import RowRecipe, add_raw_rows, raw_user_row, scale_row, unscale_row
from recsvc.storage import codec
from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.storage.stream import RecentEvents, parse_recent, recent_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldInState:
    """What fold-in needs from one model version, built once per version (see :func:`foldin_state`).

    ``params`` is None when this version cannot be folded in against (``reason`` says why); the
    recommendation path then keeps its usual answer.
    """

    params: RowRecipe | None
    yty: np.ndarray | None
    reason: str | None = None


def _build_state(model: Any) -> FoldInState:
    try:
        params = RowRecipe.from_manifest(model.manifest.get("params") or {})
    except ValueError as e:
        log.warning("model %s: fold-in disabled: %s", model.version, e)
        return FoldInState(None, None, str(e))
    if params.scaling == "bm25":
        frequency = getattr(model, "document_frequency", None)
        local = getattr(model, "_local_artifact", None)
        if frequency is None and local is not None:
            frequency = np.bincount(local.interactions.indices, minlength=model.n_items)
        if frequency is None:
            reason = "bm25 scaling needs the training document frequency per item, which is not published"
            log.warning("model %s: fold-in disabled: %s", model.version, reason)
            return FoldInState(None, None, reason)
        params = params.with_document_frequency(np.asarray(frequency))
    return FoldInState(params, gramian(model.item_factors))


def foldin_state(model: Any) -> FoldInState:
    """The fold-in parameters and ``Y^T Y`` of ``model``'s version, computed once and shared.

    Kept in the model's per-version memo (:meth:`recsvc.serving.model.ServingModel.memo`), so a version
    switch computes it once per process and every thread reuses it.
    """
    return model.memo("realtime.foldin", lambda: _build_state(model))


@dataclass(frozen=True)
class RealtimeVector:
    """A folded-in user vector and what went into it.

    Attributes
    ----------
    vector : numpy.ndarray
        float32 ``(factors,)``.
    purchased : numpy.ndarray
        int32 item indices the user bought in the events used (added to "already bought").
    events_used : int
        Recent events considered: all of them for an unknown user, those newer than the model's
        ``trained_until`` for a known one (events on unknown items and zero-weight events included).
    known_user : bool
        The model has the user: their training row was part of the solve.
    indices, raw : numpy.ndarray
        The row solved for: item indices (training row plus new events) and their raw summed
        weights, which a blended model's item-kNN and history parts score from.
    recent_items : numpy.ndarray
        int32 item indices of the new events (what explanations call "just viewed").
    """

    vector: np.ndarray
    purchased: np.ndarray
    events_used: int
    known_user: bool
    indices: np.ndarray
    raw: np.ndarray
    recent_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))


def realtime_vector(
    model: Any,
    recent: RecentEvents,
    train_indices: np.ndarray,
    train_confidence: np.ndarray,
    known_user: bool,
) -> RealtimeVector | None:
    """Fold a user in from their training row plus their recent events (pure numpy).

    Parameters
    ----------
    model : ServingModel
        The live model: ``item_factors``, ``item_index``, ``manifest`` (params, trained_until).
    recent : RecentEvents
        The user's recent events (``recent:<user_id>``, :func:`recsvc.storage.keys.recent`).
    train_indices, train_confidence : numpy.ndarray
        The user's training row (``interactions``, before alpha); empty for an unknown user.
    known_user : bool
        Whether the model has the user. Then only events newer than ``trained_until`` count (older
        ones are already in the training row), and without any the answer is None: the cached
        personalised list is current.

    Returns
    -------
    RealtimeVector or None
        None when real time does not apply: nothing new, no event on an item the model knows, or a
        model version fold-in cannot use.
    """
    state = foldin_state(model)
    if state.params is None or len(recent) == 0:
        return None
    trained_until = model.manifest.get("trained_until")
    trained_until = int(trained_until) if trained_until not in (None, "") else None
    if known_user and trained_until is not None:
        recent = recent.take(recent.timestamps > trained_until)
        if len(recent) == 0:
            return None
    positions = np.fromiter(
        (model.item_index.get(item, -1) for item in recent.item_ids), dtype=np.int64, count=len(recent)
    )
    # Training's decay clock is trained_until; new events after it count at full weight, as a
    # retrain at that moment would weigh them.
    new_indices, new_raw = raw_user_row(
        positions, recent.events, recent.timestamps, state.params, trained_until
    )
    if len(new_indices) == 0:
        return None
    if len(train_indices):
        # Add in raw space, then scale the sum: the row a retrain would build from both histories.
        train_raw = unscale_row(train_indices, train_confidence, state.params)
        indices, raw = add_raw_rows(train_indices, train_raw, new_indices, new_raw)
    else:
        indices, raw = new_indices, new_raw
    confidence, regularization = state.params.solve_terms(scale_row(indices, raw, state.params))
    vector = fold_in(
        model.item_factors,
        indices,
        confidence,
        regularization,
        state.params.alpha,
        yty=state.yty,
    )
    bought = positions[(recent.events == PURCHASE) & (positions >= 0)]
    return RealtimeVector(
        vector=vector,
        purchased=np.unique(bought).astype(np.int32),
        events_used=len(recent),
        known_user=known_user,
        indices=indices.astype(np.int32),
        raw=raw.astype(np.float32),
        recent_items=np.asarray(new_indices, dtype=np.int32),
    )


def user_vector_for(
    model: Any,
    client: redis.Redis,
    user_id: str,
    known_user: bool | None = None,
    history_length: int = 200,
    recent_entries: Sequence[bytes | str] | None = None,
) -> RealtimeVector | None:
    """The folded-in vector of ``user_id`` under ``model``, or None when real time does not apply.

    One Redis round trip reads the user's recent events and (for a known user) their training row.
    A caller that already read the recent list in its own pipeline passes ``recent_entries``; then
    Redis is asked for the training row only when the user is known and has new events, so a user
    without new events costs no round trip at all. A Redis failure returns None: the caller keeps
    its non-real-time answer.

    Parameters
    ----------
    model : ServingModel
    client : redis.Redis
    user_id : str
        Checked against the id contract before it touches a key.
    known_user : bool, optional
        Whether the model has the user (the caller knows from its own lookup); None = find out from
        the training row.
    history_length : int
        Most recent events read (``Config.history_length``).
    recent_entries : sequence, optional
        The raw ``LRANGE`` reply of the user's recent list (``0 .. history_length-1``), when already read.
    """
    key = recent_key(user_id)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    remote = getattr(model, "origin", "redis") == "redis"
    try:
        if recent_entries is not None:
            recent = parse_recent(recent_entries[:history_length])
            if not _may_apply(model, recent, known_user):
                return None
            train = empty
            if known_user is not False:
                train = model.training_row(client, user_id)
        elif remote:
            pipe = client.pipeline(transaction=False)
            pipe.lrange(key, 0, history_length - 1)
            if known_user is not False:
                pipe.hget(model.user_key("interactions", user_id), user_id)
            replies = pipe.execute()
            recent = parse_recent(replies[0])
            train = codec.unpack_weighted(replies[1]) if len(replies) > 1 else empty
        else:
            recent = parse_recent(client.lrange(key, 0, history_length - 1))
            train = model.training_row(client, user_id) if known_user is not False else empty
    except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
        log.warning("real-time lookup for a user failed, answering without it: %s", type(e).__name__)
        return None
    if known_user is None:
        known_user = len(train[0]) > 0
    return realtime_vector(model, recent, train[0], train[1], known_user)


def _may_apply(model: Any, recent: RecentEvents, known_user: bool | None) -> bool:
    """Cheap pre-check before any Redis work: are there events, and new ones for a known user?"""
    if len(recent) == 0:
        return False
    trained_until = model.manifest.get("trained_until")
    if known_user is True and trained_until not in (None, ""):
        return bool((recent.timestamps > int(trained_until)).any())
    return True


def recommend(
    model: Any,
    client: redis.Redis,
    user_id: str,
    filters: Any,
    n: int,
    *,
    known_user: bool | None = None,
    history_length: int = 200,
    recent_entries: Sequence[bytes | str] | None = None,
) -> tuple[np.ndarray, np.ndarray, RealtimeVector] | None:
    """Real-time top ``n`` for the recommendations endpoint, or None when real time does not apply.

    The one call the endpoint makes: fold in (:func:`user_vector_for`), add the user's new
    purchases to "already bought", and rank every item with
    :func:`recsvc.core.ranking.recommend_for_vector` under the request's filters.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, RealtimeVector) or None
        int32 item indices and float32 scores, best first, and the vector used.
    """
    folded = user_vector_for(
        model,
        client,
        user_id,
        known_user=known_user,
        history_length=history_length,
        recent_entries=recent_entries,
    )
    if folded is None:
        return None
    items, scores = rank_folded(model, folded, filters, n)
    return items, scores, folded


def rank_folded(model: Any, folded: RealtimeVector, filters: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Score every item for a folded-in vector and keep the top ``n`` under ``filters`` (pure numpy).

    The user's new purchases join ``filters.purchased``, so "already bought" (and its repurchase
    exemption by category) covers them like purchases the model was trained on; for a model that
    excludes everything a user interacted with, the new events' items join it too. A blended model
    scores with its :class:`~recsvc.core.scoring.Scorer` over the folded row.
    """
    spec = getattr(model, "spec", PLAIN_ALS)
    gone = folded.indices if spec.excludes_interacted else folded.purchased
    if len(gone):
        purchased = np.concatenate((np.asarray(filters.purchased, dtype=np.int32), gone))
        filters = dataclasses.replace(filters, purchased=purchased)
    scores = None
    if not spec.is_plain_als:
        scores = model.scorer.score_one(folded.indices, folded.raw, folded.vector)
    return ranking.recommend_for_vector(model, folded.vector, filters, n, scores=scores)


def raw_training_row(model: Any, indices: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """The raw summed weights behind a stored training row (what a blended model scores from).

    A version fold-in cannot use (:class:`FoldInState` without parameters) keeps the stored values.
    """
    params = foldin_state(model).params
    if params is None or len(indices) == 0:
        return np.asarray(confidence, dtype=np.float32)
    return unscale_row(indices, confidence, params).astype(np.float32)
