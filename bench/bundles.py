"""Bundle benchmark: quality against raw co-occurrence, what each choice is worth, speed, latency.

    .venv/bin/python bench/bundles.py                          # every part
    .venv/bin/python bench/bundles.py --parts quality,variants # hit rates only (~5 min)
    .venv/bin/python bench/bundles.py --parts stages --before b8b8dca   # bundle stages, before/after
    .venv/bin/python bench/bundles.py --quick                  # smaller synthetic data, short HTTP

Parts (``--parts``, comma-separated; default all):

``quality``
    On every data set of ``../shared/data`` with purchases, and the sample shop
    (``recsvc sample-data`` defaults): the time split of ``recsvc evaluate`` (the data set's window;
    the sample shop's automatic one), ALS fitted on the training part with the training defaults,
    then ``training.cooccurrence.evaluate_bundles`` on every held-out query
    (``max_queries=None``). Printed per data set and method: hit rate@3 with its bootstrap 95%
    interval over queries, queries, and the ratio to raw co-occurrence measured in the same run
    (paired bootstrap interval for the served bundles). Real baskets: Instacart and UCI Online
    Retail orders (invoices). MovieLens and Taobao have no orders: their "baskets" are a user's
    positive ratings / purchases within one hour (the session rule of mining); they are reported
    and held to the same bar, marked as sessions.
``variants``
    The same evaluation for other mining parameters and assembly rules, as ratios to raw
    co-occurrence per data set: first the old defaults changed one step at a time into the new
    ones, then one change at a time away from the new defaults.
``mining``
    Mining speed (``mine_bundles_report``) on the real basket sets and on synthetic orders (1M,
    ``--quick`` 100k); baseline in the same run: the textbook pure-Python pair ``Counter`` over
    the same baskets (checked to agree with our pair count).
``stages``
    The two bundle stages of training -- ``mine_bundles_report`` (``recsvc train``) and
    ``evaluate_bundles`` (its evaluation, default sample and full) -- each in a fresh process,
    on grocery-shaped synthetic baskets (124k orders, 68k items, 2.5k customers, ~1.2M
    purchases: the shape of the real grocery set where they were slow; ``--quick`` 30k orders and
    20k items) and on the UCI Online Retail baskets. Printed: wall seconds and peak RSS of the
    process (and what the stage added to the peak of the loaded data). With ``--before REV``
    the same processes run on the code of git revision ``REV`` (exported to a temporary folder)
    in the same run, alternating, and the ratios after/before are printed.
``http``
    Endpoint latency in the serving benchmark's setup (``bench/serve.py``: synthetic model of
    50k users x 20k items x 64 factors, ``--quick`` 20k x 5k; ``recsvc serve`` under gunicorn,
    a throw-away redis-server, ``wrk``): ``GET /v1/items/<id>/bundle``, ``GET
    /v1/users/<id>/bundles``, ``POST /v1/bundles``, against ``GET /v1/items/<id>/similar?n=2``
    in the same run. Skipped with a note when ``wrk`` is missing.

Data sets are converted into a temporary folder and deleted afterwards; nothing is written to the
repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# A child process of the "stages" part may run on another checkout (--tree): its code first.
CODE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else REPO
sys.path.insert(0, str(CODE))
sys.path.insert(1, str(REPO / "bench"))

from recsvc.core.contract import PURCHASE  # noqa: E402
from recsvc.core.eventfiles import EventTable  # noqa: E402
from training.cooccurrence import build_baskets, evaluate_bundles, mine_bundles_report  # noqa: E402

DATA_DIR = REPO.parent / "shared" / "data"
MINING_SETS = ("online-retail-uci-baskets", "instacart")
SIZE = 3


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _orders(
    rng: np.random.Generator, n_orders: int, n_items: int, mean_extra: float, zipf: float, complement: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(items, order)`` of orders of 1 + Poisson(``mean_extra``) items drawn with Zipf popularity,
    each item bringing one of its three fixed complements along with probability ``complement``;
    sorted by order."""
    sizes = 1 + rng.poisson(mean_extra, n_orders)
    weights = 1.0 / np.arange(1, n_items + 1) ** zipf
    weights /= weights.sum()
    items = rng.choice(n_items, size=int(sizes.sum()), p=weights)
    order = np.repeat(np.arange(n_orders), sizes)
    complements = rng.integers(0, n_items, size=(n_items, 3))
    extra = rng.random(len(items)) < complement
    items = np.concatenate([items, complements[items[extra], rng.integers(0, 3, int(extra.sum()))]])
    order = np.concatenate([order, order[extra]])
    sort = np.argsort(order, kind="stable")
    return items[sort], order[sort]


