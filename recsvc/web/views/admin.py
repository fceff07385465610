"""Admin endpoints (API key): publish a version from the models folder, roll back.

``POST /v1/admin/publish`` ``{"version": "latest" | "<version name>"}`` publishes a folder of
``Config.models_dir`` -- only a version *name*, never a path, so a caller cannot make the server read
arbitrary files. ``POST /v1/admin/rollback`` switches to the previously live version.
"""

from __future__ import annotations

from flask import Blueprint, g

from recsvc.core.answers import Source
from recsvc.core.artifact import ArtifactError, resolve_name
from recsvc.core.ids import is_valid_version
from recsvc.storage import versions
from recsvc.storage.connection import REDIS_DOWN_ERRORS
from recsvc.web.auth import audit, require_api_key
from recsvc.web.errors import ApiError, bad_request
from recsvc.web.params import declared, json_body
from recsvc.web.render import answer, request_id
from recsvc.web.services import services

bp = Blueprint("admin", __name__)


def _redis_unavailable(e: BaseException) -> ApiError:
    return ApiError(
        503, "redis_unavailable", f"Redis is unreachable ({type(e).__name__}); nothing was changed"
    )


@bp.post("/v1/admin/publish")
@require_api_key
def publish():
    declared()
    body = json_body(allowed=("version",))
    ref = body.get("version", "latest")
    if not isinstance(ref, str) or not (ref == "latest" or is_valid_version(ref)):
        raise bad_request(
            "version", 'version must be "latest" or a version name ([A-Za-z0-9][A-Za-z0-9._-]{0,63})'
        )
    svc = services()
    try:
        path = resolve_name(svc.config.models_dir, ref)
    except ArtifactError:
        raise ApiError(
            404, "unknown_version", f"no model version {ref!r} in the models folder", field="version"
        ) from None
    client = svc.admin_client()
    try:
        previous = versions.current_version(client)
        stats: list[versions.PublishStats] = []
        version = versions.publish(client, path, svc.config, stats=stats)
    except ArtifactError as e:
        raise ApiError(422, "invalid_artifact", str(e), field="version") from None
    except versions.PublishError as e:
        raise ApiError(409, "publish_failed", str(e)) from None
    except REDIS_DOWN_ERRORS as e:
        raise _redis_unavailable(e) from None
    finally:
        client.close()
    svc.models.invalidate()
    audit(
        "publish",
        f"admin publish {version} by key {g.get('api_key_fingerprint')} (previous {previous})",
        version=version,
        previous=previous,
    )
    s = stats[0]
    return answer(
        {
            "model_version": version,
            "source": Source.PERSONALIZED,
            "request_id": request_id(),
            "published": version,
            "previous": previous,
            "users": s.users,
            "items": s.items,
            "seconds": round(s.seconds, 3),
            "reused": s.reused,
        }
    )


@bp.post("/v1/admin/rollback")
@require_api_key
def rollback():
    declared()
    json_body(allowed=())
    svc = services()
    try:
        previous = versions.current_version(svc.client)
        version = versions.rollback(svc.client, svc.config)
    except versions.RollbackError as e:
        raise ApiError(409, "no_previous_version", str(e)) from None
    except REDIS_DOWN_ERRORS as e:
        raise _redis_unavailable(e) from None
    svc.models.invalidate()
    audit(
        "rollback",
        f"admin rollback {previous} -> {version} by key {g.get('api_key_fingerprint')}",
        version=version,
        previous=previous,
    )
    return answer(
        {
            "model_version": version,
            "source": Source.PERSONALIZED,
            "request_id": request_id(),
            "previous": previous,
        }
    )
