"""A seeded generator of realistic shop data: a catalog and a browse/cart/purchase event log.

What makes it realistic enough for collaborative filtering to matter:

* **Catalog**: categories with their own price levels; items have a latent "style" near their
  category's direction, a power-law popularity, and ~4% are out of stock (no events in the last
  week, ``available=false``).
* **Users** have latent tastes (a mix of one to three favourite categories plus personal noise),
  an activity level (log-normal: a few heavy shoppers, many light ones) and a join date, so some
  users are new near the end of the log.
* **Sessions** pick items from the user's consideration set, drawn once per user by a Gumbel race
  over ``taste . style + popularity``; views lead to carts and carts to purchases with a
  probability that grows with how much the user likes the item, so purchases carry more signal
  than views.
* **Orders**: purchases of one session share an ``order_id`` (multi-item orders); an item of a
  category with a complement (phones -> cases, coffee machines -> beans...) brings one of its
  three fixed accessories along with probability ``complement_rate`` (bundle mining signal).
* **Repeat purchases**: consumable categories have a replenishment cycle (coffee beans every two
  weeks, pet food every four, skincare every five...). After buying one, a customer buys it again
  with probability ``repeat_rate``, after their own version of the cycle (a personal pace, log-normal
  around the category's, times a log-normal jitter per purchase), and again, until they stop or the
  log ends: chains of repeats with real intervals to learn from.

``generate_shop`` is vectorised (numpy), so millions of events take seconds, and deterministic
for a given seed and sizes.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from recsvc.core.contract import CART, PURCHASE, VIEW
from recsvc.core.events import duplicate_mask

# name, base price, consumable (bought again), complement category (or "")
CATEGORIES: tuple[tuple[str, float, bool, str], ...] = (
    ("phones", 420.0, False, "phone-cases"),
    ("phone-cases", 19.0, False, "phones"),
    ("laptops", 950.0, False, "laptop-bags"),
    ("laptop-bags", 55.0, False, "laptops"),
    ("cameras", 520.0, False, "memory-cards"),
    ("memory-cards", 24.0, True, "cameras"),
    ("coffee-machines", 210.0, False, "coffee-beans"),
    ("coffee-beans", 13.0, True, "coffee-machines"),
    ("running-shoes", 115.0, False, "sports-socks"),
    ("sports-socks", 9.0, True, "running-shoes"),
    ("pet-food", 32.0, True, "pet-toys"),
    ("pet-toys", 11.0, False, "pet-food"),
    ("books", 16.0, False, ""),
    ("toys", 29.0, False, ""),
    ("skincare", 26.0, True, ""),
    ("kitchen", 38.0, False, ""),
)
#: Replenishment cycle in days of each consumable category (the others are not bought again).
CYCLE_DAYS: dict[str, float] = {
    "memory-cards": 45.0,
    "coffee-beans": 14.0,
    "sports-socks": 40.0,
    "pet-food": 28.0,
    "skincare": 35.0,
}
#: Spread (log-normal sigma) of a customer's pace around the category cycle, and of one interval
#: around the customer's pace.
_PACE_SIGMA = 0.25
_JITTER_SIGMA = 0.15
ADJECTIVES = ("Classic", "Pro", "Eco", "Urban", "Compact", "Deluxe", "Smart", "Nordic", "Vivid", "Essential")
END_OF_LOG = _dt.datetime(2024, 6, 30, tzinfo=_dt.UTC)

_LATENT_DIM = 16
_CONSIDERATION = 40  # items each user would ever look at
_TASTE_STRENGTH = 5.0  # weight of taste . style in a user's utility
_POPULARITY_STRENGTH = 0.6  # weight of log-popularity in a user's utility


def generate_shop(
    seed: int = 7,
    n_users: int = 2000,
    n_items: int = 500,
    days: int = 60,
    *,
    sessions_per_user: float = 12.0,
    complement_rate: float = 0.35,
    repeat_rate: float = 0.5,
) -> tuple[pa.Table, pa.Table]:
    """Generate a shop: ``(events, catalog)`` as arrow tables in the input contract.

    Parameters
    ----------
    seed : int
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    n_users, n_items, days : int
        Shop size and length of the event log (ending 2024-06-30 UTC).
    sessions_per_user : float
        Mean sessions per user over the whole log (activity is log-normal around it).
    complement_rate : float
        Probability that a purchase of an item with accessories also buys one of them.
    repeat_rate : float
        Probability that a consumable purchase is followed by another one a cycle later
        (:data:`CYCLE_DAYS`; each repeat may be followed by another with the same probability).

    Returns
    -------
    (pyarrow.Table, pyarrow.Table)
        events ``user_id, item_id, event, timestamp, order_id, quantity, price`` sorted by time
        (timestamps in Unix seconds), and catalog ``item_id, title, category, price, available``.
    """
    if n_users < 1 or n_items < len(CATEGORIES) or days < 1:
        raise ValueError(f"need n_users >= 1, n_items >= {len(CATEGORIES)} and days >= 1")
    rng = np.random.default_rng(seed)
    catalog = _make_catalog(rng, n_items)
    users = _make_users(rng, n_users, days, sessions_per_user, catalog)
    events = _make_events(rng, catalog, users, days, complement_rate, repeat_rate)
    return _events_table(events, catalog), _catalog_table(catalog)


@dataclass
class _Catalog:
    category: np.ndarray  # int per item
    style: np.ndarray  # (n_items, dim)
    popularity_logit: np.ndarray
    price: np.ndarray
    available: np.ndarray
    accessories: np.ndarray  # (n_items, 3) item indices in the complement category, -1 if none
    consumable: np.ndarray  # bool per item
    centroids: np.ndarray  # (n_categories, dim)
    titles: list[str]


def _make_catalog(rng: np.random.Generator, n_items: int) -> _Catalog:
    n_cat = len(CATEGORIES)
    centroids = rng.standard_normal((n_cat, _LATENT_DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    # Uneven category sizes, every category non-empty.
    share = rng.dirichlet(np.full(n_cat, 3.0))
    category = np.concatenate([np.arange(n_cat), rng.choice(n_cat, n_items - n_cat, p=share)])
    rng.shuffle(category)
    style = centroids[category] + 0.45 * rng.standard_normal((n_items, _LATENT_DIM)) / np.sqrt(_LATENT_DIM)
    style /= np.linalg.norm(style, axis=1, keepdims=True)
    # Power-law popularity: the item at popularity rank r gets logit -1.1 * log(r).
    rank = rng.permutation(n_items) + 1
    popularity_logit = -1.1 * np.log(rank)
    base = np.array([c[1] for c in CATEGORIES])[category]
    price = np.round(base * rng.lognormal(0.0, 0.35, n_items), 2).clip(0.5, None)
    available = rng.random(n_items) >= 0.04
    consumable = np.array([c[2] for c in CATEGORIES])[category]
    # Accessories: three items of the complement category, favouring popular ones with a close style.
    names = [c[0] for c in CATEGORIES]
    complement = np.array([names.index(c[3]) if c[3] else -1 for c in CATEGORIES])
    accessories = np.full((n_items, 3), -1, dtype=np.int64)
    for cat in range(n_cat):
        comp = complement[cat]
        if comp < 0:
            continue
        anchors = np.flatnonzero(category == cat)
        pool = np.flatnonzero(category == comp)
        affinity = (
            style[anchors] @ style[pool].T * 3.0
            + popularity_logit[pool]
            + rng.gumbel(size=(len(anchors), len(pool)))
        )
        k = min(3, len(pool))
        best = np.argsort(-affinity, axis=1)[:, :k]
        accessories[anchors, :k] = pool[best]
    titles = [
        f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {names[c].replace('-', ' ')} {i + 1}"
        for i, c in enumerate(category)
    ]
    return _Catalog(
        category, style, popularity_logit, price, available, accessories, consumable, centroids, titles
    )


@dataclass
class _Users:
    taste: np.ndarray  # (n_users, dim)
    sessions: np.ndarray  # sessions per user
    join_day: np.ndarray  # float day the user shows up
    consideration: np.ndarray  # (n_users, M) item indices
    cumulative: np.ndarray  # (n_users, M) cumulative pick probabilities within the set
    affinity: np.ndarray  # (n_users, M) standardised utility of each considered item


def _make_users(
    rng: np.random.Generator, n_users: int, days: int, sessions_per_user: float, cat: _Catalog
) -> _Users:
    n_cat = len(cat.centroids)
    n_fav = rng.integers(1, 4, n_users)
    taste = np.zeros((n_users, _LATENT_DIM))
    for k in range(3):
        fav = rng.integers(0, n_cat, n_users)
        weight = (k < n_fav) * rng.uniform(0.5, 1.0, n_users)
        taste += weight[:, None] * cat.centroids[fav]
    taste += 0.35 * rng.standard_normal((n_users, _LATENT_DIM)) / np.sqrt(_LATENT_DIM)
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)
    activity = rng.lognormal(0.0, 0.8, n_users)
    activity *= sessions_per_user / activity.mean()
    join_day = np.where(rng.random(n_users) < 0.75, 0.0, rng.uniform(0, days * 0.9, n_users))
    active_share = (days - join_day) / days
    sessions = np.maximum(1, rng.poisson(activity * active_share))

    consideration, utility_kept = _consideration_sets(rng, taste, cat)
    # Within the set, items are picked in proportion to exp(utility); affinity drives the funnel.
    # (softened: the set itself was already drawn in proportion to exp(utility)).
    weights = np.exp(0.5 * (utility_kept - utility_kept.max(axis=1, keepdims=True)))
    cumulative = np.cumsum(weights, axis=1)
    cumulative /= cumulative[:, -1:]
    centred = utility_kept - utility_kept.mean(axis=1, keepdims=True)
    affinity = centred / (centred.std() + 1e-9)
    return _Users(
        taste, sessions, join_day, consideration, cumulative.astype(np.float32), affinity.astype(np.float32)
    )


def _consideration_sets(
    rng: np.random.Generator, taste: np.ndarray, cat: _Catalog
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's consideration set: ``m`` distinct items drawn roughly in proportion to
    ``exp(utility)``, ``utility = taste . style + popularity``.

    Scoring every user against every item costs users x items; instead candidates are proposed
    cheaply (category by the user's affinity to its centre, item by popularity within it) and
    re-weighted by ``exp(utility) / proposal`` in a Gumbel race (sampling-importance-resampling),
    which costs users x 4m.
    """
    n_users, n_items = len(taste), len(cat.category)
    m = min(_CONSIDERATION, n_items)
    n_cat = len(cat.centroids)
    pop = _POPULARITY_STRENGTH * cat.popularity_logit
    # Items grouped by category, with the within-category popularity CDF shifted by the category
    # number, so one searchsorted over "category + u" picks an item of that category.
    by_cat = np.argsort(cat.category, kind="stable")
    cat_sorted = cat.category[by_cat]
    weight = np.exp(pop[by_cat] - pop.max())
    mass = np.bincount(cat_sorted, weights=weight, minlength=n_cat)
    within = np.cumsum(weight) - np.concatenate(([0.0], np.cumsum(mass)))[cat_sorted]
    shifted_cdf = cat_sorted + within / mass[cat_sorted]
    log_item_share = np.log(weight / mass[cat_sorted])  # log P(item | category), in by_cat order
    item_share = np.empty(n_items)
    item_share[by_cat] = log_item_share

    k = 4 * m
    consideration = np.empty((n_users, m), dtype=np.int64)
    utility_kept = np.empty((n_users, m), dtype=np.float32)
    chunk = 4096
    for lo in range(0, n_users, chunk):
        t = taste[lo : lo + chunk]
        rows = len(t)
        cat_logit = _TASTE_STRENGTH * (t @ cat.centroids.T) + np.log(mass + 1e-300)
        cat_prob = np.exp(cat_logit - cat_logit.max(axis=1, keepdims=True))
        cat_prob /= cat_prob.sum(axis=1, keepdims=True)
        cat_cdf = np.cumsum(cat_prob, axis=1)
        r = rng.random((rows, k))
        cand_cat = np.minimum((cat_cdf[:, None, :] < r[:, :, None]).sum(axis=2), n_cat - 1)
        pos = np.searchsorted(shifted_cdf, cand_cat + rng.random((rows, k)), side="right")
        cand = by_cat[np.minimum(pos, n_items - 1)]
        cand = np.where(cat.category[cand] == cand_cat, cand, by_cat[np.searchsorted(cat_sorted, cand_cat)])
        utility = _TASTE_STRENGTH * np.einsum("rd,rkd->rk", t, cat.style[cand]) + pop[cand]
        log_proposal = np.log(np.take_along_axis(cat_prob, cand_cat, axis=1) + 1e-300) + item_share[cand]
        race = utility - log_proposal - np.log(rng.standard_exponential((rows, k)) + 1e-300)
        # Repeated candidates race once: later copies of an item are pushed to the back.
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_cand = np.take_along_axis(cand, order, axis=1)
        repeat = np.zeros_like(sorted_cand, dtype=bool)
        repeat[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        race_sorted = np.take_along_axis(race, order, axis=1)
        race_sorted[repeat] = -np.inf
        top = np.argsort(-race_sorted, axis=1)[:, :m]
        chosen = np.take_along_axis(sorted_cand, top, axis=1)
        chosen_utility = np.take_along_axis(np.take_along_axis(utility, order, axis=1), top, axis=1)
        # A user with fewer than m distinct candidates (tiny catalogs) keeps repeats at the end.
        consideration[lo : lo + rows] = chosen
        utility_kept[lo : lo + rows] = chosen_utility
    return consideration, utility_kept


def _pick(rng: np.random.Generator, users: _Users, user_of: np.ndarray) -> np.ndarray:
    """Position within each user's consideration set, drawn by the user's pick probabilities."""
    out = np.empty(len(user_of), dtype=np.int64)
    chunk = 1 << 18
    for lo in range(0, len(user_of), chunk):
        u = user_of[lo : lo + chunk]
        r = rng.random(len(u), dtype=np.float32)
        out[lo : lo + chunk] = (users.cumulative[u] < r[:, None]).sum(axis=1)
    return np.minimum(out, users.cumulative.shape[1] - 1)


def _make_events(
    rng: np.random.Generator,
    cat: _Catalog,
    users: _Users,
    days: int,
    complement_rate: float,
    repeat_rate: float,
) -> dict[str, np.ndarray]:
    end = END_OF_LOG.timestamp()
    start = end - days * 86_400
    n_sessions = int(users.sessions.sum())
    session_user = np.repeat(np.arange(len(users.sessions)), users.sessions)
    session_day = users.join_day[session_user] + rng.random(n_sessions) * (
        days - users.join_day[session_user]
    )
    session_time = start + session_day * 86_400

    # Views: 1 + Poisson(1.6) distinct-ish items per session, from the user's consideration set.
    views_per_session = 1 + rng.poisson(1.6, n_sessions)
    view_session = np.repeat(np.arange(n_sessions), views_per_session)
    view_user = session_user[view_session]
    pos = _pick(rng, users, view_user)
    view_item = users.consideration[view_user, pos]
    view_affinity = users.affinity[view_user, pos]
    step = np.arange(len(view_session)) - np.repeat(
        np.cumsum(views_per_session) - views_per_session, views_per_session
    )
    view_time = session_time[view_session] + 45.0 * step

    # Funnel: liking an item raises the chance to cart it; carted items are bought half the time.
    p_cart = 1.0 / (1.0 + np.exp(-(1.2 * view_affinity - 2.9)))
    carted = rng.random(len(view_item)) < p_cart
    bought = carted & (rng.random(len(view_item)) < 0.55)

    users_col = [view_user, view_user[carted], view_user[bought]]
    items_col = [view_item, view_item[carted], view_item[bought]]
    kinds = [
        np.full(len(view_item), VIEW),
        np.full(int(carted.sum()), CART),
        np.full(int(bought.sum()), PURCHASE),
    ]
    times = [
        view_time,
        view_time[carted] + 20.0,
        session_time[view_session[bought]] + 45.0 * views_per_session[view_session[bought]] + 120.0,
    ]
    orders = [np.full(len(view_item), -1), np.full(int(carted.sum()), -1), view_session[bought]]

    # Accessories bought along in the same order (viewed and carted first).
    b_item = view_item[bought]
    b_session = view_session[bought]
    acc = cat.accessories[b_item, rng.integers(0, 3, len(b_item))]
    takes = (acc >= 0) & (rng.random(len(b_item)) < complement_rate)
    acc_user, acc_item, acc_session = view_user[bought][takes], acc[takes], b_session[takes]
    acc_time = session_time[acc_session] + 45.0 * views_per_session[acc_session] + 60.0
    for kind, offset in ((VIEW, 0.0), (CART, 30.0), (PURCHASE, 90.0)):
        users_col.append(acc_user)
        items_col.append(acc_item)
        kinds.append(np.full(len(acc_item), kind))
        times.append(acc_time + offset)
        orders.append(acc_session if kind == PURCHASE else np.full(len(acc_item), -1))

    # Repeat purchases of consumables: chains of replenishments a customer's cycle apart, each
    # continued with probability repeat_rate, as their own small orders.
    all_user = np.concatenate([view_user[bought], acc_user])
    all_item = np.concatenate([b_item, acc_item])
    all_time = np.concatenate([times[2], acc_time + 90.0])
    names = [c[0] for c in CATEGORIES]
    cycle = np.array([CYCLE_DAYS.get(name, 0.0) for name in names])[cat.category]
    pace = rng.lognormal(0.0, _PACE_SIGMA, len(users.sessions))
    r_users, r_items, r_times = [], [], []
    # A customer has one replenishment habit per item: it starts at their first purchase of it.
    first = np.lexsort((all_time, all_item, all_user))
    starts = np.ones(len(first), dtype=bool)
    starts[1:] = (all_user[first][1:] != all_user[first][:-1]) | (all_item[first][1:] != all_item[first][:-1])
    chain = first[starts & cat.consumable[all_item[first]]]
    c_user, c_item, c_time = all_user[chain], all_item[chain], all_time[chain]
    while len(c_user):
        go = rng.random(len(c_user)) < repeat_rate
        gap = cycle[c_item[go]] * pace[c_user[go]] * rng.lognormal(0.0, _JITTER_SIGMA, int(go.sum()))
        c_user, c_item, c_time = c_user[go], c_item[go], c_time[go] + gap * 86_400
        in_log = c_time < end
        c_user, c_item, c_time = c_user[in_log], c_item[in_log], c_time[in_log]
        r_users.append(c_user)
        r_items.append(c_item)
        r_times.append(c_time)
    r_user = np.concatenate(r_users) if r_users else np.zeros(0, np.int64)
    r_item = np.concatenate(r_items) if r_items else np.zeros(0, np.int64)
    r_time = np.concatenate(r_times) if r_times else np.zeros(0)
    r_order = n_sessions + np.arange(len(r_user))
    for kind, offset in ((VIEW, -120.0), (CART, -60.0), (PURCHASE, 0.0)):
        users_col.append(r_user)
        items_col.append(r_item)
        kinds.append(np.full(len(r_item), kind))
        times.append(r_time + offset)
        orders.append(r_order if kind == PURCHASE else np.full(len(r_item), -1))

    user = np.concatenate(users_col)
    item = np.concatenate(items_col)
    event = np.concatenate(kinds).astype(np.int8)
    time = np.concatenate(times).astype(np.int64)
    order = np.concatenate(orders)
    # Out-of-stock items sold out a week before the end: no events after that.
    sold_out = ~cat.available[item] & (time >= end - 7 * 86_400)
    keep = ~sold_out & (time < end)
    user, item, event, time, order = user[keep], item[keep], event[keep], time[keep], order[keep]
    # An item picked twice in one session would be "bought" twice at the same instant in the same
    # order: one purchase line, as a shop would log it.
    unique = ~duplicate_mask([user, item, time, event, order])
    user, item, event, time, order = user[unique], item[unique], event[unique], time[unique], order[unique]
    by_time = np.argsort(time, kind="stable")
    return {
        "user": user[by_time],
        "item": item[by_time],
        "event": event[by_time],
        "time": time[by_time],
        "order": order[by_time],
    }


def _ids(prefix: str, values: np.ndarray, width: int) -> pa.Array:
    """``prefix`` + zero-padded number, built by arrow (fast for millions of rows)."""
    import pyarrow.compute as pc

    numbers = pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), numbers, "")


