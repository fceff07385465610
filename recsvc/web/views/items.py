"""``GET /v1/items/<item_id>/similar`` and ``GET /v1/popular``: item lists that need no user data."""

from __future__ import annotations

from flask import Blueprint

from recsvc.web.params import FILTER_PARAMS, parse_filters, parse_id, parse_n, query_args
from recsvc.web.render import render
from recsvc.web.services import services

bp = Blueprint("items", __name__)

PARAMS = frozenset(("n", *FILTER_PARAMS))


@bp.get("/v1/items/<item_id>/similar")
def similar(item_id: str):
    """Items closest to ``item_id`` (cosine of item factors), filtered; popular for unknown items."""
    item_id = parse_id(item_id, "item_id")
    args = query_args(PARAMS)
    svc = services()
    result = svc.recommender.similar(item_id, parse_n(args, svc.config), parse_filters(args, svc.config))
    return render(result)


@bp.get("/v1/popular")
def popular():
    """The most popular items (overall, or in the asked categories), filtered."""
    args = query_args(PARAMS)
    svc = services()
    return render(svc.recommender.popular(parse_n(args, svc.config), parse_filters(args, svc.config)))
