"""Bundle assembly and pricing (pure numpy): rules, fallbacks, carts, users -- answers by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsvc.core.artifact import BundleCandidates
from recsvc.core.bundles import (
    MAX_CART_ITEMS,
    BundleCatalog,
    BundleRules,
    Offer,
    already_bought,
    assemble_bundle,
    category_codes,
    companions_for_evaluation,
    complete_cart,
    normalise_title,
    price_bundle,
    user_bundles,
)

CATEGORIES = ["phones", "cases", "chargers", "audio", "books"]


def candidates(n: int, rows: dict[int, list[tuple[int, int]]]) -> BundleCandidates:
    """``{anchor: [(item, support), ...]}`` best first; score = support / 100 (0.01 if support 0)."""
    indptr, indices, score, support = [0], [], [], []
    for anchor in range(n):
        for item, sup in rows.get(anchor, []):
            indices.append(item)
            support.append(sup)
            score.append(sup / 100 if sup else 0.01)
        indptr.append(len(indices))
    return BundleCandidates(
        np.asarray(indptr, np.int64),
        np.asarray(indices, np.int32),
        np.asarray(score, np.float32),
        np.asarray(support, np.int32),
    )


def make_catalog(
    category: list[int],
    rows: dict[int, list[tuple[int, int]]] | None = None,
    *,
    price: list[float] | None = None,
    factors: np.ndarray | None = None,
    available: list[bool] | None = None,
    titles: list[str] | None = None,
    popularity: list[float] | None = None,
) -> BundleCatalog:
    n = len(category)
    if factors is None:
        factors = np.eye(n, dtype=np.float32)  # orthogonal: no similarity, no near-duplicates
    return BundleCatalog(
        item_ids=[f"i{i}" for i in range(n)],
        item_factors=factors,
        price=np.asarray(price if price is not None else [10.0 * (i + 1) for i in range(n)], np.float32),
        available=np.asarray(available if available is not None else [True] * n),
        category=np.asarray(category, np.int32),
        popularity=np.asarray(
            popularity if popularity is not None else [float(n - i) for i in range(n)], np.float32
        ),
        bundles=candidates(n, rows or {}),
        categories=CATEGORIES,
        titles=titles if titles is not None else [f"Item {i}" for i in range(n)],
    )


# ---- pricing -----------------------------------------------------------------------------------


def test_percent_and_cheapest_discounts():
    assert price_bundle([10.0, 20.0, 30.0], "percent", 10) == Offer(60.0, 54.0, 6.0)
    assert price_bundle([10.0, 20.0, 30.0], "cheapest", 50) == Offer(60.0, 55.0, 5.0)
    assert price_bundle([19.99], "percent", 0) == Offer(19.99, 19.99, 0.0)
    assert price_bundle([5.0, 7.0], "cheapest", 100) == Offer(12.0, 7.0, 5.0)


def test_amounts_are_cents_that_add_up():
    offer = price_bundle([0.1, 0.2, 9.99], "percent", 15)
    assert offer.total_price == 10.29
    # 15% of 1029 cents = 154.35 -> 154 cents saved.
    assert offer.savings == 1.54 and offer.bundle_price == 8.75
    assert round(offer.bundle_price + offer.savings, 2) == offer.total_price


def test_unknown_price_or_bad_rule():
    assert price_bundle([10.0, math.nan], "percent", 10) == Offer(None, None, None)
    assert price_bundle([], "percent", 10) == Offer(None, None, None)
    with pytest.raises(ValueError, match="discount rule"):
        price_bundle([1.0], "bogo", 10)
    with pytest.raises(ValueError, match="between 0 and 100"):
        price_bundle([1.0], "percent", 120)


def test_rules_validation_and_config():
    from recsvc.core.config import Config

    rules = BundleRules.from_config(
        Config.create(bundle_discount_rule="cheapest", bundle_discount_pct=25.0), size=4
    )
    assert (rules.size, rules.discount_rule, rules.discount_pct, rules.same_category) == (
        4,
        "cheapest",
        25.0,
        False,
    )
    for bad in (
        {"size": 1},
        {"size": 11},
        {"discount_rule": "x"},
        {"discount_pct": -1.0},
        {"max_price": -5.0},
    ):
        with pytest.raises(ValueError):
            BundleRules(**bad)


# ---- one anchor ------------------------------------------------------------------------------


def test_evidence_order_takes_co_purchases_best_first_whatever_their_category():
    # 0 phone; 1 phone (bought together most), 2 case, 3 case, 4 charger.
    cat = make_catalog([0, 0, 1, 1, 2], {0: [(1, 9), (2, 8), (3, 7), (4, 6)]})
    bundle = assemble_bundle(cat, 0, BundleRules(size=3))
    # Really bought together with the anchor: a second phone is allowed, and comes first.
    assert bundle.items == [0, 1, 2]
    assert bundle.support == [0, 9, 8] and bundle.sources == ["base", "bought_together", "bought_together"]
    assert bundle.reason == "bought together by 9 customers" and bundle.reason_code == "bought_together"
    # price 10 + 20 + 30 = 60, 10% off.
    assert bundle.offer == Offer(60.0, 54.0, 6.0)
    assert assemble_bundle(cat, 0, BundleRules(size=5)).items == [0, 1, 2, 3, 4]
    # Diversity order: new categories first, then other categories, the anchor's last.
    diverse = BundleRules(size=3, order="diversity")
    assert assemble_bundle(cat, 0, diverse).items == [0, 2, 4]
    assert assemble_bundle(cat, 0, diverse.with_(size=4)).items == [0, 2, 4, 3]
    assert assemble_bundle(cat, 0, diverse.with_(size=5)).items == [0, 2, 4, 3, 1]
    # With same-category sets allowed, categories play no part: evidence order.
    assert assemble_bundle(cat, 0, BundleRules(size=5, same_category=True)).items == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="order"):
        BundleRules(order="random")


def test_a_category_repeats_only_for_items_bought_together_with_the_anchor():
    # Anchor 0 (phones). Bought with it: 1 (cases). Similar taste only (support 0 in its mined
    # row): 2 (cases), 6 (phones). Best sellers: 3 (cases), 4 (phones), 5 (chargers), 7 (audio).
    cat = make_catalog(
        [0, 1, 1, 1, 0, 2, 0, 3],
        {0: [(1, 4), (2, 0), (6, 0)]},
        popularity=[0, 1, 2, 9, 8, 7, 0, 6],
    )
    bundle = assemble_bundle(cat, 0, BundleRules(size=5))
    # 2 and 3 would be a second case, 4 and 6 a second phone, none bought with the anchor.
    assert bundle.items == [0, 1, 5, 7]
    assert bundle.sources[1:] == ["bought_together", "popular_pairing", "popular_pairing"]
    # Bought together, a case goes with a case and a phone with a phone.
    cat = make_catalog([0, 0, 1, 1, 2], {0: [(3, 2), (1, 3), (2, 1)]}, popularity=[0, 0, 0, 0, 9])
    assert assemble_bundle(cat, 0, BundleRules(size=5)).items == [0, 3, 1, 2, 4]
    # In a cart too: the cart's categories count as taken.
    cart = complete_cart(
        make_catalog([0, 1, 1, 2], {}, popularity=[0, 9, 8, 7]), [0, 2], BundleRules(), add=2
    )
    assert cart.companions == [3]


@pytest.mark.parametrize("order", ["evidence", "diversity"])
def test_no_bundle_repeats_a_category_without_co_purchase_on_random_catalogues(order):
    rng = np.random.default_rng(17)
    for trial in range(30):
        n = 40
        category = rng.integers(-1, 5, n).tolist()  # -1: unknown category, never a conflict
        rows = {
            a: [
                (int(i), int(rng.integers(0, 3)) * int(rng.integers(1, 9)))
                for i in rng.choice(n, 8, replace=False)
            ]
            for a in range(n)
            if rng.random() < 0.7
        }
        cat = make_catalog(
            category,
            rows,
            factors=rng.standard_normal((n, 4)).astype(np.float32),
            popularity=rng.random(n).tolist(),
            available=(rng.random(n) < 0.9).tolist(),
        )
        rules = BundleRules(size=int(rng.integers(2, 8)), order=order)
        bundles = [assemble_bundle(cat, a, rules) for a in range(n)]
        bundles += [
            complete_cart(cat, rng.choice(n, 3, replace=False).tolist(), rules, add=3) for _ in range(10)
        ]
        for bundle in filter(None, bundles):
            seen: dict[int, int] = {}
            for position, item in enumerate(bundle.items):
                code = category[item]
                if code < 0:
                    continue
                if code in seen and position >= bundle.base:
                    # A repeated category: this companion was really bought with the base ...
                    assert bundle.support[position] > 0, (trial, bundle.items, bundle.support)
                    # ... and so was the earlier one, unless that one is a base item.
                    first = seen[code]
                    assert first < bundle.base or bundle.support[first] > 0, (trial, bundle.items)
                seen.setdefault(code, position)


def test_out_of_stock_duplicates_and_near_duplicates_are_skipped():
    factors = np.eye(6, dtype=np.float32)
    factors[5] = factors[0] * 2.0 + 0.01  # a variant of the anchor in factor space
    cat = make_catalog(
        [0, 1, 1, 2, 3, 4],
        {0: [(1, 9), (2, 8), (3, 7), (5, 0), (4, 6)]},
        available=[True, False, True, True, True, True],
        titles=["Red phone", "Case", "red  PHONE!", "Charger", "Earbuds", "Phone"],
        factors=factors,
    )
    # 1 is out of stock; 2 has the anchor's title (normalised); 5 (similarity only) is a variant.
    assert assemble_bundle(cat, 0, BundleRules(size=4)).items == [0, 3, 4]
    assert normalise_title("  Red-phone ") == "red phone"


def test_co_purchased_items_are_not_near_duplicates_whatever_the_factors():
    factors = np.eye(3, dtype=np.float32)
    factors[1] = factors[0]  # bought together AND identical factors: a real complement
    factors[2] = factors[0]  # identical factors, never bought together: a substitute
    cat = make_catalog([0, 1, 2], {0: [(1, 5), (2, 0)]}, factors=factors)
    assert assemble_bundle(cat, 0, BundleRules(size=3)).items == [0, 1]


def test_best_sellers_are_no_near_duplicates_of_each_other_only_of_the_anchor():
    # No co-purchase data, no categories. Best sellers 1, 2, 3: 1 is a variant of the anchor,
    # 2 and 3 share their factors (bought by everyone, as best sellers' factors tend to be).
    factors = np.eye(5, dtype=np.float32)
    factors[1] = factors[0]
    factors[3] = factors[2]
    cat = make_catalog([-1] * 5, {}, factors=factors, popularity=[0, 9, 8, 7, 1])
    bundle = assemble_bundle(cat, 0, BundleRules(size=3))
    assert bundle.items == [0, 2, 3] and bundle.sources[1:] == ["popular_pairing", "popular_pairing"]


def test_max_price_bounds_the_bundle_price_after_discount():
    cat = make_catalog([0, 1, 2, 3], {0: [(1, 9), (2, 8), (3, 7)]}, price=[50.0, 40.0, 10.0, math.nan])
    # 50 + 40 = 90 -> 81 > 70: skipped; 50 + 10 = 60 -> 54 fits; unknown price skipped.
    bundle = assemble_bundle(cat, 0, BundleRules(size=4, max_price=70.0))
    assert bundle.items == [0, 2] and bundle.offer.bundle_price == 54.0
    assert assemble_bundle(cat, 0, BundleRules(max_price=44.0)) is None  # the anchor alone: 45
    # Without a budget, an unknown price is allowed but the offer cannot be priced.
    unpriced = assemble_bundle(cat, 0, BundleRules(size=4))
    assert unpriced.items == [0, 1, 2, 3] and unpriced.offer == Offer(None, None, None)


def test_unavailable_anchor_has_no_offer():
    cat = make_catalog([0, 1], {0: [(1, 3)]}, available=[False, True])
    assert assemble_bundle(cat, 0, BundleRules()) is None
    with pytest.raises(IndexError):
        assemble_bundle(cat, 2, BundleRules())


def test_exclusions_and_repurchase_categories():
    cat = make_catalog([0, 1, 2, 3], {0: [(1, 9), (2, 8), (3, 7)]})
    assert assemble_bundle(cat, 0, BundleRules(size=3), exclude=[1]).items == [0, 2, 3]
    # Bought 1 (cases) and 2 (chargers); chargers are bought again.
    bought = already_bought([1, 2, 2, 99], cat.category, category_codes(["chargers", "nope"], CATEGORIES))
    assert bought.tolist() == [1]
    assert category_codes(["chargers", "nope", "phones"], CATEGORIES) == [2, 0]


def test_fallback_chain_popular_complements_then_similarity():
    # Item 0 has no co-purchase data; its factors are close to item 3's.
    factors = np.eye(6, dtype=np.float32)
    factors[0] = [0.0, 0.0, 0.0, 1.0, 0.0, 0.5]
    cat = make_catalog(
        [0, 1, 2, 2, 3, 1], {1: [(4, 5)], 4: [(1, 5)]}, factors=factors, popularity=[1, 2, 3, 4, 5, 6]
    )
    bundle = assemble_bundle(cat, 0, BundleRules(size=3))
    # Phones have no complementary category: the best sellers, 5 (cases) then 4 (audio).
    assert bundle.items == [0, 5, 4] and bundle.sources[1:] == ["popular_pairing", "popular_pairing"]
    assert bundle.reason == "popular pairing" and bundle.support == [0, 0, 0]
    # The old order: similarity first -- 3 (cosine .89), then 5 (cosine .45).
    similar = assemble_bundle(cat, 0, BundleRules(size=3, similar_before_popular=True))
    assert similar.items == [0, 3, 5] and similar.sources[1:] == ["similar_taste", "similar_taste"]
    assert similar.reason == "similar taste" and similar.scores[1] == pytest.approx(
        1 / math.sqrt(1.25), rel=1e-5
    )
    # Similarity fills what the popular items leave: here the 200 best sellers are out of stock.
    n = 260
    big_factors = np.eye(n, dtype=np.float32)
    big_factors[0, 250] = 2.0  # 0 and 250 are alike
    popularity = np.arange(n, 0, -1, dtype=np.float32)  # 0 ... 199 are the best sellers
    big = make_catalog(
        [-1] * n, {}, factors=big_factors, popularity=popularity.tolist(),
        available=[i == 0 or i >= 200 for i in range(n)], price=[1.0] * n,
    )  # fmt: skip
    scarce = assemble_bundle(big, 0, BundleRules(size=2))
    assert scarce.items == [0, 250] and scarce.sources[1:] == ["similar_taste"]

    # An item with neither co-purchases nor factors: popular items of the categories bought with
    # its category (cases are bought with audio: 1<->4), then popular items overall.
    factors[1] = 0.0
    cat = make_catalog(
        [0, 1, 2, 2, 3, 1], {4: [(1, 5)], 2: [(4, 1)]}, factors=factors, popularity=[1, 2, 3, 4, 9, 6]
    )
    cat_bundle = assemble_bundle(cat, 1, BundleRules(size=3))
    assert cat_bundle.items[:2] == [1, 4]  # audio first: the complementary category
    assert cat_bundle.items[2] == 3  # then the most popular item of a new category (chargers)
    assert cat_bundle.reason_code == "popular_pairing" and cat_bundle.reason == "popular pairing"


def test_similarity_candidates_in_the_mined_row_do_not_claim_bought_together():
    # The mined row ranks 1 (ALS only, support 0) above 2 (bought together 4 times): evidence first.
    cat = make_catalog([0, 1, 2], {0: [(1, 0), (2, 4)]})
    bundle = assemble_bundle(cat, 0, BundleRules(size=3))
    assert bundle.items == [0, 2, 1] and bundle.sources[1:] == ["bought_together", "similar_taste"]
    assert bundle.reason == "bought together by 4 customers"


def test_a_co_purchase_in_the_anchors_category_beats_a_guess_in_another():
    # 0 and 1 phones bought together; 2 and 3 cases never bought with 0 (popular fallback only).
    cat = make_catalog([0, 0, 1, 1], {0: [(1, 5)]}, popularity=[1, 2, 9, 8])
    bundle = assemble_bundle(cat, 0, BundleRules(size=3))
    assert bundle.items == [0, 1, 2]
    assert bundle.sources[1:] == ["bought_together", "popular_pairing"]
    # Without co-purchase evidence the anchor's category is never used for a fallback.
    lonely = assemble_bundle(make_catalog([0, 0, 1, 1], {}, popularity=[1, 9, 8, 7]), 0, BundleRules(size=3))
    assert 1 not in lonely.items


def test_every_valid_item_gets_a_bundle():
    rng = np.random.default_rng(0)
    n = 40
    cat = make_catalog(
        list(rng.integers(0, 5, n)),
        {i: [((i + 1) % n, 3)] for i in range(0, n, 4)},
        factors=rng.standard_normal((n, 4)).astype(np.float32),
    )
    for anchor in range(n):
        bundle = assemble_bundle(cat, anchor, BundleRules(size=3))
        assert len(bundle.companions) == 2 and anchor not in bundle.companions
        assert len(set(bundle.items)) == 3


# ---- carts and users -------------------------------------------------------------------------


def test_cart_completion_pools_the_cart_items_candidates():
    # Cart: 0 (phone) and 1 (case). 3 goes with both; 4 only with 0 but more often.
    cat = make_catalog(
        [0, 1, 2, 2, 3, 4],
        {0: [(4, 9), (3, 5), (1, 9)], 1: [(3, 5), (0, 9), (5, 2)]},
        available=[True, True, True, True, True, True],
    )
    bundle = complete_cart(cat, [0, 1, 0], BundleRules(size=3), add=2)
    # Summed scores: 3 -> .10, 4 -> .09, 5 -> .02; items already in the cart are not suggested.
    assert bundle.items == [0, 1, 3, 4] and bundle.base == 2 and bundle.companions == [3, 4]
    assert bundle.support[2:] == [5, 9]
    assert bundle.offer.total_price == 10 + 20 + 40 + 50


def test_cart_with_out_of_stock_items_and_limits():
    cat = make_catalog([0, 1, 2], {0: [(2, 3)]}, available=[True, False, True])
    bundle = complete_cart(cat, [0, 1], BundleRules(), add=1)
    assert bundle.items == [0, 2] and bundle.extra == {"unavailable_cart_items": ["i1"]}
    assert complete_cart(cat, [1], BundleRules(), add=1) is None
    with pytest.raises(ValueError, match="at most"):
        complete_cart(cat, list(range(MAX_CART_ITEMS + 1)), BundleRules(), add=1)
    with pytest.raises(ValueError, match="add"):
        complete_cart(cat, [0], BundleRules(), add=0)


def test_user_bundles_never_repeat_an_item_or_offer_bought_ones():
    cat = make_catalog([0, 1, 2, 0, 1, 2, 3], {0: [(1, 5), (2, 4)], 3: [(1, 5), (4, 4), (5, 3)], 6: [(0, 2)]})
    bundles = user_bundles(cat, [0, 3, 6], n=3, rules=BundleRules(size=3), exclude=[2])
    # 0: case 1, then (2 bought) charger 5 from the popular items of phones' complements.
    # 3: 1 and 5 are taken, so case 4, then the popular item of a new category: 6.
    # 6 is then already shown, so it anchors nothing.
    assert [b.items for b in bundles] == [[0, 1, 5], [3, 4, 6]]
    assert bundles[0].sources[1:] == ["bought_together", "popular_pairing"]
    assert len(user_bundles(cat, [0, 3, 6], n=1, rules=BundleRules())) == 1
    assert user_bundles(cat, [2], n=3, rules=BundleRules(), exclude=[2]) == []


# ---- JSON and evaluation helper ----------------------------------------------------------------


def test_to_dict_shape():
    cat = make_catalog([0, 1], {0: [(1, 7)]}, price=[19.99, 5.01])
    body = assemble_bundle(cat, 0, BundleRules(size=2, discount_rule="cheapest", discount_pct=50)).to_dict(
        cat, BundleRules(discount_rule="cheapest", discount_pct=50)
    )
    anchor, companion = body["items"]
    assert anchor == {
        "item_id": "i0", "title": "Item 0", "category": "phones", "price": 19.99,
        "role": "anchor", "source": "base", "score": 1.0, "bought_together": 0,
    }  # fmt: skip
    assert companion == {
        "item_id": "i1", "title": "Item 1", "category": "cases", "price": 5.01,
        "role": "companion", "source": "bought_together", "score": 0.07, "bought_together": 7,
        "explanation": {
            "code": "bought_together", "text": "Often bought together with Item 0", "because": ["i0"],
        },
    }  # fmt: skip
    # Half of 501 cents is 250.5: rounded half up to 251 cents saved.
    assert (body["total_price"], body["bundle_price"], body["savings"]) == (25.0, 22.49, 2.51)
    assert body["discount"] == {"rule": "cheapest", "percent": 50} and body["size"] == 2
    assert body["reason"] == "bought together by 7 customers" and body["reason_code"] == "bought_together"


def test_companions_for_evaluation_matches_assembly():
    category = np.array([0, 1, 2, 1], np.int32)
    rows = candidates(4, {0: [(1, 3), (3, 2), (2, 1)]})
    table = companions_for_evaluation(
        np.array([0, 2]), rows, np.eye(4, dtype=np.float32), category, np.ones(4), 2
    )
    # Anchor 0: 1 and 3 are both cases, both bought with it; 2: no data, best sellers 0 and 1.
    assert table.shape == (2, 2) and table[0].tolist() == [1, 3] and table[1].tolist() == [0, 1]
    for row, anchor in enumerate([0, 2]):
        assert table[row].tolist() == assemble_bundle(
            BundleCatalog(
                item_ids=["a", "b", "c", "d"], item_factors=np.eye(4, dtype=np.float32),
                price=np.full(4, np.nan, np.float32), available=np.ones(4, bool), category=category,
                popularity=np.ones(4, np.float32), bundles=rows,
            ),
            anchor,
            BundleRules(size=3),
        ).companions  # fmt: skip