def _events_table(ev: dict[str, np.ndarray], cat: _Catalog) -> pa.Table:
    import pyarrow.compute as pc

    n_items = len(cat.category)
    names = np.array(["view", "cart", "purchase", "impression", "click"], dtype=object)
    is_purchase = ev["event"] == PURCHASE
    order = pc.if_else(pa.array(is_purchase), _ids("o", np.maximum(ev["order"], 0), 7), pa.scalar(""))
    # Consumables come in packs of 1-3; everything else one at a time.
    quantity = np.where(is_purchase, np.where(cat.consumable[ev["item"]], 1 + ev["order"] % 3, 1), 0)
    return pa.table(
        {
            "user_id": _ids("u", ev["user"], 6),
            "item_id": _ids("sku-", ev["item"], max(5, len(str(n_items)))),
            "event": pa.array(names[ev["event"]], type=pa.string()),
            "timestamp": pa.array(ev["time"], type=pa.int64()),
            "order_id": order,
            "quantity": pc.if_else(
                pa.array(is_purchase), pc.cast(pa.array(quantity), pa.string()), pa.scalar("")
            ),
            "price": pc.if_else(
                pa.array(is_purchase), pc.cast(pa.array(cat.price[ev["item"]]), pa.string()), pa.scalar("")
            ),
        }
    )


