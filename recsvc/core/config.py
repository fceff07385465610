"""One configuration object in typed sections, read from the environment in one place.

Every setting has a default that works on a laptop; production overrides come from ``RECSVC_*``
variables (and ``REDIS_URL``). Each field names its variable, so the table below is the whole
contract; :meth:`Config.from_env` is the only reader of ``os.environ`` for settings, and
:func:`unknown_variables` finds ``RECSVC_*`` names that configure nothing (a typo such as
``RECSVC_API_KEY`` must not pass silently).

Code and tests override settings by their flat name -- the variable without ``RECSVC_``, lower
case (``max_n``, ``redis_url``) -- with :meth:`Config.create`, :meth:`Config.from_env` or
:meth:`Config.with_overrides`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints


def _env(name: str, default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose value can come from environment variable ``name``."""
    if default is MISSING:
        return field(metadata={"env": name}, **kwargs)
    return field(default=default, metadata={"env": name}, **kwargs)


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is and how long a request waits for it (storefront latency beats one answer)."""

    url: str | None = _env("REDIS_URL", None)  # None: start/reuse the embedded Redis under var_dir
    socket_timeout_s: float = _env("RECSVC_REDIS_SOCKET_TIMEOUT_S", 0.1)
    connect_timeout_s: float = _env("RECSVC_REDIS_CONNECT_TIMEOUT_S", 0.1)
    retries: int = _env("RECSVC_REDIS_RETRIES", 1)
    down_recheck_s: float = _env("RECSVC_REDIS_DOWN_RECHECK_S", 1.0)  # after a failure: fallback only


@dataclass(frozen=True)
class ServingSettings:
    """Limits of the read endpoints and of what a published version holds."""

    default_n: int = _env("RECSVC_DEFAULT_N", 10)
    max_n: int = _env("RECSVC_MAX_N", 100)
    # Items cached per user at publish; K >= 100 so filters leave enough.
    topk_cached: int = _env("RECSVC_TOPK_CACHED", 200)
    keep_versions: int = _env("RECSVC_KEEP_VERSIONS", 3)  # published versions kept for rollback
    max_body_bytes: int = _env("RECSVC_MAX_BODY_BYTES", 1 << 20)
    max_exclude: int = _env("RECSVC_MAX_EXCLUDE", 200)  # ids in ?exclude= / cart bodies
    max_categories: int = _env("RECSVC_MAX_CATEGORIES", 20)
    # Categories always exempt from "already bought" (an override: the learned repurchase rate
    # already exempts items bought again often enough, see repurchase_min_rate).
    repurchase_categories: tuple[str, ...] = _env("RECSVC_REPURCHASE_CATEGORIES", ())
    # Learned share of purchases followed by another at which an item counts as bought again:
    # it stays recommendable after a purchase and may appear in "buy again" (above 1: none does).
    repurchase_min_rate: float = _env("RECSVC_REPURCHASE_MIN_RATE", 0.4)
    # Default horizon of "buy again" and of the due_for_reorder export, and its upper bound.
    repurchase_horizon_days: float = _env("RECSVC_REPURCHASE_HORIZON_DAYS", 7.0)
    repurchase_max_horizon_days: float = _env("RECSVC_REPURCHASE_MAX_HORIZON_DAYS", 365.0)
    # Probability of a purchase within the horizon from which an item is "due" (mixed into
    # recommendations with include_due, sent by the due_for_reorder export).
    repurchase_due_probability: float = _env("RECSVC_REPURCHASE_DUE_PROBABILITY", 0.3)
    # How long item answers trust the model in memory before reading the live pointer again.
    model_check_interval_s: float = _env("RECSVC_MODEL_CHECK_INTERVAL_S", 1.0)
    # A request body must arrive whole within this time (408 beyond): slow senders are bounded.
    body_timeout_s: float = _env("RECSVC_BODY_TIMEOUT_S", 10.0)
    # Wrong API keys from one client address per minute; beyond, every keyed request from that
    # address answers 429 until the minute ends (online key guessing is throttled).
    auth_failures_per_min: int = _env("RECSVC_AUTH_FAILURES_PER_MIN", 20)
    # Proxies in front that append to X-Forwarded-For (nginx: 1); 0 trusts no such header. The
    # client address (for the wrong-key throttle) is taken that many hops back.
    proxy_hops: int = _env("RECSVC_PROXY_HOPS", 0)
    # How long a console login lasts (the signed session cookie's lifetime).
    console_session_s: float = _env("RECSVC_CONSOLE_SESSION_S", 8 * 3600.0)


@dataclass(frozen=True)
class EventSettings:
    """Real-time events: the durable stream, per-user history, batch and rate limits."""

    stream: str = _env("RECSVC_EVENTS_STREAM", "recsvc:events")
    stream_maxlen: int = _env("RECSVC_EVENTS_STREAM_MAXLEN", 10_000_000)  # `recsvc events dump` drains it
    max_batch: int = _env("RECSVC_MAX_EVENTS_BATCH", 1000)
    history_length: int = _env("RECSVC_HISTORY_LENGTH", 200)  # recent events kept per user for fold-in
    # Requests per minute per API key; 429 beyond. A storefront posts with one key for all its
    # visitors: size it as peak page views/s x event requests per view x 60 x 2 (docs/realtime.md).
    rate_limit_per_min: int = _env("RECSVC_EVENTS_RATE_LIMIT_PER_MIN", 60_000)
    # A visitor's recent list expires this long after their newest event.
    history_ttl_s: int = _env("RECSVC_HISTORY_TTL_S", 30 * 86_400)
    # How long a stored batch's id is remembered: a retry of the same batch (the client's
    # Idempotency-Key, or the service's own retry after a Redis timeout) within it is not stored again.
    dedup_ttl_s: int = _env("RECSVC_EVENTS_DEDUP_TTL_S", 86_400)


@dataclass(frozen=True)
class BundleSettings:
    """How bundles are sized and priced."""

    size: int = _env("RECSVC_BUNDLE_SIZE", 3)
    discount_rule: str = _env("RECSVC_BUNDLE_DISCOUNT_RULE", "percent")  # "percent" | "cheapest"
    discount_pct: float = _env("RECSVC_BUNDLE_DISCOUNT_PCT", 10.0)
    # A set of one category is rarely what merchandisers want.
    same_category: bool = _env("RECSVC_BUNDLE_SAME_CATEGORY", False)


@dataclass(frozen=True)
class ExperimentSettings:
    """A/B experiments: the definitions file and the served log."""

    file: Path | None = _env("RECSVC_EXPERIMENTS_FILE", None)
    refresh_s: float = _env("RECSVC_EXPERIMENTS_REFRESH_S", 1.0)
    served_maxlen: int = _env("RECSVC_EXPERIMENTS_SERVED_MAXLEN", 1_000_000)
    # Stream dumps the report endpoint reads at most; beyond, use `recsvc report`.
    report_max_bytes: int = _env("RECSVC_EXPERIMENTS_REPORT_MAX_BYTES", 256 * 1024 * 1024)


@dataclass(frozen=True)
class TrainingSettings:
    """The offline jobs."""

    # Fault injection for the crash tests of `recsvc retrain`: exit right after this step.
    retrain_crash_after: str | None = _env("RECSVC_RETRAIN_CRASH_AFTER", None)
    # Python the Spark engine's executors run (handed to pyspark as PYSPARK_PYTHON); unset: this
    # interpreter for a local master, Spark's own setting otherwise.
    spark_python: str | None = _env("RECSVC_SPARK_PYTHON", None)
    # `recsvc retrain` re-runs model selection when the saved choice (tuning.json) is older than
    # this many days, or missing; 0 never tunes there (the choice of `recsvc tune`, or the defaults).
    retune_days: float = _env("RECSVC_RETUNE_DAYS", 30.0)
    # Wall-clock bound of one model selection (`recsvc tune`, `train --tune`, a re-tune in retrain).
    tune_budget_s: float = _env("RECSVC_TUNE_BUDGET_S", 900.0)


@dataclass(frozen=True)
class OpsSettings:
    """Running it: logs, metrics, progress lines of long jobs, server processes."""

    log_level: str = _env("RECSVC_LOG_LEVEL", "INFO")
    # "json": one JSON object per line; "text": for people; "auto": text on a terminal, else json.
    log_format: str = _env("RECSVC_LOG_FORMAT", "auto")
    # Server processes write log lines in batches at most this often (0: each line at once);
    # commands always write each line at once.
    log_flush_s: float = _env("RECSVC_LOG_FLUSH_S", 0.5)
    request_log: bool = _env("RECSVC_REQUEST_LOG", True)  # one log line per HTTP request
    metrics_enabled: bool = _env("RECSVC_METRICS_ENABLED", True)
    # Read-only keys that may scrape GET /metrics (besides RECSVC_API_KEYS); none: only those.
    metrics_keys: tuple[str, ...] = _env("RECSVC_METRICS_KEYS", ())
    # Workers write their counts to the shared metric files this often (a scrape sees the other
    # workers' counts at most this old).
    metrics_flush_s: float = _env("RECSVC_METRICS_FLUSH_S", 1.0)
    # prometheus-client's own variable: where the worker processes of one server keep their
    # metric files (`recsvc serve` sets it per instance; unset: metrics of this process only).
    metrics_dir: Path | None = _env("PROMETHEUS_MULTIPROC_DIR", None)
    progress_interval_s: float = _env("RECSVC_PROGRESS_INTERVAL_S", 5.0)  # a progress line this often
    workers: int = _env("RECSVC_WORKERS", 0)  # gunicorn workers; 0: 2 per CPU of the quota, capped
    max_workers: int = _env("RECSVC_MAX_WORKERS", 16)  # the cap of the automatic worker count


SECTIONS: dict[str, type] = {
    "redis": RedisSettings,
    "serving": ServingSettings,
    "events": EventSettings,
    "bundles": BundleSettings,
    "experiments": ExperimentSettings,
    "training": TrainingSettings,
    "ops": OpsSettings,
}


@dataclass(frozen=True)
class Config:
    """Every setting of recsvc (see the module docstring)."""

    models_dir: Path = _env("RECSVC_MODELS_DIR", Path("models"))
    var_dir: Path = _env("RECSVC_VAR_DIR", Path("var"))
    # Empty: admin and write endpoints are disabled, not open.
    api_keys: tuple[str, ...] = _env("RECSVC_API_KEYS", ())
    redis: RedisSettings = field(default_factory=RedisSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    events: EventSettings = field(default_factory=EventSettings)
    bundles: BundleSettings = field(default_factory=BundleSettings)
    experiments: ExperimentSettings = field(default_factory=ExperimentSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)

    @classmethod
    def create(cls, **overrides: Any) -> Config:
        """The defaults with ``overrides`` by flat setting name (``max_n=5``); ignores the environment."""
        return cls().with_overrides(**overrides)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Settings from ``environ`` (default ``os.environ``), then ``overrides`` by flat name.

        Raises
        ------
        ValueError
            A variable's value does not parse; the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS.values():
            raw = env.get(setting.env)
            if raw is not None and raw != "":
                values[setting.name] = setting.parse(raw)
        values.update(overrides)
        return cls().with_overrides(**values)

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with settings changed by flat name (``max_n=5``, ``redis_url="redis://..."``).

        Whole sections can be replaced too (``serving=ServingSettings(...)``).
        """
        top: dict[str, Any] = {}
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in overrides.items():
            if name in SECTIONS or name in _TOP_LEVEL:
                top[name] = _coerce(name, value) if name in _TOP_LEVEL else value
                continue
            setting = SETTINGS.get(name)
            if setting is None:
                raise TypeError(f"unknown setting {name!r}{_suggest(name, SETTINGS)}")
            assert setting.section is not None  # top-level settings (section None) were handled above
            by_section.setdefault(setting.section, {})[setting.field] = _coerce(name, value)
        config = replace(self, **top) if top else self
        for section, changes in by_section.items():
            config = replace(config, **{section: replace(getattr(config, section), **changes)})
        return config


