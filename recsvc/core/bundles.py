"""Bundle assembly and pricing: pure numpy, no Flask, no Redis.

A *bundle* is an anchor item (or a cart) plus complementary items, priced as one offer.
Companions come from a fallback chain, so every valid item gets a bundle:

1. **co-purchase candidates** mined offline (:class:`recsvc.core.artifact.BundleCandidates`: the
   artifact's ``bundles.npz``) -- reason ``bought_together`` when a companion has co-purchase
   support, ``similar_taste`` for an ALS-only candidate (mining can blend those in);
2. **category-complementary popular items**: popular items of the categories most often bought
   with the anchor's category, then the most popular items overall -- ``popular_pairing``;
3. **ALS similarity** computed on the fly from the item factors -- ``similar_taste`` (reached
   when stock, price or category rules leave the popular items short).

Popular pairings come before similarity because they predict held-out orders better on every
data set measured (``bench/bundles.py``, ``docs/bundles.md``): what an anchor's buyers add to
their basket is, failing co-purchase evidence, most often a best seller, rarely a look-alike.

Every companion must be in stock, not the anchor, not excluded (already bought, already in the
cart), not a near-duplicate of an item already in the bundle (same normalised title, or item
factors with cosine >= ``near_duplicate_cosine``: only for companions that were never bought with
the anchor, since substitutes are rarely bought together, and for popular pairings only against
the anchor or cart, since best sellers' factors all point the same way) and keep the bundle price
within ``max_price``.

**Categories** (``same_category`` False, the default). A bundle never holds two items of one
category unless they were really bought together with the anchor: a companion without
co-purchase support (a fallback) must bring a category the bundle does not have yet, the
anchor's included. Co-purchased companions may repeat a category (the sample shop's orders hold
two consumables of one category; refusing them cost hit rate). ``order`` decides what comes
first among the co-purchased: ``"evidence"`` (default) takes them best score first;
``"diversity"`` takes those of new categories first, then other categories, the anchor's last.
With ``same_category`` True categories play no part at all (a merchant's explicit choice).

Pricing (:func:`price_bundle`): ``percent`` takes ``discount_pct`` off the total; ``cheapest``
takes ``discount_pct`` off the cheapest item. Amounts are rounded to cents and
``bundle_price + savings == total_price`` exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from recsvc.core.artifact import BundleCandidates
from recsvc.core.explain import MAX_ANCHORS, Code, Explanation, describe

DISCOUNT_RULES: tuple[str, ...] = ("percent", "cheapest")
MAX_BUNDLE_SIZE = 10  # anchor included; a storefront widget shows a handful, not a catalogue
MAX_CART_ITEMS = 100  # a cart longer than this is not a shopper's cart

#: Reason codes and the sentence shown to shoppers.
REASON_BOUGHT_TOGETHER = "bought_together"
REASON_SIMILAR_TASTE = "similar_taste"
REASON_POPULAR_PAIRING = "popular_pairing"

_SOURCE_RANK = {REASON_BOUGHT_TOGETHER: 0, REASON_SIMILAR_TASTE: 1, REASON_POPULAR_PAIRING: 2}
# How deep each fallback looks: enough to survive stock/category/price filters, bounded work.
_ALS_POOL = 100
_POPULAR_PER_CATEGORY = 20
_POPULAR_GLOBAL = 200
_COMPLEMENT_CATEGORIES = 10

#: Orders of companions within a pool (see the module docstring).
ORDERS: tuple[str, ...] = ("evidence", "diversity")

#: Passes of :meth:`_Picker.fill` over one pool, keyed by ``(same_category, order)``:
#: ``(new categories only, base's category allowed, co-purchased items only)``. Whatever the
#: pass, an item without co-purchase support needs a category the bundle does not hold yet
#: (:meth:`_Picker.allowed`).
_PASSES: dict[tuple[bool, str], tuple[tuple[bool, bool, bool], ...]] = {
    (False, "evidence"): ((False, True, True), (True, False, False)),
    (False, "diversity"): (
        (True, False, True),
        (False, False, True),
        (False, True, True),
        (True, False, False),
    ),
    (True, "evidence"): ((False, True, True), (False, True, False)),
    (True, "diversity"): ((False, True, True), (False, True, False)),
}

#: A pool of candidates: ``(items, co-purchase support, scores, reason code)``, best first.
Pool = tuple[np.ndarray, np.ndarray, np.ndarray, str]


@dataclass(frozen=True)
class BundleRules:
    """How bundles are assembled and priced.

    Attributes
    ----------
    size : int
        Items in an item bundle, anchor included (2..:data:`MAX_BUNDLE_SIZE`).
    discount_rule : str
        ``"percent"`` (off the total) or ``"cheapest"`` (off the cheapest item).
    discount_pct : float
        Percent, 0..100.
    same_category : bool
        False: two items of one category only when both were bought together with the anchor
        (see the module docstring). True: categories are ignored.
    order : str
        ``"evidence"``: co-purchased companions best score first, whatever their category.
        ``"diversity"``: co-purchased companions of new categories first.
    similar_before_popular : bool
        Fallback order: False (default) popular pairings, then ALS similarity; True the
        reverse (the order before measurements showed popular pairings predict orders better).
    max_price : float or None
        Upper bound on the bundle price after discount; companions without a known price are
        skipped when it is set.
    near_duplicate_cosine : float
        Two items whose factor cosine reaches this are the same product in another variant.
    """

    size: int = 3
    discount_rule: str = "percent"
    discount_pct: float = 10.0
    same_category: bool = False
    order: str = "evidence"
    similar_before_popular: bool = False
    max_price: float | None = None
    near_duplicate_cosine: float = 0.95

    def __post_init__(self) -> None:
        if not 2 <= int(self.size) <= MAX_BUNDLE_SIZE:
            raise ValueError(f"size must be between 2 and {MAX_BUNDLE_SIZE}, got {self.size!r}")
        if self.discount_rule not in DISCOUNT_RULES:
            raise ValueError(
                f"discount_rule must be one of {', '.join(DISCOUNT_RULES)}, got {self.discount_rule!r}"
            )
        if not (math.isfinite(self.discount_pct) and 0.0 <= self.discount_pct <= 100.0):
            raise ValueError(f"discount_pct must be between 0 and 100, got {self.discount_pct!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.max_price is not None and not (math.isfinite(self.max_price) and self.max_price >= 0):
            raise ValueError(f"max_price must be a finite number >= 0, got {self.max_price!r}")
        if not 0.0 < self.near_duplicate_cosine <= 1.0:
            raise ValueError(f"near_duplicate_cosine must be in (0, 1], got {self.near_duplicate_cosine!r}")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> BundleRules:
        """Rules from a :class:`~recsvc.core.config.Config` (its ``bundles`` section), with overrides."""
        settings = config.bundles
        values = {
            "size": settings.size,
            "discount_rule": settings.discount_rule,
            "discount_pct": float(settings.discount_pct),
            "same_category": bool(settings.same_category),
        }
        values.update(overrides)
        return cls(**values)

    def with_(self, **overrides: Any) -> BundleRules:
        return replace(self, **overrides)


@dataclass(frozen=True)
class Offer:
    """Prices of a bundle; all None when an item's price is unknown."""

    total_price: float | None
    bundle_price: float | None
    savings: float | None


