"""The training report: ``report.html`` in each model folder, one self-contained page with plots.

What a merchandiser or an engineer asks of a new version before it goes live, from the artifact
itself (its manifest and its parts) and a seeded sample of its users' lists:

* evaluation against the baselines, nDCG@10 with 95 % intervals, overall and per activity bucket;
* the scores the model gives (the best item's and the tenth's, per user);
* coverage: how many catalogue items reach anyone's top 10, and how unevenly;
* popularity bias: how popular recommended items are, against what users interact with;
* training time per stage (and the settings the model was fitted with).

Plots are drawn with matplotlib (the Agg backend) as PNG and inlined as base64, so the file opens
anywhere without other files or a network; the page carries no script. Written after the version
(:func:`recsvc.core.artifact.write_document`): a report that cannot be made never costs the model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.core.artifact import Artifact, write_document

log = logging.getLogger(__name__)

#: Users whose lists are scored for the score, coverage and popularity figures (seeded sample).
SAMPLE_USERS = 2000
_BLOCK_FLOATS = 1 << 23  # scores held at once while the sample's lists are ranked
TOP = 10
METHODS = ("model", "popularity", "recent_popularity", "item_knn", "implicit_als")
COLOURS = {"model": "#2563a8", "other": "#9db7d8"}
BASELINE_COLOURS = ("#9db7d8", "#f2a65a", "#7fbf7b", "#c994c7", "#bdbdbd")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float = 6.4, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def sample_lists(artifact: Artifact, sample: int = SAMPLE_USERS, seed: int = 0) -> dict[str, np.ndarray]:
    """Top-10 lists of a seeded sample of users, scored as publish scores them (what a user may not
    get again left out).

    Returns ``items`` ``(users, 10)`` int (-1 pads), ``scores`` ``(users, 10)`` float32 and ``users``.
    """
    n_users = artifact.n_users
    if n_users == 0:
        empty = np.zeros((0, TOP))
        return {
            "items": empty.astype(np.int64),
            "scores": empty.astype(np.float32),
            "users": np.zeros(0, int),
        }
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(n_users, min(sample, n_users), replace=False))
    scorer = artifact.scorer()
    raw = artifact.raw_interactions()
    never = artifact.interactions if artifact.spec().excludes_interacted else artifact.purchases
    # Scored a block of users at a time: a dense score row per user over the whole catalogue
    # (2,000 users x 68k items was 2.6 GB at once) stays within _BLOCK_FLOATS.
    step = max(1, _BLOCK_FLOATS // max(artifact.n_items, 1))
    parts = [
        scorer.top_k(
            raw[block],
            artifact.user_factors[block],
            min(TOP, artifact.n_items),
            blocked=never[block],
        )
        for block in (users[lo : lo + step] for lo in range(0, len(users), step))
    ]
    items = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    return {"items": items, "scores": scores, "users": users}


def list_figures(artifact: Artifact, lists: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers behind the score, coverage and popularity-bias plots (pure numpy)."""
    items, scores = lists["items"], lists["scores"]
    shown = items[items >= 0]
    counts = np.bincount(shown, minlength=artifact.n_items)
    coverage = float(np.count_nonzero(counts)) / max(artifact.n_items, 1)
    # Popularity rank of an item: 0 = most interacted-with (distinct users), as a percentile.
    interacted = np.bincount(artifact.interactions.indices, minlength=artifact.n_items)
    order = np.argsort(-interacted, kind="stable")
    rank = np.empty(artifact.n_items, dtype=np.float64)
    rank[order] = np.arange(artifact.n_items) / max(artifact.n_items - 1, 1)
    history = artifact.interactions[lists["users"]].indices if len(lists["users"]) else np.zeros(0, int)
    sorted_counts = np.sort(counts)[::-1]
    top_share = float(sorted_counts[: max(1, artifact.n_items // 10)].sum()) / max(float(counts.sum()), 1.0)
    return {
        "first": scores[:, 0] if scores.shape[1] else np.zeros(0),
        "last": scores[:, -1] if scores.shape[1] else np.zeros(0),
        "counts": sorted_counts,
        "coverage": coverage,
        "top_decile_share": top_share,
        "recommended_rank": rank[shown],
        "history_rank": rank[history],
    }


def _metrics_plot(metrics: dict[str, Any]) -> str | None:
    methods = [
        m for m in METHODS if isinstance(metrics.get(m), dict) and metrics[m].get("ndcg@10") is not None
    ]
    if not methods:
        return None
    fig, ax = _figure(6.4, 0.5 + 0.45 * len(methods))
    values = [metrics[m]["ndcg@10"] for m in methods]
    lows, highs = [], []
    for m, v in zip(methods, values, strict=True):
        ci = metrics[m].get("ndcg@10_ci") or [v, v]
        lows.append(v - ci[0])
        highs.append(ci[1] - v)
    colours = [COLOURS["model"] if m == "model" else COLOURS["other"] for m in methods]
    ax.barh(methods, values, xerr=[lows, highs], color=colours, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 on the held-out split (95 % interval)")
    return _png(fig)


def _bucket_plot(metrics: dict[str, Any]) -> str | None:
    methods = [m for m in METHODS if isinstance(metrics.get(m), dict) and metrics[m].get("buckets")]
    if not methods:
        return None
    buckets: list[str] = []
    for m in methods:
        buckets += [b for b in metrics[m]["buckets"] if b not in buckets]
    fig, ax = _figure(6.4, 3.0)
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        values = [(metrics[m]["buckets"].get(b) or {}).get("ndcg@10") or 0.0 for b in buckets]
        colour = COLOURS["model"] if m == "model" else BASELINE_COLOURS[k % len(BASELINE_COLOURS)]
        ax.bar(np.arange(len(buckets)) + k * width, values, width, label=m, color=colour)
    users = [(metrics.get("model", {}).get("buckets", {}).get(b) or {}).get("users") for b in buckets]
    ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2)
    ax.set_xticklabels(
        [f"{b} events\n({u} users)" if u is not None else b for b, u in zip(buckets, users, strict=True)]
    )
    ax.set_ylabel("nDCG@10")
    ax.legend(fontsize=8)
    return _png(fig)


def _scores_plot(figures: dict[str, Any]) -> str | None:
    if not len(figures["first"]):
        return None
    fig, ax = _figure()
    ax.hist(figures["first"], bins=40, alpha=0.7, label="best item")
    ax.hist(figures["last"], bins=40, alpha=0.7, label=f"item {TOP}")
    ax.set_xlabel("score")
    ax.set_ylabel("users")
    ax.legend()
    return _png(fig)


def _coverage_plot(figures: dict[str, Any]) -> str | None:
    counts = figures["counts"]
    if not counts.sum():
        return None
    fig, ax = _figure()
    ax.plot(np.arange(1, len(counts) + 1), counts, color=COLOURS["model"])
    ax.set_xlabel("items, most recommended first")
    ax.set_ylabel(f"top-{TOP} lists holding it")
    return _png(fig)


def _popularity_plot(figures: dict[str, Any]) -> str | None:
    if not len(figures["recommended_rank"]):
        return None
    fig, ax = _figure()
    bins = np.linspace(0, 1, 21)
    ax.hist(figures["history_rank"], bins=bins, alpha=0.6, density=True, label="what users interacted with")
    ax.hist(
        figures["recommended_rank"], bins=bins, alpha=0.6, density=True, label="what they are recommended"
    )
    ax.set_xlabel("item popularity rank (0 = most popular, 1 = least)")
    ax.set_ylabel("density")
    ax.legend()
    return _png(fig)


def _timings_plot(timings: dict[str, float]) -> str | None:
    stages = [(k, float(v)) for k, v in timings.items() if k not in ("total",) and v is not None]
    if not stages:
        return None
    fig, ax = _figure(6.4, 0.5 + 0.4 * len(stages))
    ax.barh([k for k, _ in stages], [v for _, v in stages], color=COLOURS["model"])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    return _png(fig)


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return f'<p class="muted">{html.escape(alt)}: nothing to plot.</p>'
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    methods = [m for m in METHODS if isinstance(metrics.get(m), dict)]
    names = [
        k
        for k in ("ndcg@10", "recall@20", "precision@10", "map@10", "hit_rate@10", "coverage@10")
        if any(k in metrics[m] for m in methods)
    ]
    if not methods:
        return '<p class="muted">This version was not evaluated.</p>'
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = ""
    for m in methods:
        cells = "".join(
            f"<td>{metrics[m][n]:.4f}</td>" if isinstance(metrics[m].get(n), int | float) else "<td>–</td>"
            for n in names
        )
        body += f"<tr><th>{html.escape(m)}</th>{cells}</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2330; max-width: 980px; margin: 24px auto;
  padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #d9dee7; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e8ef; text-align: left;
  font-variant-numeric: tabular-nums; }
.muted { color: #5d6677; } img { max-width: 100%; } .warn { color: #9a5a06; }
"""


def render_report(artifact: Artifact, lists: dict[str, np.ndarray] | None = None) -> str:
    """The report page of ``artifact`` (a written version: its manifest is complete)."""
    m = artifact.manifest
    metrics = m.get("metrics") or {}
    lists = lists if lists is not None else sample_lists(artifact)
    figures = list_figures(artifact, lists)
    comparison = metrics.get("comparison") or {}
    summary = []
    if comparison:
        ci = comparison.get("ratio_ci") or ["?", "?"]
        summary.append(
            f"Model nDCG@10 {comparison.get('model', 0):.4f} against the best baseline "
            f"({html.escape(str(comparison.get('best_baseline')))}) {comparison.get('baseline', 0):.4f}: "
            f"ratio {comparison.get('ratio')} [{ci[0]}, {ci[1]}] (paired 95 % interval)."
        )
    warnings = "".join(
        f'<p class="warn">Warning: {html.escape(str(w))}</p>' for w in metrics.get("warnings", [])
    )
    counts = m.get("counts", {})
    timings = m.get("timings_s", {})
    total_s = timings.get("total", sum(v for v in timings.values() if isinstance(v, int | float)))
    rec_rank, hist_rank = figures["recommended_rank"], figures["history_rank"]
    median_rec = float(np.median(rec_rank)) if len(rec_rank) else float("nan")
    median_hist = float(np.median(hist_rank)) if len(hist_rank) else float("nan")
    sampled = f"{len(lists['users']):,}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Training report {html.escape(artifact.version)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Training report: {html.escape(artifact.version)}</h1>",
        f"<p class='muted'>Created {html.escape(str(m.get('created_at')))}, data until "
        f"{html.escape(str(m.get('trained_until_utc', m.get('trained_until'))))}; "
        f"{counts.get('users', 0):,} users, {counts.get('items', 0):,} items, "
        f"{counts.get('interactions', 0):,} user-item pairs.</p>",
        "<h2>Evaluation against the baselines</h2>",
        "".join(f"<p>{s}</p>" for s in summary) + warnings,
        _img(_metrics_plot(metrics), "nDCG@10 per method"),
        _metrics_table(metrics),
        "<h3>Per activity bucket (training events per test user)</h3>",
        _img(_bucket_plot(metrics), "nDCG@10 per activity bucket"),
        "<h2>Scores</h2>",
        f"<p class='muted'>Top-{TOP} lists of {sampled} sampled users, scored as publish scores them.</p>",
        _img(_scores_plot(figures), "score of the best and the tenth item per user"),
        "<h2>Coverage</h2>",
        f"<p><strong>{figures['coverage']:.1%}</strong> of the catalogue is in at least one sampled "
        f"top-{TOP} list; "
        f"the most recommended tenth of the items fills {figures['top_decile_share']:.1%} of the slots.</p>",
        _img(_coverage_plot(figures), "how often each item is recommended"),
        "<h2>Popularity bias</h2>",
        f"<p>Median popularity rank of recommended items {median_rec:.2f}, "
        f"of the items users interacted with {median_hist:.2f} "
        "(0 = the most popular item, 1 = the least).</p>",
        _img(_popularity_plot(figures), "popularity of recommended and interacted items"),
        "<h2>Training</h2>",
        f"<p>Total {total_s:.1f} s "
        "before writing (per stage below). Training loss is not recorded by the fit.</p>",
        _img(_timings_plot(timings), "seconds per stage"),
        _table([("model", json.dumps(m.get("model"))), ("parameters", json.dumps(m.get("params"))),
                ("chosen by", m.get("params_source")), ("engine", (m.get("training") or {}).get("engine"))]),
        "</body></html>",
    ]  # fmt: skip
    return "".join(parts)


def write_report(path: str | Path, artifact: Artifact) -> Path | None:
    """Write ``report.html`` into version folder ``path``; None (and a logged warning) on failure."""
    try:
        page = render_report(artifact)
        return write_document(path, "report.html", page.encode("utf-8"))
    except Exception as e:  # noqa: BLE001 - a report must never fail a training run
        log.warning("training report not written: %s: %s", type(e).__name__, e)
        return None


def customer_segments(events: Any) -> Any:
    """The customer segments of ``events`` (None, with a warning, when they cannot be computed).

    Training computes them while it still holds the events, which it releases before the fit.
    """
    if events is None or not len(events):
        return None
    try:
        from training.segments import compute_segments

        return compute_segments(events)
    except Exception as e:  # noqa: BLE001 - segments are a convenience of the console
        log.warning("customer segments not computed: %s: %s", type(e).__name__, e)
        return None


def write_documents(path: str | Path, artifact: Artifact, events: Any = None, segments: Any = None) -> None:
    """The documents of a freshly written version: ``segments.npz`` (``segments``, else computed
    from ``events``) and the report."""
    if segments is None:
        segments = customer_segments(events)
    if segments is not None:
        try:
            from training.segments import segments_document

            write_document(path, "segments.npz", segments_document(segments, artifact.user_ids))
        except Exception as e:  # noqa: BLE001 - segments are a convenience of the console
            log.warning("customer segments not written: %s: %s", type(e).__name__, e)
    write_report(path, artifact)
