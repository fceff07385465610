"""The serving policy, written once: which model answers, which user data it sees, which strategy.

Every read endpoint goes through one :class:`Recommender`:

1. **Resolve the model.** Per-user answers read the live pointer and the user's record in one
   round trip and switch versions when a publish or rollback happened; item answers trust the
   model in memory for ``model_check_interval_s``. Redis down or slow, or nothing published: the
   answer is degraded to the in-process copy of the live version, else the newest local artifact
   (:class:`ModelChoice`), and says why (:class:`~recsvc.core.answers.Reason`).
2. **Walk the strategy chain** (:class:`Chain`, data not code): real time (fold in events newer
   than the model) → the cached top-K list → popular items. An A/B variant replaces the chain and
   may name another published version. A strategy that does not apply returns None; one that
   raises is logged and skipped, so a bug in fold-in costs the user real time, never a 5xx.

Nothing here knows Flask: the web layer parses the request, calls one method and renders the
:class:`Answer`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from recsvc.core import bundles as bundle_rules
from recsvc.core import ranking
from recsvc.core import repurchase as rebuy
from recsvc.core.answers import Reason, Source, Strategy
from recsvc.core.config import Config, ServingSettings
from recsvc.core.contract import CART, PURCHASE, VIEW
from recsvc.core.errors import NotFound, NotPublished
from recsvc.core.explain import Code, Explanation
from recsvc.core.ranking import EMPTY_ITEMS, Filters
from recsvc.serving import realtime
from recsvc.serving.explanations import Basis, explain_answer, user_history
from recsvc.serving.health import RedisHealth
from recsvc.serving.model import ModelCache, ServingModel, UserRecord, fetch_history, fetch_user
from recsvc.storage import stream
from recsvc.storage.connection import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

#: Newest recent events read for bundle anchors: a bounded Redis reply.
RECENT_ANCHORS = 50
MAX_USER_BUNDLES = 10


# ------------------------------------------------------------------------------------------------
# Requests and answers
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterArgs:
    """Filters as the caller gave them (names and ids), before mapping onto a model."""

    categories: tuple[str, ...] | None = None
    min_price: float | None = None
    max_price: float | None = None
    exclude: tuple[str, ...] = ()
    in_stock_only: bool = True

    def for_model(
        self,
        model: ServingModel,
        repurchase: tuple[str, ...],
        purchased: np.ndarray | None = None,
        exempt: np.ndarray | None = None,
    ) -> Filters:
        """The :class:`~recsvc.core.ranking.Filters` for ``model`` (unknown names/ids match nothing).

        ``exempt`` (:func:`exempt_items`) marks the bought items that stay recommendable.
        """
        return Filters(
            in_stock_only=self.in_stock_only,
            categories=None if self.categories is None else model.category_codes(self.categories),
            min_price=self.min_price,
            max_price=self.max_price,
            exclude=model.item_indices(self.exclude) if self.exclude else EMPTY_ITEMS,
            purchased=purchased if purchased is not None else EMPTY_ITEMS,
            exclude_purchased=True,
            repurchase_categories=model.memo(
                ("repurchase", *repurchase), lambda: model.category_codes(repurchase)
            ),
            repurchasable=exempt,
        )


NO_FILTERS = FilterArgs()


def exempt_items(model: ServingModel, serving: ServingSettings) -> np.ndarray:
    """Bool mask over ``model``'s items: bought items that stay recommendable (built once per version).

    :func:`recsvc.core.repurchase.repurchasable_items` of the version's learned repurchase rates
    and the operator's ``repurchase_categories``.
    """
    categories = tuple(serving.repurchase_categories)

    def build() -> np.ndarray:
        rate = model.repurchase.rate if model.repurchase is not None else None
        mask = rebuy.repurchasable_items(
            rate, serving.repurchase_min_rate, model.category, model.category_codes(categories)
        )
        mask.flags.writeable = False
        return mask

    return model.memo(("exempt", serving.repurchase_min_rate, *categories), build)


@dataclass
class Answer:
    """What a recommender returns: items and scores of one model version, and where they come from.

    ``fields`` holds what the endpoint adds to the answer (``user_id``, ``item_id``, ``bundles``,
    ``note``...), in the order they are shown.
    """

    model: ServingModel | None
    items: np.ndarray
    scores: np.ndarray
    source: Source
    reason: Reason | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    #: False when the user's A/B variant could not be applied (its version is gone, Redis is down).
    variant_applied: bool = True
    #: More fields of some items, by item index (a "buy again" item's dates and reason).
    item_fields: dict[int, dict[str, Any]] | None = None
    #: Why each item is in the list (asked for with ``explain``), one per item; None when not asked.
    explanations: list[Explanation] | None = None

    @property
    def model_version(self) -> str | None:
        return self.model.version if self.model is not None else None


@dataclass(frozen=True)
class Chain:
    """Strategies tried in order for a user, and the reason a popular answer gives."""

    steps: tuple[Strategy, ...]
    popular_reason: Reason = Reason.UNKNOWN_USER


DEFAULT_CHAIN = Chain((Strategy.REALTIME, Strategy.CACHED, Strategy.POPULAR))
#: What each A/B variant strategy serves (``recsvc.analytics.experiments.STRATEGIES``).
VARIANT_CHAINS: dict[str, Chain] = {
    "personalized": Chain((Strategy.CACHED, Strategy.POPULAR)),
    "realtime": Chain((Strategy.REALTIME, Strategy.CACHED, Strategy.POPULAR)),
    "popular": Chain((Strategy.POPULAR,), popular_reason=Reason.EXPERIMENT),
}


@dataclass(frozen=True)
class Variant:
    """An A/B variant's serving plan: its chain, and optionally a published version to serve from."""

    chain: Chain
    model_version: str | None = None

    @classmethod
    def of(cls, strategy: str, model_version: str | None = None) -> Variant:
        """The plan of a variant that names one of :data:`VARIANT_CHAINS`' strategies."""
        return cls(VARIANT_CHAINS.get(strategy, DEFAULT_CHAIN), model_version)