def _purchases(items: np.ndarray, order: np.ndarray, customer: np.ndarray, n_items: int) -> EventTable:
    """Purchase events of ``_orders``: ids ``sku<i>``, ``o<order>``, ``c<customer>``, 30 s apart."""
    return EventTable(
        user_id=np.array([f"c{c}" for c in range(int(customer.max()) + 1)], dtype=object)[customer[order]],
        item_id=np.array([f"sku{i:06d}" for i in range(n_items)], dtype=object)[items],
        event=np.full(len(items), PURCHASE, np.int8),
        timestamp=1_700_000_000 + order.astype(np.int64) * 30,
        order_id=np.array([f"o{o}" for o in range(int(order.max()) + 1)], dtype=object)[order],
    )


def synthetic_orders(n_orders: int, n_items: int, seed: int = 0) -> EventTable:
    """Orders of 1 + Poisson(2.5) items (Zipf popularity); each item brings one of its three
    fixed complements along with probability 0.4 (the signal mining should find)."""
    items, order = _orders(np.random.default_rng(seed), n_orders, n_items, 2.5, 0.9, 0.4)
    return _purchases(items, order, np.arange(n_orders) % (n_orders // 3 + 1), n_items)


def grocery_orders(
    n_orders: int = 124_000,
    n_items: int = 68_000,
    n_customers: int = 2_500,
    n_categories: int = 130,
    seed: int = 0,
) -> tuple[EventTable, np.ndarray]:
    """Grocery-shaped orders: 1 + Poisson(7.5) items (Zipf 0.8 popularity), and each item brings
    one of its three fixed complements along with probability 0.2; orders 30 s apart, customers
    and categories uniform. Returns the events and an int32 category per item."""
    rng = np.random.default_rng(seed)
    items, order = _orders(rng, n_orders, n_items, 7.5, 0.8, 0.2)
    customer = rng.integers(0, n_customers, n_orders)
    return _purchases(items, order, customer, n_items), rng.integers(0, n_categories, n_items).astype(
        np.int32
    )


def load_dataset(name: str, workdir: Path):
    from recsvc.core.eventfiles import load_events
    from training.datasets import convert

    converted = convert(name, DATA_DIR, workdir / name)
    events, _ = load_events(converted.events)
    return events, converted.split_days


def item_index_of(events: EventTable) -> dict[str, int]:
    codes, values = events.codes("item_id")
    present = np.bincount(codes, minlength=len(values)) > 0
    return {item: i for i, item in enumerate(sorted(values[present]))}


def fit_factors(events: EventTable, item_ids: list[str], cutoff: int | None = None) -> np.ndarray:
    """ALS item factors as ``recsvc train`` fits them (default parameters), rows in ``item_ids`` order."""
    from recsvc.core.weighting import confidence_matrix, id_maps
    from training.als import TrainParams, fit_als

    params = TrainParams()
    users, _ = id_maps(events, params.weighting())
    confidence = confidence_matrix(
        events, users, np.asarray(item_ids, dtype=object), params.weighting(), now=cutoff
    )
    _, item_factors = fit_als(confidence, params, seed=0, threads=0)
    return item_factors


def split_by_time(events: EventTable, split_days: float | None) -> tuple[EventTable, EventTable, int]:
    """``recsvc evaluate``'s split: events before ``newest - split_days`` (default: 10% of the
    span, 1 to 14 days), and the purchases from then on. Returns ``(train, test, cutoff)``."""
    ts = np.asarray(events.timestamp)
    if split_days is None:
        split_days = float(min(14, max(1, np.ceil((int(ts.max()) - int(ts.min())) / 86_400 * 0.1))))
    cutoff = int(ts.max()) - int(round(split_days * 86_400)) + 1
    before = np.asarray(events.timestamp) < cutoff
    test = ~before & (np.asarray(events.event) == PURCHASE)
    return events.take(before), events.take(test), cutoff


# ------------------------------------------------------------------------------------------------
# 1. Mining speed
# ------------------------------------------------------------------------------------------------


def naive_pair_count(baskets) -> tuple[float, int]:
    """The textbook way: a Counter over every pair of every basket. Returns (seconds, distinct pairs)."""
    matrix = baskets.matrix
    start = time.perf_counter()
    counts: Counter = Counter()
    indptr, indices = matrix.indptr, matrix.indices
    for b in range(matrix.shape[0]):
        row = indices[indptr[b] : indptr[b + 1]].tolist()
        if len(row) > 1:
            counts.update(itertools.combinations(sorted(row), 2))
    return time.perf_counter() - start, len(counts)


def mining_row(
    label: str, events: EventTable, factors: np.ndarray, index: dict[str, int], threads: int
) -> dict:
    category = np.full(len(index), -1, np.int32)
    start = time.perf_counter()
    candidates, report = mine_bundles_report(events, index, factors, category, threads=threads)
    total = time.perf_counter() - start
    baskets = build_baskets(events, index)
    naive_s, naive_pairs = naive_pair_count(baskets)
    ours_pairs = report["pairs_counted"] // 2  # ordered pairs -> unordered
    return {
        "label": label,
        "orders": report["baskets"],
        "items": len(index),
        "events": len(events),
        "seconds": total,
        "stages": report["seconds"],
        "naive_s": naive_s,
        "pairs_agree": naive_pairs == ours_pairs,
        "pairs": ours_pairs,
        "candidates": report["candidates"],
        "capped": report["baskets_capped"],
    }


def print_mining(rows: list[dict]) -> None:
    print(
        f"{'data':<34}{'orders':>10}{'items':>8}{'mine s':>8}{'baskets':>8}{'pairs':>7}{'blend':>7}"
        f"{'cover':>7}{'orders/s':>11}{'naive s':>9}{'pairs vs naive':>15}"
    )
    for r in rows:
        st = r["stages"]
        print(
            f"{r['label']:<34}{r['orders']:>10,}{r['items']:>8,}{r['seconds']:>8.2f}"
            f"{st['baskets']:>8.2f}{st['pairs']:>7.2f}{st['blend']:>7.2f}{st['coverage']:>7.2f}"
            f"{r['orders'] / r['seconds']:>11,.0f}"
            f"{r['naive_s']:>9.2f}{r['naive_s'] / max(st['pairs'], 1e-9):>14.1f}x"
        )
    for r in rows:
        agree = "agree" if r["pairs_agree"] else "DISAGREE"
        print(
            f"  {r['label']}: {r['pairs']:,} distinct pairs ({agree} with the naive count), "
            f"{r['candidates']:,} candidates kept, {r['capped']:,} baskets capped"
        )


# ------------------------------------------------------------------------------------------------
# 2. Quality: hit rate@3 on held-out orders, against raw co-occurrence in the same run
# ------------------------------------------------------------------------------------------------

#: ``(label, source, baskets)``: source is a dataset of ``training.datasets`` or ``sample``.
QUALITY_SETS: tuple[tuple[str, str, str], ...] = (
    ("sample shop", "sample", "orders"),
    ("instacart", "instacart", "orders"),
    ("online-retail-uci-baskets", "online-retail-uci-baskets", "invoices"),
    ("online-retail-uci (10k rows)", "online-retail-uci", "invoices"),
    ("movielens-100k", "movielens-100k", "sessions"),
    ("taobao", "taobao", "sessions"),
    ("grocery synthetic", "grocery", "orders"),
)

SHORT = {
    "online-retail-uci-baskets": "retail-bskts",
    "online-retail-uci (10k rows)": "retail-rows",
    "grocery synthetic": "grocery-synth",
}

#: The mining defaults before this benchmark's comparison (confidence shrunk by s / (s + 2),
#: support >= 2, lift > 1, an ALS blend of 20 neighbours at 0.05, no best-seller floor).
OLD_MINING: dict[str, Any] = {
    "measure": "confidence",
    "min_support": 2,
    "min_lift": 1.0,
    "best_seller_floor": False,
    "als_neighbours": 20,
}
OLD_RULES: dict[str, Any] = {"order": "diversity", "similar_before_popular": True}

#: ``(label, mining overrides, rule overrides)``: first the old defaults turned step by step into
#: the new ones (each row adds one change to the row above), then one change at a time from the
#: new defaults.
VARIANTS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("old defaults", OLD_MINING, OLD_RULES),
    ("+ popular pairings before ALS similarity", OLD_MINING, {"order": "diversity"}),
    ("+ evidence order (same category if co-bought)", OLD_MINING, {}),
    ("+ no ALS blend", {**OLD_MINING, "als_neighbours": 0}, {}),
    ("+ posterior m=10, support >= 1, any lift", {"best_seller_floor": False}, {}),
    ("+ best-seller floor = new defaults", {}, {}),
    ("new defaults, no coverage re-rank", {"coverage_positions": 0}, {}),
    ("new defaults, ALS blend 0.05 x 20 neighbours", {"als_neighbours": 20}, {}),
    ("new defaults, ALS blend 0.2 x 20 neighbours", {"als_neighbours": 20, "als_weight": 0.2}, {}),
    ("new defaults, support >= 2", {"min_support": 2}, {}),
    ("new defaults, prior m=5", {"prior_baskets": 5.0}, {}),
    ("new defaults, prior m=20", {"prior_baskets": 20.0}, {}),
    ("new defaults, lift > 1", {"min_lift": 1.0}, {}),
    (
        "new defaults, confidence s/(s+2) (old measure)",
        {"measure": "confidence", "best_seller_floor": False},
        {},
    ),
    ("new defaults, diversity order", {}, {"order": "diversity"}),
    ("new defaults, ALS similarity before popular", {}, {"similar_before_popular": True}),
)


class Prepared:
    """A data set split by time with an ALS model fitted on its training part."""

    def __init__(
        self, label: str, kind: str, train: Any, test: Any, index: dict, factors: Any, category: Any
    ):
        self.label, self.kind = label, kind
        self.train, self.test, self.index, self.factors, self.category = train, test, index, factors, category

    def evaluate(self, params: dict[str, Any] | None = None, rules: dict[str, Any] | None = None) -> dict:
        from recsvc.core.bundles import BundleRules

        return evaluate_bundles(
            self.train,
            self.test,
            self.index,
            self.factors,
            self.category,
            size=SIZE,
            params=params or None,
            rules=BundleRules(size=SIZE, **(rules or {})),
            max_queries=None,
            threads=os.cpu_count() or 1,
        )


def prepare_quality(label: str, source: str, kind: str, workdir: Path) -> Prepared | None:
    """Split as ``recsvc evaluate`` does and fit ALS (training defaults) on the training part."""
    from recsvc.core.eventfiles import load_catalog, load_events
    from recsvc.core.weighting import confidence_matrix, id_maps, index_positions
    from training.als import TrainParams, fit_als

    if source == "grocery":  # the stages part's synthetic orders (random complements)
        events, category = grocery_orders()
        train, test, _ = split_by_time(events, 1.0)
        index = {f"sku{i:06d}": i for i in range(len(category))}
        return Prepared(label, kind, train, test, index, fit_factors(train, list(index)), category)
    if source == "sample":
        from training.synth import write_shop

        events_path, catalog_path = write_shop(workdir / "sample")  # `recsvc sample-data` defaults
        split_days = None
    else:
        from training.datasets import convert

        try:
            converted = convert(source, DATA_DIR, workdir / source)
        except FileNotFoundError as e:
            print(f"  {label}: skipped ({e})")
            return None
        events_path, catalog_path, split_days = converted.events, converted.catalog, converted.split_days
    events, _ = load_events(events_path)
    catalog = load_catalog(catalog_path)[0] if catalog_path else None
    train, test, cutoff = split_by_time(events, split_days)
    params = TrainParams()
    users, item_ids = id_maps(train, params.weighting(), None if catalog is None else catalog.item_id)
    confidence = confidence_matrix(train, users, item_ids, params.weighting(), now=cutoff - 1)
    _, factors = fit_als(confidence, params, seed=42, threads=0)
    category = np.full(len(item_ids), -1, dtype=np.int32)
    if catalog is not None:
        names = sorted({c for c in catalog.category if c})
        code = {name: i for i, name in enumerate(names)}
        pos = index_positions(catalog.item_id, item_ids)
        ok = pos >= 0
        category[pos[ok]] = [code.get(c, -1) for c in catalog.category[ok]]
    index = {str(item): i for i, item in enumerate(item_ids)}
    return Prepared(label, kind, train, test, index, factors, category)


def _rate(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def print_quality(sets: list[Prepared]) -> list[dict]:
    """One evaluation per data set with the served defaults; a row per method."""
    key = f"@{SIZE}"
    print(
        f"{'data set':<30}{'baskets':<10}{'method':<24}{'hit_rate' + key + ' [95% CI]':>27}"
        f"{'queries':>9}{'vs raw co-occ [95% CI]':>26}"
    )
    results = []
    for prep in sets:
        r = prep.evaluate()
        results.append({"label": prep.label, **r})
        ci = r.get("ci95", {})
        raw = r[f"cooccurrence_hit_rate{key}"]
        methods = [("bundles (served)", "")]
        if f"any_category_hit_rate{key}" in r:
            methods.append(("bundles, any category", "any_category_"))
        methods += [("raw co-occurrence", "cooccurrence_"), ("popularity", "popularity_")]
        for i, (name, prefix) in enumerate(methods):
            rate = r[f"{prefix}hit_rate{key}"]
            if not raw or rate is None:
                ratio = "-"
            else:
                ratio = f"{rate / raw:.3f}x"
                if prefix == "" and "lift_vs_cooccurrence" in ci:
                    lo, hi = ci["lift_vs_cooccurrence"]
                    ratio += f" [{lo:.3f}, {hi:.3f}]"
            print(
                f"{prep.label if i == 0 else '':<30}{prep.kind if i == 0 else '':<10}{name:<24}"
                f"{_rate(rate, ci.get(f'{prefix}hit_rate{key}')):>27}"
                f"{r['queries'] if i == 0 else '':>9}{ratio:>26}"
            )
        flush()
    worst = [r["lift_vs_cooccurrence"] for r in results if r.get("lift_vs_cooccurrence") is not None]
    if worst:
        lowest = min(worst)
        print(f"served bundles / raw co-occurrence: lowest {lowest:.3f}x ({len(worst)} data sets with hits)")
    return results


def print_variants(sets: list[Prepared]) -> None:
    """Hit rate@3 of each variant as a ratio to raw co-occurrence of the same run, per data set."""
    width = 14
    print(
        f"{'variant (ratio to raw co-occurrence)':<50}"
        + "".join(f"{SHORT.get(p.label, p.label)[: width - 1]:>{width}}" for p in sets)
    )
    for label, params, rules in VARIANTS:
        cells = []
        for prep in sets:
            lift = prep.evaluate(params, rules).get("lift_vs_cooccurrence")
            cells.append("-" if lift is None else f"{lift:.3f}{'<' if lift < 1 else ' '}")
        print(f"{label:<50}" + "".join(f"{c:>{width}}" for c in cells))
        flush()
    print("('<': below raw co-occurrence; '-': no method has a hit)")


def flush() -> None:
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# 4. Bundle stages of training: fresh processes, optionally against another revision
# ------------------------------------------------------------------------------------------------

STAGE_SETS = ("grocery", "online-retail-uci-baskets")
STAGES = ("mine", "evaluate", "evaluate-full")


def grocery_shape(quick: bool) -> dict[str, int]:
    return {"n_orders": 30_000, "n_items": 20_000} if quick else {"n_orders": 124_000, "n_items": 68_000}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def stage_data(
    name: str, prep: Path, quick: bool
) -> tuple[EventTable, dict[str, int], np.ndarray, np.ndarray, float]:
    """``(events, item_index, item_factors, category, split_days)`` of a stage data set."""
    if name == "grocery":
        events, category = grocery_orders(**grocery_shape(quick))
        index = {f"sku{i:06d}": i for i in range(len(category))}
        split_days = 1.0  # ~2,900 orders
    else:
        from recsvc.core.eventfiles import load_events

        events, _ = load_events(prep / name / "events.csv")
        index = item_index_of(events)
        category = np.full(len(index), -1, np.int32)
        split_days = 30.0
    return events, index, np.load(prep / f"{name}-factors.npy"), category, split_days


def child_stage(stage: str, name: str, prep: Path, quick: bool, threads: int) -> dict[str, Any]:
    """Run one stage on one data set in this (fresh) process; wall and peak memory."""
    events, index, factors, category, split_days = stage_data(name, prep, quick)
    out: dict[str, Any] = {"events": len(events), "items": len(index)}
    if stage == "mine":
        out["data_mb"] = _peak_rss_mb()
        start, cpu = time.perf_counter(), time.process_time()
        _, report = mine_bundles_report(events, index, factors, category, threads=threads)
        out["wall_s"], out["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        out["stages"] = report["seconds"]
        out["baskets"] = report["baskets"]
    else:
        train, test, _ = split_by_time(events, split_days)
        del events
        out["data_mb"] = _peak_rss_mb()
        # As training's evaluation calls it: the defaults (a sample of queries, where supported).
        kwargs: dict[str, Any] = {"max_queries": None} if stage == "evaluate-full" else {}
        start, cpu = time.perf_counter(), time.process_time()
        result = evaluate_bundles(train, test, index, factors, category, **kwargs)
        out["wall_s"], out["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        out.update(
            queries=result["queries"],
            queries_total=result.get("queries_total", result["queries"]),
            hit_rate=result[f"hit_rate@{SIZE}"],
            lift=result["lift_vs_cooccurrence"],
        )
    out["peak_mb"] = _peak_rss_mb()
    return out


def prepare_stages(workdir: Path, quick: bool) -> Path:
    """Convert the retail baskets and fit ALS factors for each stage data set, once."""
    prep = workdir / "stages"
    prep.mkdir(parents=True, exist_ok=True)
    for name in STAGE_SETS:
        if name == "grocery":
            events, category = grocery_orders(**grocery_shape(quick))
            item_ids = [f"sku{i:06d}" for i in range(len(category))]
        else:
            from training.datasets import convert

            convert(name, DATA_DIR, prep / name)
            events, _ = load_dataset(name, workdir / "convert")
            item_ids = list(item_index_of(events))
        np.save(prep / f"{name}-factors.npy", fit_factors(events, item_ids))
    return prep


def run_stage_child(
    tree: Path, stage: str, name: str, prep: Path, quick: bool, threads: int
) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child-stage", stage, "--data", name,
        "--prep", str(prep), "--mining-threads", str(threads), "--tree", str(tree),
    ] + (["--quick"] if quick else [])  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"stage child {stage} {name} ({tree}) failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def export_revision(rev: str, dest: Path) -> Path:
    """The tree of git revision ``rev`` in ``dest`` (``git archive``; the worktree is untouched)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def bundle_stages(workdir: Path, quick: bool, threads: int, before: str | None, repeat: int) -> None:
    prep = prepare_stages(workdir, quick)
    trees = [("after", REPO)]
    if before:
        trees.insert(0, ("before", export_revision(before, workdir / "before")))
    label = {"grocery": "grocery synthetic, " + ("30k orders" if quick else "124k orders")}
    print(
        f"{'data':<32}{'stage':<15}{'code':<8}{'wall s':>8}{'CPU s':>7}{'peak MB':>9}{'stage MB':>9}"
        f"{'queries':>16}{'hit@3':>8}{'vs raw':>8}{'wall':>8}{'CPU':>7}{'peak':>7}"
    )
    for name in STAGE_SETS:
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for stage in STAGES:
            runs: dict[str, list[dict[str, Any]]] = {}
            for _ in range(repeat):  # alternate the trees: the host's load drifts
                for code, tree in trees:
                    if code == "before" and stage == "evaluate-full":
                        continue  # the old evaluation scored every query: its "evaluate" row
                    runs.setdefault(code, []).append(run_stage_child(tree, stage, name, prep, quick, threads))
            for code, rs in runs.items():
                # Medians over the repeats (wall, CPU and memory each), the host being shared.
                r = dict(rs[0])
                for field in ("wall_s", "cpu_s", "peak_mb", "data_mb"):
                    r[field] = float(np.median([x[field] for x in rs]))
                best[stage, code] = r
                queries = (
                    f"{r['queries']:,}/{r['queries_total']:,}" if "queries" in r else f"{r['baskets']:,} bsk"
                )
                hit = "" if r.get("hit_rate") is None else f"{r['hit_rate']:.4f}"
                lift = "" if r.get("lift") is None else f"{r['lift']:.3f}"
                # Ratios against the old code's run of the same stage (its evaluation was full).
                base = best.get(("mine" if stage == "mine" else "evaluate", "before"))
                ratio = (
                    f"{r['wall_s'] / base['wall_s']:>7.2f}x{r['cpu_s'] / base['cpu_s']:>6.2f}x"
                    f"{r['peak_mb'] / base['peak_mb']:>6.2f}x"
                    if base is not None and code == "after"
                    else ""
                )
                print(
                    f"{label.get(name, name):<32}{stage:<15}{code:<8}{r['wall_s']:>8.2f}{r['cpu_s']:>7.2f}"
                    f"{r['peak_mb']:>9.0f}"
                    f"{r['peak_mb'] - r['data_mb']:>9.0f}{queries:>16}{hit:>8}{lift:>8}{ratio}"
                )
            flush()
    print(
        f"(median of {repeat} alternating run(s) each, fresh processes; 'stage MB' = peak RSS minus the "
        f"peak after loading the data; ratios after/before; mining on {threads} threads, the evaluation "
        "called as training calls it)"
    )


# ------------------------------------------------------------------------------------------------
# 5. Endpoint latency (the serving benchmark's setup)
# ------------------------------------------------------------------------------------------------

WRK_POST = """
local bodies = {%(bodies)s}
local pace_ms = %(pace_ms)s
math.randomseed(%(seed)d)
request = function()
  local body = bodies[math.random(#bodies)]
  return wrk.format("POST", "/v1/bundles", {["Content-Type"] = "application/json"}, body)
end
if pace_ms > 0 then
  delay = function() return pace_ms end
end
"""


def run_wrk_post(base: str, bodies: list[str], seconds: int, connections: int, pace_ms: float, workdir: Path):
    from serve import parse_wrk

    script = workdir / f"wrk-post-{time.monotonic_ns()}.lua"
    script.write_text(
        WRK_POST % {"bodies": ",".join(json.dumps(b) for b in bodies), "pace_ms": f"{pace_ms:.3f}", "seed": 7}
    )
    cmd = [
        "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s",
        "--latency", "--timeout", "5s", "-s", str(script), base,
    ]  # fmt: skip
    return parse_wrk(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def endpoint_latency(quick: bool, workdir: Path, workers: int, threads: int, connections: int) -> int:
    from serve import free_port, run_wrk, stop, synthetic_artifact, wait_http

    from recsvc.core.artifact import write_artifact
    from recsvc.core.config import Config
    from recsvc.storage import versions
    from recsvc.storage.connection import connect_admin
    from recsvc.storage.embedded import RedisServer

    if shutil.which("wrk") is None:
        print("wrk is not installed: endpoint latency skipped (apt-get install wrk)")
        return 0
    serve_users, serve_items = (20_000, 5_000) if quick else (50_000, 20_000)
    seconds = 3 if quick else 8
    artifact = synthetic_artifact(serve_users, serve_items, 64, seed=2)
    orders = synthetic_orders(100_000 if quick else 300_000, serve_items, seed=5)
    index = {item: i for i, item in enumerate(artifact.item_ids)}
    artifact.bundles, report = mine_bundles_report(orders, index, artifact.item_factors, artifact.category)
    print(
        f"model: {serve_users:,} users x {serve_items:,} items x 64 factors; bundle candidates for "
        f"{report['anchors_with_candidates']:,} items mined from {report['baskets']:,} synthetic orders"
    )
    server = RedisServer(workdir / "redis").start()
    procs: list[subprocess.Popen] = []
    try:
        client = connect_admin(server.url)
        models = workdir / "models"
        config = Config.create(redis_url=server.url, models_dir=models, var_dir=workdir / "var")
        write_artifact(artifact, models)
        versions.publish(client, artifact, config)
        env = dict(os.environ)
        env.update(
            REDIS_URL=server.url,
            RECSVC_MODELS_DIR=str(models),
            RECSVC_VAR_DIR=str(workdir / "var"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        )
        port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "recsvc"), "serve", "--port", str(port),
            "--workers", str(workers), "--threads", str(threads),
        ]  # fmt: skip
        log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=workdir))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/ready")

        rng = np.random.default_rng(11)
        in_stock = np.flatnonzero(artifact.available)
        anchors = [artifact.item_ids[i] for i in rng.choice(in_stock, 1000, replace=False)]
        users = [artifact.user_ids[u] for u in rng.choice(serve_users, 1000, replace=False)]
        carts = [
            json.dumps({"items": [artifact.item_ids[i] for i in rng.choice(in_stock, 3, replace=False)]})
            for _ in range(500)
        ]
        cases = [
            ("baseline: GET /v1/items/<id>/similar?n=2", [f"/v1/items/{a}/similar?n=2" for a in anchors]),
            ("GET /v1/items/<id>/bundle?size=3", [f"/v1/items/{a}/bundle?size=3" for a in anchors]),
            ("GET /v1/users/<id>/bundles?n=3", [f"/v1/users/{u}/bundles?n=3" for u in users]),
        ]
        # Sanity: real answers, not errors.
        import urllib.request

        with urllib.request.urlopen(base + cases[1][1][0]) as r:
            body = json.loads(r.read())
        assert len(body["bundles"]) == 1 and len(body["bundles"][0]["items"]) == 3, body
        for _, paths in cases:  # warm every worker
            run_wrk(base, paths, 1, connections, 0, workdir)
        run_wrk_post(base, carts, 1, connections, 0, workdir)

        results = []
        for label, paths in cases:
            peak = run_wrk(base, paths, seconds, connections, 0, workdir)
            paced = run_wrk(
                base, paths, seconds, connections, 1000.0 * connections / (peak["rps"] / 2), workdir
            )
            results.append((label, peak, paced))
        peak = run_wrk_post(base, carts, seconds, connections, 0, workdir)
        paced = run_wrk_post(
            base, carts, seconds, connections, 1000.0 * connections / (peak["rps"] / 2), workdir
        )
        results.append(("POST /v1/bundles (3-item carts)", peak, paced))

        print(f"workers={workers} threads={threads} connections={connections} seconds/run={seconds}")
        print(
            f"{'endpoint':<42}{'max req/s':>10}{'p99@max':>9}{'p50@half':>9}{'p99@half':>9}"
            f"{'p99 ratio':>10}{'errors':>7}"
        )
        base_p99 = results[0][2]["p99"]
        errors = 0
        for label, pk, pc in results:
            errors += pk["errors"] + pc["errors"]
            print(
                f"{label:<42}{pk['rps']:>10,.0f}{pk['p99']:>9.2f}{pc['p50']:>9.2f}{pc['p99']:>9.2f}"
                f"{pc['p99'] / base_p99:>9.2f}x{pk['errors'] + pc['errors']:>7}"
            )
        print(
            "(latencies in ms; 'half' = paced at half of that endpoint's own max; "
            "ratio vs the baseline's p99@half)"
        )
        return 1 if errors else 0
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


# ------------------------------------------------------------------------------------------------

PARTS = ("quality", "variants", "mining", "stages", "http")


def mining_speed(workdir: Path, quick: bool, threads: int) -> None:
    rows = []
    for name in MINING_SETS:
        try:
            events, _ = load_dataset(name, workdir)
        except FileNotFoundError as e:
            print(f"  {name}: skipped ({e})")
            continue
        index = item_index_of(events)
        factors = fit_factors(events, list(index))
        rows.append(mining_row(name, events, factors, index, threads))
    n_orders = 100_000 if quick else 1_000_000
    orders = synthetic_orders(n_orders, 20_000, seed=1)
    index = {f"sku{i:06d}": i for i in range(20_000)}
    factors = (np.random.default_rng(2).standard_normal((20_000, 64)) * 0.3).astype(np.float32)
    rows.append(mining_row(f"synthetic {n_orders:,} orders", orders, factors, index, threads))
    print_mining(rows)


def main(argv: list[str] | None = None) -> int:
    global DATA_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--quick", action="store_true", help="smaller synthetic data, short HTTP runs")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="public data sets (../shared/data)")
    parser.add_argument("--no-http", action="store_true", help="skip the endpoint latency part")
    parser.add_argument("--before", help="stages part: also run the code of this git revision (e.g. b8b8dca)")
    parser.add_argument("--repeat", type=int, default=1, help="stages part: alternating runs per stage")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--mining-threads", type=int, default=0, help="mining threads, as `recsvc train` uses (0 = all cores)"
    )
    # Internal: one measurement of the stages part in a fresh process.
    parser.add_argument("--child-stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--prep", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    DATA_DIR = args.data_dir.resolve()
    mining_threads = args.mining_threads or os.cpu_count() or 1
    if args.child_stage:
        result = child_stage(args.child_stage, args.data, Path(args.prep), args.quick, mining_threads)
        print(json.dumps(result))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")
    if args.no_http and "http" in parts:
        parts.remove("http")
    workdir = Path(tempfile.mkdtemp(prefix="recsvc-bench-bundles-"))
    rc = 0
    try:
        if "quality" in parts or "variants" in parts:
            sets = [p for p in (prepare_quality(*spec, workdir) for spec in QUALITY_SETS) if p is not None]
            if "quality" in parts:
                print(
                    f"# quality: hit rate@{SIZE} on held-out baskets, every query, served defaults",
                    flush=True,
                )
                print_quality(sets)
            if "variants" in parts:
                print(f"\n# variants: hit rate@{SIZE} / raw co-occurrence of the same run", flush=True)
                print_variants(sets)
            del sets
        if "mining" in parts:
            print(
                f"\n# mining speed, {mining_threads} threads (baseline: a pure-Python pair Counter on the "
                "same baskets, compared with the pairs stage)",
                flush=True,
            )
            mining_speed(workdir, args.quick, mining_threads)
        if "stages" in parts:
            print("\n# bundle stages of training, fresh processes", flush=True)
            bundle_stages(workdir, args.quick, mining_threads, args.before, max(1, args.repeat))
        if "http" in parts:
            print("\n# endpoint latency (serving benchmark setup: recsvc serve + wrk, loopback)", flush=True)
            rc = endpoint_latency(args.quick, workdir, args.workers, args.threads, args.connections)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
