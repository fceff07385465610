"""The bundle endpoints against a real Redis with a published artifact whose bundles are known."""

from __future__ import annotations

import pytest

from recsvc.core.artifact import Artifact, write_artifact
from tests.factories import API_KEY, bundle_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")


@pytest.fixture
def artifact(models_dir) -> Artifact:
    """Bundle candidates as in tests.factories.BUNDLE_ROWS; item 5 out of stock."""
    a = bundle_artifact()
    write_artifact(a, models_dir)
    return a


@pytest.fixture
def config(make_config):
    return make_config(max_body_bytes=4096)


ENVELOPE = {"model_version", "source", "request_id", "items", "bundles"}


def get(client, url, status=200):
    r = client.get(url)
    assert r.status_code == status, r.get_data(as_text=True)
    return r.get_json()


def post(client, body, status=200, **kwargs):
    r = client.post("/v1/bundles", json=body, **kwargs)
    assert r.status_code == status, r.get_data(as_text=True)
    return r.get_json()


def ids(bundle) -> list[str]:
    return [it["item_id"] for it in bundle["items"]]


# ---- GET /v1/items/<id>/bundle -----------------------------------------------------------------


def test_item_bundle_is_priced_and_explained(client, published):
    body = get(client, "/v1/items/i0/bundle")
    assert ENVELOPE <= set(body) and body["model_version"] == published.version
    assert body["source"] == "personalized" and body["item_id"] == "i0"
    [bundle] = body["bundles"]
    # The two items bought with i0 most often, best first: i1, then i4 -- a second shirt, which
    # is allowed because it was really bought together with the anchor.
    assert ids(bundle) == ["i0", "i1", "i4"]
    assert [it["role"] for it in bundle["items"]] == ["anchor", "companion", "companion"]
    assert [it["bought_together"] for it in bundle["items"]] == [0, 12, 10]
    assert [it["category"] for it in bundle["items"]] == ["shoes", "shirts", "shirts"]
    # Each co-purchased companion says with what.
    assert "explanation" not in bundle["items"][0]
    assert bundle["items"][1]["explanation"] == {
        "code": "bought_together",
        "text": "Often bought together with Item 0",
        "because": ["i0"],
    }
    # prices 1 + 2 + 5, 10% off (Config defaults)
    assert (bundle["total_price"], bundle["bundle_price"], bundle["savings"]) == (8.0, 7.2, 0.8)
    assert (
        bundle["reason"] == "bought together by 12 customers" and bundle["reason_code"] == "bought_together"
    )
    assert bundle["discount"] == {"rule": "percent", "percent": 10.0}
    # The flat list of everything shown, in the common item shape.
    assert [it["item_id"] for it in body["items"]] == ["i0", "i1", "i4"]
    assert set(body["items"][0]) >= {"item_id", "score", "title", "category", "price"}


def test_size_max_price_and_discount_rule(client, published, config, make_app):
    # i3 is a shoe like the anchor, bought with it 9 times: it comes before i2 (8 times).
    assert ids(get(client, "/v1/items/i0/bundle?size=4")["bundles"][0]) == ["i0", "i1", "i4", "i3"]
    # 1 + 2 -> 2.70 fits 4.50; adding i4 (5), i3 (4) or i2 (3) does not, nor anything else.
    bundle = get(client, "/v1/items/i0/bundle?max_price=4.5")["bundles"][0]
    assert ids(bundle) == ["i0", "i1"] and bundle["bundle_price"] == 2.7
    cheapest = make_app(config.with_overrides(bundle_discount_rule="cheapest", bundle_discount_pct=50.0))
    bundle = get(cheapest.test_client(), "/v1/items/i0/bundle")["bundles"][0]
    assert (bundle["total_price"], bundle["bundle_price"], bundle["savings"]) == (8.0, 7.5, 0.5)


def test_item_without_co_purchases_still_gets_a_bundle(client, published):
    body = get(client, "/v1/items/i7/bundle")
    [bundle] = body["bundles"]
    assert bundle["items"][0]["item_id"] == "i7" and len(bundle["items"]) == 3
    # Never the anchor's category (shirts), never out of stock (i5), never twice.
    assert all(it["category"] != "shirts" for it in bundle["items"][1:])
    assert "i5" not in ids(bundle) and len(set(ids(bundle))) == 3
    assert bundle["reason_code"] in ("similar_taste", "popular_pairing")


def test_out_of_stock_anchor_gets_no_offer(client, published):
    body = get(client, "/v1/items/i5/bundle")
    assert body["bundles"] == [] and body["note"] == "anchor_unavailable" and body["items"] == []