@dataclass(frozen=True)
class ModelChoice:
    """The model an answer uses, and the reason when it is not the live one from Redis."""

    model: ServingModel | None
    reason: Reason | None = None

    @property
    def degraded(self) -> bool:
        return self.reason is not None


@dataclass
class UserState:
    """The model and a user's data for one request, read in one round trip."""

    model: ServingModel | None
    record: UserRecord | None = None
    has_recent: bool = False
    reason: Reason | None = None  # degraded: redis_unavailable | not_published
    variant_applied: bool = True


@dataclass(frozen=True)
class _Found:
    """A strategy's list, and what it was scored from (``basis``: for explanations)."""

    items: np.ndarray
    scores: np.ndarray
    source: Source
    reason: Reason | None = None
    basis: Basis | None = None


@dataclass
class _Context:
    """What a strategy sees: the request and the user's state under one model."""

    model: ServingModel
    user_id: str
    record: UserRecord | None
    has_recent: bool
    filters: Filters
    n: int
    chain: Chain


# ------------------------------------------------------------------------------------------------
# The recommender
# ------------------------------------------------------------------------------------------------


class Recommender:
    """Answers every read endpoint with the one serving policy (see the module docstring).

    Parameters
    ----------
    config : Config
        Serving limits, repurchase categories, history length, bundle rules.
    client : redis.Redis
        The request-path client (short timeouts).
    models : ModelCache
        The process's loaded versions.
    health : RedisHealth
        Shared memory of recent Redis failures.
    """

    def __init__(self, config: Config, client: redis.Redis, models: ModelCache, health: RedisHealth):
        self.config, self.client, self.models, self.health = config, client, models, health
        self._strategies: dict[Strategy, Callable[[_Context], _Found | None]] = {
            Strategy.REALTIME: self._realtime,
            Strategy.CACHED: self._cached,
            Strategy.POPULAR: self._popular,
        }

    # -- the model ---------------------------------------------------------------------------------

    def fallback(self, reason: Reason) -> ModelChoice:
        """The in-process copy of the last live version, else the newest local artifact, else nothing."""
        model = self.models.last_live
        if model is None:
            model = self.models.local_fallback()
        return ModelChoice(model, reason)

    def resolve(self) -> ModelChoice:
        """The model for answers without per-user data (the pointer is re-read every few seconds)."""
        if self.health.is_down():
            return self.fallback(Reason.REDIS_UNAVAILABLE)
        try:
            model = self.models.get(self.client)
        except REDIS_DOWN_ERRORS as e:
            self.health.mark_down(e)
            return self.fallback(Reason.REDIS_UNAVAILABLE)
        except NotPublished:
            return self.fallback(Reason.NOT_PUBLISHED)
        self.health.mark_up()
        if model is None:
            return self.fallback(Reason.NOT_PUBLISHED)
        return ModelChoice(model)

    def user_state(
        self, user_id: str, *, model_version: str | None = None, with_training_row: bool = False
    ) -> UserState:
        """The live model (or ``model_version``) and ``user_id``'s record, in one round trip.

        A publish or rollback seen in the reply switches the process to the new version and reads
        the user again. ``model_version`` (an A/B variant's) that is no longer published gives the
        live model's state with ``variant_applied=False``. ``with_training_row`` reads the user's
        training row in the same round trip (:attr:`UserRecord.training_row`).
        """
        fetch = functools.partial(fetch_user, with_training_row=with_training_row)
        if self.health.is_down():
            return self._degraded(Reason.REDIS_UNAVAILABLE, model_version)
        probes = (stream.recent_key(user_id),)
        try:
            if model_version is not None:
                try:
                    model = self.models.model_for(self.client, model_version)
                except NotPublished:
                    log.warning("model version %s of an A/B variant is not published", model_version)
                    return self._live_state(user_id, probes, fetch, variant_applied=False)
                _, record, (has_recent,) = fetch(self.client, model, user_id, probes)
                self.health.mark_up()
                return UserState(model, record, bool(has_recent))
            return self._live_state(user_id, probes, fetch)
        except REDIS_DOWN_ERRORS as e:
            self.health.mark_down(e)
            return self._degraded(Reason.REDIS_UNAVAILABLE, model_version)
        except NotPublished:
            return self._degraded(Reason.NOT_PUBLISHED, model_version)

    def _live_state(
        self,
        user_id: str,
        probes: tuple[str, ...],
        fetch: Callable[..., tuple[Any, Any, list[int]]] = fetch_user,
        variant_applied: bool = True,
    ) -> UserState:
        found = self._read_live(user_id, probes, fetch)
        if found is None:
            return self._degraded(Reason.NOT_PUBLISHED, None, variant_applied)
        model, record, (has_recent,) = found
        self.health.mark_up()
        return UserState(model, record, bool(has_recent), variant_applied=variant_applied)

    def _read_live(
        self, user_id: str, probes: tuple[str, ...], fetch: Callable[..., tuple[Any, Any, list[int]]]
    ) -> tuple[ServingModel, Any, list[int]] | None:
        """The live model and ``fetch``'s user data under it (switching versions when the pointer
        moved); None when nothing is published. Redis errors propagate."""
        model = self.models.current() or self.models.get(self.client, force_check=True)
        if model is None:
            return None
        live, value, found = fetch(self.client, model, user_id, probes)
        if live != model.version:
            if live is None:
                return None
            model = self.models.switch(self.client, live)
            _, value, found = fetch(self.client, model, user_id, probes)
        return model, value, found

    def _degraded(self, reason: Reason, model_version: str | None, variant_applied: bool = True) -> UserState:
        choice = self.fallback(reason)
        return UserState(choice.model, reason=reason, variant_applied=variant_applied and not model_version)

    # -- personalised top-N ------------------------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        n: int,
        wanted: FilterArgs = NO_FILTERS,
        *,
        variant: Variant | None = None,
        include_due: bool = False,
        now: float | None = None,
        explain: bool = False,
    ) -> Answer:
        """Top ``n`` items for ``user_id`` under ``wanted``, by the chain of ``variant`` or the default.

        Parameters
        ----------
        user_id : str
            Already validated against the id contract.
        n : int
            Items wanted (already bounded by the caller).
        wanted : FilterArgs
            The request's filters.
        variant : Variant, optional
            The user's A/B variant; None serves :data:`DEFAULT_CHAIN` from the live version.
        include_due : bool
            Put the items the user is due to buy again (:meth:`buy_again` with the default horizon,
            probability at least ``repurchase_due_probability``) first, in at most half the places.
        now : float, optional
            The moment due-ness is computed for (default: the clock).
        explain : bool
            Say why each item is in the list (:attr:`Answer.explanations`). The user's training row
            is then read in the same round trip as the record; without it, nothing more.
        """
        fields = {"user_id": user_id}
        state = self.user_state(
            user_id, model_version=variant.model_version if variant else None, with_training_row=explain
        )
        chain = variant.chain if variant is not None and state.variant_applied else DEFAULT_CHAIN
        model = state.model
        if state.reason is not None or model is None:
            found_popular = self._popular_answer(state.model, wanted, n, state.reason, fields, applied=False)
            return _explained(found_popular) if explain else found_popular
        ctx = _Context(
            model=model,
            user_id=user_id,
            record=state.record,
            has_recent=state.has_recent,
            filters=wanted.for_model(
                model,
                self.config.serving.repurchase_categories,
                state.record.purchased if state.record is not None else None,
                self._exempt(model),
            ),
            n=n,
            chain=chain,
        )
        for step in chain.steps:
            try:
                found = self._strategies[step](ctx)
            except REDIS_DOWN_ERRORS as e:
                self.health.mark_down(e)
                degraded = self._popular_answer(
                    self.fallback(Reason.REDIS_UNAVAILABLE).model,
                    wanted,
                    n,
                    Reason.REDIS_UNAVAILABLE,
                    fields,
                    applied=False,
                )
                return _explained(degraded) if explain else degraded
            except Exception:  # a bug in one strategy must cost this answer that strategy, not a 5xx
                log.exception("strategy %s failed for a user; trying the next one", step.value)
                continue
            if found is not None:
                answer = Answer(
                    model,
                    found.items,
                    found.scores,
                    found.source,
                    found.reason,
                    fields,
                    variant_applied=state.variant_applied,
                    explanations=self._explain(ctx, found) if explain else None,
                )
                return self._mix_due(answer, user_id, wanted, n, now) if include_due else answer
        empty = Answer(model, EMPTY_ITEMS, EMPTY_ITEMS, Source.FALLBACK, chain.popular_reason, fields)
        return _explained(empty) if explain else empty

    def _explain(self, ctx: _Context, found: _Found) -> list[Explanation]:
        """Why each item of ``found`` is there; a cached list reads the user's training row first."""
        model, record = ctx.model, ctx.record
        basis = found.basis
        if found.source is not Source.FALLBACK and basis is not None and basis.raw is None:
            if basis.confidence is None:
                try:
                    indices, confidence = self._training_row(model, record, ctx.user_id)
                except (redis.RedisError, *REDIS_DOWN_ERRORS) as e:
                    # The list stands; its reasons then rest on the model's other parts alone.
                    log.warning("training row for explanations unavailable: %s", type(e).__name__)
                    indices, confidence = EMPTY_ITEMS, np.zeros(0, np.float32)
                basis = Basis(indices, basis.vector, confidence=confidence, recent_items=basis.recent_items)
        history = None
        if basis is not None:
            history = user_history(model, basis, record.purchased if record is not None else None)
        return explain_answer(model, found.items, found.source, history, basis.vector if basis else None)

    def _training_row(
        self, model: ServingModel, record: UserRecord | None, user_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The user's training row: the one read with the record when it was, else one more read."""
        if record is not None and record.training_row is not None:
            return record.training_row
        return model.training_row(self.client, user_id)

    def _realtime(self, ctx: _Context) -> _Found | None:
        if not ctx.has_recent:
            return None
        folded = realtime.recommend(
            ctx.model,
            self.client,
            ctx.user_id,
            ctx.filters,
            ctx.n,
            known_user=ctx.record is not None,
            history_length=self.config.events.history_length,
        )
        if folded is None:
            return None
        items, scores, vector = folded
        basis = Basis(vector.indices, vector.vector, raw=vector.raw, recent_items=vector.recent_items)
        return _Found(items, scores, Source.REALTIME, basis=basis)

    def _cached(self, ctx: _Context) -> _Found | None:
        record = ctx.record
        if record is None:
            return None
        model = ctx.model
        row: list[Basis] = []  # the training row, when scoring read it (explanations reuse it)
        if model.stored_scores:
            # A blend: the list carries its scores; when it runs short every item is scored from
            # the user's training row (read with the record when explaining, else one more read).
            def score_all() -> np.ndarray:
                indices, confidence = self._training_row(model, record, record.user_id)
                raw = realtime.raw_training_row(model, indices, confidence)
                row.append(Basis(indices, record.vector, raw=raw, confidence=confidence))
                return model.scorer.score_one(indices, raw, record.vector)

            items, scores, _how = ranking.recommend_from_cache(
                model, record.topk_items, record.topk_scores, record.vector, ctx.filters, ctx.n, score_all
            )
        else:
            # Scores only for the items returned (the cached list is in score order).
            items, scores, _how = ranking.recommend_from_cache(
                model, record.topk_items, None, record.vector, ctx.filters, ctx.n
            )
        basis = row[0] if row else Basis(EMPTY_ITEMS, record.vector)
        return _Found(items, scores, Source.PERSONALIZED, basis=basis)

    def _popular(self, ctx: _Context) -> _Found:
        items, scores = ranking.popular_items(ctx.model, ctx.filters, ctx.n)
        return _Found(items, scores, Source.FALLBACK, ctx.chain.popular_reason)

    def _popular_answer(
        self,
        model: ServingModel | None,
        wanted: FilterArgs,
        n: int,
        reason: Reason | None,
        fields: dict[str, Any],
        applied: bool = True,
    ) -> Answer:
        """Popular items of ``model`` under ``wanted`` (an empty answer without any model)."""
        if model is None:
            return Answer(None, EMPTY_ITEMS, EMPTY_ITEMS, Source.FALLBACK, reason, fields, applied)
        filters = wanted.for_model(model, self.config.serving.repurchase_categories)
        items, scores = ranking.popular_items(model, filters, n)
        return Answer(model, items, scores, Source.FALLBACK, reason, fields, applied)

    # -- item answers ------------------------------------------------------------------------------

    def popular(self, n: int, wanted: FilterArgs = NO_FILTERS) -> Answer:
        """The most popular items (overall, or in the asked categories), filtered."""
        choice = self.resolve()
        return self._popular_answer(choice.model, wanted, n, choice.reason, {})

    def similar(self, item_id: str, n: int, wanted: FilterArgs = NO_FILTERS) -> Answer:
        """Items closest to ``item_id`` in the model's factor space (cosine), filtered.

        An item the model does not know (e.g. added after training) gets popular items instead,
        with ``reason: unknown_item``: a product page never shows an empty widget.
        """
        fields = {"item_id": item_id}
        choice = self.resolve()
        model = choice.model
        if model is None:
            return Answer(None, EMPTY_ITEMS, EMPTY_ITEMS, Source.FALLBACK, choice.reason, fields)
        anchor = model.item_index.get(item_id)
        if anchor is None:
            return self._popular_answer(model, wanted, n, Reason.UNKNOWN_ITEM, fields)
        filters = wanted.for_model(model, self.config.serving.repurchase_categories)
        items, scores = ranking.similar_items(model, anchor, filters, n, unit_factors=model.unit_item_factors)
        source = Source.FALLBACK if choice.degraded else Source.PERSONALIZED
        return Answer(model, items, scores, source, choice.reason, fields)

    # -- bundles -----------------------------------------------------------------------------------

    def item_bundle(self, item_id: str, rules: bundle_rules.BundleRules) -> Answer:
        """The anchor item plus complementary items.

        Raises
        ------
        NotFound
            The model does not know ``item_id`` (a bundle needs a real anchor).
        """
        fields: dict[str, Any] = {"item_id": item_id}
        choice = self.resolve()
        model = choice.model
        if model is None:
            return _bundle_answer(None, [], Source.FALLBACK, choice.reason, fields)
        anchor = model.item_index.get(item_id)
        if anchor is None:
            raise NotFound(f"item {item_id!r} is not in model version {model.version}", field="item_id")
        catalog = bundle_catalog(model)
        bundle = bundle_rules.assemble_bundle(catalog, anchor, rules)
        if bundle is None:
            fields["note"] = "anchor_unavailable" if not catalog.available[anchor] else "over_max_price"
            return _bundle_answer(model, [], Source.FALLBACK, choice.reason, fields)
        source = Source.FALLBACK if choice.degraded else _bundle_source(bundle)
        return _bundle_answer(model, [(bundle, {})], source, choice.reason, fields, rules)

    def cart_bundle(
        self, cart_ids: Sequence[str], rules: bundle_rules.BundleRules, add: int, user_id: str | None = None
    ) -> Answer:
        """Items that complete a cart; with ``user_id``, none the user already bought."""
        choice = self.resolve()
        model = choice.model
        fields: dict[str, Any] = {}
        if model is None:
            return _bundle_answer(None, [], Source.FALLBACK, choice.reason, fields)
        catalog = bundle_catalog(model)
        cart = [model.item_index[i] for i in cart_ids if i in model.item_index]
        unknown = [i for i in cart_ids if i not in model.item_index]
        exclude = EMPTY_ITEMS
        if user_id is not None and not choice.degraded:
            record = self._record(model, user_id)
            if record is not None:
                exclude = bundle_rules.already_bought(
                    record.purchased, catalog.category, self._repurchase(model), self._exempt(model)
                )
        bundle = bundle_rules.complete_cart(catalog, cart, rules, add, exclude=exclude)
        if unknown:
            fields["unknown_items"] = unknown
        if user_id is not None:
            fields["user_id"] = user_id
        if bundle is None:
            fields["note"] = "over_max_price" if cart else "no_known_items"
            return _bundle_answer(model, [], Source.FALLBACK, choice.reason, fields)
        source = Source.FALLBACK if choice.degraded else _bundle_source(bundle)
        return _bundle_answer(model, [(bundle, {})], source, choice.reason, fields, rules)

    def user_bundles(self, user_id: str, n: int, rules: bundle_rules.BundleRules) -> Answer:
        """Up to ``n`` bundles for a user, no item repeated, none already bought.

        Anchors, in order: items the user viewed or carted recently (``source: realtime``), the
        user's top recommendations (``personalized``), then popular items (``fallback``).
        """
        fields: dict[str, Any] = {"user_id": user_id}
        state = self.user_state(user_id)
        model, record = state.model, state.record
        if model is None:
            return _bundle_answer(None, [], Source.FALLBACK, state.reason, fields)
        recent = None
        if state.reason is None and state.has_recent:
            try:
                recent = stream.recent_events(
                    self.client, user_id, min(RECENT_ANCHORS, self.config.events.history_length)
                )
            except REDIS_DOWN_ERRORS as e:
                self.health.mark_down(e)
        catalog = bundle_catalog(model)
        purchased = [record.purchased] if record is not None else []
        origin: dict[int, Source] = {}
        if recent is not None and len(recent):
            positions = np.fromiter(
                (model.item_index.get(i, -1) for i in recent.item_ids), dtype=np.int64, count=len(recent)
            )
            purchased.append(positions[(recent.events == PURCHASE) & (positions >= 0)])
            browsed = positions[np.isin(recent.events, (VIEW, CART)) & (positions >= 0)]
            for item in dict.fromkeys(browsed.tolist()):
                origin.setdefault(item, Source.REALTIME)
        if record is not None:
            for item in record.topk_items.tolist():
                origin.setdefault(int(item), Source.PERSONALIZED)
        for item in catalog.popular_order[: 4 * MAX_USER_BUNDLES * bundle_rules.MAX_BUNDLE_SIZE].tolist():
            origin.setdefault(int(item), Source.FALLBACK)
        bought = np.concatenate(purchased) if purchased else EMPTY_ITEMS
        exclude = bundle_rules.already_bought(
            bought, catalog.category, self._repurchase(model), self._exempt(model)
        )
        found = bundle_rules.user_bundles(catalog, list(origin), n, rules, exclude=exclude)
        pairs = [
            (
                b,
                {
                    "anchor_item_id": catalog.item_ids[b.items[0]],
                    "anchor_source": origin[b.items[0]].value,
                },
            )
            for b in found
        ]
        source = Source.FALLBACK if state.reason or not found else origin[found[0].items[0]]
        return _bundle_answer(model, pairs, source, state.reason, fields, rules)

    def _record(self, model: ServingModel, user_id: str) -> UserRecord | None:
        """The user's record under ``model`` (None when unknown or Redis fails)."""
        if model.origin != "redis":
            return model.local_user(user_id)
        try:
            return fetch_user(self.client, model, user_id)[1]
        except REDIS_DOWN_ERRORS as e:
            self.health.mark_down(e)
            return None

    def _repurchase(self, model: ServingModel) -> np.ndarray:
        return model.category_codes(tuple(self.config.serving.repurchase_categories))

    def _exempt(self, model: ServingModel) -> np.ndarray:
        return exempt_items(model, self.config.serving)

    # -- buy again ---------------------------------------------------------------------------------

    def buy_again(
        self,
        user_id: str,
        n: int,
        wanted: FilterArgs = NO_FILTERS,
        *,
        horizon_days: float | None = None,
        now: float | None = None,
    ) -> Answer:
        """Items ``user_id`` bought and is likely to buy again within ``horizon_days``, most due first.

        Candidates are the user's bought items passing ``wanted`` (stock, categories, prices,
        exclusions); an item people rarely buy again gets a low probability and comes last.
        Purchases since the model (real-time events) move the dates. Each
        item carries ``last_bought``, ``expected_next``, ``due_in_days``, ``times_bought``,
        ``typical_interval_days`` and a ``reason`` in words; its score is the probability of a
        purchase within the horizon. Without any such item (unknown user, nothing bought, a
        version without a repurchase model): the most popular of the items bought again,
        ``source: fallback``, ``reason: no_repurchases``; degraded like every answer when Redis is
        down or nothing is published.
        """
        serving = self.config.serving
        horizon = float(horizon_days if horizon_days is not None else serving.repurchase_horizon_days)
        at = time.time() if now is None else float(now)
        fields: dict[str, Any] = {"user_id": user_id, "horizon_days": horizon}
        choice, history, source = self._history(user_id)
        model = choice.model
        if choice.degraded or model is None:
            return self._repeat_popular(model, wanted, n, choice.reason, fields)
        if history is None or model.repurchase is None:
            return self._repeat_popular(model, wanted, n, Reason.NO_REPURCHASES, fields)
        items, scores, extra = self._due_list(model, history, wanted, n, horizon, at)
        if len(items) == 0:
            return self._repeat_popular(model, wanted, n, Reason.NO_REPURCHASES, fields)
        return Answer(model, items, scores, source or Source.PERSONALIZED, None, fields, item_fields=extra)

    def _history(self, user_id: str) -> tuple[ModelChoice, rebuy.UserHistory | None, Source | None]:
        """The model, the user's bought items (with purchases since the model) and their source.

        The source is None for a user the model does not know, ``realtime`` when purchases since
        the model changed the history.
        """
        if self.health.is_down():
            return self.fallback(Reason.REDIS_UNAVAILABLE), None, None
        probes = (stream.recent_key(user_id),)
        try:
            found = self._read_live(user_id, probes, fetch_history)
            if found is None:
                return self.fallback(Reason.NOT_PUBLISHED), None, None
            model, history, (has_recent,) = found
            recent = None
            if has_recent:
                recent = stream.recent_events(self.client, user_id, self.config.events.history_length)
            self.health.mark_up()
        except REDIS_DOWN_ERRORS as e:
            self.health.mark_down(e)
            return self.fallback(Reason.REDIS_UNAVAILABLE), None, None
        except NotPublished:
            return self.fallback(Reason.NOT_PUBLISHED), None, None
        choice = ModelChoice(model)
        source = Source.PERSONALIZED if history is not None else None
        if recent is not None and len(recent):
            merged = _with_recent_purchases(model, history, recent)
            if merged is not history:
                return choice, merged, Source.REALTIME
        return choice, history, source

    def _due_list(
        self,
        model: ServingModel,
        history: rebuy.UserHistory,
        wanted: FilterArgs,
        n: int,
        horizon: float,
        now: float,
        min_probability: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
        """The ``n`` most due candidate items of ``history``: indices, probabilities, their fields."""
        assert model.repurchase is not None  # callers check
        params = model.repurchase
        if wanted is NO_FILTERS:  # the common request: in stock is the only filter
            allowed = model.available[history.items]
        else:
            allowed = ranking.allowed(model, wanted.for_model(model, ()), history.items)
        ranked = rebuy.rank_history(params, history, now, horizon, n, allowed, min_probability)
        order = ranked.order
        shown = history.items[order]
        extra: dict[int, dict[str, Any]] = {}
        for item, count, last, due_in, interval, elapsed, rate in zip(
            shown.tolist(),
            history.count[order].tolist(),
            history.last[order].tolist(),
            ranked.due_in_days.tolist(),
            ranked.interval_days.tolist(),
            ranked.elapsed_days.tolist(),
            params.rate[shown].tolist(),
            strict=True,
        ):
            extra[item] = {
                "last_bought": _iso(last),
                "expected_next": _iso(int(now + due_in * rebuy.SECONDS_PER_DAY)),
                "due_in_days": round(due_in, 1),
                "times_bought": count,
                "typical_interval_days": round(interval, 1),
                "reason": rebuy.reason(count, interval, elapsed, due_in, rate),
            }
        return shown.astype(np.int32), ranked.probability.astype(np.float32), extra

    def _repeat_popular(
        self,
        model: ServingModel | None,
        wanted: FilterArgs,
        n: int,
        reason: Reason | None,
        fields: dict[str, Any],
    ) -> Answer:
        """The most popular items of those bought again, under ``wanted`` (plain popularity when the
        version marks none)."""
        if model is None:
            return Answer(None, EMPTY_ITEMS, EMPTY_ITEMS, Source.FALLBACK, reason, fields)
        exempt = self._exempt(model)
        if not exempt.any():
            return self._popular_answer(model, wanted, n, reason, fields)
        order = model.memo(
            (
                "repeat_popular",
                self.config.serving.repurchase_min_rate,
                *self.config.serving.repurchase_categories,
            ),
            lambda: model.popular[exempt[model.popular]],
        )
        filters = wanted.for_model(model, ())
        items = order[ranking.allowed(model, filters, order)][:n].astype(np.int32)
        return Answer(
            model, items, model.popularity[items].astype(np.float32), Source.FALLBACK, reason, fields
        )

    def _mix_due(self, answer: Answer, user_id: str, wanted: FilterArgs, n: int, now: float | None) -> Answer:
        """``answer`` with the user's due items first (at most half of ``n``), the rest after them."""
        model = answer.model
        if model is None or model.repurchase is None:
            return answer
        try:
            if model.origin == "redis":
                history = fetch_history(self.client, model, user_id)[1]
            else:
                history = model.local_history(user_id)
        except REDIS_DOWN_ERRORS as e:
            self.health.mark_down(e)
            return answer
        if history is None:
            return answer
        serving = self.config.serving
        at = time.time() if now is None else float(now)
        due_items, due_scores, extra = self._due_list(
            model,
            history,
            wanted,
            math.ceil(n / 2),
            serving.repurchase_horizon_days,
            at,
            serving.repurchase_due_probability,
        )
        if len(due_items) == 0:
            return answer
        for fields in extra.values():
            fields["due"] = True
        rest = ~np.isin(answer.items, due_items)
        items = np.concatenate((due_items, answer.items[rest]))[:n].astype(np.int32)
        scores = np.concatenate((due_scores, answer.scores[rest]))[:n].astype(np.float32)
        why = None
        if answer.explanations is not None:
            kept = [e for e, keep in zip(answer.explanations, rest, strict=True) if keep]
            why = ([Explanation(Code.BUY_AGAIN)] * len(due_items) + kept)[:n]
        return Answer(
            model,
            items,
            scores,
            answer.source,
            answer.reason,
            answer.fields,
            answer.variant_applied,
            item_fields=extra,
            explanations=why,
        )


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _with_recent_purchases(
    model: ServingModel, history: rebuy.UserHistory | None, recent: stream.RecentEvents
) -> rebuy.UserHistory | None:
    """``history`` with the purchases among ``recent`` that are newer than the model (the same
    object when there are none)."""
    newer_than = model.trained_until or 0
    bought = (recent.events == PURCHASE) & (recent.timestamps > newer_than)
    if not bought.any():
        return history
    rows = np.flatnonzero(bought)
    positions = np.fromiter((model.item_index.get(recent.item_ids[i], -1) for i in rows), np.int64, len(rows))
    known = positions >= 0
    if not known.any():
        return history
    base = history if history is not None else rebuy.UserHistory.empty()
    return rebuy.merge_purchases(base, positions[known], recent.timestamps[rows][known])


def _explained(answer: Answer) -> Answer:
    """A popular answer with its explanations (every item ``trending``)."""
    answer.explanations = explain_answer(answer.model, answer.items, Source.FALLBACK, None, None)
    return answer


def bundle_catalog(model: ServingModel) -> bundle_rules.BundleCatalog:
    """The bundle view of a model version, built once per version and shared by threads."""
    return model.memo("bundle_catalog", lambda: bundle_rules.BundleCatalog.from_model(model))


def _bundle_source(bundle: bundle_rules.Bundle) -> Source:
    if bundle.reason_code == bundle_rules.REASON_POPULAR_PAIRING:
        return Source.FALLBACK
    return Source.PERSONALIZED


def _bundle_answer(
    model: ServingModel | None,
    bundles: list[tuple[bundle_rules.Bundle, dict[str, Any]]],
    source: Source,
    reason: Reason | None,
    fields: dict[str, Any],
    rules: bundle_rules.BundleRules | None = None,
) -> Answer:
    """An answer with ``fields["bundles"]`` (each bundle priced, with its extra fields) and, as its
    items, everything shown, each once, in bundle order."""
    shown: list[int] = []
    scores: list[float] = []
    for bundle, _ in bundles:
        for position, item in enumerate(bundle.items):
            if item not in shown:
                shown.append(item)
                scores.append(bundle.scores[position])
    rendered: list[dict[str, Any]] = []
    if bundles:
        # Bundles only come with the model they were assembled from and the rules that priced them.
        assert model is not None and rules is not None
        catalog = bundle_catalog(model)
        rendered = [{**bundle.to_dict(catalog, rules), **extra} for bundle, extra in bundles]
    fields["bundles"] = rendered
    return Answer(
        model,
        np.asarray(shown, dtype=np.int32),
        np.asarray(scores, dtype=np.float32),
        source,
        reason,
        fields,
    )