def price_bundle(prices: Sequence[float] | np.ndarray, rule: str = "percent", pct: float = 10.0) -> Offer:
    """Price a set of items as one offer.

    Parameters
    ----------
    prices : sequence of float
        Unit prices of the items (NaN = unknown).
    rule : {"percent", "cheapest"}
        ``percent``: ``pct`` off the total. ``cheapest``: ``pct`` off the cheapest item.
    pct : float
        Discount in percent, 0..100.

    Returns
    -------
    Offer
        Rounded to cents with ``bundle_price + savings == total_price``; all None when any price
        is unknown or there are no items.

    Examples
    --------
    >>> price_bundle([10.0, 20.0, 30.0], "percent", 10)
    Offer(total_price=60.0, bundle_price=54.0, savings=6.0)
    >>> price_bundle([10.0, 20.0, 30.0], "cheapest", 50)
    Offer(total_price=60.0, bundle_price=55.0, savings=5.0)
    """
    if rule not in DISCOUNT_RULES:
        raise ValueError(f"discount rule must be one of {', '.join(DISCOUNT_RULES)}, got {rule!r}")
    if not (math.isfinite(pct) and 0.0 <= pct <= 100.0):
        raise ValueError(f"discount percent must be between 0 and 100, got {pct!r}")
    values = np.asarray(prices, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return Offer(None, None, None)
    # Work in integer cents so the three figures always add up.
    cents = np.round(values * 100.0).astype(np.int64)
    total = int(cents.sum())
    base = total if rule == "percent" else int(cents.min())
    # Half a cent rounds up (retail rounding), not to even as round() would.
    saved = int(math.floor(base * pct / 100.0 + 0.5))
    return Offer(total / 100.0, (total - saved) / 100.0, saved / 100.0)


def normalise_title(title: str) -> str:
    """Casefolded title with punctuation and repeated spaces removed ("" for no title)."""
    return " ".join(re.sub(r"[\W_]+", " ", title.casefold()).split())


class BundleCatalog:
    """Everything bundle assembly needs about one model version, prepared once.

    Build it with :meth:`from_model` from a serving model or an :class:`~recsvc.core.artifact.Artifact`
    (anything with ``item_ids, item_factors, price, available, category, categories, titles,
    popularity, bundles``). ``available`` is read at assembly time, so a stock update made to the
    array in place is seen by the next request.
    """

    def __init__(
        self,
        *,
        item_ids: Sequence[str],
        item_factors: np.ndarray,
        price: np.ndarray,
        available: np.ndarray,
        category: np.ndarray,
        popularity: np.ndarray,
        bundles: BundleCandidates,
        categories: Sequence[str] = (),
        titles: Sequence[str] | None = None,
        unit_factors: np.ndarray | None = None,
    ):
        n = len(item_ids)
        self.item_ids = item_ids
        self.price = np.asarray(price, dtype=np.float32)
        self.available = np.asarray(available, dtype=bool)
        self.category = np.asarray(category, dtype=np.int32)
        self.popularity = np.asarray(popularity, dtype=np.float32)
        self.categories = list(categories)
        self.titles = titles if titles is not None else [""] * n
        self.bundles = bundles
        for name, arr in (("price", self.price), ("available", self.available), ("category", self.category)):
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},)")
        if self.popularity.shape != (n,):
            raise ValueError(f"popularity has shape {self.popularity.shape}, expected ({n},)")
        if bundles.n_items != n:
            raise ValueError(f"bundle candidates cover {bundles.n_items} items, expected {n}")
        factors = np.asarray(item_factors, dtype=np.float32)
        if factors.ndim != 2 or factors.shape[0] != n:
            raise ValueError(f"item_factors has shape {factors.shape}, expected ({n}, k)")
        norms = np.linalg.norm(factors, axis=1, keepdims=True)
        if unit_factors is not None and np.shape(unit_factors) == factors.shape:
            self.unit_factors = np.asarray(unit_factors, dtype=np.float32)  # shared, not copied
        else:
            self.unit_factors = np.divide(factors, norms, out=np.zeros_like(factors), where=norms > 0)
        self.has_factors = norms.ravel() > 0
        self._title_keys: dict[int, str] = {}
        # Popular items overall and per category, most popular first (ties: lower index).
        self.popular_order = np.lexsort((np.arange(n), -self.popularity)).astype(np.int64)
        self._popular_by_category = self._popular_per_category()
        # Overall best sellers, then the best seller of each category (so a catalogue whose top
        # items all share the anchor's category still completes the bundle).
        leaders = np.array([order[0] for order in self._popular_by_category.values()], dtype=np.int64)
        leaders = leaders[np.lexsort((leaders, -self.popularity[leaders]))] if len(leaders) else leaders
        self._popular_global = np.concatenate(
            [self.popular_order[:_POPULAR_GLOBAL], leaders[:_POPULAR_GLOBAL]]
        ).astype(np.int64)
        self._complements = self._category_complements()

    @classmethod
    def from_model(cls, model: Any) -> BundleCatalog:
        """Build from a ServingModel or an Artifact (attribute names as in :class:`Artifact`).

        A ServingModel's ``unit_item_factors`` are shared rather than computed again.
        """
        return cls(
            unit_factors=getattr(model, "unit_item_factors", None),
            item_ids=model.item_ids,
            item_factors=model.item_factors,
            price=model.price,
            available=model.available,
            category=model.category,
            popularity=model.popularity,
            bundles=model.bundles,
            categories=getattr(model, "categories", ()),
            titles=getattr(model, "titles", None),
        )

    @property
    def n_items(self) -> int:
        return len(self.price)

    # -- preparation ------------------------------------------------------------------------------

    def _popular_per_category(self) -> dict[int, np.ndarray]:
        order = self.popular_order
        cats = self.category[order]
        known = cats >= 0
        order, cats = order[known], cats[known]
        # Stable sort by category keeps popularity order inside each category.
        by_cat = np.argsort(cats, kind="stable")
        order, cats = order[by_cat], cats[by_cat]
        out: dict[int, np.ndarray] = {}
        if len(cats):
            starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]])
            for lo, hi in zip(starts, np.r_[starts[1:], len(cats)], strict=True):
                out[int(cats[lo])] = order[lo : min(hi, lo + _POPULAR_PER_CATEGORY)]
        return out

    def _category_complements(self) -> dict[int, np.ndarray]:
        """Per category, the other categories its items are most often bought with."""
        b = self.bundles
        if len(b.indices) == 0:
            return {}
        anchor = np.repeat(np.arange(b.n_items), np.diff(b.indptr))
        a_cat, c_cat = self.category[anchor], self.category[b.indices]
        ok = (a_cat >= 0) & (c_cat >= 0) & (a_cat != c_cat) & (b.support > 0)
        if not ok.any():
            return {}
        a_cat, c_cat, weight = a_cat[ok].astype(np.int64), c_cat[ok].astype(np.int64), b.support[ok]
        n_cat = int(max(a_cat.max(), c_cat.max())) + 1
        key = a_cat * n_cat + c_cat
        unique, inverse = np.unique(key, return_inverse=True)
        total = np.bincount(inverse, weights=weight.astype(np.float64))
        rows, cols = unique // n_cat, unique % n_cat
        order = np.lexsort((cols, -total, rows))
        rows, cols = rows[order], cols[order]
        out: dict[int, np.ndarray] = {}
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
            out[int(rows[lo])] = cols[lo : min(hi, lo + _COMPLEMENT_CATEGORIES)]
        return out

    # -- candidate sources ------------------------------------------------------------------------

    def title_key(self, item: int) -> str:
        key = self._title_keys.get(item)
        if key is None:
            key = normalise_title(str(self.titles[item] or "")) if item < len(self.titles) else ""
            if len(self._title_keys) < 1_000_000:  # bounded cache
                self._title_keys[item] = key
        return key

    def similar_items(self, vector: np.ndarray, limit: int = _ALS_POOL) -> tuple[np.ndarray, np.ndarray]:
        """Items by cosine to ``vector`` (a unit factor vector), best first, positive cosine only.

        Returns ``(items, cosines)``.
        """
        if not np.any(vector):
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        sims = self.unit_factors @ vector.astype(np.float32)
        limit = min(limit, len(sims))
        top = np.argpartition(-sims, limit - 1)[:limit] if limit < len(sims) else np.arange(len(sims))
        top = top[np.lexsort((top, -sims[top]))]
        top = top[sims[top] > 0]
        return top.astype(np.int64), sims[top].astype(np.float64)

    def popular_complements(self, categories: Iterable[int]) -> np.ndarray:
        """Popular items of categories bought with ``categories``, then popular items overall."""
        parts: list[np.ndarray] = []
        seen: set[int] = set()
        for cat in categories:
            for other in self._complements.get(int(cat), ()):
                if int(other) not in seen:
                    seen.add(int(other))
                    parts.append(self._popular_by_category.get(int(other), np.zeros(0, np.int64)))
        parts.append(self._popular_global)
        return np.concatenate(parts).astype(np.int64)