@dataclass(frozen=True)
class Setting:
    """One configurable value: its flat name, environment variable, section and field."""

    name: str
    env: str
    section: str | None  # None: a top-level field of Config
    field: str
    type: Any
    default: Any

    def parse(self, raw: str) -> Any:
        try:
            return _parse_value(raw, self.type, self.default)
        except ValueError:
            kind = getattr(self.type, "__name__", str(self.type))
            raise ValueError(f"environment variable {self.env}={raw!r} is not a valid {kind}") from None


def _settings() -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    owners: list[tuple[str | None, type]] = [(None, Config), *SECTIONS.items()]
    for section, cls in owners:
        hints = get_type_hints(cls)
        for f in fields(cls):
            env = f.metadata.get("env")
            if env is None:
                continue
            name = env.removeprefix("RECSVC_").lower()
            default = f.default if f.default is not MISSING else None
            out[name] = Setting(name, env, section, f.name, hints[f.name], default)
    return out


SETTINGS: dict[str, Setting] = _settings()
_TOP_LEVEL = {s.name for s in SETTINGS.values() if s.section is None}
_KNOWN_ENV = {s.env for s in SETTINGS.values()}


def _parse_value(raw: str, kind: Any, default: Any) -> Any:
    text = str(kind)
    if kind is bool or isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if "tuple" in text:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if "Path" in text:
        return Path(raw)
    return raw