def _catalog_table(cat: _Catalog) -> pa.Table:
    n_items = len(cat.category)
    names = np.array([c[0] for c in CATEGORIES], dtype=object)
    return pa.table(
        {
            "item_id": _ids("sku-", np.arange(n_items), max(5, len(str(n_items)))),
            "title": pa.array(cat.titles, type=pa.string()),
            "category": pa.array(names[cat.category], type=pa.string()),
            "price": pa.array(cat.price, type=pa.float64()),
            "available": pa.array(np.where(cat.available, "true", "false"), type=pa.string()),
        }
    )


def write_shop(
    out_dir: str | Path,
    seed: int = 7,
    n_users: int = 2000,
    n_items: int = 500,
    days: int = 60,
    **kwargs: float,
) -> tuple[Path, Path]:
    """Generate a shop and write ``events.csv`` and ``catalog.csv`` into ``out_dir``.

    Files are written under temporary names and renamed, so a reader never sees half a file.

    Returns
    -------
    (Path, Path)
        Paths of the events and catalog files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events, catalog = generate_shop(seed=seed, n_users=n_users, n_items=n_items, days=days, **kwargs)
    paths = []
    for name, table in (("events.csv", events), ("catalog.csv", catalog)):
        final = out / name
        tmp = out / f".{name}.tmp"
        pa_csv.write_csv(table, tmp)
        tmp.replace(final)
        paths.append(final)
    return paths[0], paths[1]