@dataclass
class Bundle:
    """One assembled bundle: the base items (anchor or cart) first, then the companions.

    ``support[i]`` is the co-purchase count of item ``i`` with the base (0 when it came from
    similarity or popularity); ``sources[i]`` is the reason code that produced it ("base" for the
    anchor or cart items); ``scores[i]`` its ranking score in that source (mined score, cosine,
    0 for popular fill, 1 for base items).
    """

    items: list[int]
    base: int  # how many leading items are the anchor / the cart
    support: list[int]
    sources: list[str]
    scores: list[float]
    offer: Offer
    reason_code: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def companions(self) -> list[int]:
        return self.items[self.base :]

    def to_dict(self, catalog: BundleCatalog, rules: BundleRules) -> dict[str, Any]:
        """JSON-ready form: item ids, titles, categories and prices, and the priced offer."""
        items: list[dict[str, Any]] = []
        for position, item in enumerate(self.items):
            price = float(catalog.price[item])
            cat = int(catalog.category[item])
            items.append(
                {
                    "item_id": catalog.item_ids[item],
                    "title": str(catalog.titles[item]) if item < len(catalog.titles) else "",
                    "category": catalog.categories[cat] if 0 <= cat < len(catalog.categories) else None,
                    "price": round(price, 2) if math.isfinite(price) else None,
                    "role": "anchor" if position < self.base else "companion",
                    "source": self.sources[position],
                    "score": round(float(self.scores[position]), 6),
                    "bought_together": int(self.support[position]),
                }
            )
            if position >= self.base and self.sources[position] == REASON_BOUGHT_TOGETHER:
                why = Explanation(Code.BOUGHT_TOGETHER, tuple(self.items[: min(self.base, MAX_ANCHORS)]))
                items[-1]["explanation"] = {
                    "code": why.code.value,
                    "text": describe(why, item, catalog.titles, catalog.item_ids, None),
                    "because": [catalog.item_ids[a] for a in why.anchors],
                }
        return {
            "items": items,
            "size": len(self.items),
            "total_price": self.offer.total_price,
            "bundle_price": self.offer.bundle_price,
            "savings": self.offer.savings,
            "discount": {"rule": rules.discount_rule, "percent": rules.discount_pct},
            "reason": self.reason,
            "reason_code": self.reason_code,
            **self.extra,
        }