@pytest.mark.parametrize(
    "url, status, field",
    [
        ("/v1/items/nope/bundle", 404, "item_id"),
        ("/v1/items/bad%20id/bundle", 400, "item_id"),
        ("/v1/items/i0/bundle?size=1", 400, "size"),
        ("/v1/items/i0/bundle?size=11", 400, "size"),
        ("/v1/items/i0/bundle?size=two", 400, "size"),
        ("/v1/items/i0/bundle?size=2&size=3", 400, "size"),
        ("/v1/items/i0/bundle?max_price=-1", 400, "max_price"),
        ("/v1/items/i0/bundle?max_price=nan", 400, "max_price"),
        ("/v1/items/i0/bundle?n=3", 400, "n"),
        ("/v1/users/u1/bundles?n=0", 400, "n"),
        ("/v1/users/u1/bundles?n=11", 400, "n"),
        ("/v1/users/bad%20user/bundles", 400, "user_id"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client, published, url, status, field):
    body = get(client, url, status)
    assert body["field"] == field and body["error"] in ("invalid_request", "not_found") and body["message"]


def test_nothing_published_is_an_empty_fallback_not_an_error(client, artifact, models_dir):
    import shutil

    shutil.rmtree(models_dir)  # no local artifact either
    body = get(client, "/v1/items/i0/bundle")
    assert body["bundles"] == [] and body["source"] == "fallback" and body["reason"] == "not_published"


# ---- POST /v1/bundles ----------------------------------------------------------------------------


def test_cart_completion_without_api_key(client, published):
    body = post(client, {"items": ["i0", "zz-new-item"], "size": 2})
    [bundle] = body["bundles"]
    assert ids(bundle) == ["i0", "i1", "i4"] and body["unknown_items"] == ["zz-new-item"]
    assert [it["role"] for it in bundle["items"]] == ["anchor", "companion", "companion"]
    assert bundle["total_price"] == 8.0 and body["source"] == "personalized"


def test_cart_excludes_what_the_user_already_bought(client, published):
    # u1 bought i1: the next ones bought with i0, i4 and i3, take its place.
    bundle = post(client, {"items": ["i0"], "user_id": "u1"})["bundles"][0]
    assert ids(bundle) == ["i0", "i4", "i3"]


def test_cart_budget_and_defaults(client, published):
    bundle = post(client, {"items": ["i0", "i1"], "max_price": 5.5})["bundles"][0]
    # default size: bundle_size - 1 = 2 to add; 1 + 2 + 3 = 6 -> 5.40 fits, nothing else does.
    assert ids(bundle) == ["i0", "i1", "i2"] and bundle["bundle_price"] == 5.4


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": "i0"}, "items"),
        ({"items": ["i0", "bad id"]}, "items[1]"),
        ({"items": ["i0", 7]}, "items[1]"),
        ({"items": [f"i{i}" for i in range(101)]}, "items"),
        ({"items": ["i0"], "size": 0}, "size"),
        ({"items": ["i0"], "size": True}, "size"),
        ({"items": ["i0"], "size": 2.5}, "size"),
        ({"items": ["i0"], "max_price": -3}, "max_price"),
        ({"items": ["i0"], "max_price": "10"}, "max_price"),
        ({"items": ["i0"], "user_id": "bad id"}, "user_id"),
        ({"items": ["i0"], "user_id": 5}, "user_id"),
        ({"items": ["i0"], "cart": []}, "cart"),
        ([], "body"),
    ],
)
def test_bad_cart_is_a_400_naming_the_field(client, published, body, field):
    answer = post(client, body, 400)
    assert answer["field"] == field and answer["error"] == "invalid_request"


def test_cart_body_is_bounded(client, published):
    r = client.post(
        "/v1/bundles", data=b'{"items": ["' + b"a" * 5000 + b'"]}', content_type="application/json"
    )
    assert r.status_code == 413
    r = client.post("/v1/bundles", data=b"{not json", content_type="application/json")
    assert r.status_code == 400 and r.get_json()["field"] == "body"


# ---- GET /v1/users/<id>/bundles ------------------------------------------------------------------


def test_user_bundles_from_recommendations(client, published):
    body = get(client, "/v1/users/u1/bundles")
    assert body["user_id"] == "u1" and body["source"] == "personalized"
    bundles = body["bundles"]
    assert 1 <= len(bundles) <= 3
    shown = [i for b in bundles for i in ids(b)]
    assert len(shown) == len(set(shown)) and "i1" not in shown  # u1 bought i1
    assert "i5" not in shown  # out of stock
    assert bundles[0]["anchor_source"] == "personalized"
    assert [it["item_id"] for it in body["items"]] == shown


def test_user_bundles_follow_recent_views(client, published):
    event = {"user_id": "u1", "item_id": "i0", "event": "view", "timestamp": 1_900_000_000}
    r = client.post("/v1/events", json=event, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 202, r.get_data(as_text=True)
    body = get(client, "/v1/users/u1/bundles?n=2&size=3")
    assert body["source"] == "realtime" and len(body["bundles"]) == 2
    first = body["bundles"][0]
    assert first["anchor_item_id"] == "i0" and first["anchor_source"] == "realtime"
    assert ids(first) == ["i0", "i4", "i3"]  # i1 was bought by u1


def test_unknown_user_gets_popular_anchors(client, published):
    body = get(client, "/v1/users/stranger/bundles?n=1")
    [bundle] = body["bundles"]
    assert body["source"] == "fallback" and bundle["anchor_source"] == "fallback"
    assert ids(bundle) == ["i0", "i1", "i4"]  # i0 is the most popular item
