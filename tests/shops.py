"""Event tables for tests: hand-made baskets, a hand-computed attribution shop, simulated experiments.

The simulated experiment shop: users are assigned with the real hash, get rec ids from the real
generator, see 4 items, click some, and convert with a probability that depends only on their
variant; noise that must not be credited is mixed in (organic purchases of items never
recommended, purchases after the window).
"""

from __future__ import annotations

import numpy as np

from recsvc.analytics.experiments import parse_experiment
from recsvc.analytics.recids import new_rec_id
from recsvc.core.contract import CLICK, IMPRESSION, PURCHASE
from recsvc.core.events import EventTable

T = 1_700_000_000
DAY = 86_400


def simulate(seed: int, rates: dict[str, float], n_users: int) -> EventTable:
    rng = np.random.default_rng(seed)
    experiment = parse_experiment(
        {
            "name": "sim",
            "salt": f"sim-{seed}",
            "variants": [{"name": "A", "share": 50}, {"name": "B", "share": 50}],
        }
    )
    users = np.array([f"s{seed}u{i}" for i in range(n_users)], dtype=object)
    variant = np.array([experiment.variant_for(u).name for u in users], dtype=object)
    served = T + rng.integers(0, 3 * DAY, n_users)
    rec = np.array([new_rec_id("sim", v, s) for v, s in zip(variant, served, strict=True)], dtype=object)
    # 4 distinct items per user: a random start and a random stride (at most 3 * 124 < 500 apart).
    shown = (
        rng.integers(0, 500, n_users)[:, None] + np.arange(4) * rng.integers(1, 125, n_users)[:, None]
    ) % 500
    rate = np.where(variant == "B", rates["B"], rates["A"])
    converts = rng.random(n_users) < rate
    clicks = converts | (rng.random(n_users) < 0.3)
    late = ~converts & (rng.random(n_users) < 0.05)  # buy the clicked item after the 7-day window
    organic = rng.random(n_users) < 0.1  # buy something never recommended

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "event", "ts", "rec", "price")}

    def add(mask, item, event, ts, with_rec, price):
        k = int(mask.sum())
        cols["user"].append(users[mask])
        cols["item"].append(
            np.asarray(item, dtype=object)[mask] if np.ndim(item) else np.full(k, item, object)
        )
        cols["event"].append(np.full(k, event, np.int8))
        cols["ts"].append(np.asarray(ts)[mask])
        cols["rec"].append(rec[mask] if with_rec else np.full(k, "", object))
        cols["price"].append(np.full(k, price, np.float32))

    item_ids = np.array([f"i{i}" for i in range(500)], dtype=object)
    everyone = np.ones(n_users, bool)
    for slot in range(4):
        add(everyone, item_ids[shown[:, slot]], IMPRESSION, served + 5, True, np.nan)
    add(clicks, item_ids[shown[:, 0]], CLICK, served + 60, True, np.nan)
    add(
        converts,
        item_ids[shown[:, 0]],
        PURCHASE,
        served + 60 + rng.integers(60, 5 * DAY, n_users),
        False,
        20.0,
    )
    add(late, item_ids[shown[:, 0]], PURCHASE, served + 10 * DAY, False, 20.0)
    add(
        organic,
        np.array([f"o{i}" for i in rng.integers(0, 100, n_users)], dtype=object),
        PURCHASE,
        served + DAY,
        False,
        9.0,
    )
    return EventTable(
        user_id=np.concatenate(cols["user"]),
        item_id=np.concatenate(cols["item"]),
        event=np.concatenate(cols["event"]),
        timestamp=np.concatenate(cols["ts"]),
        rec_id=np.concatenate(cols["rec"]),
        price=np.concatenate(cols["price"]),
    )


def write_events_csv(table: EventTable, path) -> None:
    """Write a table as an events file per the contract (empty price where unknown)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from recsvc.core.contract import EVENT_TYPES

    names = np.array(EVENT_TYPES, dtype=object)[table.event]
    price = pa.array(table.price.astype(np.float64), mask=np.isnan(table.price))
    pa_csv.write_csv(
        pa.table(
            {
                "user_id": pa.array(table.user_id, pa.string()),
                "item_id": pa.array(table.item_id, pa.string()),
                "event": pa.array(names, pa.string()),
                "timestamp": pa.array(table.timestamp),
                "rec_id": pa.array(table.rec_id, pa.string()),
                "price": price,
            }
        ),
        str(path),
    )


def push_to_stream(client, table: EventTable, stream: str = "recsvc:events") -> None:
    """Append a table's events to the live stream the way ``POST /v1/events`` does."""
    from recsvc.core.contract import EVENT_TYPES
    from recsvc.storage.stream import append_events

    batch = []
    for i in range(len(table)):
        event = {
            "user_id": table.user_id[i],
            "item_id": table.item_id[i],
            "event": EVENT_TYPES[table.event[i]],
            "timestamp": int(table.timestamp[i]),
        }
        if table.rec_id[i]:
            event["rec_id"] = table.rec_id[i]
        if not np.isnan(table.price[i]):
            event["price"] = float(table.price[i])
        batch.append(event)
    for start in range(0, len(batch), 1000):
        append_events(client, batch[start : start + 1000], stream=stream, history_length=5, history_ttl_s=60)


# ---- attribution: every number of this shop's report is computed by hand in the tests -----

RA1 = new_rec_id("exp", "A", T)
RX = new_rec_id(now=T + 400)  # untagged rec (no experiment) that competes for credit
RB1 = new_rec_id("exp", "B", T)
RB2 = new_rec_id("exp", "B", T)
RA2 = new_rec_id("exp", "A", T)
RB3 = new_rec_id("exp", "B", T)
ROLD = new_rec_id("exp", "A", T - 20 * DAY)  # served long before the purchase
RO = new_rec_id("other", "X", T)


