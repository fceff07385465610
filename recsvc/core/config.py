"""One configuration object, read from the environment in one place.

Every setting has a default that works on a laptop; production overrides come from ``RECSVC_*``
variables (and ``REDIS_URL``). ``Config.from_env()`` is the only reader of ``os.environ`` for
settings; tests build a ``Config`` directly or pass overrides to ``create_app``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Config:
    # --- where things live -------------------------------------------------------------------
    redis_url: str | None = None  # None: start/reuse the embedded Redis under var_dir
    var_dir: Path = Path("var")
    models_dir: Path = Path("models")

    # --- security ------------------------------------------------------------------------------
    api_keys: tuple[str, ...] = ()  # empty: admin and write endpoints are disabled, not open

    # --- Redis client behaviour (storefront latency matters more than one answer) ---------------
    redis_socket_timeout_s: float = 0.1
    redis_connect_timeout_s: float = 0.1
    redis_retries: int = 1
    redis_down_recheck_s: float = 1.0  # after a failure, how long to go straight to fallback

    # --- serving limits --------------------------------------------------------------------------
    default_n: int = 10
    max_n: int = 100
    topk_cached: int = 200  # precomputed per user at publish; K >= 100 so filters leave enough
    keep_versions: int = 3  # published versions kept in Redis for rollback
    max_body_bytes: int = 1 << 20
    max_exclude: int = 200  # ids in ?exclude= / cart bodies
    max_categories: int = 20
    repurchase_categories: tuple[str, ...] = ()  # categories exempt from "already bought"

    # --- real-time events -------------------------------------------------------------------------
    events_stream: str = "recsvc:events"
    events_stream_maxlen: int = 10_000_000  # approximate cap; `recsvc events dump` drains it
    max_events_batch: int = 1000
    history_length: int = 200  # recent events kept per user for fold-in
    events_rate_limit_per_min: int = 600  # per API key; 429 beyond
    # (added by real-time) a visitor's recent list expires this long after their newest event
    history_ttl_s: int = 30 * 86_400

    # --- bundles ---------------------------------------------------------------------------------
    bundle_size: int = 3
    bundle_discount_rule: str = "percent"  # "percent" | "cheapest"
    bundle_discount_pct: float = 10.0
    bundle_same_category: bool = False  # a set of one category is rarely what merchandisers want

    # --- experiments -----------------------------------------------------------------------------
    experiments_file: Path | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            name = "REDIS_URL" if f.name == "redis_url" else f"RECSVC_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].default)
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Config:
        return replace(self, **overrides)


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return _split(raw)
        if isinstance(default, Path) or name.endswith(("_dir", "_file")):
            return Path(raw)
        return raw
    except ValueError:
        env_name = "REDIS_URL" if name == "redis_url" else f"RECSVC_{name.upper()}"
        raise ValueError(
            f"environment variable {env_name}={raw!r} is not a valid {type(default).__name__}"
        ) from None
