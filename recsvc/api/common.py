"""What every blueprint shares: the app's services, query parsing, the live model, the answer body.

Other blueprints (events, bundles, experiments) use these instead of re-implementing them:

* :func:`services` -- the per-app :class:`Services` (config, Redis client, model cache, health).
* :func:`query_args` -- reject unknown query parameters (400 naming the parameter).
* :func:`parse_n`, :func:`parse_id`, :func:`parse_id_list`, :func:`parse_price`, :func:`json_body`.
* :func:`live_model` -- the model to answer with, falling back when Redis is down or empty.
* :func:`recommendation_body` + :func:`answer` -- the one shape of an item-list answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from flask import current_app, g, request
from werkzeug.datastructures import MultiDict

from recsvc.analytics import experiments
from recsvc.core.config import Config
from recsvc.core.ids import MAX_ID_LENGTH, is_valid_id
from recsvc.core.ranking import EMPTY_ITEMS, Filters
from recsvc.serving import REDIS_DOWN_ERRORS, ModelCache, ModelNotPublished, RedisHealth, ServingModel
from recsvc.web import jsonio
from recsvc.web.errors import ApiError, bad_request

# Sources of an answer (also in the OpenAPI document).
PERSONALIZED = "personalized"
REALTIME = "realtime"
FALLBACK = "fallback"


@dataclass
class Services:
    """Per-app state, created once by :func:`recsvc.app.create_app` (one per gunicorn worker)."""

    config: Config
    redis_url: str
    client: redis.Redis
    models: ModelCache
    health: RedisHealth

    def admin_client(self) -> redis.Redis:
        """A client with generous timeouts for slow admin work (publish)."""
        from recsvc.storage.connection import connect_admin

        return connect_admin(self.redis_url)


def services() -> Services:
    """The current app's :class:`Services`."""
    return current_app.extensions["recsvc"]


def request_id() -> str:
    """This request's id (the caller's valid ``X-Request-ID``, else a fresh one)."""
    return g.get("request_id", "")


# ------------------------------------------------------------------------------------------------
# Input parsing (every failure is a 400 naming the field)
# ------------------------------------------------------------------------------------------------


def query_args(allowed: Iterable[str]) -> MultiDict:
    """The query parameters, after rejecting any not in ``allowed`` (pass a frozenset on hot paths)."""
    args = request.args
    if not args:
        return args
    if not isinstance(allowed, frozenset | set):
        allowed = frozenset(allowed)
    for name in args:
        if name not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise bad_request(name, f"unknown query parameter {name!r} (expected: {expected})")
    return args


