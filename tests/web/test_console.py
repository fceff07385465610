"""The merchandiser console: who may see it, and what each page shows (a real Redis, a published blend)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from recsvc.analytics import registry
from recsvc.core.artifact import write_artifact, write_document
from recsvc.storage import versions
from recsvc.web import sessions
from tests.factories import API_KEY, blend_artifact, bundle_candidates

AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = 1_718_000_000


@pytest.fixture
def artifact(models_dir):
    a = blend_artifact(seed=1)
    a.manifest["trained_until"] = T
    a.bundles = bundle_candidates(50)
    a.manifest["metrics"] = {
        "model": {
            "ndcg@10": 0.31,
            "ndcg@10_ci": [0.28, 0.34],
            "buckets": {"3-9": {"ndcg@10": 0.3, "users": 40}},
        },
        "popularity": {"ndcg@10": 0.12, "ndcg@10_ci": [0.1, 0.14], "buckets": {"3-9": {"ndcg@10": 0.11}}},
        "warnings": ["a warning worth showing"],
        "comparison": {
            "metric": "ndcg@10", "model": 0.31, "baseline": 0.12, "best_baseline": "popularity",
            "ratio": 2.58, "ratio_ci": [2.1, 3.0],
        },
    }  # fmt: skip
    path = write_artifact(a, models_dir)
    write_document(path, "report.html", b"<!doctype html><title>report</title><h1>Training report</h1>")
    return a


@pytest.fixture
def client(redis_client, artifact, config, make_app):
    versions.publish(redis_client, artifact, config)
    return make_app(config).test_client()


def signed_in(client):
    r = client.post("/console/login", data={"key": API_KEY})
    assert r.status_code == 303 and r.headers["Location"].endswith("/console")
    return client


def text(r) -> str:
    return re.sub(r"\s+", " ", r.get_data(as_text=True))


@pytest.mark.parametrize(
    "path", ["/console", "/console/users?user_id=u6", "/console/items?item_id=i0", "/console/models"]
)
def test_without_a_key_every_page_is_refused_with_the_login_form(client, path):
    r = client.get(path)
    assert r.status_code == 401
    assert 'name="key"' in r.get_data(as_text=True) and "i0" not in text(r).split("<main>")[1]


def test_a_wrong_key_is_refused_and_counts_towards_the_throttle(client, config, make_app):
    app = make_app(config.with_overrides(auth_failures_per_min=2))
    c = app.test_client()
    for _ in range(2):
        r = c.post("/console/login", data={"key": "not-the-key-0123456789"})
        assert r.status_code == 401 and "not valid" in r.get_data(as_text=True)
        assert sessions.COOKIE not in r.headers.get("Set-Cookie", "")
    r = c.post("/console/login", data={"key": API_KEY})  # throttled: even the right key waits
    assert r.status_code == 429


def test_login_sets_a_strict_http_only_cookie_that_opens_the_console(client):
    r = client.post("/console/login", data={"key": API_KEY})
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert API_KEY not in cookie
    assert client.get("/console").status_code == 200
    # The cookie is for the console only; it opens no API endpoint.
    assert client.post("/v1/admin/rollback").status_code == 401
    client.post("/console/logout")
    assert client.get("/console").status_code == 401


def test_sessions_expire_and_die_with_their_key():
    token = sessions.issue(API_KEY, 60, now=1000)
    assert sessions.valid(token, (API_KEY,), now=1059)
    assert not sessions.valid(token, (API_KEY,), now=1061)
    assert not sessions.valid(token, ("another-key-0123456789",), now=1000)
    assert not sessions.valid(token.replace(".", ".0", 1)[:-1], (API_KEY,), now=1000)
    assert not sessions.valid("9999999999." + "0" * 64, (API_KEY,), now=1000)


def test_a_cross_site_login_is_refused(client):
    r = client.post("/console/login", data={"key": API_KEY}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


def test_without_configured_keys_the_console_is_disabled(config, make_app, redis_client, artifact):
    c = make_app(config.with_overrides(api_keys=())).test_client()
    assert c.get("/console").status_code == 403
    assert c.post("/console/login", data={"key": API_KEY}).status_code == 403


def test_a_bearer_key_opens_pages_for_scripts(client):
    assert client.get("/console/models", headers=AUTH).status_code == 200
    assert (
        client.get("/console/models", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code
        == 401
    )


def test_pages_allow_no_script(client):
    r = signed_in(client).get("/console")
    assert "script-src" not in r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "<script" not in r.get_data(as_text=True)
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"


def test_user_page_shows_history_recommendations_with_reasons_and_bundles(client, redis_client):
    signed_in(client)
    event = {"user_id": "u6", "item_id": "i30", "event": "view", "timestamp": int(time.time())}
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    page = text(client.get("/console/users?user_id=u6"))
    assert "known to model" in page
    # The same list and reasons as the API's answer.
    api = client.get("/v1/users/u6/recommendations?n=10").get_json()
    for item in api["items"]:
        assert item["explanation"]["text"] in page
    assert "Because you just viewed Item 30" in page
    # Recent activity (the new view) and the training history with the purchase marked.
    recent = page.split('id="recent"')[1].split("</table>")[0]
    assert "view" in recent and "Item 30" in recent
    history = page.split('id="history"')[1].split("</table>")[0]
    assert "Item 6" in history and "bought" in history
    assert 'id="bundles"' in page and "saves" in page
    assert 'experiment: <strong id="experiment">none' in page


def test_user_page_names_the_experiment_variant_without_logging_an_exposure(client, redis_client):
    signed_in(client)
    definition = {
        "variants": [{"name": "control", "share": 50}, {"name": "pop", "strategy": "popular", "share": 50}]
    }
    assert client.put("/v1/admin/experiments/hp", json=definition, headers=AUTH).status_code == 201
    arm = {
        u: client.get(f"/v1/admin/experiments/hp/assignment?user_id={u}", headers=AUTH).get_json()["variant"]
        for u in (f"u{i}" for i in range(20))
    }
    user = next(u for u, variant in arm.items() if variant == "pop")
    page = text(client.get(f"/console/users?user_id={user}"))
    assert "hp / variant pop (popular)" in page and "Trending in" in page
    # The API's answer is an exposure; the console's look is not: one logged, from the API.
    client.get(f"/v1/users/{user}/recommendations")
    client.application.extensions["recsvc"].served_log.close()
    assert registry.read_served(redis_client, "hp")["user_id"].tolist() == [user]


def test_unknown_user_page_says_so(client):
    page = text(signed_in(client).get("/console/users?user_id=nobody"))
    assert "not in model" in page and "Trending" in page


def test_item_page_shows_similar_items_bundle_prices_buyers_and_stock(client, artifact):
    page = text(signed_in(client).get("/console/items?item_id=i0"))
    buyers = int(np.count_nonzero(artifact.purchases[:, 0].toarray()))
    assert f"Bought by <strong>{buyers}</strong>" in page
    assert "in stock" in page
    assert page.count('class="card bundle"') == 1 and "bundle price" in page and "saves" in page
    similar = page.split('id="similar"')[1].split("</table>")[0]
    assert similar.count("<tr>") == 11  # header + 10 similar items


def test_models_page_shows_versions_charts_report_and_history(client, artifact):
    page = text(signed_in(client).get("/console/models"))
    version = artifact.manifest["version"]
    assert version in page and "live" in page
    assert page.count("<svg") == 2  # overall and the one activity bucket
    assert "0.3100 [0.2800, 0.3400]" in page and "a warning worth showing" in page
    assert "against the best baseline, popularity, 0.1200: 2.58x [2.10, 3.00]" in page
    history = page.split('id="history"')[1]
    assert "publish" in history and version in history
    r = client.get(f"/console/models/{version}/report")
    assert r.status_code == 200 and b"Training report" in r.data
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert client.get("/console/models/..%2F..%2Fetc/report").status_code in (400, 404)
    assert client.get("/console/models/nope/report").status_code == 404


def test_experiment_page_shows_variants_charts_and_the_verdict(client):
    signed_in(client)
    definition = {
        "variants": [{"name": "control", "share": 50}, {"name": "pop", "strategy": "popular", "share": 50}]
    }
    assert client.put("/v1/admin/experiments/hp", json=definition, headers=AUTH).status_code == 201
    listing = text(client.get("/console/experiments"))
    assert "hp" in listing and "control (personalized" in listing
    page = text(client.get("/console/experiments/hp"))
    assert 'id="verdict"' in page and "Not enough data yet to compare pop with control" in page
    assert page.count("<svg") == 4


def test_bad_ids_are_refused_before_they_touch_a_key(client):
    r = signed_in(client).get("/console/users?user_id=a%20b")
    assert r.status_code == 400
    assert client.get("/console/users?user=u1").status_code == 400  # undeclared parameter
