"""``GET /v1/users/<id>/buy-again``, ``include_due`` and learned "already bought" exemptions, through
the Flask app on a real Redis, with the hand-made histories of ``tests.factories``."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from recsvc.core.artifact import write_artifact
from recsvc.storage import versions
from tests.factories import API_KEY, DAY, REPURCHASE_NOW, repurchase_artifact

pytestmark = pytest.mark.redis_backends("single", "cluster")

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def artifact(models_dir):
    a = repurchase_artifact()
    a.manifest["trained_until"] = REPURCHASE_NOW - 3600
    write_artifact(a, models_dir)
    return a


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(client, path: str):
    r = client.get(path)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_the_most_due_item_first_with_its_dates_and_reason(client, published):
    body = _get(client, f"/v1/users/u1/buy-again?as_of={REPURCHASE_NOW}")
    assert body["source"] == "personalized" and body["horizon_days"] == 7.0 and "reason" not in body
    items = body["items"]
    ids = [it["item_id"] for it in items]
    # u1 bought i3 5 times every 10 days, 9 days ago: due (0.770 by the formula in the docs);
    # i6 two days ago, i20 (rarely bought again) and i12 (40 days overdue) much less.
    assert ids[0] == "i3" and set(ids) == {"i3", "i6", "i20", "i12"}
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    first = items[0]
    assert first["score"] == pytest.approx(0.770, abs=0.002)
    assert first["last_bought"] == _iso(REPURCHASE_NOW - 9 * DAY)
    assert first["times_bought"] == 5 and first["typical_interval_days"] == 10.0
    due_in = first["due_in_days"]
    assert 0 < due_in < 7 and first["expected_next"][:10] == _iso(REPURCHASE_NOW + int(due_in * DAY))[:10]
    assert (
        first["reason"]
        == f"bought 5 times, about every 10 days; last bought 9 days ago, due in {round(due_in)} days"
    )
    assert first["title"] == "Item 3" and first["category"] == "shoes" and first["price"] == 4.0
    overdue = next(it for it in items if it["item_id"] == "i12")
    assert overdue["reason"].endswith("30 days later than usual")


def test_n_horizon_and_filters(client, published):
    at = f"as_of={REPURCHASE_NOW}"
    assert [it["item_id"] for it in _get(client, f"/v1/users/u1/buy-again?n=2&{at}")["items"]][0] == "i3"
    assert len(_get(client, f"/v1/users/u1/buy-again?n=2&{at}")["items"]) == 2
    week = {it["item_id"]: it["score"] for it in _get(client, f"/v1/users/u1/buy-again?{at}")["items"]}
    month_body = _get(client, f"/v1/users/u1/buy-again?horizon_days=30&{at}")
    month = {it["item_id"]: it["score"] for it in month_body["items"]}
    assert month_body["horizon_days"] == 30.0 and all(month[i] >= week[i] for i in week)
    # i20 is the only hat; max_price 5 keeps i3 (price 4); exclude drops i3.
    assert [it["item_id"] for it in _get(client, f"/v1/users/u1/buy-again?category=hats&{at}")["items"]] == [
        "i20"
    ]
    assert [it["item_id"] for it in _get(client, f"/v1/users/u1/buy-again?max_price=5&{at}")["items"]] == [
        "i3"
    ]
    assert "i3" not in [
        it["item_id"] for it in _get(client, f"/v1/users/u1/buy-again?exclude=i3&{at}")["items"]
    ]


def test_without_purchases_the_most_popular_items_bought_again(client, published):
    body = _get(client, "/v1/users/visitor/buy-again?n=3")
    assert body["source"] == "fallback" and body["reason"] == "no_repurchases"
    # Items 0-9 are bought again; item 0 is the most popular.
    assert [it["item_id"] for it in body["items"]] == ["i0", "i1", "i2"]
    assert [
        it["item_id"] for it in _get(client, "/v1/users/visitor/buy-again?n=2&category=hats")["items"]
    ] == [
        "i2",
        "i5",
    ]


def test_a_purchase_sent_since_the_model_moves_the_dates(client, published):
    before = _get(client, f"/v1/users/u2/buy-again?as_of={REPURCHASE_NOW}")["items"][0]
    assert before["item_id"] == "i7" and before["times_bought"] == 2
    event = {"user_id": "u2", "item_id": "i7", "event": "purchase", "timestamp": REPURCHASE_NOW - 60}
    assert client.post("/v1/events", json=event, headers=AUTH).status_code == 202
    body = _get(client, f"/v1/users/u2/buy-again?as_of={REPURCHASE_NOW}")
    after = body["items"][0]
    assert body["source"] == "realtime"
    assert after["times_bought"] == 3 and after["last_bought"] == _iso(REPURCHASE_NOW - 60)
    # An interval of 3 days joins the user's (10 days): their mean log interval is log(sqrt(30)),
    # blended with the item's log(10) at equal variances, 2 intervals to 1: (10 * 30) ** (1/3) days.
    assert after["typical_interval_days"] == pytest.approx((10 * 30) ** (1 / 3), abs=0.05)
    assert after["reason"].startswith("bought 3 times, about every 7 days; last bought today")


def test_include_due_puts_due_items_first(client, published):
    plain = _get(client, f"/v1/users/u1/recommendations?n=6&as_of={REPURCHASE_NOW}")
    mixed = _get(client, f"/v1/users/u1/recommendations?n=6&include_due=true&as_of={REPURCHASE_NOW}")
    items = mixed["items"]
    assert len(items) == 6 and len({it["item_id"] for it in items}) == 6
    assert items[0]["item_id"] == "i3" and items[0]["due"] is True and items[0]["times_bought"] == 5
    due = [it for it in items if it.get("due")]
    assert 1 <= len(due) <= 3 and all(it["score"] >= 0.3 for it in due)
    rest = [it["item_id"] for it in items if not it.get("due")]
    assert (
        rest
        == [it["item_id"] for it in plain["items"] if it["item_id"] not in {d["item_id"] for d in due}][
            : len(rest)
        ]
    )
    assert not any(it.get("due") for it in plain["items"])
    # Due items say so; the others keep the reasons the plain answer gave them.
    assert all(it["explanation"]["code"] == "buy_again" for it in due)
    assert due[0]["explanation"]["text"] == "Time to buy this again"
    plain_why = {it["item_id"]: it["explanation"] for it in plain["items"]}
    assert all(it["explanation"] == plain_why[it["item_id"]] for it in items if not it.get("due"))
    lean = _get(
        client, f"/v1/users/u1/recommendations?n=6&include_due=true&explain=false&as_of={REPURCHASE_NOW}"
    )
    assert [it["item_id"] for it in lean["items"]] == [it["item_id"] for it in items]
    assert not any("explanation" in it for it in lean["items"])
    # Nobody is due: the answer is the plain one.
    nobody = _get(client, f"/v1/users/u5/recommendations?n=6&include_due=true&as_of={REPURCHASE_NOW}")
    assert (
        nobody["items"] == _get(client, f"/v1/users/u5/recommendations?n=6&as_of={REPURCHASE_NOW}")["items"]
    )


def test_learned_repurchasability_decides_what_stays_recommendable(published, config, make_app):
    # User u bought item u (tests.factories). Item 3 is bought again by most (rate 0.8), item 15
    # rarely (0.05): u3 may see i3 again, u15 never sees i15.
    client = make_app(config).test_client()
    assert "i3" in [it["item_id"] for it in _get(client, "/v1/users/u3/recommendations?n=50")["items"]]
    assert "i15" not in [it["item_id"] for it in _get(client, "/v1/users/u15/recommendations?n=50")["items"]]
    # Above 1, nothing is exempt by the learned rate; the operator's categories still are.
    strict = make_app(config.with_overrides(repurchase_min_rate=1.01)).test_client()
    assert "i3" not in [it["item_id"] for it in _get(strict, "/v1/users/u3/recommendations?n=50")["items"]]
    override = make_app(config.with_overrides(repurchase_min_rate=1.01, repurchase_categories=("shoes",)))
    assert "i3" in [
        it["item_id"] for it in _get(override.test_client(), "/v1/users/u3/recommendations?n=50")["items"]
    ]


@pytest.mark.parametrize(
    "query, field",
    [
        ("horizon_days=0", "horizon_days"),
        ("horizon_days=366", "horizon_days"),
        ("horizon_days=nan", "horizon_days"),
        ("as_of=-5", "as_of"),
        ("as_of=1.5", "as_of"),
        ("n=0", "n"),
        ("horizon=7", "horizon"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(client, published, query, field):
    r = client.get(f"/v1/users/u1/buy-again?{query}")
    assert r.status_code == 400 and r.get_json()["field"] == field


def test_include_due_must_be_a_boolean(client, published):
    r = client.get("/v1/users/u1/recommendations?include_due=yes")
    assert r.status_code == 400 and r.get_json()["field"] == "include_due"


def test_a_version_without_a_repurchase_model(models_dir, config, redis_client, make_app):
    from tests.factories import make_artifact

    plain = make_artifact(seed=4)
    write_artifact(plain, models_dir)
    versions.publish(redis_client, plain, config)
    client = make_app(config).test_client()
    body = _get(client, "/v1/users/u1/buy-again?n=2")
    assert body["source"] == "fallback" and body["reason"] == "no_repurchases"
    assert [it["item_id"] for it in body["items"]] == ["i0", "i1"]  # plain popularity
    # Nothing learned: only the operator's categories are exempt (u1 bought i1, a shirt).
    assert "i1" not in [it["item_id"] for it in _get(client, "/v1/users/u1/recommendations?n=50")["items"]]
    assert math.isfinite(_get(client, "/v1/users/u1/recommendations?include_due=true")["items"][0]["score"])


def test_a_version_with_a_ranker_orders_by_it_and_shows_the_probability(
    models_dir, config, redis_client, make_app, client, published
):
    from recsvc.core.repurchase import RANKER_FEATURES

    before = {
        it["item_id"]: it for it in _get(client, f"/v1/users/u1/buy-again?as_of={REPURCHASE_NOW}")["items"]
    }
    # A ranker that weighs only the days since the last purchase: the oldest purchase first.
    ranker = tuple(1.0 if name == "log1p_days_since" else 0.0 for name in RANKER_FEATURES)
    ranked = repurchase_artifact(seed=6, ranker=ranker)
    ranked.manifest["trained_until"] = REPURCHASE_NOW - 3600
    write_artifact(ranked, models_dir)
    versions.publish(redis_client, ranked, config)
    items = _get(make_app(config).test_client(), f"/v1/users/u1/buy-again?as_of={REPURCHASE_NOW}")["items"]
    assert [it["item_id"] for it in items] == ["i12", "i20", "i3", "i6"]  # 40, 10, 9, 2 days ago
    # What each item shows is the cure model's, as before: the ranker only orders.
    for it in items:
        assert it["score"] == pytest.approx(before[it["item_id"]]["score"], rel=1e-6)
        assert it["due_in_days"] == before[it["item_id"]]["due_in_days"]