def ev(user, item, event, t, rec_id=None, price=None, quantity=None):
    out = {"user_id": user, "item_id": item, "event": event, "timestamp": t}
    if rec_id:
        out["rec_id"] = rec_id
    if price is not None:
        out["price"] = price
    if quantity is not None:
        out["quantity"] = quantity
    return out


def attribution_shop() -> EventTable:
    return EventTable.from_records(
        [
            # u1 (A): sees 3 items, clicks i1 twice from A's rec, once from an untagged rec, buys 2 x 10.
            ev("u1", "i1", "impression", T + 10, RA1),
            ev("u1", "i2", "impression", T + 10, RA1),
            ev("u1", "i3", "impression", T + 10, RA1),
            ev("u1", "i1", "click", T + 100, RA1),
            ev("u1", "i1", "click", T + 200, RA1),
            ev("u1", "i1", "click", T + 500, RX),
            ev("u1", "i1", "purchase", T + 1000, price=10, quantity=2),
            # u2 (B): buys the clicked item 8 days later: outside a 7-day window.
            ev("u2", "i3", "impression", T + 10, RB1),
            ev("u2", "i3", "click", T + 100, RB1),
            ev("u2", "i3", "purchase", T + 100 + 8 * DAY, price=7),
            # u3 (B): buys another item (no credit), carts and buys the clicked one with the rec id.
            ev("u3", "i4", "impression", T + 10, RB2),
            ev("u3", "i4", "click", T + 100, RB2),
            ev("u3", "i4", "cart", T + 150, RB2),
            ev("u3", "i5", "purchase", T + 200, price=3),
            ev("u3", "i4", "purchase", T + 300, RB2, price=4),
            # u4 (A): buys straight from the rec (the purchase carries the rec id, no click).
            ev("u4", "i6", "impression", T + 10, RA2),
            ev("u4", "i6", "purchase", T + 50, RA2, price=5),
            # u5 (B): clicks, carts and buys without rec ids on the cart/purchase; no price sent.
            ev("u5", "i7", "impression", T + 10, RB3),
            ev("u5", "i7", "click", T + 100, RB3),
            ev("u5", "i7", "cart", T + 200),
            ev("u5", "i7", "purchase", T + 300),
            # u6 (A): a click that is recent, on a rec served 20 days ago: the rec is stale.
            ev("u6", "i8", "click", T + 100, ROLD),
            ev("u6", "i8", "purchase", T + 200, price=100),
            # u7: another experiment; u8: no rec at all.
            ev("u7", "i9", "click", T + 100, RO),
            ev("u7", "i9", "purchase", T + 200, price=50),
            ev("u8", "i1", "purchase", T + 100, price=10),
        ]
    )


# ---- bundle mining: hand-made baskets -------------------------------------------------------


def events(rows: list[tuple[str, str, int, int, str]]) -> EventTable:
    """Rows of (user, item, event code, timestamp, order id)."""
    return EventTable(
        user_id=np.array([r[0] for r in rows], dtype=object),
        item_id=np.array([r[1] for r in rows], dtype=object),
        event=np.array([r[2] for r in rows], dtype=np.int8),
        timestamp=np.array([r[3] for r in rows], dtype=np.int64),
        order_id=np.array([r[4] for r in rows], dtype=object),
    )


def orders(baskets: dict[str, str], start: int = 1_700_000_000) -> list[tuple[str, str, int, int, str]]:
    """Purchase rows for ``{"o1": "ABC", ...}`` (one user per order)."""
    rows = []
    for n, (order, items) in enumerate(baskets.items()):
        for item in items:
            rows.append((f"user{order}", item, PURCHASE, start + n, order))
    return rows


#: Replenishment shop: items 0-19 are consumables with these cycles (days, by item % 5), items
#: 20-39 durables bought once.
CYCLES = (7.0, 10.0, 14.0, 21.0, 30.0)


def replenishment_shop(
    seed: int = 0, n_users: int = 400, days: int = 150
) -> tuple[EventTable, dict[str, str]]:
    """Purchases of a shop whose consumables are bought again on their cycle, and its categories.

    Every customer replenishes 3-6 consumables on the item's cycle times their own pace
    (log-normal, sd 0.2) with a jitter per purchase (sd 0.15), stopping after each purchase with
    probability 0.1; and buys 2-5 durables once. The log ends ``days`` after it starts at ``T``.
    """
    rng = np.random.default_rng(seed)
    end = T + days * DAY
    users, items, stamps = [], [], []
    for u in range(n_users):
        pace = rng.lognormal(0.0, 0.2)
        for item in rng.choice(20, rng.integers(3, 7), replace=False).tolist():
            t = T + rng.uniform(0, 40) * DAY
            while t < end:
                users.append(f"c{u}")
                items.append(f"p{item}")
                stamps.append(int(t))
                if rng.random() < 0.1:
                    break
                t += CYCLES[item % 5] * pace * rng.lognormal(0.0, 0.15) * DAY
        for item in rng.choice(np.arange(20, 40), rng.integers(2, 6), replace=False).tolist():
            users.append(f"c{u}")
            items.append(f"p{item}")
            stamps.append(int(T + rng.uniform(0, days) * DAY))
    n = len(users)
    table = EventTable(
        user_id=np.asarray(users, dtype=object),
        item_id=np.asarray(items, dtype=object),
        event=np.full(n, PURCHASE, np.int8),
        timestamp=np.asarray(stamps, np.int64),
    )
    categories = {f"p{i}": ("consumables" if i < 20 else "durables") for i in range(40)}
    return table, categories
