"""Recommendation quality on every data set: recsvc's default and tuned models against baselines.

``python bench/quality.py [--data-dir ../shared/data] [--datasets taobao,instacart] [--no-tune]``

For every data set in ``--data-dir`` that has users (the UCI baskets file has none) plus the
synthetic shop, and for both protocols (the global time split and each user's last 20 %):

* baselines fitted here, from the raw event-weighted matrix (view 1, cart 4, purchase 10), with
  implicit directly: ``popularity`` (distinct buyers), ``item_knn`` (implicit's BM25 item-item
  model, K=100), ``implicit_als`` (implicit's ALS with its own defaults: 100 factors,
  regularization 0.01, alpha 1, 15 iterations);
* ``recsvc`` -- the model ``recsvc train`` fits by default; ``recsvc_tuned`` -- ``recsvc train
  --tune``: model selection on a per-user validation split of the training part, then the fit.

Every method ranks for the same test users with the same exclusions (what recsvc's measured rule
leaves out) and the same popularity tie-break, and is scored with the same metrics: nDCG@10 and
recall@20 with bootstrap 95 % intervals, nDCG@10 per activity bucket, and the ratio to the best
baseline with a paired interval. The summary checks the targets: recsvc's default at least the best
baseline on every non-degenerate fold and 1.1x on average (geometric mean), above popularity in
every activity bucket, and tuning at most 10x one default fit. Tables go to stdout and
``bench/results/quality.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsvc.core.eventfiles import load_catalog, load_events  # noqa: E402
from recsvc.core.ids import IdMap  # noqa: E402
from recsvc.core.scoring import ModelSpec  # noqa: E402
from recsvc.core.weighting import WeightingParams, raw_matrix  # noqa: E402
from training.als import TrainParams  # noqa: E402
from training.datasets import convert  # noqa: E402
from training.evaluation import PRIMARY, prepare, rank_lists, scorer_block, summarise  # noqa: E402
from training.metrics import BUCKETS, ratio_interval  # noqa: E402
from training.model import fit_model  # noqa: E402
from training.splits import SplitSpec, split_events  # noqa: E402
from training.synth import write_shop  # noqa: E402
from training.tuning import tune  # noqa: E402

DATASETS = ("taobao", "instacart", "online-retail-uci", "movielens-100k")
PROTOCOLS = ("global", "user")
BASELINES = ("popularity", "item_knn", "implicit_als")
KS = (10, 20)
SEED = 42
#: Activity buckets with fewer test users say nothing (one user is 0 or 1); they are shown, not judged.
MIN_BUCKET_USERS = 20
RAW_WEIGHTS = WeightingParams(event_weights={"view": 1.0, "cart": 4.0, "purchase": 10.0}, scaling="linear")


def load(name: str, data_dir: Path, work: Path) -> tuple[Any, Any]:
    if name == "synthetic":
        events_path, catalog_path = write_shop(work / name, seed=7, n_users=2000, n_items=500)
    else:
        converted = convert(name, data_dir, work / name)
        events_path, catalog_path = converted.events, converted.catalog
    events, _ = load_events(events_path)
    catalog = load_catalog(catalog_path)[0] if catalog_path else None
    return events, catalog


def baseline_scores(method: str, train: Any, prep: Any) -> tuple[Any, float]:
    """A score function of one baseline fitted here with implicit, and its fit seconds."""
    started = time.perf_counter()
    n_items = len(prep.item_ids)
    if method == "popularity":  # the shared popularity tie-break is the whole ranking
        return (lambda rows: np.zeros((len(rows), n_items))), 0.0
    weighted = sp.csr_matrix(
        raw_matrix(train, IdMap(prep.user_ids), IdMap(prep.item_ids), RAW_WEIGHTS), dtype=np.float32
    )
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "item_knn":
            from implicit.nearest_neighbours import BM25Recommender

            knn = BM25Recommender(K=100)
            knn.fit(weighted, show_progress=False)
            similarity = sp.csr_matrix(knn.similarity)
            return (lambda rows: (weighted[rows] @ similarity).toarray()), time.perf_counter() - started
        from implicit.cpu.als import AlternatingLeastSquares

        als = AlternatingLeastSquares(random_state=SEED)  # implicit's own defaults
        als.fit(weighted, show_progress=False)
    users, items = np.asarray(als.user_factors), np.asarray(als.item_factors)
    return (lambda rows: users[rows] @ items.T), time.perf_counter() - started


def fold(events: Any, catalog: Any, protocol: str, with_tune: bool) -> dict[str, Any]:
    split = split_events(events, SplitSpec(protocol))
    catalog_ids = None if catalog is None else catalog.item_id
    prep = prepare(split, catalog_ids, TrainParams(), max_test_users=None, seed=SEED)
    out: dict[str, Any] = {"split": prep.info, "methods": {}, "seconds": {}}
    if len(prep.test_rows) == 0:
        return out
    depth = max(KS)
    cutoff = int(split.train.timestamp.max())
    methods = out["methods"]
    for method in BASELINES:
        score, seconds = baseline_scores(method, split.train, prep)
        methods[method] = summarise(prep, rank_lists(prep, score, depth), KS, SEED)
        out["seconds"][method] = round(seconds, 2)

    started = time.perf_counter()
    # What `recsvc train` does: the defaults, with the exclusion rule measured on the training part.
    params = TrainParams(model=ModelSpec(exclude=prep.exclusion["exclude"]))
    fitted = fit_model(split.train, prep.user_ids, prep.item_ids, params, now=cutoff, seed=SEED)
    fit_seconds = time.perf_counter() - started
    methods["recsvc"] = summarise(
        prep,
        rank_lists(prep, scorer_block(fitted.scorer(), fitted.raw, fitted.user_factors), depth),
        KS,
        SEED,
    )
    out["seconds"]["recsvc"] = round(fit_seconds, 2)
    if with_tune:
        started = time.perf_counter()
        result = tune(split.train, catalog, params, seed=SEED)
        tuned = fit_model(split.train, prep.user_ids, prep.item_ids, result.best, now=cutoff, seed=SEED)
        tuned_seconds = time.perf_counter() - started
        methods["recsvc_tuned"] = summarise(
            prep,
            rank_lists(prep, scorer_block(tuned.scorer(), tuned.raw, tuned.user_factors), depth),
            KS,
            SEED,
        )
        out["seconds"]["recsvc_tuned"] = round(tuned_seconds, 2)
        chosen = result.best.model
        out["tuning"] = {
            "chosen": {
                "regularization_per_item": result.best.regularization_per_item,
                "popularity": chosen.popularity,
                "popularity_boost": chosen.popularity_boost,
                "knn": chosen.knn,
            },
            "seconds": round(result.seconds, 2),
            "fits_of_default": round(result.seconds / fit_seconds, 2),
            "changed": result.best != params,
            "reason": result.reason,
        }
    best = max(BASELINES, key=lambda b: methods[b][PRIMARY])
    out["best_baseline"] = best
    for name in ("recsvc", "recsvc_tuned"):
        if name in methods:
            ours, theirs = methods[name], methods[best]
            interval = ratio_interval(ours["_per_user"][PRIMARY], theirs["_per_user"][PRIMARY], SEED)
            ours["ratio"] = ours[PRIMARY] / theirs[PRIMARY] if theirs[PRIMARY] > 0 else None
            ours["ratio_ci"] = interval
    for values in methods.values():
        values.pop("_per_user", None)
    return out


def _ci(values: dict[str, Any], key: str) -> str:
    low, high = values[f"{key}_ci"]
    return f"{values[key]:.4f} [{low:.4f}, {high:.4f}]"


def fold_table(name: str, protocol: str, result: dict[str, Any]) -> list[str]:
    split = result["split"]
    degenerate = "; ".join(split.get("degenerate") or []) or "no"
    lines = [
        f"### {name} / {protocol}",
        "",
        f"test users {split.get('scored_test_users', 0):,}; "
        f"cold purchasers {split.get('cold_test_users', 0):,}; "
        f"training events {split.get('train_events', 0):,}; items {split.get('items', 0):,}; "
        f"excluded: {split.get('exclude')}; degenerate: {degenerate}",
        "",
    ]
    if not result["methods"]:
        return [*lines, "no test user", ""]
    names = [b for b in BUCKETS_NAMES if b in result["methods"]["popularity"].get("buckets", {})]
    lines.append(
        "| method | nDCG@10 [95% CI] | recall@20 [95% CI] | vs best baseline [paired CI] | nDCG@10 by bucket "
        + " / ".join(names)
        + " | fit s |"
    )
    lines.append("|---|---|---|---|---|---|")
    for method, values in result["methods"].items():
        ratio = values.get("ratio")
        interval = values.get("ratio_ci")
        vs = (
            ""
            if ratio is None
            else f"{ratio:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
        )
        if method == result["best_baseline"]:
            vs = "best baseline"
        buckets = values.get("buckets", {})
        by_bucket = " / ".join(
            f"{buckets[b][PRIMARY]:.3f} ({buckets[b]['users']})" if b in buckets else "-" for b in names
        )
        lines.append(
            f"| {method} | {_ci(values, 'ndcg@10')} | {_ci(values, 'recall@20')} | {vs} | {by_bucket} | "
            f"{result['seconds'].get(method, 0):.2f} |"
        )
    if "tuning" in result:
        t = result["tuning"]
        lines += [
            "",
            f"tuning: {t['seconds']:.1f} s = {t['fits_of_default']:.1f} default fits; {t['reason']}",
        ]
    return [*lines, ""]


BUCKETS_NAMES = [b[0] for b in BUCKETS]


def summary(results: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| fold | recsvc / best baseline | tuned / best | recsvc > popularity in every bucket |",
    ]
    lines.append("|---|---|---|---|")
    ratios, tuned_ratios, bucket_ok, tuning_cost = [], [], [], []
    for (name, protocol), result in results.items():
        methods = result["methods"]
        if not methods:
            continue
        degenerate = bool(result["split"].get("degenerate"))
        ours = methods["recsvc"]
        ratio = ours.get("ratio")
        tuned = methods.get("recsvc_tuned", {}).get("ratio")
        pop = methods["popularity"].get("buckets", {})
        wins = [
            ours["buckets"][b][PRIMARY] > pop[b][PRIMARY]
            for b in ours.get("buckets", {})
            if b in pop and ours["buckets"][b]["users"] >= MIN_BUCKET_USERS
        ]
        if not degenerate and ratio:
            ratios.append(ratio)
            if tuned:
                tuned_ratios.append(tuned)
            bucket_ok.append(all(wins))
        if "tuning" in result:
            tuning_cost.append(result["tuning"]["fits_of_default"])
        note = " (degenerate: not counted)" if degenerate else ""
        tuned_text = "-" if tuned is None else f"{tuned:.2f}x"
        every = "yes" if all(wins) else "no"
        lines.append(f"| {name} / {protocol}{note} | {ratio or 0:.2f}x | {tuned_text} | {every} |")

    def geo(values: list[float]) -> float:
        return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values)) if values else float("nan")

    lines += [
        "",
        f"- recsvc default vs the best baseline: geometric mean {geo(ratios):.3f}x (target 1.1x), "
        f"lowest {min(ratios, default=float('nan')):.2f}x (target 1.0x), over {len(ratios)} folds",
    ]
    if tuned_ratios:
        lines.append(
            f"- recsvc --tune: geometric mean {geo(tuned_ratios):.3f}x, lowest {min(tuned_ratios):.2f}x"
        )
    lines.append(
        f"- above popularity in every activity bucket (of at least {MIN_BUCKET_USERS} test users): "
        f"{sum(bucket_ok)} of {len(bucket_ok)} folds"
    )
    if tuning_cost:
        lines.append(f"- tuning cost: at most {max(tuning_cost):.1f} default fits (target 10)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--datasets", default=",".join((*DATASETS, "synthetic")))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--no-tune", action="store_true", help="Skip recsvc --tune (the slow part).")
    parser.add_argument(
        "--quick", action="store_true", help="The synthetic shop and instacart only, no tuning."
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    names = ["synthetic", "instacart"] if args.quick else args.datasets.split(",")
    with_tune = not (args.no_tune or args.quick)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    lines = ["# Recommendation quality (bench/quality.py)", ""]
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            try:
                events, catalog = load(name, Path(args.data_dir), Path(work))
            except FileNotFoundError as e:
                print(f"{name}: skipped ({e})", flush=True)
                continue
            for protocol in args.protocols.split(","):
                started = time.perf_counter()
                result = fold(events, catalog, protocol, with_tune)
                result["wall_s"] = round(time.perf_counter() - started, 1)
                results[(name, protocol)] = result
                table = fold_table(name, protocol, result)
                print("\n".join(table), flush=True)
                lines += table
    lines += summary(results)
    print("\n".join(summary(results)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    document = {f"{n}/{p}": r for (n, p), r in results.items()}
    (out / "quality.json").write_text(json.dumps(document, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