def _single(args: MultiDict, name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise bad_request(name, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_n(args: MultiDict, config: Config, name: str = "n") -> int:
    """``n`` in ``1..config.max_n`` (default ``config.default_n``)."""
    raw = _single(args, name)
    if raw is None or raw == "":
        return config.default_n
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(name, f"{name} must be an integer in 1..{config.max_n}") from None
    if not 1 <= value <= config.max_n:
        raise bad_request(name, f"{name} must be an integer in 1..{config.max_n}, got {value}")
    return value


def parse_id(value: str, field: str) -> str:
    """``value`` if it satisfies the id contract, else a 400 naming ``field``."""
    if is_valid_id(value):
        return value
    if not value:
        raise bad_request(field, f"{field} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise bad_request(field, f"{field} is longer than {MAX_ID_LENGTH} characters")
    raise bad_request(field, f"{field} must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._:-]")


def parse_id_list(args: MultiDict, name: str, limit: int) -> list[str]:
    """Comma-separated ids, the parameter possibly repeated; each checked; at most ``limit``."""
    values: list[str] = []
    for raw in args.getlist(name):
        for part in raw.split(","):
            part = part.strip()
            if part:
                values.append(parse_id(part, name))
            if len(values) > limit:
                raise bad_request(name, f"{name} has more than {limit} entries")
    return list(dict.fromkeys(values))


def parse_categories(args: MultiDict, name: str, limit: int) -> list[str] | None:
    """Category names (comma-separated and/or repeated); None when not given."""
    if name not in args:
        return None
    values: list[str] = []
    for raw in args.getlist(name):
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            if len(part) > 128:
                raise bad_request(name, f"{name} names are at most 128 characters")
            values.append(part)
            if len(values) > limit:
                raise bad_request(name, f"{name} has more than {limit} entries")
    if not values:
        raise bad_request(name, f"{name} is empty")
    return list(dict.fromkeys(values))


def parse_price(args: MultiDict, name: str) -> float | None:
    """A finite, non-negative number, or None when absent."""
    raw = _single(args, name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(name, f"{name} must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise bad_request(name, f"{name} must be a finite number >= 0")
    return value


def parse_bool(args: MultiDict, name: str, default: bool) -> bool:
    raw = _single(args, name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise bad_request(name, f"{name} must be true or false")


def json_body(allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """The request's JSON object (empty body -> {}), rejecting unknown and missing fields.

    The body size is capped by ``MAX_CONTENT_LENGTH`` (``Config.max_body_bytes``): larger bodies get 413.
    """
    raw = request.get_data(cache=True)
    if not raw:
        body: Any = {}
    else:
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise bad_request("body", "body is not valid JSON")
    if not isinstance(body, dict):
        raise bad_request("body", "body must be a JSON object")
    allowed = set(allowed)
    for name in body:
        if name not in allowed:
            raise bad_request(name, f"unknown field {name!r}")
    for name in required:
        if body.get(name) in (None, ""):
            raise bad_request(name, f"{name} is required")
    return body


@dataclass(frozen=True)
class FilterArgs:
    """Filters as the caller gave them (names and ids), before mapping onto a model."""

    categories: list[str] | None = None
    min_price: float | None = None
    max_price: float | None = None
    exclude: tuple[str, ...] = ()
    in_stock_only: bool = True

    def for_model(self, model: ServingModel, config: Config, purchased: np.ndarray | None = None) -> Filters:
        """The :class:`~recsvc.ranking.Filters` for ``model`` (unknown names/ids simply match nothing)."""
        repurchase = config.repurchase_categories
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
        )


FILTER_PARAMS = ("category", "min_price", "max_price", "exclude")


_NO_FILTERS = FilterArgs()


def parse_filters(args: MultiDict, config: Config) -> FilterArgs:
    """``category`` (several allowed), ``min_price``, ``max_price``, ``exclude`` (item ids)."""
    if not any(name in args for name in FILTER_PARAMS):
        return _NO_FILTERS
    min_price, max_price = parse_price(args, "min_price"), parse_price(args, "max_price")
    if min_price is not None and max_price is not None and min_price > max_price:
        raise bad_request("min_price", "min_price is greater than max_price")
    return FilterArgs(
        categories=parse_categories(args, "category", config.max_categories),
        min_price=min_price,
        max_price=max_price,
        exclude=tuple(parse_id_list(args, "exclude", config.max_exclude)),
    )


# ------------------------------------------------------------------------------------------------
# The model to answer with
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """The model an answer uses, and whether it is the live one from Redis or a fallback."""

    model: ServingModel | None
    degraded: bool
    reason: str | None = None  # redis_unavailable | not_published | None


def fallback_model(reason: str) -> ModelChoice:
    """The in-process copy of the live version, else the newest local artifact, else nothing."""
    svc = services()
    model = svc.models.current() if reason == "redis_unavailable" else None
    if model is None:
        model = svc.models.local_fallback()
    return ModelChoice(model, True, reason)


def live_model() -> ModelChoice:
    """The live model for endpoints without per-user data (pointer re-read at most every second)."""
    svc = services()
    if svc.health.is_down():
        return fallback_model("redis_unavailable")
    try:
        model = svc.models.get(svc.client)
    except REDIS_DOWN_ERRORS as e:
        svc.health.mark_down(e)
        return fallback_model("redis_unavailable")
    except ModelNotPublished:
        return fallback_model("not_published")
    svc.health.mark_up()
    if model is None:
        return fallback_model("not_published")
    return ModelChoice(model, False)


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------


def _item_templates(model: ServingModel) -> list[dict[str, Any]]:
    """Per item, the answer's dict with a placeholder score: ``item_id, score, title, category, price``.

    Built once per model version, so an answer copies 20 small dicts and sets their scores instead
    of looking up four fields per item. The placeholder keeps ``score`` second in the JSON.
    """
    categories = model.categories
    return [
        {
            "item_id": item_id,
            "score": 0.0,
            "title": title,
            "category": categories[code] if code >= 0 else None,
            "price": None if price != price else round(price, 2),  # price != price: NaN, unknown
        }
        for item_id, title, code, price in zip(
            model.item_ids, model.titles, model.category.tolist(), model.price.tolist(), strict=True
        )
    ]


def item_list(model: ServingModel | None, items: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    """Items as the API shows them: ``item_id, score, title, category, price``."""
    if model is None or len(items) == 0:
        return []
    templates = model.memo("api_item_templates", lambda: _item_templates(model))
    # Six decimals keep the answer short; one numpy call rounds them all.
    rounded = np.round(np.asarray(scores, dtype=np.float64), 6).tolist()
    out = []
    for i, score in zip(items.tolist(), rounded, strict=True):
        item = templates[i].copy()
        item["score"] = score
        out.append(item)
    return out


def recommendation_body(
    model: ServingModel | None,
    items: np.ndarray,
    scores: np.ndarray,
    *,
    source: str,
    **extra: Any,
) -> dict[str, Any]:
    """The body of every item-list answer (recommendations, similar, popular, bundles, real time).

    ``{"model_version", "source", "request_id", "items": [...], **extra}``; ``extra`` carries
    endpoint-specific fields such as ``user_id`` or ``reason``.
    """
    body: dict[str, Any] = {
        "model_version": model.version if model is not None else None,
        "source": source,
        "request_id": request_id(),
    }
    body.update(extra)
    body["items"] = item_list(model, items, scores)
    # A/B experiments (issue 7): adds experiment, variant, rec_id and logs the exposure.
    return experiments.tag_answer(body)


def answer(body: dict[str, Any], status: int = 200):
    """A JSON response from a body that already names ``model_version``, ``source``, ``request_id``."""
    body.setdefault("request_id", request_id())
    return current_app.response_class(jsonio.dumps(body), status=status, mimetype="application/json")


def not_found(field: str, message: str) -> ApiError:
    return ApiError(404, "not_found", message, field=field)
