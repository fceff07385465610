"""A storefront's traffic mix for ``locust`` (driven by bench/loadtest/run.py, or by hand).

Mix: 70 % recommendations (a third of them filtered by category/price/exclude),
10 % similar items, 10 % bundles (item bundle, cart bundle, user bundles), 10 % events.
Users: known to the model (70 %), unknown (15 %), real-time (15 %: visitors whose events this
run posts, so their recommendations are folded in live, ``source: realtime``).

Environment: LOADTEST_DATA (a JSON file: {"users": [...], "items": [...], "categories": [...]}),
LOADTEST_API_KEY (for POST /v1/events), LOADTEST_RATE_PER_USER (requests/s of each simulated
user, default 10). Any answer other than 200 (202 for events) is a failure, 429 included.

    locust -f bench/loadtest/locustfile.py --headless -u 20 -r 20 -t 30s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, constant_throughput, task

with open(os.environ["LOADTEST_DATA"], encoding="utf-8") as _f:
    DATA = json.load(_f)
KNOWN: list[str] = DATA["users"]
ITEMS: list[str] = DATA["items"]
CATEGORIES: list[str] = DATA["categories"] or [""]
REALTIME = [f"rt-{i:05d}" for i in range(500)]
KEY = os.environ.get("LOADTEST_API_KEY", "")
RATE = float(os.environ.get("LOADTEST_RATE_PER_USER", "10"))


def _user() -> str:
    r = random.random()
    if r < 0.70:
        return random.choice(KNOWN)
    if r < 0.85:
        return f"anon-{random.randrange(10**9)}"
    return random.choice(REALTIME)


class Shopper(FastHttpUser):
    wait_time = constant_throughput(RATE)

    def _get(self, path: str, name: str) -> None:
        with self.client.get(path, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}")

    @task(47)
    def recommendations(self) -> None:
        self._get(f"/v1/users/{_user()}/recommendations?n=10", "recommendations")

    @task(23)
    def recommendations_filtered(self) -> None:
        cat = random.choice(CATEGORIES)
        excl = ",".join(random.sample(ITEMS, 3))
        self._get(
            f"/v1/users/{_user()}/recommendations?n=10&category={cat}&max_price=150&exclude={excl}",
            "recommendations (filtered)",
        )

    @task(10)
    def similar(self) -> None:
        self._get(f"/v1/items/{random.choice(ITEMS)}/similar?n=10", "similar")

    @task(5)
    def item_bundle(self) -> None:
        self._get(f"/v1/items/{random.choice(ITEMS)}/bundle", "bundle (item)")

    @task(3)
    def user_bundles(self) -> None:
        self._get(f"/v1/users/{_user()}/bundles?n=3", "bundles (user)")

    @task(2)
    def cart_bundle(self) -> None:
        body = {"items": random.sample(ITEMS, 2)}
        with self.client.post("/v1/bundles", json=body, name="bundle (cart)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}")

    @task(10)
    def events(self) -> None:
        user = random.choice(REALTIME) if random.random() < 0.5 else random.choice(KNOWN)
        event = {
            "user_id": user,
            "item_id": random.choice(ITEMS),
            "event": random.choice(("view", "view", "view", "cart", "purchase")),
            "timestamp": int(time.time()),
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        with self.client.post(
            "/v1/events", json=event, headers=headers, name="events", catch_response=True
        ) as resp:
            if resp.status_code != 202:
                resp.failure(f"{resp.status_code}")
