"""Request parsing for every endpoint: each failure is a 400 naming the field.

Query parameters not in an endpoint's list are rejected (a typo such as ``?categroy=`` must not
silently serve unfiltered items); ids are checked against the id contract before they touch a key;
every count and size is bounded by the configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from recsvc.core.ids import MAX_ID_LENGTH, is_valid_id
from recsvc.serving.recommender import NO_FILTERS, FilterArgs
from recsvc.web.errors import bad_request

FILTER_PARAMS = ("category", "min_price", "max_price", "exclude")


@dataclass(frozen=True)
class QuerySpec:
    """One endpoint's query parameters, arranged once for the request path."""

    by_name: dict[str, Any]  # name -> declared parameter (:class:`recsvc.web.declare.Param`)
    required: tuple[str, ...]
    absent: dict[str, None]  # every name, None: the values of a request without a query string
    expected: str  # the names, for the unknown-parameter message

    @classmethod
    def of(cls, params: Iterable[Any]) -> QuerySpec:
        query = [p for p in params if p.where == "query"]
        names = sorted(p.name for p in query)
        return cls(
            by_name={p.name: p for p in query},
            required=tuple(p.name for p in query if p.required),
            absent=dict.fromkeys((p.name for p in query), None),
            expected=", ".join(names) or "none",
        )


def query_specs(table: dict[tuple[str, str], tuple[Any, ...]]) -> dict[tuple[str, str], QuerySpec]:
    """:class:`QuerySpec` per (HTTP method, Flask rule) of :func:`recsvc.web.declare.by_rule`."""
    return {key: QuerySpec.of(params) for key, params in table.items()}


def declared() -> dict[str, Any]:
    """The request's query parameters parsed by the endpoint's declaration (:mod:`recsvc.web.declare`).

    Every declared name is in the result (None when absent); a name the endpoint does not declare
    is a 400 naming it. Only the parameters a request carries are parsed.
    """
    spec: QuerySpec = current_app.extensions["recsvc.query"][(request.method, request.url_rule.rule)]  # type: ignore[union-attr]
    values = dict(spec.absent)
    args = request.args
    if args:
        for name in args:  # every name first: an unknown one is the error, whatever else is wrong
            if name not in spec.by_name:
                raise bad_request(name, f"unknown query parameter {name!r} (expected: {spec.expected})")
        for name in args:
            values[name] = spec.by_name[name].parse(args.getlist(name))
    for name in spec.required:
        if values[name] is None:
            raise bad_request(name, f"{name} is required")
    return values


def filter_args(values: dict[str, Any]) -> FilterArgs:
    """``category``, ``min_price``, ``max_price``, ``exclude`` from :func:`declared` values.

    ``min_price`` above ``max_price`` is no error: no item passes both bounds (an empty list).
    """
    if all(values.get(name) is None for name in FILTER_PARAMS):
        return NO_FILTERS
    return FilterArgs(
        categories=values["category"],
        min_price=values["min_price"],
        max_price=values["max_price"],
        exclude=values["exclude"] or (),
    )


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


def price_value(raw: Any, field: str) -> float | None:
    """A finite, non-negative JSON number, or None when absent."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        raise bad_request(field, f"{field} must be a finite number >= 0")
    return float(raw)


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