def _reason(codes: Sequence[str], support: Sequence[int]) -> tuple[str, str]:
    """The bundle's headline: the strongest source among its companions."""
    if not codes:
        return REASON_POPULAR_PAIRING, "popular pairing"
    best = min(codes, key=lambda c: _SOURCE_RANK[c])
    if best == REASON_BOUGHT_TOGETHER:
        n = max(support)
        return best, f"bought together by {n} customer{'s' if n != 1 else ''}"
    if best == REASON_SIMILAR_TASTE:
        return best, "similar taste"
    return best, "popular pairing"


class _Picker:
    """Greedy selection of companions under the rules, remembering what the bundle holds."""

    def __init__(self, catalog: BundleCatalog, rules: BundleRules, base: Sequence[int], blocked: np.ndarray):
        self.catalog, self.rules = catalog, rules
        self.items: list[int] = list(base)
        self.support: list[int] = [0] * len(base)
        self.sources: list[str] = ["base"] * len(base)
        self.scores: list[float] = [1.0] * len(base)
        self.blocked = blocked  # bool mask: anchor/cart items and exclusions
        self.base = len(base)
        self.base_categories = {int(catalog.category[i]) for i in base if catalog.category[i] >= 0}
        self.categories = set(self.base_categories)
        self.title_keys = {k for k in (catalog.title_key(i) for i in base) if k}
        self.vectors = [catalog.unit_factors[i] for i in base if catalog.has_factors[i]]
        self.base_vectors = list(self.vectors)
        prices = catalog.price[list(base)] if len(base) else np.zeros(0, np.float32)
        self.prices = [float(p) for p in prices]

    def allowed(
        self,
        item: int,
        distinct_categories: bool,
        support: int = 0,
        base_category: bool = False,
        source: str = REASON_SIMILAR_TASTE,
    ) -> bool:
        cat = self.catalog
        if self.blocked[item] or not cat.available[item]:
            return False
        code = int(cat.category[item])
        if code >= 0 and not self.rules.same_category:
            # Two items of one category only when really bought together with the base.
            if support <= 0 and code in self.categories:
                return False
            if code in self.base_categories and not base_category:
                return False
            if distinct_categories and code in self.categories:
                return False
        key = cat.title_key(item)
        if key and key in self.title_keys:
            return False
        # Substitutes (variants of one product) are rarely bought together, so an item that was
        # co-purchased with the anchor is not a duplicate whatever its factors say; only the
        # fallbacks are checked against the factors. A best seller only against the base items:
        # bought by everyone, best sellers' factors point the same way without being variants of
        # one product (on sparse data every best seller "duplicated" the first one taken).
        vectors = self.base_vectors if source == REASON_POPULAR_PAIRING else self.vectors
        if support <= 0 and cat.has_factors[item] and vectors:
            cosines = np.asarray(vectors) @ cat.unit_factors[item]
            if float(cosines.max()) >= self.rules.near_duplicate_cosine:
                return False
        if self.rules.max_price is not None:
            price = float(cat.price[item])
            if not math.isfinite(price):
                return False
            offer = price_bundle([*self.prices, price], self.rules.discount_rule, self.rules.discount_pct)
            if offer.bundle_price is None or offer.bundle_price > self.rules.max_price + 1e-9:
                return False
        return True

    def take(self, item: int, support: int, source: str, score: float) -> None:
        cat = self.catalog
        self.items.append(int(item))
        self.support.append(int(support))
        self.sources.append(source)
        self.scores.append(float(score))
        self.blocked[item] = True
        code = int(cat.category[item])
        if code >= 0:
            self.categories.add(code)
        key = cat.title_key(item)
        if key:
            self.title_keys.add(key)
        if cat.has_factors[item]:
            self.vectors.append(cat.unit_factors[item])
        self.prices.append(float(cat.price[item]))

    def fill(self, wanted: int, pools: Iterator[Pool]) -> None:
        """Take up to ``wanted`` companions, evidence first.

        ``pools`` yields ``(items, support, scores, source)`` in fallback order and each pool is
        exhausted before the next is drawn (lazily: a bundle filled from co-purchase data never
        computes the fallbacks), so what was really bought together always wins over a guess.
        Within a pool, items co-purchased with the base go before the others: in score order
        (``order="evidence"``) or categories new to the bundle first (``"diversity"``). An item
        without co-purchase support never repeats a category already in the bundle.
        """
        passes = _PASSES[(bool(self.rules.same_category), self.rules.order)]
        for items, support, scores, source in pools:
            # Converted once per pool: the passes below walk it up to four times.
            entries = list(zip(items.tolist(), support.tolist(), scores.tolist(), strict=True))
            for distinct, base_category, evidence_only in passes:
                for item, sup, score in entries:
                    if len(self.items) - self.base >= wanted:
                        return
                    if (sup > 0) != evidence_only:
                        continue
                    if self.allowed(item, distinct, sup, base_category, source):
                        # Mined rows also hold ALS-only candidates (support 0): those are taste,
                        # not co-purchase, and must not claim "bought together".
                        if source == REASON_BOUGHT_TOGETHER and sup <= 0:
                            self.take(item, 0, REASON_SIMILAR_TASTE, score)
                        else:
                            self.take(item, sup, source, score)
            if len(self.items) - self.base >= wanted:
                return

    def bundle(self, extra: dict[str, Any] | None = None) -> Bundle:
        base = self.base
        offer = price_bundle(self.prices, self.rules.discount_rule, self.rules.discount_pct)
        code, text = _reason(self.sources[base:], self.support[base:])
        return Bundle(
            self.items, base, self.support, self.sources, self.scores, offer, code, text, extra or {}
        )


