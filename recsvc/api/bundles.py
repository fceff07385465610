"""Bundle endpoints: a thin HTTP layer over :mod:`recsvc.bundles`.

* ``GET /v1/items/<item_id>/bundle?size=3&max_price=`` -- the anchor plus complementary items.
* ``POST /v1/bundles`` -- items that complete a cart (read-only: no API key, bounded body).
* ``GET /v1/users/<user_id>/bundles?n=3&size=3&max_price=`` -- bundles anchored on the user's
  recent views, then their top recommendations, then popular items.

Every answer is the common envelope (``model_version, source, request_id``), a ``bundles`` list
(each bundle: ``items, total_price, bundle_price, savings, discount, reason, reason_code``) and
the flat ``items`` list of everything shown, built by the shared
:func:`recsvc.api.common.recommendation_body` so A/B tagging sees bundle answers too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flask import Blueprint

from recsvc import realtime
from recsvc.api.common import (
    FALLBACK,
    PERSONALIZED,
    REALTIME,
    answer,
    json_body,
    live_model,
    not_found,
    parse_id,
    parse_price,
    query_args,
    recommendation_body,
    services,
)
from recsvc.core.bundles import (
    MAX_BUNDLE_SIZE,
    MAX_CART_ITEMS,
    REASON_POPULAR_PAIRING,
    Bundle,
    BundleCatalog,
    BundleRules,
    already_bought,
    assemble_bundle,
    complete_cart,
    user_bundles,
)
from recsvc.core.contract import CART, PURCHASE, VIEW
from recsvc.core.ids import is_valid_id
from recsvc.core.ranking import EMPTY_ITEMS
from recsvc.serving import REDIS_DOWN_ERRORS, ModelNotPublished, ServingModel, UserRecord, fetch_user
from recsvc.web.errors import bad_request

bp = Blueprint("bundles", __name__)

MAX_USER_BUNDLES = 10
DEFAULT_USER_BUNDLES = 3
RECENT_ANCHORS = 50  # newest recent events read for anchors: bounded Redis reply


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def _int_arg(raw: Any, field: str, low: int, high: int) -> int:
    """An integer in ``low..high`` from a query string or a JSON value, else a 400 naming ``field``."""
    if isinstance(raw, bool):
        raise bad_request(field, f"{field} must be an integer in {low}..{high}")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str):
        try:
            raw = int(raw)
        except ValueError:
            raise bad_request(field, f"{field} must be an integer in {low}..{high}") from None
    if not isinstance(raw, int) or not low <= raw <= high:
        raise bad_request(field, f"{field} must be an integer in {low}..{high}, got {raw!r}")
    return raw


def _query_int(args: Any, name: str, low: int, high: int, default: int) -> int:
    values = args.getlist(name)
    if len(values) > 1:
        raise bad_request(name, f"{name} is given {len(values)} times; give it once")
    if not values or values[0] == "":
        return default
    return _int_arg(values[0], name, low, high)


def _rules(config: Any, size: int, max_price: float | None) -> BundleRules:
    return BundleRules.from_config(config, size=size, max_price=max_price)


def _catalog(model: ServingModel) -> BundleCatalog:
    """The bundle view of a model version, built once per version and shared by threads."""
    return model.memo("bundle_catalog", lambda: BundleCatalog.from_model(model))


def _repurchase_codes(model: ServingModel, config: Any) -> np.ndarray:
    return model.category_codes(tuple(config.repurchase_categories))


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------


def _bundle_json(bundle: Bundle, catalog: BundleCatalog, rules: BundleRules, **extra: Any) -> dict[str, Any]:
    body = bundle.to_dict(catalog, rules)
    body.update(extra)
    return body


def _body(
    model: ServingModel,
    catalog: BundleCatalog,
    rules: BundleRules,
    bundles: list[tuple[Bundle, dict[str, Any]]],
    *,
    source: str,
    **extra: Any,
) -> dict[str, Any]:
    """The envelope with ``bundles`` and the flat ``items`` list of everything shown."""
    shown: list[int] = []
    scores: list[float] = []
    for bundle, _ in bundles:
        for position, item in enumerate(bundle.items):
            if item not in shown:
                shown.append(item)
                scores.append(bundle.scores[position])
    body = recommendation_body(
        model,
        np.asarray(shown, dtype=np.int32),
        np.asarray(scores, dtype=np.float32),
        source=source,
        **extra,
        bundles=[_bundle_json(b, catalog, rules, **more) for b, more in bundles],
    )
    return body


def _source_of(bundle: Bundle | None) -> str:
    if bundle is None or bundle.reason_code == REASON_POPULAR_PAIRING:
        return FALLBACK
    return PERSONALIZED


def _empty(source: str = FALLBACK, **extra: Any):
    return answer(recommendation_body(None, EMPTY_ITEMS, EMPTY_ITEMS, source=source, bundles=[], **extra))


# ------------------------------------------------------------------------------------------------
# GET /v1/items/<item_id>/bundle
# ------------------------------------------------------------------------------------------------


@bp.get("/v1/items/<item_id>/bundle")
def item_bundle(item_id: str):
    """The anchor item plus ``size - 1`` complementary items, priced as one offer.

    404 for an item the model does not know. An anchor that is out of stock (or alone costs more
    than ``max_price``) gets an empty ``bundles`` list and a ``note``; any other valid item gets a
    bundle, from co-purchase data, ALS similarity or popular complementary items.
    """
    item_id = parse_id(item_id, "item_id")
    args = query_args(("size", "max_price"))
    config = services().config
    size = _query_int(args, "size", 2, MAX_BUNDLE_SIZE, config.bundle_size)
    rules = _rules(config, size, parse_price(args, "max_price"))
    choice = live_model()
    model = choice.model
    degraded = {"reason": choice.reason} if choice.degraded else {}
    if model is None:
        return _empty(item_id=item_id, **degraded)
    anchor = model.item_index.get(item_id)
    if anchor is None:
        raise not_found("item_id", f"item {item_id!r} is not in model version {model.version}")
    catalog = _catalog(model)
    bundle = assemble_bundle(catalog, anchor, rules)
    if bundle is None:
        note = "anchor_unavailable" if not catalog.available[anchor] else "over_max_price"
        body = _body(model, catalog, rules, [], source=FALLBACK, item_id=item_id, note=note, **degraded)
        return answer(body)
    source = FALLBACK if choice.degraded else _source_of(bundle)
    return answer(_body(model, catalog, rules, [(bundle, {})], source=source, item_id=item_id, **degraded))


# ------------------------------------------------------------------------------------------------
# POST /v1/bundles (cart completion)
# ------------------------------------------------------------------------------------------------


def _cart_ids(raw: Any, limit: int) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("items", "items must be a non-empty list of item ids")
    if len(raw) > limit:
        raise bad_request("items", f"items holds at most {limit} ids, got {len(raw)}")
    for position, value in enumerate(raw):
        if not is_valid_id(value):
            raise bad_request(
                f"items[{position}]", f"items[{position}] must be 1-128 characters of [A-Za-z0-9._:-]"
            )
    return list(dict.fromkeys(raw))


def _max_price(raw: Any) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        raise bad_request("max_price", "max_price must be a finite number >= 0")
    return float(raw)


@bp.post("/v1/bundles")
def cart_bundle():
    """Items that complete a cart: ``{"items": [...], "size": 2, "max_price": 100, "user_id": "u1"}``.

    ``size`` is the number of items to add (default ``bundle_size - 1``). Unknown cart ids are
    listed in ``unknown_items`` and otherwise ignored; with ``user_id``, items the user already
    bought are not suggested (unless of a repurchase category).
    """
    query_args(())
    svc = services()
    config = svc.config
    body = json_body(("items", "size", "max_price", "user_id"), required=("items",))
    ids = _cart_ids(body["items"], min(MAX_CART_ITEMS, config.max_exclude))
    add_default = max(1, config.bundle_size - 1)
    add = _int_arg(body.get("size", add_default), "size", 1, MAX_BUNDLE_SIZE - 1)
    max_price = _max_price(body.get("max_price"))
    user_id = body.get("user_id")
    if user_id is not None:
        user_id = parse_id(user_id, "user_id") if isinstance(user_id, str) else None
        if user_id is None:
            raise bad_request("user_id", "user_id must be a string")
    rules = _rules(config, add + 1, max_price)
    choice = live_model()
    model = choice.model
    degraded = {"reason": choice.reason} if choice.degraded else {}
    if model is None:
        return _empty(**degraded)
    catalog = _catalog(model)
    cart = [model.item_index[i] for i in ids if i in model.item_index]
    unknown = [i for i in ids if i not in model.item_index]
    exclude = EMPTY_ITEMS
    if user_id is not None and not choice.degraded:
        record = _user_record(model, user_id)
        if record is not None:
            exclude = already_bought(record.purchased, catalog.category, _repurchase_codes(model, config))
    bundle = complete_cart(catalog, cart, rules, add, exclude=exclude)
    extra: dict[str, Any] = {"unknown_items": unknown} if unknown else {}
    if user_id is not None:
        extra["user_id"] = user_id
    if bundle is None:
        note = "over_max_price" if cart else "no_known_items"
        return answer(_body(model, catalog, rules, [], source=FALLBACK, note=note, **extra, **degraded))
    source = FALLBACK if choice.degraded else _source_of(bundle)
    return answer(_body(model, catalog, rules, [(bundle, {})], source=source, **extra, **degraded))


def _user_record(model: ServingModel, user_id: str) -> UserRecord | None:
    """The user's record under ``model`` (None when unknown or Redis fails)."""
    svc = services()
    if model.origin != "redis":
        return model.local_user(user_id)
    try:
        return fetch_user(svc.client, model, user_id)[1]
    except REDIS_DOWN_ERRORS as e:
        svc.health.mark_down(e)
        return None


