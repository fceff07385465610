"""The OpenAPI document (recsvc/web/openapi.json) describes every route the app registers, and only those."""

from __future__ import annotations

import re

from recsvc.web.views.docs import openapi_document

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def _routes(app, console: bool = False) -> set[tuple[str, str]]:
    """The app's (path, method) pairs: the JSON API's, or with ``console`` the console's HTML pages
    (declared in ``declare.console_endpoints``, not part of the API document)."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/console") != console:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - IGNORED_METHODS:
            out.add((path, method.lower()))
    return out


def _documented(doc) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete"}
    return {(path, m) for path, item in doc["paths"].items() for m in item if m in methods}


def test_every_route_is_documented_and_every_documented_route_exists(app):
    doc = openapi_document()
    routes, documented = _routes(app), _documented(doc)
    assert routes - documented == set(), "routes missing from recsvc/web/openapi.json"
    assert documented - routes == set(), "recsvc/web/openapi.json documents routes the app does not have"


def test_document_is_openapi_3_and_references_resolve(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    doc = r.get_json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "recsvc"
    text = r.get_data(as_text=True)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node = doc
        for part in ref.split("/"):
            assert part in node, f"unresolved $ref #/{ref}"
            node = node[part]
    for path, item in doc["paths"].items():
        params = set(re.findall(r"{([^}]+)}", path))
        for op in item.values():
            declared = set()
            for p in op.get("parameters", []):
                if "$ref" in p:
                    p = doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
                if p["in"] == "path":
                    declared.add(p["name"])
            assert declared == params, f"{path}: path parameters {params} declared as {declared}"
            assert "responses" in op and op["responses"]


SERVING_GETS = (
    "/v1/users/{user_id}/recommendations",
    "/v1/users/{user_id}/buy-again",
    "/v1/items/{item_id}/similar",
    "/v1/popular",
    "/v1/model",
    "/health/live",
    "/health/ready",
    "/openapi.json",
)


def test_query_parameters_in_the_document_are_the_ones_the_app_accepts(client, published):
    doc = openapi_document()
    for path in SERVING_GETS:
        op = doc["paths"][path]["get"]
        names = []
        for p in op.get("parameters", []):
            if "$ref" in p:
                p = doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
            if p["in"] == "query":
                names.append(p["name"])
        url = path.replace("{user_id}", "u1").replace("{item_id}", "i1")
        sample = {
            "n": "2",
            "category": "hats",
            "min_price": "1",
            "max_price": "90",
            "exclude": "i9",
            "include_due": "true",
            "horizon_days": "14",
            "as_of": "1719000000",
            "explain": "true",
        }
        query = "&".join(f"{n}={sample.get(n, 'x')}" for n in names)
        r = client.get(f"{url}?{query}" if query else url)
        assert r.status_code in (200, 503), (path, r.get_json())