def _mask(n: int, items: Iterable[int] | np.ndarray | None) -> np.ndarray:
    blocked = np.zeros(n, dtype=bool)
    if items is not None:
        idx = np.asarray(list(items) if not isinstance(items, np.ndarray) else items, dtype=np.int64)
        idx = idx[(idx >= 0) & (idx < n)]
        blocked[idx] = True
    return blocked


def _candidate_pools(catalog: BundleCatalog, base: Sequence[int], rules: BundleRules) -> Iterator[Pool]:
    """The fallback chain for a set of base items, as ordered pools, computed only when reached."""
    if len(base) == 1:
        items, score, support = catalog.bundles.row(int(base[0]))
        yield (
            items.astype(np.int64),
            support.astype(np.int64),
            score.astype(np.float64),
            REASON_BOUGHT_TOGETHER,
        )
    else:
        # A cart: candidates of every cart item, scores summed (an item that goes with several
        # cart items ranks higher), support = the largest pair count with any cart item.
        rows = [catalog.bundles.row(int(i)) for i in base]
        items = np.concatenate([r[0] for r in rows]).astype(np.int64)
        if len(items):
            score = np.concatenate([r[1] for r in rows]).astype(np.float64)
            support = np.concatenate([r[2] for r in rows]).astype(np.int64)
            unique, inverse = np.unique(items, return_inverse=True)
            total = np.bincount(inverse, weights=score)
            best_support = np.zeros(len(unique), dtype=np.int64)
            np.maximum.at(best_support, inverse, support)
            order = np.lexsort((unique, -total))
            yield unique[order], best_support[order], total[order], REASON_BOUGHT_TOGETHER
    if rules.similar_before_popular:
        yield from _similar_pool(catalog, base)
    cats = [int(catalog.category[i]) for i in base if catalog.category[i] >= 0]
    popular = catalog.popular_complements(cats)
    yield popular, np.zeros(len(popular), np.int64), np.zeros(len(popular)), REASON_POPULAR_PAIRING
    if not rules.similar_before_popular:
        yield from _similar_pool(catalog, base)


