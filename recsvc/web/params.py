"""Request parsing for every endpoint: each failure is a 400 naming the field.

Query parameters not in an endpoint's list are rejected (a typo such as ``?categroy=`` must not
silently serve unfiltered items); ids are checked against the id contract before they touch a key;
every count and size is bounded by the configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flask import request
from werkzeug.datastructures import MultiDict

from recsvc.core.config import Config
from recsvc.core.ids import MAX_ID_LENGTH, is_valid_id
from recsvc.serving.recommender import NO_FILTERS, FilterArgs
from recsvc.web.errors import bad_request

FILTER_PARAMS = ("category", "min_price", "max_price", "exclude")


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


def single(args: MultiDict, name: str) -> str | None:
    """The one value of a parameter (None when absent); 400 when it is given twice."""
    values = args.getlist(name)
    if len(values) > 1:
        raise bad_request(name, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_n(args: MultiDict, config: Config, name: str = "n") -> int:
    """``n`` in ``1..max_n`` (default ``default_n``)."""
    serving = config.serving
    raw = single(args, name)
    if raw is None or raw == "":
        return serving.default_n
    return int_value(raw, name, 1, serving.max_n)


def int_value(raw: Any, field: str, low: int, high: int) -> int:
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


def query_int(args: MultiDict, name: str, low: int, high: int, default: int) -> int:
    """An optional integer query parameter in ``low..high``."""
    raw = single(args, name)
    if raw is None or raw == "":
        return default
    return int_value(raw, name, low, high)


def parse_id(value: Any, field: str) -> str:
    """``value`` if it satisfies the id contract, else a 400 naming ``field``."""
    if is_valid_id(value):
        return value
    if not isinstance(value, str):
        raise bad_request(field, f"{field} must be a string")
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


def parse_categories(args: MultiDict, name: str, limit: int) -> tuple[str, ...] | None:
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
    return tuple(dict.fromkeys(values))


def parse_price(args: MultiDict, name: str) -> float | None:
    """A finite, non-negative number, or None when absent."""
    raw = single(args, name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(name, f"{name} must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise bad_request(name, f"{name} must be a finite number >= 0")
    return value


def price_value(raw: Any, field: str) -> float | None:
    """A finite, non-negative JSON number, or None when absent."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        raise bad_request(field, f"{field} must be a finite number >= 0")
    return float(raw)


def parse_bool(args: MultiDict, name: str, default: bool) -> bool:
    raw = single(args, name)
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

    The body size is capped by ``MAX_CONTENT_LENGTH`` (``serving.max_body_bytes``): larger bodies
    get 413.
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


def parse_filters(args: MultiDict, config: Config) -> FilterArgs:
    """``category`` (several allowed), ``min_price``, ``max_price``, ``exclude`` (item ids)."""
    if not any(name in args for name in FILTER_PARAMS):
        return NO_FILTERS
    min_price, max_price = parse_price(args, "min_price"), parse_price(args, "max_price")
    if min_price is not None and max_price is not None and min_price > max_price:
        raise bad_request("min_price", "min_price is greater than max_price")
    serving = config.serving
    return FilterArgs(
        categories=parse_categories(args, "category", serving.max_categories),
        min_price=min_price,
        max_price=max_price,
        exclude=tuple(parse_id_list(args, "exclude", serving.max_exclude)),
    )
