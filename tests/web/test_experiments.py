"""The experiments admin API and the serving hooks, on the real app factory and a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from recsvc.analytics import experiments as ex
from recsvc.analytics import recids
from recsvc.analytics import registry as reg
from recsvc.core.artifact import write_artifact
from recsvc.storage import keys
from tests.factories import API_KEY, make_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

KEY = API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
DEFINITION = {
    "variants": [
        {"name": "control", "share": 50},
        {"name": "pop", "share": 50, "strategy": "popular"},
    ]
}


def test_admin_needs_a_key_and_is_disabled_without_one(client, config, make_app):
    assert client.get("/v1/admin/experiments").status_code == 401
    assert client.get("/v1/admin/experiments", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/admin/experiments", headers={"X-API-Key": KEY}).status_code == 200
    closed = make_app(config.with_overrides(api_keys=())).test_client()
    response = closed.put("/v1/admin/experiments/x", json=DEFINITION, headers=AUTH)
    assert response.status_code == 403 and response.get_json()["error"] == "disabled"


def test_create_replace_sticky_list_get_delete(client, redis_client):
    created = client.put("/v1/admin/experiments/homepage", json=DEFINITION, headers=AUTH)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["created"] is True and body["experiment"]["status"] == "active"
    assert body["experiment"]["variants"][1]["buckets"] == [[5000, 10000]]
    assert json.loads(redis_client.hget(keys.EXPERIMENTS, "homepage"))["name"] == "homepage"

    # Shares move 50/50 -> 70/30: only buckets 5000..7000 change owner.
    changed = {
        "variants": [{"name": "control", "share": 70}, {"name": "pop", "share": 30, "strategy": "popular"}]
    }
    replaced = client.put("/v1/admin/experiments/homepage", json=changed, headers=AUTH)
    assert replaced.status_code == 200
    variants = replaced.get_json()["experiment"]["variants"]
    assert variants[0]["buckets"] == [[0, 7000]] and variants[1]["buckets"] == [[7000, 10000]]

    listed = client.get("/v1/admin/experiments", headers=AUTH).get_json()["experiments"]
    assert [e["name"] for e in listed] == ["homepage"] and listed[0]["source"] == "redis"
    one = client.get("/v1/admin/experiments/homepage", headers=AUTH).get_json()["experiment"]
    assert one["variants"][0]["share"] == 70.0

    user = next(f"u{i}" for i in range(100) if ex.bucket_of("homepage", f"u{i}") >= 7000)
    who = client.get(f"/v1/admin/experiments/homepage/assignment?user_id={user}", headers=AUTH).get_json()
    assert who["variant"] == "pop" and who["bucket"] >= 7000

    assert client.delete("/v1/admin/experiments/homepage", headers=AUTH).status_code == 200
    assert client.delete("/v1/admin/experiments/homepage", headers=AUTH).status_code == 404
    assert client.get("/v1/admin/experiments/homepage", headers=AUTH).status_code == 404


X = "/v1/admin/experiments/x"


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"),
    [
        ("/v1/admin/experiments/bad.name", DEFINITION, 400, "name"),
        (X, {"variants": [{"name": "a", "share": 90}, {"name": "b", "share": 20}]}, 409, "variants"),
        (X, {"variants": DEFINITION["variants"], "bogus": 1}, 400, "bogus"),
        (X, {"name": "y", "variants": DEFINITION["variants"]}, 409, "name"),
        (X, {"variants": [{"name": "a", "share": 1}, {"name": "b", "strategy": "x"}]}, 400,
         "variants[1].strategy"),
        (X + "?debug=1", DEFINITION, 400, "debug"),
    ],
)  # fmt: skip
def test_bad_definitions_are_400_naming_the_field(client, redis_client, path, payload, status, field):
    """400 for a field that breaks its own rule; 409 for fields valid alone but not together."""
    response = client.put(path, json=payload, headers=AUTH)
    assert response.status_code == status
    body = response.get_json()
    code = "invalid_request" if status == 400 else "inconsistent_definition"
    assert body["error"] == code and body["field"] == field and body["message"]
    assert redis_client.hlen(keys.EXPERIMENTS) == 0  # nothing stored
    not_json = client.put(
        "/v1/admin/experiments/x", data="{", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    huge = {"variants": DEFINITION["variants"], "description": "x" * (ex.MAX_DEFINITION_BYTES + 1)}
    too_large = client.put("/v1/admin/experiments/x", json=huge, headers=AUTH)
    assert too_large.status_code == 413 and too_large.get_json()["field"] == "body"


def test_file_experiments_are_read_only_and_unpublished_versions_warn(
    tmp_path, config, redis_client, make_app
):
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps({"experiments": [{"name": "from-file", **DEFINITION}]}))
    client = make_app(config.with_overrides(experiments_file=path)).test_client()
    assert client.put("/v1/admin/experiments/from-file", json=DEFINITION, headers=AUTH).status_code == 409
    assert client.delete("/v1/admin/experiments/from-file", headers=AUTH).status_code == 409
    assert (
        client.get("/v1/admin/experiments/from-file", headers=AUTH).get_json()["experiment"]["source"]
        == "file"
    )
    with_version = {
        "variants": [{"name": "a", "share": 50}, {"name": "b", "share": 50, "model_version": "nope"}]
    }
    response = client.put("/v1/admin/experiments/v", json=with_version, headers=AUTH)
    assert response.status_code == 201 and "not published" in response.get_json()["warnings"][0]


def test_invalid_experiments_file_stops_start_up(tmp_path, config, make_app):
    path = tmp_path / "experiments.json"
    path.write_text('{"experiments": [{"name": "x", "variants": []}]}')
    with pytest.raises(ex.ExperimentFileError, match="variants"):
        make_app(config.with_overrides(experiments_file=path))


def test_report_endpoint_matches_the_pure_report(client, config, redis_client):
    from recsvc.analytics.attribution import build_report
    from tests.shops import push_to_stream, simulate, write_events_csv

    created = client.put("/v1/admin/experiments/sim", json={"salt": "sim-3", **DEFINITION}, headers=AUTH)
    assert created.status_code == 201
    shop = simulate(3, {"A": 0.05, "B": 0.05}, 1500)
    # simulate() names its variants A and B; rename to this definition's.
    rename = {"sim.A.": "sim.control.", "sim.B.": "sim.pop."}
    shop.rec_id = np.array([rename.get(r[:6], r[:6]) + r[6:] for r in shop.rec_id], dtype=object)
    # A third already dumped to <var_dir>/events/ (as `recsvc retrain --dump-stream` does), the
    # rest still in the live stream.
    third = len(shop) // 3
    dumps = config.var_dir / "events"
    dumps.mkdir(parents=True)
    write_events_csv(shop.take(np.arange(third)), dumps / "stream-1.csv")
    push_to_stream(redis_client, shop.take(np.arange(third, len(shop))))

    response = client.get("/v1/admin/experiments/sim/report?window_days=7&attribution=linear", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    expected = build_report(shop, "sim", variants=["control", "pop"], window_days=7)
    assert body["primary_attribution"] == "linear" and body["definition_source"] == "redis"
    rows = {r["variant"]: r for r in body["attribution"]["linear"]["variants"]}
    for m in expected.results["linear"].variants:
        assert (rows[m.variant]["users"], rows[m.variant]["converters"]) == (m.users, m.converters)
    assert body["winner"] == expected.results["linear"].winner
    assert body["data"]["events"] == len(shop)
    live_only = client.get("/v1/admin/experiments/sim/report?include_dumps=false", headers=AUTH).get_json()
    assert live_only["data"]["events"] == len(shop) - third

    for query, field in (
        ("window_days=-1", "window_days"),
        ("alpha=0", "alpha"),
        ("attribution=x", "attribution"),
        ("max_events=0", "max_events"),
        ("x=1", "x"),
    ):
        bad = client.get(f"/v1/admin/experiments/sim/report?{query}", headers=AUTH)
        assert bad.status_code == 400 and bad.get_json()["field"] == field
    assert client.get("/v1/admin/experiments/nosuch/report", headers=AUTH).status_code == 404


# --- serving hooks -------------------------------------------------------------------------------


@pytest.fixture
def published(config, redis_client):
    """Two published versions: v1 (live) and v2; user u3 is known to both."""
    from recsvc.storage import versions
    from recsvc.storage.connection import connect_admin

    admin = connect_admin(config.redis.url)
    v2 = write_artifact(make_artifact(seed=2), config.models_dir, version="v2")
    v1 = write_artifact(make_artifact(seed=1), config.models_dir, version="v1")
    versions.publish(admin, v2, config)
    versions.publish(admin, v1, config)
    assert versions.current_version(admin) == "v1"
    return admin


def user_in(experiment_name: str, low: int, high: int) -> str:
    return next(f"u{i}" for i in range(20) if low <= ex.bucket_of(experiment_name, f"u{i}") < high)


def test_variant_popular_and_model_version(config, published, redis_client, make_app):
    from recsvc.serving.recommender import Variant
    from recsvc.web.render import render

    app = make_app(config)
    svc = app.extensions["recsvc"]
    reg.store_experiment(
        redis_client,
        ex.parse_experiment(
            {
                "name": "hp",
                "variants": [
                    {"name": "pop", "share": 34, "strategy": "popular"},
                    {"name": "new", "share": 33, "model_version": "v2"},
                    {"name": "gone", "share": 33, "model_version": "v9"},
                ],
            }
        ),
    )
    pop_user, new_user, gone_user = (
        user_in("hp", 0, 3400),
        user_in("hp", 3400, 6700),
        user_in("hp", 6700, 10_000),
    )
    with app.test_request_context(f"/v1/users/{pop_user}/recommendations"):
        answer = svc.recommender.recommend(pop_user, 5, variant=Variant.of("popular"))
        body = render(answer, user_id=pop_user, strict=True).get_json()
        assert (body["experiment"], body["variant"], body["source"], body["reason"]) == (
            "hp",
            "pop",
            "fallback",
            "experiment",
        )
        # make_artifact: popularity n_items - i, so the popular list starts at i0 (minus purchases).
        assert [it["item_id"] for it in body["items"]][:2] == ["i0", "i1"] or pop_user == "u0"
        assert recids.parse_rec_id(body["rec_id"]).variant == "pop"
    with app.test_request_context(f"/v1/users/{new_user}/recommendations"):
        answer = svc.recommender.recommend(new_user, 5, variant=Variant.of("personalized", "v2"))
        body = render(answer, user_id=new_user, strict=True).get_json()
        assert body["model_version"] == "v2" and body["variant"] == "new" and body["source"] == "personalized"
    with app.test_request_context(f"/v1/users/{gone_user}/recommendations"):
        # v9 is not published: the live version serves, and its answer is tagged outside the experiment.
        answer = svc.recommender.recommend(gone_user, 5, variant=Variant.of("personalized", "v9"))
        assert answer.model_version == "v1" and not answer.variant_applied
        body = render(answer, user_id=gone_user, strict=True).get_json()
        assert body["experiment"] is None and body["variant"] is None and "." not in body["rec_id"]
    svc.served_log.close()
    # The pop and new answers were logged; the untagged one was not.
    assert redis_client.llen(keys.EXPERIMENTS_SERVED) == 2


def test_tag_answer_rules():
    a = reg.Assignment("hp.pop.x", "hp", "pop", "popular", None)
    assert reg.served_as_defined(a, {"source": "fallback", "reason": "experiment"})
    assert not reg.served_as_defined(a, {"source": "personalized"})
    assert not reg.served_as_defined(a, {"source": "fallback", "reason": "redis_unavailable"})
    p = reg.Assignment("hp.p.x", "hp", "p", "personalized", "v2")
    assert reg.served_as_defined(p, {"source": "personalized", "model_version": "v2"})
    assert not reg.served_as_defined(p, {"source": "personalized", "model_version": "v1"})
    assert not reg.served_as_defined(reg.Assignment("x", "hp", "p", "personalized"), {"source": "realtime"})
    assert reg.served_as_defined(reg.Assignment("x", "hp", "r", "realtime"), {"source": "realtime"})
    # Surfaces that do not apply variants (bundles) stay tagged unless degraded: same for every arm.
    assert reg.served_as_defined(p, {"source": "realtime", "model_version": "v1"}, strict=False)
    assert not reg.served_as_defined(p, {"source": "fallback", "reason": "not_published"}, strict=False)


def test_redis_down_keeps_assigning_from_memory(config, published, redis_client, make_app):
    from recsvc.web.render import assignment
    from recsvc.web.services import services

    app = make_app(config)
    reg.store_experiment(redis_client, ex.parse_experiment({"name": "hp", **DEFINITION}))
    with app.test_request_context("/"):
        assert assignment("u1").experiment == "hp"
    with app.test_request_context("/"):
        services().health.mark_down(redis.ConnectionError("test"))
        assert assignment("u1").experiment == "hp"  # no Redis round trip needed


def test_recommendation_answers_carry_and_honour_the_variant(config, published, redis_client, make_app):
    app = make_app(config)
    client = app.test_client()
    definition = {
        "variants": [
            {"name": "pop", "share": 30, "strategy": "popular"},
            {"name": "new", "share": 30, "model_version": "v2"},
        ]
    }  # 40 % of users are in no variant
    assert client.put("/v1/admin/experiments/hp", json=definition, headers=AUTH).status_code == 201
    users = {
        name: user_in("hp", low, high)
        for name, low, high in (("pop", 0, 3000), ("new", 3000, 6000), (None, 6000, 10_000))
    }

    pop = client.get(f"/v1/users/{users['pop']}/recommendations?n=3").get_json()
    assert (pop["experiment"], pop["variant"], pop["source"], pop["reason"]) == (
        "hp",
        "pop",
        "fallback",
        "experiment",
    )
    assert recids.parse_rec_id(pop["rec_id"]) is not None and pop["rec_id"].startswith("hp.pop.")
    new = client.get(f"/v1/users/{users['new']}/recommendations?n=3").get_json()
    assert (new["experiment"], new["variant"], new["model_version"]) == ("hp", "new", "v2")
    outside = client.get(f"/v1/users/{users[None]}/recommendations?n=3").get_json()
    assert outside["experiment"] is None and outside["variant"] is None and outside["model_version"] == "v1"
    assert recids.parse_rec_id(outside["rec_id"]).experiment is None
    # Bundles do not apply variants: every arm gets the same surface, tagged with the user's arm.
    bundles = client.get(f"/v1/users/{users['new']}/bundles").get_json()
    assert (bundles["experiment"], bundles["variant"], bundles["model_version"]) == ("hp", "new", "v1")
    # Answers without a user still carry a rec id (for click attribution), outside any experiment.
    similar = client.get("/v1/items/i1/similar?n=3").get_json()
    assert similar["experiment"] is None and similar["rec_id"]
    # The three tagged answers were logged as exposures.
    app.extensions["recsvc"].served_log.close()
    served = reg.read_served(redis_client, "hp")
    assert sorted(served["user_id"].tolist()) == sorted([users["pop"], users["new"], users["new"]])


def test_every_experiments_route_is_in_the_openapi_document(config, make_app):
    import json as _json
    from pathlib import Path

    import recsvc

    doc = _json.loads((Path(recsvc.__file__).parent / "web" / "openapi.json").read_text())
    app = make_app(config)
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("experiments."):
            path = rule.rule.replace("<", "{").replace(">", "}")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert method.lower() in doc["paths"][path], (method, path)
    props = doc["components"]["schemas"]["ItemList"]["allOf"][1]["properties"]
    assert {"experiment", "variant", "rec_id"} <= set(props)