def _similar_pool(catalog: BundleCatalog, base: Sequence[int]) -> Iterator[Pool]:
    """Items by cosine to the mean unit factor vector of the base items (none without factors)."""
    vectors = [catalog.unit_factors[i] for i in base if catalog.has_factors[i]]
    if vectors:
        mean = np.mean(vectors, axis=0)
        norm = float(np.linalg.norm(mean))
        if norm > 0:
            similar, cosine = catalog.similar_items(mean / norm)
            yield similar, np.zeros(len(similar), np.int64), cosine, REASON_SIMILAR_TASTE


def assemble_bundle(
    catalog: BundleCatalog,
    anchor: int,
    rules: BundleRules,
    exclude: Iterable[int] | np.ndarray | None = None,
) -> Bundle | None:
    """The bundle for one anchor item: the anchor plus ``rules.size - 1`` companions.

    Parameters
    ----------
    catalog : BundleCatalog
        The live model's items.
    anchor : int
        Item index of the anchor.
    rules : BundleRules
        Size, pricing, category and price constraints.
    exclude : iterable of int, optional
        Item indices that must not be companions (already bought, already shown).

    Returns
    -------
    Bundle or None
        None when the anchor itself is out of stock, or alone costs more than ``max_price``
        (no valid offer exists). Otherwise a bundle, possibly with fewer companions than asked
        when the filters leave too few items.
    """
    if not 0 <= anchor < catalog.n_items:
        raise IndexError(f"anchor {anchor} out of range 0..{catalog.n_items - 1}")
    if not catalog.available[anchor] or not _fits_budget(catalog, [anchor], rules):
        return None
    blocked = _mask(catalog.n_items, exclude)
    blocked[anchor] = True
    picker = _Picker(catalog, rules, [anchor], blocked)
    picker.fill(rules.size - 1, _candidate_pools(catalog, [anchor], rules))
    return picker.bundle()


