"""Model selection on a validation split: only the knobs that matter, and only real improvements.

``recsvc tune`` (and ``recsvc train --tune``) searches the blend's weights and the ALS
regularization on a per-user validation split carved from the training data -- hundreds of users,
where a window at the end of the log held ten -- and keeps a candidate only when it beats the
current parameters with a paired bootstrap 95 % interval whose lower bound is above 1: never worse
than the defaults because of noise. What was searched, every trial and why the winner won are
recorded; :func:`save_choice` writes the choice where ``recsvc train`` and the nightly retrain
reuse it.

Search space (docs/quality.md): ``regularization_per_item`` in {0.01, 0.03, 0.1} (each one ALS
fit), and, re-scoring the same fitted parts, ``popularity`` in {0.25, 0.5, 1},
``popularity_boost`` in {3, 10, 30} and ``knn`` in {0.5, 1, 2}. The exclusion rule is measured, not
searched. Cost: three ALS fits and three kNN fits plus re-scoring, about 4-6x one fit.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.core.events import EventTable
from recsvc.core.scoring import ModelSpec
from training.als import TrainParams
from training.evaluation import PRIMARY, prepare, top_of_block, user_blocks
from training.metrics import hit_matrix, per_user, ratio_interval, relevant_counts
from training.model import fit_model
from training.splits import SplitSpec, split_events

TUNING_FILE = "tuning.json"
MIN_VALIDATION_USERS = 200
#: Around the defaults, a step of about 3x (2x for the kNN weight) either way: what moved results on
#: validation (docs/quality.md; the base popularity weight moved nothing by more than 0.5 %, its
#: boost for short histories did). Only the regularization needs a fit; the rest re-weighs its parts.
#: Then one fit each, on top of the best so far, for changes of the matrix and of ALS that moved
#: some data set and not others. Not searched, on the evidence (docs/quality.md): factors and
#: iterations (64 and 15 were within noise of 128 and 10-25, 32 was worse everywhere), alpha (1-20
#: within 5 % once confidences are log-scaled) and the scaling (linear confidences were the grocery
#: failure; bm25 never best on average).
SEARCH_SPACE: dict[str, tuple[float, ...]] = {
    "regularization_per_item": (0.003, 0.01, 0.03),
    "popularity_boost": (1.0, 3.0, 10.0),
    "knn": (1.0, 2.0, 4.0),
}
STRUCTURE_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("purchases only", {"event_weights": {"view": 0.0, "cart": 0.0, "click": 0.0, "purchase": 1.0}}),
    ("half-life 30 days", {"half_life_days": 30.0}),
)


@dataclass
class TuneResult:
    """The chosen parameters, every trial (best first) and the validation split."""

    best: TrainParams
    best_score: float
    default_score: float
    reason: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": PRIMARY,
            "chosen": self.best.to_config(),
            "best_score": self.best_score,
            "default_score": self.default_score,
            "reason": self.reason,
            "trials": self.trials,
            "validation": self.validation,
            "seconds": round(self.seconds, 2),
        }


def tune(
    events: EventTable,
    catalog: Any,
    base: TrainParams | None = None,
    *,
    seed: int = 42,
    threads: int = 0,
    device: str = "auto",
    time_budget_s: float = 600.0,
    max_validation_users: int = 3000,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search :data:`SEARCH_SPACE` on a per-user validation split of ``events``.

    Parameters
    ----------
    events : EventTable
        The training data (never the evaluation's test part).
    catalog : Catalog or None
    base : TrainParams, optional
        The parameters to beat (trial 0); their factors, iterations, weights, scaling are kept.
    seed, threads, device
        Fits, the user sample and the bootstrap are seeded.
    time_budget_s : float
        No new regularization is fitted after this many seconds (the scored ones are kept).
    max_validation_users : int
        Seeded sample of validation users scored.
    progress : callable, optional
        Receives a line per fit and per best-so-far.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    base = base or TrainParams()
    split = split_events(events, SplitSpec("user"))
    prep = prepare(
        split,
        None if catalog is None else catalog.item_id,
        base,
        max_test_users=max_validation_users,
        seed=seed,
    )
    validation = {**prep.info}
    n_users = len(prep.test_rows)
    if n_users < MIN_VALIDATION_USERS:
        return TuneResult(
            base,
            float("nan"),
            float("nan"),
            f"kept the current parameters: {n_users} validation users (< {MIN_VALIDATION_USERS})",
            validation=validation,
            seconds=time.perf_counter() - started,
        )
    n_rel = relevant_counts(prep.relevant)
    cutoff = int(split.train.timestamp.max())
    # Every candidate re-weighs the same fitted parts: fit with a spec that has all of them.
    search = replace(base, model=_with_every_part(base.model))
    candidates = [
        replace(base.model, popularity_boost=boost, knn=knn)
        for boost, knn in itertools.product(SEARCH_SPACE["popularity_boost"], SEARCH_SPACE["knn"])
    ]

    def fit(params: TrainParams) -> Any:
        return fit_model(
            split.train,
            prep.user_ids,
            prep.item_ids,
            params,
            now=cutoff,
            seed=seed,
            threads=threads,
            device=device,
        )

    fit_started = time.perf_counter()
    base_fit = fit(search)
    fit_seconds = time.perf_counter() - fit_started
    default_values = _ndcg_of(prep, base_fit, [base.model], n_rel)[0]
    default_score = float(default_values.mean())
    say(f"validation: {n_users} users; current parameters {PRIMARY}={default_score:.4f}")
    trials: list[dict[str, Any]] = []
    best, best_values, reason = (
        base,
        default_values,
        "no candidate beat the current parameters with confidence",
    )
    for reg in SEARCH_SPACE["regularization_per_item"]:
        if time.perf_counter() - started > time_budget_s:
            say(f"time budget of {time_budget_s:.0f}s reached: stopped before regularization {reg}")
            break
        candidate_base = replace(base, regularization=None, regularization_per_item=reg)
        same_fit = base.regularization is None and reg == base.regularization_per_item
        fitted = base_fit if same_fit else fit(replace(candidate_base, model=search.model))
        for spec, values in zip(candidates, _ndcg_of(prep, fitted, candidates, n_rel), strict=True):
            params = replace(candidate_base, model=spec)
            interval = ratio_interval(values, default_values, seed)
            trial = {
                "regularization_per_item": reg,
                "popularity": spec.popularity,
                "popularity_boost": spec.popularity_boost,
                "knn": spec.knn,
                PRIMARY: float(values.mean()),
                "ratio_vs_current": round(float(values.mean()) / default_score, 4)
                if default_score > 0
                else None,
                "ratio_ci": None if interval is None else [round(interval[0], 4), round(interval[1], 4)],
            }
            trials.append(trial)
            if interval is not None and interval[0] > 1.0 and values.mean() > best_values.mean():
                best, best_values = params, values
                reason = (
                    f"{PRIMARY} {values.mean():.4f} vs current {default_score:.4f} on {n_users} validation "
                    f"users, paired 95% interval of the ratio [{interval[0]:.3f}, {interval[1]:.3f}] above 1"
                )
                say(f"better: {reason}")
    # One fit per change of the matrix or of ALS, on top of the best so far, while the budget lasts.
    for name, change in STRUCTURE_CANDIDATES:
        if time.perf_counter() - started + fit_seconds > time_budget_s:
            say(f"time budget of {time_budget_s:.0f}s reached: stopped before {name}")
            break
        params = best.replace(**change)
        fitted = fit(replace(params, model=_with_every_part(params.model)))
        values = _ndcg_of(prep, fitted, [params.model], n_rel)[0]
        interval = ratio_interval(values, best_values, seed)
        trials.append(
            {
                "change": name,
                PRIMARY: float(values.mean()),
                "ratio_vs_current": round(float(values.mean()) / default_score, 4)
                if default_score > 0
                else None,
                "ratio_ci": None if interval is None else [round(interval[0], 4), round(interval[1], 4)],
            }
        )
        if interval is not None and interval[0] > 1.0:
            best, best_values = params, values
            reason = (
                f"{PRIMARY} {values.mean():.4f} vs current {default_score:.4f} on {n_users} validation users "
                f"after '{name}', paired 95% interval of the ratio to the previous best "
                f"[{interval[0]:.3f}, {interval[1]:.3f}] above 1"
            )
            say(f"better: {reason}")
    trials.sort(key=lambda t: -t[PRIMARY])
    return TuneResult(
        best,
        float(best_values.mean()),
        default_score,
        reason,
        trials,
        validation,
        time.perf_counter() - started,
    )


def _with_every_part(spec: ModelSpec) -> ModelSpec:
    """``spec`` with a weight on every part the search varies, so that all of them are fitted."""
    return replace(spec, knn=spec.knn or 1.0, popularity=spec.popularity or 0.5)


def _ndcg_of(prep: Any, fitted: Any, specs: list[ModelSpec], n_rel: np.ndarray) -> np.ndarray:
    """nDCG@10 per validation user ``(len(specs), n_users)`` of each spec over one fit's parts.

    The parts (the ALS and item-kNN products, z-scored) are computed once per block of users and
    re-weighed for every spec: the search costs a few fits, not one scoring pass per candidate.
    """
    depth = 10
    scorer = fitted.scorer()
    out = np.zeros((len(specs), len(prep.test_rows)))
    for lo, rows in user_blocks(prep):
        parts = scorer.parts(fitted.raw[rows], fitted.user_factors[rows])
        hi = lo + len(rows)
        relevant = prep.relevant[lo:hi]
        for j, spec in enumerate(specs):
            top = top_of_block(prep, rows, scorer.combine(parts, spec), depth)
            out[j, lo:hi] = per_user(hit_matrix(top, relevant), n_rel[lo:hi], "ndcg", depth)
    return out


def save_choice(
    models_dir: str | os.PathLike, result: TuneResult | dict[str, Any], fingerprint: str = ""
) -> Path:
    """Write a tuning result (or its :meth:`TuneResult.to_dict`) to ``<models_dir>/tuning.json``
    (atomically) and return the path."""
    folder = Path(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "data_fingerprint": fingerprint,
        **(result.to_dict() if isinstance(result, TuneResult) else result),
    }
    path = folder / TUNING_FILE
    tmp = folder / f".{TUNING_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True, default=float), encoding="utf-8")
    tmp.replace(path)
    return path


def load_choice(models_dir: str | os.PathLike) -> tuple[TrainParams, dict[str, Any]] | None:
    """The saved choice and its record, or None when nothing was tuned.

    Raises
    ------
    ValueError
        The file exists but is unusable (the message names it).
    """
    path = Path(models_dir) / TUNING_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        params = TrainParams.from_mapping(document["chosen"], source=str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unusable tuning record ({type(e).__name__}: {e})") from None
    return params, document


def choice_age_days(document: dict[str, Any], now: float | None = None) -> float:
    """Days since a saved choice was made."""
    created = _dt.datetime.fromisoformat(document["created_at"]).timestamp()
    return ((time.time() if now is None else now) - created) / 86_400