def _coerce(name: str, value: Any) -> Any:
    """Overrides in code may pass a str for a Path or a list for a tuple; normalise them."""
    setting = SETTINGS[name]
    text = str(setting.type)
    if value is None:
        return None
    if "Path" in text and isinstance(value, str | os.PathLike):
        return Path(value)
    if "tuple" in text and isinstance(value, list | tuple):
        return tuple(value)
    return value


def _suggest(name: str, known: Mapping[str, Any] | set[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``RECSVC_*`` variables that configure nothing, each with a suggestion when one is close.

    Returns
    -------
    list of str
        One warning line per unknown variable, e.g. ``RECSVC_API_KEY is not a recsvc setting
        (did you mean RECSVC_API_KEYS?)``.
    """
    env = os.environ if environ is None else environ
    out = []
    for name in sorted(env):
        if name.startswith("RECSVC_") and name not in _KNOWN_ENV and name not in IGNORED_VARIABLES:
            out.append(f"{name} is not a recsvc setting{_suggest(name, _KNOWN_ENV)}")
    return out


#: ``RECSVC_*`` variables that are read elsewhere on purpose: defaults of command-line options.
IGNORED_VARIABLES: frozenset[str] = frozenset(
    {"RECSVC_SEGMENT_NEW_DAYS", "RECSVC_SEGMENT_DORMANT_DAYS", "RECSVC_SEGMENT_HIGH_VALUE_QUANTILE"}
)
