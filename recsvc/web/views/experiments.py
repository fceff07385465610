"""Admin API for A/B experiments (API key): define, list, inspect, delete, and report.

* ``GET /v1/admin/experiments`` -- every experiment (file and Redis) with its status.
* ``GET /v1/admin/experiments/<name>`` -- one definition with bucket layout, status and source.
* ``PUT /v1/admin/experiments/<name>`` -- create or replace (stored in Redis). Changing shares
  keeps users sticky: only the buckets that must change owner move (see
  :func:`recsvc.analytics.experiments.rebalance`). 201 when created, 200 when replaced.
* ``DELETE /v1/admin/experiments/<name>`` -- remove a stored definition (events stay attributable).
* ``GET /v1/admin/experiments/<name>/assignment?user_id=`` -- which variant a user gets now.
* ``GET /v1/admin/experiments/<name>/report`` -- the attribution report over the events that went
  through the service: stream dumps under ``<var_dir>/events/``, the live stream, and the
  served log (same numbers as ``recsvc report``).

Experiments from ``RECSVC_EXPERIMENTS_FILE`` are read-only here (409): edit the file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, request

from recsvc.analytics import experiments as ex
from recsvc.analytics import registry as reg
from recsvc.analytics.attribution import ExperimentReport
from recsvc.analytics.report import combine_events, make_report
from recsvc.core.eventfiles import BadInputError, load_events
from recsvc.storage import versions
from recsvc.storage.stream import read_stream_events
from recsvc.web.auth import audit, require_api_key
from recsvc.web.errors import ApiError, bad_request
from recsvc.web.params import declared, json_body
from recsvc.web.render import answer, request_id
from recsvc.web.services import services

bp = Blueprint("experiments", __name__)

DEFAULT_REPORT_EVENTS = 200_000
MAX_REPORT_EVENTS = 1_000_000
#: Stream dumps read by the report endpoint at most (bytes on disk); beyond, use ``recsvc report``.
DEFAULT_REPORT_MAX_BYTES = 256 * 1024 * 1024
_DUMP_SUFFIXES = (".csv", ".parquet", ".csv.gz")


def _check_name(name: str) -> str:
    if ex.NAME_PATTERN.fullmatch(name) is None:
        raise bad_request("name", "experiment names are 1-32 characters of [A-Za-z0-9_-]")
    return name


def _redis_unavailable(error: Exception) -> ApiError:
    services().health.mark_down(error)
    return ApiError(503, "redis_unavailable", "Redis is unavailable; try again shortly")


def _describe(experiment: ex.Experiment, source: str | None, now: float) -> dict[str, Any]:
    return {**experiment.to_dict(), "status": experiment.status(now), "source": source}


def _published_versions() -> set[str] | None:

    try:
        return {entry["version"] for entry in versions.list_published(services().client)}
    except Exception:  # noqa: BLE001 - only used for warnings
        return None


@bp.get("/v1/admin/experiments")
@require_api_key
def list_experiments():
    """Every known experiment, ordered by start then name."""
    declared()
    registry = services().experiments
    registry.refresh(force=True)
    now = registry.clock()
    items = [_describe(e, registry.source_of(e.name), now) for e in registry.all()]
    return answer({"request_id": request_id(), "experiments": items})


@bp.get("/v1/admin/experiments/<name>")
@require_api_key
def get_experiment(name: str):
    """One experiment's definition, bucket layout, status and source."""
    name = _check_name(name)
    declared()
    registry = services().experiments
    registry.refresh(force=True)
    experiment = registry.get(name)
    if experiment is None:
        raise ApiError(404, "not_found", f"no experiment named {name!r}", field="name")
    return answer(
        {
            "request_id": request_id(),
            "experiment": _describe(experiment, registry.source_of(name), registry.clock()),
        }
    )


@bp.put("/v1/admin/experiments/<name>")
@require_api_key
def put_experiment(name: str):
    """Create or replace an experiment (body: the definition; ``name`` optional, must match)."""
    name = _check_name(name)
    declared()
    if len(request.get_data(cache=True)) > ex.MAX_DEFINITION_BYTES:
        raise ApiError(
            413, "too_large", f"a definition is at most {ex.MAX_DEFINITION_BYTES} bytes", field="body"
        )
    body = json_body(ex.DEFINITION_FIELDS)
    registry = services().experiments
    registry.refresh(force=True)
    if registry.source_of(name) == "file":
        raise ApiError(
            409, "conflict", f"{name!r} is defined in the experiments file; edit the file", field="name"
        )
    client = services().client
    try:
        previous = reg.load_stored_experiments(client).get(name)
    except redis.RedisError as e:
        raise _redis_unavailable(e) from None
    try:
        experiment = ex.parse_experiment(body, previous=previous, name=name)
    except ex.ExperimentError as e:
        if e.inconsistent:  # every field valid alone (the document's schema), not together
            raise ApiError(409, "inconsistent_definition", e.message, field=e.field) from None
        raise bad_request(e.field, e.message) from None
    warnings = []
    published = _published_versions()
    for variant in experiment.variants:
        if (
            variant.model_version is not None
            and published is not None
            and variant.model_version not in published
        ):
            warnings.append(
                f"variant {variant.name}: model version {variant.model_version} is not published; "
                "its users are served the default, untagged, until it is"
            )
    try:
        created = reg.store_experiment(client, experiment)
    except ex.ExperimentError as e:
        raise ApiError(409, "limit_reached", e.message, field="name") from None
    except redis.RedisError as e:
        raise _redis_unavailable(e) from None
    registry.refresh(force=True)
    audit("experiment_put", f"experiment {name} {'created' if created else 'replaced'}", experiment=name)
    body = {
        "request_id": request_id(),
        "experiment": _describe(experiment, "redis", registry.clock()),
        "created": created,
        "warnings": warnings,
    }
    return answer(body, 201 if created else 200)


