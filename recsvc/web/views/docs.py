"""``GET /openapi.json``: the OpenAPI 3 document of the whole API (``recsvc/web/openapi.json``).

The document is one JSON file that every area edits when it adds a route; a test checks that every
registered route and method appears in it (see docs/serving.md, "Adding a path").
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from flask import Blueprint, Response

from recsvc.web.params import query_args

bp = Blueprint("docs", __name__)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The parsed OpenAPI document shipped in the package."""
    return json.loads(resources.files("recsvc.web").joinpath("openapi.json").read_text(encoding="utf-8"))


@functools.cache
def _document_bytes() -> bytes:
    return json.dumps(openapi_document(), indent=2).encode("utf-8")


@bp.get("/openapi.json")
def openapi():
    query_args(())
    return Response(_document_bytes(), mimetype="application/json")