# ------------------------------------------------------------------------------------------------
# GET /v1/users/<user_id>/bundles
# ------------------------------------------------------------------------------------------------


@bp.get("/v1/users/<user_id>/bundles")
def user_bundles_view(user_id: str):
    """Up to ``n`` bundles for a user, no item repeated, none already bought.

    Anchors, in order: items the user viewed or carted recently (``source: realtime``), the
    user's top recommendations (``personalized``), then popular items (``fallback``).
    """
    user_id = parse_id(user_id, "user_id")
    args = query_args(("n", "size", "max_price"))
    svc = services()
    config = svc.config
    n = _query_int(args, "n", 1, MAX_USER_BUNDLES, DEFAULT_USER_BUNDLES)
    size = _query_int(args, "size", 2, MAX_BUNDLE_SIZE, config.bundle_size)
    rules = _rules(config, size, parse_price(args, "max_price"))

    model, record, recent, reason = _user_state(user_id)
    degraded = {"reason": reason} if reason else {}
    if model is None:
        return _empty(user_id=user_id, **degraded)
    catalog = _catalog(model)

    purchased = [record.purchased] if record is not None else []
    anchors: list[int] = []
    origin: dict[int, str] = {}
    if recent is not None and len(recent):
        positions = np.fromiter(
            (model.item_index.get(i, -1) for i in recent.item_ids), dtype=np.int64, count=len(recent)
        )
        purchased.append(positions[(recent.events == PURCHASE) & (positions >= 0)])
        browsed = positions[np.isin(recent.events, (VIEW, CART)) & (positions >= 0)]
        for item in dict.fromkeys(browsed.tolist()):
            origin.setdefault(item, REALTIME)
    if record is not None:
        for item in record.topk_items.tolist():
            origin.setdefault(int(item), PERSONALIZED)
    for item in catalog.popular_order[: 4 * MAX_USER_BUNDLES * MAX_BUNDLE_SIZE].tolist():
        origin.setdefault(int(item), FALLBACK)
    anchors = list(origin)
    bought = np.concatenate(purchased) if purchased else EMPTY_ITEMS
    exclude = already_bought(bought, catalog.category, _repurchase_codes(model, config))

    bundles = user_bundles(catalog, anchors, n, rules, exclude=exclude)
    pairs = [
        (b, {"anchor_item_id": catalog.item_ids[b.items[0]], "anchor_source": origin[b.items[0]]})
        for b in bundles
    ]
    source = FALLBACK if reason or not bundles else origin[bundles[0].items[0]]
    return answer(_body(model, catalog, rules, pairs, source=source, user_id=user_id, **degraded))


