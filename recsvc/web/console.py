"""What the merchandiser console shows, gathered from the services without Flask's request.

Each function returns plain data for one page (the templates under ``templates/console`` render
it). Everything is read-only: recommendations are computed exactly as the API would answer them,
but no exposure is logged (a look in the console is not an impression of an experiment) and nothing
is written to Redis.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import redis

from recsvc.analytics.report import rate_interval, verdict_sentences
from recsvc.core.artifact import ArtifactError, read_document, read_item_counts, resolve_name
from recsvc.core.bundles import BundleRules
from recsvc.core.contract import EVENT_TYPES
from recsvc.core.errors import NotFound
from recsvc.serving import explanations
from recsvc.serving.model import ServingModel
from recsvc.serving.realtime import raw_training_row
from recsvc.serving.recommender import Answer, Variant
from recsvc.storage import stream, versions
from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.web.charts import Bar, bars
from recsvc.web.services import Services

log = logging.getLogger(__name__)

#: History rows shown on a user's page (the training row's strongest items, the newest events).
HISTORY_ROWS = 30
RECENT_ROWS = 20
#: Methods of ``manifest["metrics"]`` drawn against the model, in this order.
BASELINES = ("popularity", "recent_popularity", "item_knn", "implicit_als")
#: Report documents a version folder may hold, served by the console.
REPORT = "report.html"
_ERRORS = (redis.RedisError, *REDIS_DOWN_ERRORS)


def when(seconds: float | int | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM UTC`` ('' when unknown)."""
    if seconds is None:
        return ""
    return _dt.datetime.fromtimestamp(float(seconds), _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def item_card(model: ServingModel, item: int) -> dict[str, Any]:
    """An item as the console shows it: id, title, category, price, stock."""
    code = int(model.category[item])
    price = float(model.price[item])
    return {
        "item_id": model.item_ids[item],
        "title": model.titles[item] or model.item_ids[item],
        "category": model.categories[code] if code >= 0 else None,
        "price": None if price != price else round(price, 2),
        "in_stock": bool(model.available[item]),
    }


def answer_items(result: Answer) -> list[dict[str, Any]]:
    """An answer's items with their score and, when present, their explanation and its parts."""
    model = result.model
    if model is None or not len(result.items):
        return []
    why = None
    if result.explanations is not None:
        why = explanations.rendered(model, result.items, result.explanations)
    out = []
    for k, (item, score) in enumerate(zip(result.items.tolist(), result.scores.tolist(), strict=True)):
        card = {**item_card(model, item), "score": round(float(score), 4)}
        if why is not None and result.explanations is not None:
            card["explanation"] = why[k]
            card["parts"] = result.explanations[k].parts
        out.append(card)
    return out


# ------------------------------------------------------------------------------------------------
# The pages
# ------------------------------------------------------------------------------------------------


def overview(svc: Services) -> dict[str, Any]:
    """The live version and what it holds (the console's front page)."""
    choice = svc.recommender.resolve()
    model = choice.model
    out: dict[str, Any] = {"reason": choice.reason.value if choice.reason else None, "model": None}
    if model is not None:
        counts = model.manifest.get("counts", {})
        out["model"] = {
            "version": model.version,
            "origin": model.origin,
            "created_at": model.manifest.get("created_at"),
            "users": counts.get("users", model.n_users),
            "items": model.n_items,
            "categories": len(model.categories),
        }
        out["examples"] = [model.item_ids[int(i)] for i in model.popular[:5]]
    return out


def user_page(svc: Services, user_id: str, n: int) -> dict[str, Any]:
    """A user's page: history, the recommendations and their reasons, bundles, experiment."""
    assignment = svc.experiments.assign(user_id, refresh=not svc.health.is_down())
    variant = None
    if assignment.experiment is not None and assignment.strategy is not None:
        variant = Variant.of(assignment.strategy, assignment.model_version)
    result = svc.recommender.recommend(user_id, n, variant=variant, explain=True)
    model = result.model
    rules = BundleRules.from_config(svc.config)
    bundles = svc.recommender.user_bundles(user_id, 3, rules)
    page: dict[str, Any] = {
        "user_id": user_id,
        "model_version": result.model_version,
        "source": result.source.value,
        "reason": result.reason.value if result.reason else None,
        "recommendations": answer_items(result),
        "bundles": bundles.fields.get("bundles", []),
        "experiment": assignment.experiment,
        "variant": assignment.variant,
        "variant_strategy": assignment.strategy,
        "known": False,
        "history": [],
        "recent": [],
        "segment": None,
    }
    if model is None:
        return page
    state = svc.recommender.user_state(user_id)
    record = state.record
    page["known"] = record is not None
    purchased = set(record.purchased.tolist()) if record is not None else set()
    if record is not None:
        try:
            indices, confidence = model.training_row(svc.client, user_id)
        except _ERRORS as e:
            log.warning("console: training row unavailable: %s", type(e).__name__)
            indices, confidence = np.zeros(0, np.int32), np.zeros(0, np.float32)
        raw = raw_training_row(model, indices, confidence)
        order = np.lexsort((indices, -raw))[:HISTORY_ROWS]
        page["history"] = [
            {
                **item_card(model, int(indices[k])),
                "weight": round(float(raw[k]), 2),
                "bought": int(indices[k]) in purchased and not model.spec.excludes_interacted,
            }
            for k in order
        ]
    if state.has_recent:
        try:
            recent = stream.recent_events(svc.client, user_id, RECENT_ROWS)
        except _ERRORS as e:
            log.warning("console: recent events unavailable: %s", type(e).__name__)
            recent = None
        if recent is not None:
            for item_id, event, ts in zip(
                recent.item_ids, recent.events.tolist(), recent.timestamps.tolist(), strict=True
            ):
                item = model.item_index.get(item_id)
                card = item_card(model, item) if item is not None else {"item_id": item_id, "title": item_id}
                page["recent"].append({**card, "event": EVENT_TYPES[event], "when": when(ts)})
    page["segment"] = user_segment(svc, model, user_id)
    return page


def user_segment(svc: Services, model: ServingModel, user_id: str) -> str | None:
    """The user's customer segment from the version folder's ``segments.npz`` (None when absent)."""
    table = model.memo("console.segments", lambda: _segments(svc, model.version))
    if table is None:
        return None
    names, by_user = table
    code = by_user.get(user_id)
    return None if code is None else names[code]


def _segments(svc: Services, version: str) -> tuple[list[str], dict[str, int]] | None:
    try:
        path = resolve_name(svc.config.models_dir, version)
        data = read_document(path, "segments.npz")
    except (ArtifactError, OSError):
        return None
    if data is None:
        return None
    import io
    import json

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        codes = z["codes"]
        names = [str(n) for n in z["names"]]
    user_ids = json.loads((path / "user_ids.json").read_text(encoding="utf-8"))
    if len(user_ids) != len(codes):
        return None
    return names, {u: int(c) for u, c in zip(user_ids, codes.tolist(), strict=True) if c >= 0}


def item_page(svc: Services, item_id: str) -> dict[str, Any]:
    """An item's page: the item, similar items, its bundle with prices and savings, who buys it."""
    choice = svc.recommender.resolve()
    model = choice.model
    page: dict[str, Any] = {"item_id": item_id, "known": False}
    if model is None:
        return page
    page["model_version"] = model.version
    item = model.item_index.get(item_id)
    if item is None:
        return page
    page["known"] = True
    page["item"] = item_card(model, item)
    page["similar"] = answer_items(svc.recommender.similar(item_id, 10))
    try:
        bundle = svc.recommender.item_bundle(item_id, BundleRules.from_config(svc.config))
        page["bundles"] = bundle.fields.get("bundles", [])
        page["bundle_note"] = bundle.fields.get("note")
    except NotFound:
        page["bundles"], page["bundle_note"] = [], "unknown item"
    counts = model.memo("console.item_counts", lambda: _item_counts(svc, model.version))
    page["counts"] = None
    if counts is not None:
        page["counts"] = {name: int(values[item]) for name, values in counts.items()}
    return page


def _item_counts(svc: Services, version: str) -> dict[str, np.ndarray] | None:
    try:
        return read_item_counts(resolve_name(svc.config.models_dir, version))
    except (ArtifactError, OSError):
        return None  # the version folder is not on this host


def models_page(svc: Services) -> dict[str, Any]:
    """Published versions, the live one, their metrics against baselines, the pointer's history."""
    page: dict[str, Any] = {"versions": [], "history": [], "redis": True}
    try:
        published = versions.list_published(svc.client)
        history = versions.history(svc.client, limit=50)
        manifests = {v["version"]: versions.read_manifest(svc.client, v["version"]) for v in published}
    except _ERRORS as e:
        svc.health.mark_down(e)
        page["redis"] = False
        return page
    for entry in published:
        manifest = manifests.get(entry["version"]) or {}
        report = None
        try:
            path = resolve_name(svc.config.models_dir, entry["version"])
            report = (path / REPORT).is_file()
        except ArtifactError:
            report = False
        page["versions"].append(
            {
                **entry,
                "published": when(entry["published_at"]),
                "report": report,
                "metrics": metric_charts(manifest.get("metrics") or {}),
                "model": manifest.get("model"),
                "params_source": manifest.get("params_source"),
            }
        )
    page["history"] = [{**h, "when": when(h.get("at"))} for h in history]
    return page


def metric_charts(metrics: dict[str, Any]) -> dict[str, Any]:
    """nDCG@10 of the model and the baselines with intervals, overall and per activity bucket."""
    methods = [m for m in ("model", *BASELINES) if isinstance(metrics.get(m), dict)]
    if not methods:
        return {"charts": [], "warnings": metrics.get("warnings", []), "summary": None}

    def bar(method: str, entry: dict[str, Any], key: str = "ndcg@10") -> Bar:
        value = entry.get(key)
        ci = entry.get(f"{key}_ci")
        interval = (float(ci[0]), float(ci[1])) if isinstance(ci, list | tuple) and len(ci) == 2 else None
        return Bar(method, None if value is None else float(value), interval, highlight=method == "model")

    charts = [
        bars([bar(m, metrics[m]) for m in methods], title="nDCG@10 on the held-out split (95 % interval)")
    ]
    names = {name for m in methods for name in metrics[m].get("buckets") or {}}
    buckets = sorted(
        names, key=lambda name: (int("".join(c for c in name.split("-")[0] if c.isdigit()) or 0), name)
    )
    for name in buckets:
        rows = []
        for m in methods:
            entry = (metrics[m].get("buckets") or {}).get(name) or {}
            rows.append(bar(m, entry))
        users = ((metrics["model"].get("buckets") or {}).get(name) or {}).get("users")
        label = f"activity bucket {name} events" + (f" ({users} users)" if users is not None else "")
        charts.append(bars(rows, title=f"nDCG@10, {label}"))
    return {
        "charts": charts,
        "warnings": list(metrics.get("warnings") or []),
        "summary": comparison_text(metrics.get("comparison") or {}),
    }


def comparison_text(comparison: dict[str, Any]) -> str | None:
    """The evaluation's verdict in words: the model against the best baseline, with its interval."""
    try:
        ci = comparison.get("ratio_ci") or [None, None]
        interval = f" [{float(ci[0]):.2f}, {float(ci[1]):.2f}]" if None not in ci else ""
        return (
            f"Model {comparison['metric']} {float(comparison['model']):.4f} against the best baseline, "
            f"{comparison['best_baseline']}, {float(comparison['baseline']):.4f}: "
            f"{float(comparison['ratio']):.2f}x{interval} (paired 95 % interval)."
        )
    except (KeyError, TypeError, ValueError):
        return None


def report_path(svc: Services, version: str) -> Path | None:
    """The training report of ``version`` when its folder is on this host (None otherwise)."""
    try:
        path = resolve_name(svc.config.models_dir, version) / REPORT
    except ArtifactError:
        return None
    return path if path.is_file() else None


def experiments_page(svc: Services) -> list[dict[str, Any]]:
    """Every experiment with its status and variants."""
    registry = svc.experiments
    registry.refresh(force=True)
    now = registry.clock()
    return [
        {**e.to_dict(), "status": e.status(now), "source": registry.source_of(e.name)} for e in registry.all()
    ]


def experiment_charts(report: Any) -> dict[str, Any]:
    """Exposures, conversion (Wilson interval), revenue per user and the verdict of a report."""
    result = report.results[report.primary]
    level = 0.95
    conversion, revenue, difference = [], [], []
    for v in result.variants:
        interval = rate_interval(v.converters, v.users, level)
        conversion.append(Bar(v.variant, v.conversion_rate, interval, highlight=v.variant == report.control))
        revenue.append(Bar(v.variant, v.revenue_per_user, highlight=v.variant == report.control))
    for c in result.comparisons:
        d = c.revenue_per_user
        difference.append(Bar(f"{c.variant} - {c.control}", d.diff, (d.ci_low, d.ci_high)))
    charts = [
        bars(
            [Bar(v.variant, float(v.users), highlight=v.variant == report.control) for v in result.variants],
            title="Users exposed",
            fmt=lambda x: f"{x:,.0f}",
        ),
        bars(conversion, title="Conversion rate (95 % Wilson interval)", fmt=lambda x: f"{100 * x:.2f} %"),
        bars(revenue, title="Revenue per exposed user", fmt=lambda x: f"{x:,.2f}"),
    ]
    if difference:
        charts.append(
            bars(
                difference,
                title="Revenue per user vs control (Welch 95 % interval)",
                fmt=lambda x: f"{x:+,.2f}",
            )
        )
    return {"charts": charts, "verdict": verdict_sentences(report), "variants": result.variants}