def complete_cart(
    catalog: BundleCatalog,
    cart: Sequence[int],
    rules: BundleRules,
    add: int,
    exclude: Iterable[int] | np.ndarray | None = None,
) -> Bundle | None:
    """Items that complete a cart: ``add`` companions for the cart as a whole, priced with it.

    Candidates of every cart item are pooled (scores summed), categories already in the cart
    count as taken, and unavailable cart items are left out of the offer (they cannot be sold).

    Returns
    -------
    Bundle or None
        None when no cart item is available or the available cart alone exceeds ``max_price``.
    """
    if not 1 <= add <= MAX_BUNDLE_SIZE - 1:
        raise ValueError(f"add must be between 1 and {MAX_BUNDLE_SIZE - 1}, got {add!r}")
    unique_cart = list(dict.fromkeys(int(i) for i in cart))
    if len(unique_cart) > MAX_CART_ITEMS:
        raise ValueError(f"a cart holds at most {MAX_CART_ITEMS} items, got {len(unique_cart)}")
    in_stock = [i for i in unique_cart if catalog.available[i]]
    if not in_stock or not _fits_budget(catalog, in_stock, rules):
        return None
    blocked = _mask(catalog.n_items, exclude)
    blocked[unique_cart] = True
    picker = _Picker(catalog, rules, in_stock, blocked)
    picker.fill(add, _candidate_pools(catalog, in_stock, rules))
    unavailable = [catalog.item_ids[i] for i in unique_cart if not catalog.available[i]]
    return picker.bundle({"unavailable_cart_items": unavailable} if unavailable else None)


