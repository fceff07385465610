"""``GET /openapi.json``: the OpenAPI 3 document of the whole API.

The hand-written base (``recsvc/web/openapi.json``: summaries, request bodies, answers) is
completed with every operation's parameters from :mod:`recsvc.web.declare`, the same objects the
views validate with. A test checks that every registered route and method appears in the document
(see docs/serving.md, "Adding a path").
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app

from recsvc.core.config import Config
from recsvc.web.declare import event_timestamp_schema, openapi_parameters
from recsvc.web.params import declared
from recsvc.web.services import services

bp = Blueprint("docs", __name__)


@functools.cache
def base_document() -> dict[str, Any]:
    """The hand-written part of the document shipped in the package (``recsvc/web/openapi.json``):
    summaries, bodies, answers. Operations there carry no ``parameters``."""
    return json.loads(resources.files("recsvc.web").joinpath("openapi.json").read_text(encoding="utf-8"))


def openapi_document(config: Config | None = None) -> dict[str, Any]:
    """The served document: the base, with every operation's ``parameters`` from the declarations
    the views validate with (:mod:`recsvc.web.declare`) and the gunicorn-level errors answered."""
    doc = copy.deepcopy(base_document())
    parameters = openapi_parameters(config or Config())
    schemas = doc["components"]["schemas"]
    schemas["Event"]["properties"]["timestamp"] = event_timestamp_schema()
    for name in ("start", "end"):  # an experiment's: the same times, or empty / null for "none"
        times = schemas["ExperimentDefinition"]["properties"][name]
        times["anyOf"] = [*event_timestamp_schema()["anyOf"], {"type": "string", "maxLength": 0}]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            op["parameters"] = parameters(method, path)
            op["responses"].update({k: v for k, v in COMMON_RESPONSES.items() if k not in op["responses"]})
    return doc


#: Answers any operation can get before (or whatever) its view runs.
COMMON_RESPONSES: dict[str, Any] = {
    str(status): {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for status, text in (
        (408, "The request body did not arrive in time (`RECSVC_BODY_TIMEOUT_S`)."),
        (414, "The request line is longer than the server takes."),
        (431, "The request headers are larger than the server takes."),
    )
}


@bp.get("/openapi.json")
def openapi():
    declared()
    cached = current_app.extensions.get("recsvc.openapi")
    if cached is None:
        cached = json.dumps(openapi_document(services().config), indent=2).encode("utf-8")
        current_app.extensions["recsvc.openapi"] = cached
    return Response(cached, mimetype="application/json")
