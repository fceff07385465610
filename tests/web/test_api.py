"""The HTTP API against a real Redis with a published artifact: answers, filters, validation, admin."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.core.artifact import write_artifact
from recsvc.storage import versions
from tests.factories import API_KEY, expected_top, make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

ENVELOPE = {"model_version", "source", "request_id"}
ITEM_FIELDS = {"item_id", "score", "title", "category", "price"}


def item_ids(body) -> list[str]:
    return [it["item_id"] for it in body["items"]]


def get(client, url, status=200, **kwargs):
    r = client.get(url, **kwargs)
    assert r.status_code == status, r.get_data(as_text=True)
    return r.get_json()


# ---- recommendations ---------------------------------------------------------------------------


def test_known_user_gets_the_models_top_n(client, published):
    body = get(client, "/v1/users/u3/recommendations?n=5")
    assert ENVELOPE <= set(body)
    assert body["model_version"] == published.version and body["source"] == "personalized"
    assert body["user_id"] == "u3"
    assert item_ids(body) == expected_top(published, 3, 5)
    first = body["items"][0]
    assert set(first) == ITEM_FIELDS | {"explanation"}
    lean = get(client, "/v1/users/u3/recommendations?n=5&explain=false")
    assert item_ids(lean) == item_ids(body) and set(lean["items"][0]) == ITEM_FIELDS
    i = int(first["item_id"][1:])
    assert first["title"] == f"Item {i}" and first["price"] == i + 1
    assert first["category"] == ("shoes", "shirts", "hats")[i % 3]
    assert first["score"] == pytest.approx(
        float(published.item_factors[i] @ published.user_factors[3]), rel=1e-5
    )


def test_default_n_and_already_purchased_excluded(client, published):
    body = get(client, "/v1/users/u7/recommendations")
    assert len(body["items"]) == 10
    assert "i7" not in item_ids(body)  # u7 bought i7


def test_repurchase_categories_are_not_excluded(published, config, redis_client, make_app):
    # u1 bought i1 (category shirts); with shirts as a repurchase category i1 may come back.
    app = make_app(config.with_overrides(repurchase_categories=("shirts",)))
    body = get(app.test_client(), "/v1/users/u1/recommendations?n=50")
    assert "i1" in item_ids(body)
    scores = published.item_factors @ published.user_factors[1]
    assert item_ids(body) == [f"i{i}" for i in np.lexsort((np.arange(50), -scores))]


@pytest.mark.parametrize(
    ("query", "check"),
    [
        ("category=hats", lambda i: i % 3 == 2),
        ("category=hats,shoes", lambda i: i % 3 in (0, 2)),
        ("category=hats&category=shoes", lambda i: i % 3 in (0, 2)),
        ("min_price=20", lambda i: i + 1 >= 20),
        ("max_price=12.5", lambda i: i + 1 <= 12.5),
        ("min_price=5&max_price=30&category=shirts", lambda i: 5 <= i + 1 <= 30 and i % 3 == 1),
    ],
)
def test_filters(client, published, query, check):
    body = get(client, f"/v1/users/u2/recommendations?n=8&{query}")
    ids = [int(x[1:]) for x in item_ids(body)]
    assert len(ids) == 8 and all(check(i) for i in ids)
    allowed = np.array([check(i) for i in range(50)])
    assert item_ids(body) == expected_top(published, 2, 8, allowed=allowed)


def test_exclude_ids_and_unknown_ids_in_exclude(client, published):
    top = item_ids(get(client, "/v1/users/u4/recommendations?n=3"))
    body = get(client, f"/v1/users/u4/recommendations?n=3&exclude={top[0]},{top[2]},not-an-item")
    assert top[0] not in item_ids(body) and top[2] not in item_ids(body)
    assert item_ids(body)[0] == top[1]


def test_out_of_stock_items_are_never_recommended(redis_client, models_dir, config, client):
    a = make_artifact(seed=4)
    a.available[::2] = False
    write_artifact(a, models_dir)
    versions.publish(redis_client, a, config)
    body = get(client, "/v1/users/u5/recommendations?n=30")
    # 25 odd items are in stock, and u5 bought i5: every one of the other 24, nothing else.
    assert sorted(int(x[1:]) for x in item_ids(body)) == [i for i in range(1, 50, 2) if i != 5]


def test_short_cache_is_completed_by_full_scoring(redis_client, artifact, config, make_app):
    # Only 5 items cached per user; asking 10 in one category forces full scoring with the factors.
    versions.publish(redis_client, artifact, config.with_overrides(topk_cached=5))
    client = make_app(config).test_client()
    body = get(client, "/v1/users/u6/recommendations?n=10&category=shirts")
    allowed = np.arange(50) % 3 == 1
    assert item_ids(body) == expected_top(artifact, 6, 10, allowed=allowed)
    assert len(set(item_ids(body))) == 10


def test_fewer_than_n_only_when_the_catalog_has_fewer(client, published):
    body = get(client, "/v1/users/u0/recommendations?n=100&category=hats&max_price=10")
    # hats priced <= 10: i2, i5, i8 (u0 bought i0, a shoe)
    assert sorted(item_ids(body)) == ["i2", "i5", "i8"]


def test_unknown_user_gets_popular_in_the_asked_category(client, published):
    body = get(client, "/v1/users/visitor-42/recommendations?n=4&category=shirts")
    assert body["source"] == "fallback" and body["reason"] == "unknown_user"
    assert item_ids(body) == ["i1", "i4", "i7", "i10"]  # popularity = 50 - index
    assert [it["score"] for it in body["items"]] == [49, 46, 43, 40]


def test_a_new_version_is_served_by_the_next_request(client, published, redis_client, models_dir, config):
    assert get(client, "/v1/users/u1/recommendations")["model_version"] == published.version
    a2 = make_artifact(seed=8)
    write_artifact(a2, models_dir)
    versions.publish(redis_client, a2, config)
    body = get(client, "/v1/users/u1/recommendations?n=5")
    assert body["model_version"] == a2.version
    assert item_ids(body) == expected_top(a2, 1, 5)
    versions.rollback(redis_client, config)
    assert get(client, "/v1/users/u1/recommendations")["model_version"] == published.version


# ---- items -------------------------------------------------------------------------------------


def test_similar_items(client, published):
    body = get(client, "/v1/items/i3/similar?n=4")
    unit = published.item_factors / np.linalg.norm(published.item_factors, axis=1, keepdims=True)
    cos = unit @ unit[3]
    cos[3] = -np.inf
    assert item_ids(body) == [f"i{i}" for i in np.argsort(-cos, kind="stable")[:4]]
    assert body["source"] == "personalized" and body["item_id"] == "i3"
    body = get(client, "/v1/items/i3/similar?n=3&category=hats&exclude=" + item_ids(body)[0])
    assert all(int(x[1:]) % 3 == 2 for x in item_ids(body)) and len(body["items"]) == 3


def test_similar_for_an_item_the_model_does_not_know(client, published):
    body = get(client, "/v1/items/new-product/similar?n=2")
    assert body["source"] == "fallback" and body["reason"] == "unknown_item"
    assert item_ids(body) == ["i0", "i1"]


def test_popular(client, published):
    body = get(client, "/v1/popular?n=3")
    assert item_ids(body) == ["i0", "i1", "i2"] and body["source"] == "fallback"
    assert body["model_version"] == published.version
    assert item_ids(get(client, "/v1/popular?n=3&category=hats&min_price=10")) == ["i11", "i14", "i17"]
    assert get(client, "/v1/popular?category=no-such-category")["items"] == []


# ---- model and health ----------------------------------------------------------------------------


def test_model_and_health(client, published):
    body = get(client, "/v1/model")
    assert body["model_version"] == published.version
    assert body["model"]["counts"]["users"] == 20 and body["model"]["categories"] == [
        "shoes",
        "shirts",
        "hats",
    ]
    assert body["versions"][0]["live"] is True
    assert get(client, "/health/live")["status"] == "ok"
    ready = get(client, "/health/ready")
    assert ready["status"] == "ready" and ready["checks"]["redis"] == "ok"


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/users/u1/recommendations?n=0", "n"),
        ("/v1/users/u1/recommendations?n=101", "n"),
        ("/v1/users/u1/recommendations?n=ten", "n"),
        ("/v1/users/u1/recommendations?n=1&n=2", "n"),
        ("/v1/users/u1/recommendations?count=5", "count"),
        ("/v1/users/u1/recommendations?n=ten&count=5", "count"),  # an unknown name comes first
        ("/v1/users/u1/recommendations?min_price=-1", "min_price"),
        ("/v1/users/u1/recommendations?max_price=abc", "max_price"),
        ("/v1/users/u1/recommendations?max_price=inf", "max_price"),
        ("/v1/users/u1/recommendations?exclude=ok,bad%20id", "exclude"),
        ("/v1/users/u1/recommendations?exclude=" + ",".join(f"i{i}" for i in range(201)), "exclude"),
        ("/v1/users/u1/recommendations?category=", "category"),
        ("/v1/users/u1/recommendations?category=" + ",".join(f"c{i}" for i in range(21)), "category"),
        ("/v1/users/bad%20id/recommendations", "user_id"),
        ("/v1/users/" + "u" * 129 + "/recommendations", "user_id"),
        ("/v1/users/%C3%A9/recommendations", "user_id"),
        ("/v1/items/bad!id/similar", "item_id"),
        ("/v1/items/i1/similar?n=500", "n"),
        ("/v1/popular?user=u1", "user"),
        ("/v1/model?verbose=1", "verbose"),
        ("/health/ready?x=1", "x"),
        ("/openapi.json?x=1", "x"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client, published, url, field):
    r = client.get(url)
    assert r.status_code == 400
    body = r.get_json()
    assert body["error"] == "invalid_request" and body["field"] == field and body["message"]
    assert body["request_id"] == r.headers["X-Request-ID"]


def test_bad_ids_never_touch_redis(client, published, redis_client):
    before = redis_client.info("stats")["total_commands_processed"]
    assert client.get("/v1/users/x%2Ay/recommendations").status_code == 400
    after = redis_client.info("stats")["total_commands_processed"]
    assert after - before == 1  # only our own INFO call


def test_unknown_route_is_a_json_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"


def test_request_id_is_echoed_when_valid(client, published):
    r = client.get("/v1/popular", headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123" and r.get_json()["request_id"] == "abc-123"
    r = client.get("/v1/popular", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["X-Request-ID"] != "bad id with spaces"
    assert r.get_json()["request_id"] == r.headers["X-Request-ID"] and len(r.headers["X-Request-ID"]) == 32


# ---- admin ----------------------------------------------------------------------------------------


def test_admin_is_disabled_without_configured_keys(config, artifact, make_app):
    client = make_app(config.with_overrides(api_keys=())).test_client()
    for url in ("/v1/admin/publish", "/v1/admin/rollback"):
        r = client.post(url, json={}, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and r.get_json()["error"] == "disabled"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": API_KEY + "x"},
        {"Authorization": "Basic " + API_KEY},
    ],
)
def test_admin_needs_the_right_key(client, artifact, headers, redis_client):
    r = client.post("/v1/admin/publish", json={"version": "latest"}, headers=headers)
    assert r.status_code == 401 and r.get_json()["error"] == "unauthorized"
    assert API_KEY not in r.get_data(as_text=True)
    assert versions.current_version(redis_client) is None


def test_admin_publish_and_rollback(client, artifact, models_dir, admin_headers, redis_client):
    r = client.post("/v1/admin/publish", json={"version": "latest"}, headers=admin_headers)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["published"] == artifact.version and r.get_json()["previous"] is None
    a2 = make_artifact(seed=3)
    write_artifact(a2, models_dir)
    r = client.post("/v1/admin/publish", json={"version": a2.version}, headers={"X-API-Key": API_KEY})
    assert r.get_json()["published"] == a2.version and r.get_json()["previous"] == artifact.version
    assert get(client, "/v1/users/u1/recommendations")["model_version"] == a2.version
    r = client.post("/v1/admin/rollback", headers=admin_headers)
    assert r.status_code == 200 and r.get_json()["model_version"] == artifact.version
    assert get(client, "/v1/users/u1/recommendations")["model_version"] == artifact.version
    r = client.post("/v1/admin/rollback", headers=admin_headers)
    assert r.status_code == 409 and r.get_json()["error"] == "no_previous_version"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"version": "../../etc"}, 400, "version"),
        ({"version": "/tmp/models/x"}, 400, "version"),
        ({"version": 5}, 400, "version"),
        ({"version": "20990101T000000Z-nope"}, 404, "version"),
        ({"version": "latest", "force": True}, 400, "force"),
        ([1, 2], 400, "body"),
    ],
)
def test_admin_publish_rejects_bad_bodies(client, artifact, admin_headers, body, status, field):
    r = client.post("/v1/admin/publish", json=body, headers=admin_headers)
    assert r.status_code == status and r.get_json()["field"] == field


def test_admin_publish_invalid_json_and_oversized_body(config, artifact, admin_headers, make_app):
    client = make_app(config.with_overrides(max_body_bytes=1000)).test_client()
    r = client.post(
        "/v1/admin/publish", data="{not json", headers=admin_headers, content_type="application/json"
    )
    assert r.status_code == 400 and r.get_json()["field"] == "body"
    big = '{"version": "' + "x" * 2000 + '"}'
    r = client.post("/v1/admin/publish", data=big, headers=admin_headers, content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"] == "request_entity_too_large"


def test_min_price_above_max_price_is_an_empty_list_not_an_error(client, published):
    """Each bound alone is valid (the document says so); together no item passes both."""
    r = client.get("/v1/users/u1/recommendations?min_price=9&max_price=3")
    assert r.status_code == 200 and r.get_json()["items"] == []


@pytest.mark.parametrize(
    "header, status",
    [("req-1.a:b", 200), ("", 400), ("has space", 400), ("x" * 129, 400)],
)
def test_x_request_id_is_kept_when_valid_and_refused_otherwise(client, published, header, status):
    r = client.get("/v1/popular?n=1", headers={"X-Request-ID": header})
    assert r.status_code == status
    if status == 200:
        assert r.headers["X-Request-ID"] == header
    else:
        assert r.get_json()["field"] == "X-Request-ID"
