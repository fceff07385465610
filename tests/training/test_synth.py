"""The synthetic shop: deterministic, contract-valid, and shaped like a shop."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from recsvc.core.contract import PURCHASE, VIEW
from recsvc.core.eventfiles import load_catalog, load_events
from training.synth import CATEGORIES, CYCLE_DAYS, END_OF_LOG, generate_shop, write_shop


@pytest.fixture(scope="module")
def shop():
    return generate_shop(seed=21, n_users=800, n_items=200, days=45)


def test_same_seed_same_shop_and_another_seed_differs(shop):
    again = generate_shop(seed=21, n_users=800, n_items=200, days=45)
    assert shop[0].equals(again[0]) and shop[1].equals(again[1])
    assert not generate_shop(seed=22, n_users=800, n_items=200, days=45)[0].equals(shop[0])


def test_written_files_load_without_rejections(tmp_path):
    events_path, catalog_path = write_shop(tmp_path, seed=1, n_users=300, n_items=80, days=20)
    events, report = load_events(events_path)
    catalog, catalog_report = load_catalog(catalog_path)
    assert report.rows_rejected == 0 and report.duplicates_dropped == 0
    assert catalog_report.rows_rejected == 0 and len(catalog) == 80
    assert set(np.unique(events.item_id)) <= set(catalog.item_id)
    assert events.timestamp.max() < END_OF_LOG.timestamp()
    assert events.timestamp.min() >= END_OF_LOG.timestamp() - 20 * 86_400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.csv", "events.csv"]


def test_shop_shape(shop):
    events, catalog = shop
    kinds = pc.value_counts(events["event"]).to_pylist()
    counts = {row["values"]: row["counts"] for row in kinds}
    # A funnel: many views, fewer carts, fewer purchases.
    assert counts["view"] > counts["cart"] > counts["purchase"] > 0
    # Power-law popularity: the top 10% of items get a large share of the events.
    per_item = np.sort(np.asarray(pc.value_counts(events["item_id"]).field("counts")))[::-1]
    assert per_item[: len(per_item) // 10].sum() > 0.3 * per_item.sum()
    # Multi-item orders exist, and repeat purchases of the same item by the same user.
    purchases = events.filter(pc.equal(events["event"], "purchase"))
    order_sizes = np.asarray(pc.value_counts(purchases["order_id"]).field("counts"))
    assert (order_sizes > 1).mean() > 0.1
    pairs = pc.binary_join_element_wise(purchases["user_id"], purchases["item_id"], "|")
    assert (np.asarray(pc.value_counts(pairs).field("counts")) > 1).sum() > 10
    # Catalog: every category used, prices positive, some items out of stock.
    assert set(catalog["category"].to_pylist()) == {c[0] for c in CATEGORIES}
    assert pc.min(catalog["price"]).as_py() > 0
    assert 0 < catalog["available"].to_pylist().count("false") < 0.2 * catalog.num_rows


def test_out_of_stock_items_have_no_events_in_the_last_week(shop):
    events, catalog = shop
    sold_out = set(catalog.filter(pc.equal(catalog["available"], "false"))["item_id"].to_pylist())
    last_week = events.filter(pc.greater_equal(events["timestamp"], int(END_OF_LOG.timestamp()) - 7 * 86_400))
    assert sold_out and not sold_out & set(last_week["item_id"].to_pylist())


def test_complementary_categories_are_bought_together(shop):
    events, catalog = shop
    category = dict(zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True))
    purchases = events.filter(pc.equal(events["event"], "purchase")).to_pydict()
    baskets: dict[str, set[str]] = {}
    for order, item in zip(purchases["order_id"], purchases["item_id"], strict=True):
        baskets.setdefault(order, set()).add(category[item])
    with_phone = [b for b in baskets.values() if "phones" in b]
    assert with_phone and sum("phone-cases" in b for b in with_phone) / len(with_phone) > 0.2


def test_event_codes_line_up_with_contract():
    assert (VIEW, PURCHASE) == (0, 2)
    with pytest.raises(ValueError):
        generate_shop(n_items=3)


def test_consumables_are_replenished_on_their_cycle():
    events, catalog = generate_shop(seed=4, n_users=1500, n_items=200, days=120, sessions_per_user=2.0)
    category = dict(zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True))
    purchases = events.filter(pc.equal(events["event"], "purchase")).to_pydict()
    times: dict[tuple[str, str], list[int]] = {}
    for user, item, ts in zip(
        purchases["user_id"], purchases["item_id"], purchases["timestamp"], strict=True
    ):
        times.setdefault((user, item), []).append(ts)
    gaps: dict[str, list[float]] = {}
    for (_, item), stamps in times.items():
        stamps.sort()
        gaps.setdefault(category[item], []).extend(np.diff(stamps) / 86_400)
    for name, cycle in CYCLE_DAYS.items():
        # Chains of repeats a pace (sd 0.25) times a jitter (0.15) apart (few sessions per user, so
        # few repeats by chance): the median gap near the cycle.
        assert np.median(gaps[name]) == pytest.approx(cycle, rel=0.25), name
    consumable = {name for name, _, bought_again, _ in CATEGORIES if bought_again}
    repeated = {True: [0, 0], False: [0, 0]}
    for (_, item), stamps in times.items():
        repeated[category[item] in consumable][0] += len(stamps) > 1
        repeated[category[item] in consumable][1] += 1
    share = {kind: again / pairs for kind, (again, pairs) in repeated.items()}
    assert share[True] > 3 * share[False]