@bp.delete("/v1/admin/experiments/<name>")
@require_api_key
def delete_experiment(name: str):
    """Remove a stored experiment; its users are served the default from the next refresh on."""
    name = _check_name(name)
    declared()
    registry = services().experiments
    registry.refresh(force=True)
    if registry.source_of(name) == "file":
        raise ApiError(
            409, "conflict", f"{name!r} is defined in the experiments file; edit the file", field="name"
        )
    try:
        removed = reg.delete_stored_experiment(services().client, name)
    except redis.RedisError as e:
        raise _redis_unavailable(e) from None
    if not removed:
        raise ApiError(404, "not_found", f"no experiment named {name!r}", field="name")
    registry.refresh(force=True)
    audit("experiment_delete", f"experiment {name} deleted", experiment=name)
    return answer({"request_id": request_id(), "deleted": name})


@bp.get("/v1/admin/experiments/<name>/assignment")
@require_api_key
def assignment(name: str):
    """The bucket and variant ``user_id`` gets in this experiment (whether or not it is active)."""
    name = _check_name(name)
    user_id = declared()["user_id"]
    registry = services().experiments
    experiment = registry.get(name)
    if experiment is None:
        raise ApiError(404, "not_found", f"no experiment named {name!r}", field="name")
    variant = experiment.variant_for(user_id)
    return answer(
        {
            "request_id": request_id(),
            "experiment": name,
            "user_id": user_id,
            "bucket": experiment.bucket(user_id),
            "variant": variant.name if variant is not None else None,
            "status": experiment.status(registry.clock()),
        }
    )


def _dump_files(var_dir: Path, since: float | None) -> list[Path]:
    folder = var_dir / "events"
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not path.name.endswith(_DUMP_SUFFIXES):
            continue
        if since is not None and path.stat().st_mtime < since:
            continue  # dumped before the experiment could have any event
        files.append(path)
    return files


@bp.get("/v1/admin/experiments/<name>/report")
@require_api_key
def report(name: str):
    """Attribution report: per variant metrics, both attribution models, z-test verdicts."""

    name = _check_name(name)
    q = declared()
    window_days = q["window_days"] if q["window_days"] is not None else 7.0
    alpha = q["alpha"] if q["alpha"] is not None else 0.05
    attribution = q["attribution"] or "last_click"
    max_events = q["max_events"] or DEFAULT_REPORT_EVENTS
    include_dumps = q["include_dumps"] is not False
    control = q["control"]

    result, warnings = build_report(
        name,
        window_days=window_days,
        alpha=alpha,
        attribution=attribution,
        control=control,
        max_events=max_events,
        include_dumps=include_dumps,
    )
    body = result.to_dict()
    body["warnings"] = warnings + body["warnings"]
    body["definition_source"] = services().experiments.source_of(name)
    body["request_id"] = request_id()
    return answer(body)


def build_report(
    name: str,
    *,
    window_days: float = 7.0,
    alpha: float = 0.05,
    attribution: str = "last_click",
    control: str | None = None,
    max_events: int = DEFAULT_REPORT_EVENTS,
    include_dumps: bool = True,
) -> tuple[ExperimentReport, list[str]]:
    """The attribution report of experiment ``name`` over the events that went through the service
    (stream dumps, the live stream, the served log), and warnings about what was skipped. The API's
    report endpoint and the console show the same numbers.

    Raises
    ------
    ApiError
        404 (no such experiment and no event of it), 413 (too many dumps), 503 (Redis down); 400
        for a control that is not a variant.
    """
    svc = services()
    registry = services().experiments
    definition = registry.get(name)
    warnings: list[str] = []
    parts: list[Any] = []
    if include_dumps:
        since = (
            definition.start - window_days * 86400 if definition is not None and definition.start else None
        )
        files = _dump_files(Path(svc.config.var_dir), since)
        limit = svc.config.experiments.report_max_bytes
        total = sum(p.stat().st_size for p in files)
        if total > limit:
            raise ApiError(
                413,
                "too_much_data",
                f"{len(files)} stream dumps hold {total:,} bytes (limit {limit:,}); run `recsvc report` "
                "on them, or pass include_dumps=false for the live stream only",
            )
        if files:
            for path in files:
                try:
                    parts.append(load_events(path)[0])
                except BadInputError as e:
                    warnings.append(f"skipped {path.name}: {e}")
    try:
        stream, skipped = read_stream_events(svc.client, svc.config.events.stream, max_events)
        served = reg.read_served(svc.client, name, limit=max_events)
    except redis.RedisError as e:
        raise _redis_unavailable(e) from None
    parts.append(stream)
    if skipped:
        warnings.append(f"{skipped} invalid stream entries skipped")
    events = combine_events(parts)
    try:
        result = make_report(
            events,
            name,
            definition,
            window_days=window_days,
            alpha=alpha,
            attribution=attribution,
            control=control,
            served=served,
        )
    except ValueError as e:
        if definition is None:
            raise ApiError(
                404, "not_found", f"no experiment named {name!r} and no event of it", field="name"
            ) from None
        raise bad_request("control" if "control" in str(e) else "name", str(e)) from None
    return result, warnings
