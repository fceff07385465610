"""Bundle endpoints: a thin HTTP layer over the recommender's bundle answers.

* ``GET /v1/items/<item_id>/bundle?size=3&max_price=`` -- the anchor plus complementary items.
* ``POST /v1/bundles`` -- items that complete a cart (read-only: no API key, bounded body).
* ``GET /v1/users/<user_id>/bundles?n=3&size=3&max_price=`` -- bundles anchored on the user's
  recent views, then their top recommendations, then popular items.

Every answer is the common envelope (``model_version, source, request_id``), a ``bundles`` list
(each bundle: ``items, total_price, bundle_price, savings, discount, reason, reason_code``) and
the flat ``items`` list of everything shown.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from recsvc.core.bundles import MAX_BUNDLE_SIZE, MAX_CART_ITEMS, BundleRules
from recsvc.core.config import Config
from recsvc.core.ids import is_valid_id
from recsvc.web.declare import DEFAULT_USER_BUNDLES
from recsvc.web.errors import bad_request
from recsvc.web.params import declared, int_value, json_body, parse_id, price_value
from recsvc.web.render import render
from recsvc.web.services import services

bp = Blueprint("bundles", __name__)


def _rules(config: Config, size: int, max_price: float | None) -> BundleRules:
    return BundleRules.from_config(config, size=size, max_price=max_price)


@bp.get("/v1/items/<item_id>/bundle")
def item_bundle(item_id: str):
    """The anchor item plus ``size - 1`` complementary items, priced as one offer.

    404 for an item the model does not know. An anchor that is out of stock (or alone costs more
    than ``max_price``) gets an empty ``bundles`` list and a ``note``.
    """
    item_id = parse_id(item_id, "item_id")
    q = declared()
    svc = services()
    size = q["size"] or svc.config.bundles.size
    return render(svc.recommender.item_bundle(item_id, _rules(svc.config, size, q["max_price"])))


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


@bp.post("/v1/bundles")
def cart_bundle():
    """Items that complete a cart: ``{"items": [...], "size": 2, "max_price": 100, "user_id": "u1"}``.

    ``size`` is the number of items to add (default ``bundles.size - 1``). Unknown cart ids are
    listed in ``unknown_items`` and otherwise ignored; with ``user_id``, items the user already
    bought are not suggested (unless of a repurchase category).
    """
    declared()
    svc = services()
    config = svc.config
    body = json_body(("items", "size", "max_price", "user_id"), required=("items",))
    ids = _cart_ids(body["items"], min(MAX_CART_ITEMS, config.serving.max_exclude))
    add = int_value(body.get("size", max(1, config.bundles.size - 1)), "size", 1, MAX_BUNDLE_SIZE - 1)
    max_price = price_value(body.get("max_price"), "max_price")
    user_id = parse_id(body["user_id"], "user_id") if "user_id" in body else None
    result = svc.recommender.cart_bundle(ids, _rules(config, add + 1, max_price), add, user_id)
    return render(result, user_id=user_id)


@bp.get("/v1/users/<user_id>/bundles")
def user_bundles(user_id: str):
    """Up to ``n`` bundles for a user, no item repeated, none already bought."""
    user_id = parse_id(user_id, "user_id")
    q = declared()
    svc = services()
    n = q["n"] or DEFAULT_USER_BUNDLES
    rules = _rules(svc.config, q["size"] or svc.config.bundles.size, q["max_price"])
    return render(svc.recommender.user_bundles(user_id, n, rules), user_id=user_id)