def _user_state(
    user_id: str,
) -> tuple[ServingModel | None, UserRecord | None, realtime.RecentEvents | None, str | None]:
    """``(model, record, recent events, degraded reason)`` for a user, falling back like recommendations."""
    from recsvc.api.common import fallback_model

    svc = services()
    if svc.health.is_down():
        choice = fallback_model("redis_unavailable")
        return choice.model, None, None, choice.reason
    try:
        model = svc.models.current() or svc.models.get(svc.client, force_check=True)
        if model is None:
            choice = fallback_model("not_published")
            return choice.model, None, None, choice.reason
        live, record = fetch_user(svc.client, model, user_id)
        if live != model.version:
            # A publish or rollback happened: switch once, then read the user again.
            if live is None:
                choice = fallback_model("not_published")
                return choice.model, None, None, choice.reason
            model = svc.models.switch(svc.client, live)
            record = fetch_user(svc.client, model, user_id)[1]
        recent = realtime.recent_events(svc.client, user_id, min(RECENT_ANCHORS, svc.config.history_length))
        svc.health.mark_up()
        return model, record, recent, None
    except REDIS_DOWN_ERRORS as e:
        svc.health.mark_down(e)
        choice = fallback_model("redis_unavailable")
        return choice.model, None, None, choice.reason
    except ModelNotPublished:
        choice = fallback_model("not_published")
        return choice.model, None, None, choice.reason
