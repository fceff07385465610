"""``/console``: the merchandiser console -- server-rendered pages over the same services as the API.

Read-only, behind the API keys: a browser logs in once with a key (``POST /console/login``) and
gets a signed session cookie (:mod:`recsvc.web.sessions`); a script may send the key as for the
API (``Authorization: Bearer``). Without either, every page answers 401 with the login form; with no
key configured the console is disabled (403), like every protected endpoint. Wrong keys count
towards the same per-address throttle as the API's. Pages carry no script: charts are inline SVG,
and the Content-Security-Policy allows none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Response, make_response, redirect, render_template, request, send_file

from recsvc.core.errors import RateLimited
from recsvc.core.ids import is_valid_id, is_valid_version
from recsvc.web import console as pages
from recsvc.web import sessions
from recsvc.web.auth import accept_key, audit, presented_key
from recsvc.web.errors import ApiError
from recsvc.web.params import declared
from recsvc.web.services import services
from recsvc.web.views.experiments import build_report

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="../templates")

#: No script, no frames, no form posts elsewhere; images from the shop's catalogue and inline SVG.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: https:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The training report: self-contained (inline styles and images), nothing else.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin: the login form's POST carries its Origin (no-referrer would make it "null").
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return make_response(render_template(f"console/{template}", **context), status)


def _login_page(status: int, message: str | None = None) -> Response:
    return _page("login.html", status, message=message)


def _signed_in() -> bool:
    """Whether the request carries a valid session cookie or API key (raises 401/429 for a wrong key)."""
    configured = services().config.api_keys
    if not configured:
        raise ApiError(403, "disabled", "the console is disabled: no API key is configured (RECSVC_API_KEYS)")
    if sessions.valid(request.cookies.get(sessions.COOKIE), configured):
        return True
    key = presented_key()
    if key is not None:
        accept_key(key, configured)
        return True
    return False


def console_page(view: F) -> F:
    """A console page: signed in, or 401 with the login form."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _signed_in():
            return _login_page(401)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@bp.get("/login")
def login_form():
    declared()
    return _login_page(200)


@bp.post("/login")
def login():
    """Check the posted key like an API key; on success set the session cookie and go to the console."""
    declared()
    svc = services()
    configured = svc.config.api_keys
    if not configured:
        raise ApiError(403, "disabled", "the console is disabled: no API key is configured (RECSVC_API_KEYS)")
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise ApiError(403, "forbidden", "a console login must come from the console's own page")
    key = request.form.get("key", "").strip()
    if not key:
        return _login_page(401, "Enter an API key.")
    try:
        accept_key(key, configured)
    except RateLimited as e:
        return _login_page(429, f"Too many wrong keys from this address; try again in {e.retry_after_s} s.")
    except ApiError as e:
        if e.status != 401:
            raise
        return _login_page(401, "That key is not valid.")
    audit("console_login", "console login")
    response = redirect("/console", code=303)
    lifetime = svc.config.serving.console_session_s
    response.set_cookie(
        sessions.COOKIE,
        sessions.issue(key, lifetime),
        max_age=int(lifetime),
        path=sessions.COOKIE_PATH,
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


@bp.post("/logout")
def logout():
    declared()
    response = redirect("/console/login", code=303)
    response.delete_cookie(sessions.COOKIE, path=sessions.COOKIE_PATH, httponly=True, samesite="Strict")
    return response


@bp.get("")
@console_page
def home():
    declared()
    return _page("home.html", page=pages.overview(services()))


@bp.get("/users")
@console_page
def user():
    q = declared()
    user_id = q["user_id"]
    if user_id is None:
        return _page("user.html", page=None, lookup="")
    n = q["n"] or 10
    return _page("user.html", page=pages.user_page(services(), user_id, n), lookup=user_id)


@bp.get("/items")
@console_page
def item():
    q = declared()
    item_id = q["item_id"]
    if item_id is None:
        return _page("item.html", page=None, lookup="")
    return _page("item.html", page=pages.item_page(services(), item_id), lookup=item_id)


@bp.get("/models")
@console_page
def models():
    declared()
    return _page("models.html", page=pages.models_page(services()))


@bp.get("/models/<version>/report")
@console_page
def model_report(version: str):
    declared()
    if not is_valid_version(version):
        raise ApiError(400, "invalid_request", "not a version name", field="version")
    path = pages.report_path(services(), version)
    if path is None:
        raise ApiError(
            404, "not_found", f"no training report for version {version} on this host", field="version"
        )
    response = send_file(path, mimetype="text/html", max_age=0)
    response.headers["Content-Security-Policy"] = REPORT_CSP
    return response


@bp.get("/experiments")
@console_page
def experiments():
    declared()
    return _page("experiments.html", experiments=pages.experiments_page(services()))


@bp.get("/experiments/<name>")
@console_page
def experiment(name: str):
    declared()
    if not is_valid_id(name) or len(name) > 32:
        raise ApiError(400, "invalid_request", "not an experiment name", field="name")
    definition = services().experiments.get(name)
    report, warnings = build_report(name)
    return _page(
        "experiment.html",
        name=name,
        definition=definition.to_dict() if definition is not None else None,
        report=report,
        view=pages.experiment_charts(report),
        warnings=warnings + list(report.warnings),
    )


@bp.errorhandler(ApiError)
def _api_error(error: ApiError):
    """Console errors as a page (the API's JSON body is for programs)."""
    return _page("error.html", error.status, code=error.status, message=error.message)


@bp.errorhandler(RateLimited)
def _throttled(error: RateLimited):
    return _page("error.html", 429, code=429, message=str(error))