def user_bundles(
    catalog: BundleCatalog,
    anchors: Sequence[int],
    n: int,
    rules: BundleRules,
    exclude: Iterable[int] | np.ndarray | None = None,
) -> list[Bundle]:
    """Up to ``n`` bundles for a user, anchored on ``anchors`` in order (best first).

    An item appears in at most one bundle, so the widgets do not repeat themselves; excluded
    items (already bought) are neither anchors nor companions.
    """
    if n < 1:
        return []
    used = _mask(catalog.n_items, exclude)
    out: list[Bundle] = []
    for anchor in anchors:
        if len(out) >= n:
            break
        anchor = int(anchor)
        if not 0 <= anchor < catalog.n_items or used[anchor]:
            continue
        bundle = assemble_bundle(catalog, anchor, rules, exclude=np.flatnonzero(used))
        if bundle is None or not bundle.companions:
            continue
        used[bundle.items] = True
        out.append(bundle)
    return out


def _fits_budget(catalog: BundleCatalog, items: Sequence[int], rules: BundleRules) -> bool:
    if rules.max_price is None:
        return True
    offer = price_bundle(catalog.price[list(items)], rules.discount_rule, rules.discount_pct)
    return offer.bundle_price is not None and offer.bundle_price <= rules.max_price + 1e-9


def already_bought(
    purchased: Iterable[int] | np.ndarray,
    category: np.ndarray,
    repurchase_categories: Iterable[int] = (),
    repurchasable: np.ndarray | None = None,
) -> np.ndarray:
    """Item indices a user must not be offered again: purchases outside repurchase categories.

    Parameters
    ----------
    purchased : iterable of int
        Item indices the user bought.
    category : numpy.ndarray
        Category code per item.
    repurchase_categories : iterable of int
        Category codes whose items are bought again (coffee, pet food).
    repurchasable : numpy.ndarray, optional
        Bool mask over items exempt from "already bought"
        (:func:`recsvc.core.repurchase.repurchasable_items`).
    """
    items = np.unique(
        np.asarray(list(purchased) if not isinstance(purchased, np.ndarray) else purchased, np.int64)
    )
    items = items[(items >= 0) & (items < len(category))]
    if repurchasable is not None:
        items = items[~repurchasable[items]]
    repeat = np.asarray(sorted(set(int(c) for c in repurchase_categories)), dtype=np.int64)
    if len(repeat) == 0 or len(items) == 0:
        return items
    return items[~np.isin(category[items], repeat)]


def category_codes(names: Iterable[str], categories: Sequence[str]) -> list[int]:
    """Codes of the category ``names`` present in ``categories`` (unknown names are ignored)."""
    lookup = {name: code for code, name in enumerate(categories)}
    return [lookup[name] for name in names if name in lookup]


def companions_for_evaluation(
    anchors: np.ndarray,
    candidates: BundleCandidates,
    item_factors: np.ndarray,
    category: np.ndarray,
    popularity: np.ndarray,
    k: int,
    rules: BundleRules | None = None,
) -> np.ndarray:
    """Companions (``-1`` padded) the serving assembly picks for each anchor, all items in stock.

    Used by ``training.cooccurrence.evaluate_bundles`` so the offline hit rate measures the same
    rules (category preference, near-duplicates, fallbacks) the storefront serves.
    """
    n = len(category)
    catalog = BundleCatalog(
        item_ids=[str(i) for i in range(n)],
        item_factors=item_factors,
        price=np.full(n, np.nan, np.float32),
        available=np.ones(n, dtype=bool),
        category=category,
        popularity=popularity,
        bundles=candidates,
    )
    rules = (rules or BundleRules()).with_(size=k + 1)
    table = np.full((len(anchors), k), -1, dtype=np.int64)
    for row, anchor in enumerate(np.asarray(anchors, dtype=np.int64).tolist()):
        bundle = assemble_bundle(catalog, anchor, rules)
        if bundle is not None:
            chosen = bundle.companions[:k]
            table[row, : len(chosen)] = chosen
    return table
