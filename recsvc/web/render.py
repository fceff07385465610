"""Rendering answers: the one JSON shape of every item-list answer, tagged for A/B experiments.

``{"model_version", "source", "request_id", <endpoint fields>, "reason"?, "items": [...],
"experiment", "variant", "rec_id"}``. Every answer gets a ``rec_id``; an answer served to a user
in an active experiment is tagged with the experiment and variant, unless it is not what the
variant defines (a degraded answer, another version), and its exposure is logged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import current_app, g, request
from flask.wrappers import Response

from recsvc.analytics.recids import new_rec_id
from recsvc.analytics.registry import Assignment, served_as_defined
from recsvc.serving import explanations
from recsvc.serving.model import ServingModel
from recsvc.serving.recommender import Answer, Variant
from recsvc.web import jsonio
from recsvc.web.observe import note_answer, note_variant
from recsvc.web.services import services


def request_id() -> str:
    """This request's id (the caller's valid ``X-Request-ID``, else a fresh one)."""
    return g.get("request_id", "")


def _item_templates(model: ServingModel) -> list[dict[str, Any]]:
    """Per item, the answer's dict with a placeholder score: ``item_id, score, title, category, price``.

    Built once per model version, so an answer copies 20 small dicts and sets their scores instead
    of looking up four fields per item. The placeholder keeps ``score`` second in the JSON.
    """
    categories = model.categories
    return [
        {
            "item_id": item_id,
            "score": 0.0,
            "title": title,
            "category": categories[code] if code >= 0 else None,
            "price": None if price != price else round(price, 2),  # price != price: NaN, unknown
        }
        for item_id, title, code, price in zip(
            model.item_ids, model.titles, model.category.tolist(), model.price.tolist(), strict=True
        )
    ]


def item_list(
    model: ServingModel | None,
    items: np.ndarray,
    scores: np.ndarray,
    item_fields: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Items as the API shows them: ``item_id, score, title, category, price`` and, for items in
    ``item_fields``, their extra fields (a buy-again item's dates and reason)."""
    if model is None or len(items) == 0:
        return []
    templates = model.memo("api_item_templates", lambda: _item_templates(model))
    # Six decimals keep the answer short; one numpy call rounds them all.
    rounded = np.round(np.asarray(scores, dtype=np.float64), 6).tolist()
    out = []
    for i, score in zip(items.tolist(), rounded, strict=True):
        item = templates[i].copy()
        item["score"] = score
        if item_fields is not None and i in item_fields:
            item.update(item_fields[i])
        out.append(item)
    return out


def answer(body: dict[str, Any], status: int = 200, *, item_answer: bool = False) -> Response:
    """A JSON response; the body gets this request's ``request_id`` when it has none.

    Its ``model_version``, ``source`` and ``reason`` go to the request's metrics and log line;
    ``item_answer``: it is a list of items (counted per source and reason).
    """
    body.setdefault("request_id", request_id())
    note_answer(body, item_answer=item_answer)
    return current_app.response_class(jsonio.dumps(body), status=status, mimetype="application/json")


def assignment(user_id: str | None) -> Assignment:
    """This request's A/B assignment for ``user_id`` (computed once per request, kept on ``g``).

    ``user_id`` must already satisfy the id contract. Requests without a user get an untagged rec id.
    """
    cached = g.get("_recsvc_assignment")
    if cached is not None and cached[0] == user_id:
        return cached[1]
    svc = services()
    if user_id is None:
        result = Assignment(rec_id=new_rec_id())
    else:
        # Do not wait on a Redis that is known to be down: use the definitions in memory.
        result = svc.experiments.assign(user_id, refresh=not svc.health.is_down())
    g._recsvc_assignment = (user_id, result)
    return result


def variant_of(result: Assignment) -> Variant | None:
    """The serving plan of an assignment's variant (None outside any experiment)."""
    if result.experiment is None or result.strategy is None:
        return None
    return Variant.of(result.strategy, result.model_version)


def render(
    result: Answer, *, user_id: str | None = None, strict: bool = False, status: int = 200
) -> Response:
    """The response for a recommender's answer, tagged for the user's experiment.

    Parameters
    ----------
    result : Answer
    user_id : str, optional
        The user the answer is for (answers about items carry no user and are never tagged).
    strict : bool
        The endpoint applies variants (recommendations): an answer that is not what the variant
        defines is served outside the experiment. Other surfaces are the same for every arm and
        stay tagged.
    """
    body: dict[str, Any] = {
        "model_version": result.model_version,
        "source": result.source.value,
        "request_id": request_id(),
    }
    body.update(result.fields)
    if result.reason is not None:
        body["reason"] = result.reason.value
    body["items"] = item_list(result.model, result.items, result.scores, result.item_fields)
    if result.explanations is not None and result.model is not None:
        why = explanations.rendered(result.model, result.items, result.explanations)
        for item, explanation in zip(body["items"], why, strict=True):
            item["explanation"] = explanation
    tag(body, user_id, strict=strict and result.variant_applied, applied=result.variant_applied)
    return answer(body, status, item_answer=True)


def tag(body: dict[str, Any], user_id: str | None, *, strict: bool, applied: bool = True) -> None:
    """Add ``experiment``, ``variant`` and ``rec_id`` to an answer body and log the exposure."""
    result = assignment(user_id)
    if result.experiment is None:  # most answers: no experiment, nothing to check or log
        body["experiment"] = body["variant"] = None
        body["rec_id"] = result.rec_id
        return
    if not applied or not served_as_defined(result, body, strict=strict):
        result = result.untagged()
    body.update(result.fields())
    if result.experiment is not None and result.variant is not None:
        note_variant(result.experiment, result.variant)
    if result.experiment is not None and user_id is not None:
        items = [item["item_id"] for item in body.get("items", ())]
        services().served_log.record(result, user_id, items, request.endpoint or "")
