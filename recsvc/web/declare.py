"""Request parameters, declared once: the same object validates a request and writes the spec.

Each endpoint lists its query, path and header parameters as :class:`Param` objects in
:data:`ENDPOINTS`. A parameter knows its JSON Schema (:meth:`Param.schema`) and parses a raw value
by exactly that schema (:meth:`Param.parse`): the served OpenAPI document takes every operation's
``parameters`` from here (:func:`openapi_parameters`), and the views parse with
:func:`recsvc.web.params.declared`. So the document and the code cannot disagree on a parameter:
changing a bound changes both, and ``tests/web/test_declare.py`` checks, for every declared
parameter, that values generated from its schema are accepted and values outside it refused.

Rules that apply to query strings as a whole are the same for every parameter: a name not
declared is refused (400 naming it); a scalar given twice is refused; an empty value is a value
(``n=`` is not an integer, ``exclude=`` is not an id).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recsvc.core.bundles import MAX_BUNDLE_SIZE
from recsvc.core.config import Config
from recsvc.core.contract import EPOCH_UNITS, MAX_TIMESTAMP, MIN_TIMESTAMP
from recsvc.core.ids import ID_PATTERN, MAX_ID_LENGTH, VERSION_PATTERN
from recsvc.serving.recommender import MAX_USER_BUNDLES
from recsvc.web.errors import bad_request

DEFAULT_USER_BUNDLES = 3

#: JSON number syntax: what a number in a query string may look like (no "nan", "1_0", " 5").
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
ID_REGEX = f"^{ID_PATTERN.pattern}$"
EXPERIMENT_NAME_REGEX = "^[A-Za-z0-9_-]{1,32}$"


@dataclass(frozen=True)
class Param:
    """One parameter: where it is, its schema, and the parser that applies exactly that schema."""

    name: str
    where: str  # "query" | "path" | "header"
    description: str = ""
    required: bool = False

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def parse_one(self, raw: str) -> Any:
        raise NotImplementedError

    def parse(self, values: list[str]) -> Any:
        """The parsed value from every occurrence of the parameter (None when absent)."""
        if not values:
            return None
        if len(values) > 1:
            raise bad_request(self.name, f"{self.name} is given {len(values)} times; give it once")
        return self.parse_one(values[0])

    def openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "in": self.where, "required": self.required}
        if self.description:
            out["description"] = self.description
        out["schema"] = self.schema()
        return out


@dataclass(frozen=True)
class Integer(Param):
    low: int = 0
    high: int = 0
    default: int | None = None

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.default is not None:
            s["default"] = self.default
        return s

    def parse_one(self, raw: str) -> int:
        if _INTEGER.fullmatch(raw) is None or not self.low <= int(raw) <= self.high:
            raise bad_request(self.name, f"{self.name} must be an integer in {self.low}..{self.high}")
        return int(raw)


@dataclass(frozen=True)
class Number(Param):
    low: float = 0.0
    high: float | None = None
    low_open: bool = False
    default: float | None = None

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number", "minimum": self.low}
        if self.low_open:
            s["exclusiveMinimum"] = True
        if self.high is not None:
            s["maximum"] = self.high
        if self.default is not None:
            s["default"] = self.default
        return s

    def parse_one(self, raw: str) -> float:
        value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
        ok = math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
        if not ok or (self.high is not None and value > self.high):
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
            bounds += f" and <= {self.high:g}" if self.high is not None else ""
            raise bad_request(self.name, f"{self.name} must be a number {bounds}")
        return value


@dataclass(frozen=True)
class Boolean(Param):
    default: bool | None = None

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "boolean"}
        if self.default is not None:
            s["default"] = self.default
        return s

    def parse_one(self, raw: str) -> bool:
        if raw not in ("true", "false"):
            raise bad_request(self.name, f"{self.name} must be true or false")
        return raw == "true"


@dataclass(frozen=True)
class Text(Param):
    """A string: a regular expression, or length bounds, or one of ``enum``."""

    pattern: str | None = None
    min_length: int = 1
    max_length: int | None = None
    enum: tuple[str, ...] = ()
    default: str | None = None
    what: str = ""  # how the error message names the rule

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string"}
        if self.enum:
            s["enum"] = list(self.enum)
        elif self.pattern:
            s["pattern"] = self.pattern
        else:
            s["minLength"] = self.min_length
            if self.max_length is not None:
                s["maxLength"] = self.max_length
        if self.default is not None:
            s["default"] = self.default
        return s

    def check(self, raw: str, label: str) -> str:
        if self.enum:
            ok = raw in self.enum
        elif self.pattern:
            ok = re.search(self.pattern, raw) is not None
        else:
            ok = self.min_length <= len(raw) <= (self.max_length or len(raw))
        if not ok:
            raise bad_request(label, f"{label} must be {self.what or self._rule()}")
        return raw

    def _rule(self) -> str:
        if self.enum:
            return "one of " + ", ".join(self.enum)
        if self.pattern:
            return f"a string matching {self.pattern}"
        return f"{self.min_length}-{self.max_length} characters"

    def parse_one(self, raw: str) -> str:
        return self.check(raw, self.name)


def _id_text(name: str, where: str, description: str = "", required: bool = False) -> Text:
    return Text(
        name,
        where,
        description,
        required,
        pattern=ID_REGEX,
        what=f"1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._:-]",
    )


@dataclass(frozen=True)
class TextList(Param):
    """Strings, comma-separated in one value (``explode`` false) or one per repeated parameter."""

    item: Text = field(default_factory=lambda: Text("item", "query"))
    max_items: int = 1
    explode: bool = False

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.schema(), "minItems": 1, "maxItems": self.max_items}

    def openapi(self) -> dict[str, Any]:
        return {**super().openapi(), "style": "form", "explode": self.explode}

    def parse(self, values: list[str]) -> tuple[str, ...] | None:
        if not values:
            return None
        parts = values if self.explode else [p for v in values for p in v.split(",")]
        if len(parts) > self.max_items:
            raise bad_request(self.name, f"{self.name} has more than {self.max_items} entries")
        return tuple(dict.fromkeys(self.item.check(p, self.name) for p in parts))


# ------------------------------------------------------------------------------------------------
# The declarations
# ------------------------------------------------------------------------------------------------

REQUEST_ID = _id_text("X-Request-ID", "header", "Kept and echoed back; a new one is made when absent.")
IDEMPOTENCY_KEY = _id_text(
    "Idempotency-Key",
    "header",
    "The batch's id: a retry with the same key (within `RECSVC_EVENTS_DEDUP_TTL_S`) is not stored again.",
)
USER_ID = _id_text("user_id", "path", required=True)
ITEM_ID = _id_text("item_id", "path", required=True)
EXPERIMENT = Text(
    "name", "path", required=True, pattern=EXPERIMENT_NAME_REGEX, what="1-32 characters of [A-Za-z0-9_-]"
)


EXPLAIN = Boolean(
    "explain",
    "query",
    "Say why each item is in the list (`explanation`: a reason code, its text, the history items "
    "behind it); `false` for the lean answer.",
    default=True,
)


def _filters(config: Config) -> tuple[Param, ...]:
    serving = config.serving
    return (
        Integer("n", "query", "Items wanted.", low=1, high=serving.max_n, default=serving.default_n),
        TextList(
            "category",
            "query",
            "Only these categories, comma-separated (names without commas).",
            item=Text("category", "query", pattern="^[^,]{1,128}$", what="1-128 characters, no comma"),
            max_items=serving.max_categories,
        ),
        Number("min_price", "query", "Inclusive lower price bound (items with unknown price are dropped)."),
        Number("max_price", "query", "Inclusive upper price bound (items with unknown price are dropped)."),
        TextList(
            "exclude",
            "query",
            "Item ids never to return (e.g. the cart), comma-separated.",
            item=_id_text("exclude", "query"),
            max_items=serving.max_exclude,
        ),
    )


def _as_of() -> Integer:
    return Integer(
        "as_of",
        "query",
        "The moment due dates are computed for, Unix seconds (default: now).",
        low=MIN_TIMESTAMP,
        high=MAX_TIMESTAMP - 1,
    )


def _buy_again(config: Config) -> tuple[Param, ...]:
    serving = config.serving
    return (
        Number(
            "horizon_days",
            "query",
            "Items are ranked by the probability of a purchase within this many days.",
            low=0,
            low_open=True,
            high=serving.repurchase_max_horizon_days,
            default=serving.repurchase_horizon_days,
        ),
        _as_of(),
    )


def _include_due() -> tuple[Param, ...]:
    return (
        Boolean(
            "include_due",
            "query",
            "Put items the user is due to buy again first (at most half the list; each has `due: true`).",
            default=False,
        ),
        _as_of(),
    )


def _bundle(config: Config, with_n: bool) -> tuple[Param, ...]:
    params: list[Param] = []
    if with_n:
        params.append(
            Integer(
                "n", "query", "Number of bundles.", low=1, high=MAX_USER_BUNDLES, default=DEFAULT_USER_BUNDLES
            )
        )
    params += [
        Integer(
            "size", "query", "Items per bundle, anchor included.", low=2, high=MAX_BUNDLE_SIZE,
            default=config.bundles.size,
        ),
        Number("max_price", "query", "Upper bound on the bundle price after discount."),
    ]  # fmt: skip
    return tuple(params)


def _report() -> tuple[Param, ...]:
    return (
        Number("window_days", "query", "Attribution window in days.", low=0, high=365, default=7.0),
        Number("alpha", "query", "Significance level.", low=0, high=0.5, low_open=True, default=0.05),
        Text("attribution", "query", "Model whose verdict is the winner.", enum=("last_click", "linear")),
        Text(
            "control",
            "query",
            "Control variant (default: the definition's).",
            pattern=EXPERIMENT_NAME_REGEX,
            what="a variant name (1-32 characters of [A-Za-z0-9_-])",
        ),  # fmt: skip
        Integer(
            "max_events",
            "query",
            "Newest stream / served-log entries read.",
            low=1,
            high=1_000_000,
            default=200_000,
        ),  # fmt: skip
        Boolean(
            "include_dumps", "query", "Also read the stream dumps under `<var_dir>/events/`.", default=True
        ),
    )


def endpoints(config: Config) -> dict[tuple[str, str], tuple[Param, ...]]:
    """(method, OpenAPI path) -> the operation's parameters (the request-id header included)."""
    filters, bundle = _filters(config), _bundle(config, with_n=False)
    table: dict[tuple[str, str], tuple[Param, ...]] = {
        ("get", "/v1/users/{user_id}/recommendations"): (USER_ID, *filters, *_include_due(), EXPLAIN),
        ("get", "/v1/users/{user_id}/buy-again"): (USER_ID, *filters, *_buy_again(config)),
        ("get", "/v1/items/{item_id}/similar"): (ITEM_ID, *filters),
        ("get", "/v1/popular"): filters,
        ("get", "/v1/model"): (),
        ("get", "/health/live"): (),
        ("get", "/health/ready"): (),
        ("get", "/openapi.json"): (),
        ("get", "/metrics"): (),
        ("post", "/v1/admin/publish"): (),
        ("post", "/v1/admin/rollback"): (),
        ("post", "/v1/events"): (IDEMPOTENCY_KEY,),
        ("get", "/v1/admin/experiments"): (),
        ("get", "/v1/admin/experiments/{name}"): (EXPERIMENT,),
        ("put", "/v1/admin/experiments/{name}"): (EXPERIMENT,),
        ("delete", "/v1/admin/experiments/{name}"): (EXPERIMENT,),
        ("get", "/v1/admin/experiments/{name}/assignment"): (
            EXPERIMENT,
            _id_text("user_id", "query", "The user whose variant is asked.", required=True),
        ),
        ("get", "/v1/admin/experiments/{name}/report"): (EXPERIMENT, *_report()),
        ("get", "/v1/items/{item_id}/bundle"): (ITEM_ID, *bundle),
        ("post", "/v1/bundles"): (),
        ("get", "/v1/users/{user_id}/bundles"): (USER_ID, *_bundle(config, with_n=True)),
    }
    return {key: (*params, REQUEST_ID) for key, params in table.items()}


def console_endpoints(config: Config) -> dict[tuple[str, str], tuple[Param, ...]]:
    """The console's pages (HTML, not in the OpenAPI document): their parameters, checked alike."""
    version = Text(
        "version", "path", required=True, pattern=f"^{VERSION_PATTERN.pattern}$", what="a version name"
    )
    table: dict[tuple[str, str], tuple[Param, ...]] = {
        ("get", "/console"): (),
        ("get", "/console/login"): (),
        ("post", "/console/login"): (),
        ("post", "/console/logout"): (),
        ("get", "/console/users"): (
            _id_text("user_id", "query", "The user to look up."),
            Integer(
                "n", "query", "Recommendations shown.", low=1, high=min(50, config.serving.max_n), default=10
            ),
        ),
        ("get", "/console/items"): (_id_text("item_id", "query", "The item to look up."),),
        ("get", "/console/models"): (),
        ("get", "/console/models/{version}/report"): (version,),
        ("get", "/console/experiments"): (),
        ("get", "/console/experiments/{name}"): (EXPERIMENT,),
    }
    return {key: (*params, REQUEST_ID) for key, params in table.items()}


def openapi_parameters(config: Config) -> Callable[[str, str], list[dict[str, Any]]]:
    """A function (method, path) -> the operation's ``parameters`` list for the OpenAPI document."""
    table = endpoints(config)

    def parameters(method: str, path: str) -> list[dict[str, Any]]:
        return [p.openapi() for p in table[(method, path)]]

    return parameters


def flask_rule(path: str) -> str:
    """``/v1/users/{user_id}/x`` -> ``/v1/users/<user_id>/x``."""
    return re.sub(r"{([^}]+)}", r"<\1>", path)


def by_rule(config: Config) -> dict[tuple[str, str], tuple[Param, ...]]:
    """The declarations keyed by (HTTP method, Flask rule), for the request path."""
    table = {**endpoints(config), **console_endpoints(config)}
    return {(method.upper(), flask_rule(path)): params for (method, path), params in table.items()}


#: ISO-8601 timestamps the document promises to take: 2001-2099, days 1-28 of a month (every one
#: exists), optional milliseconds or microseconds, an optional offset of at most 13 h -- always
#: inside the contract's range whatever the offset. The code takes more (any valid ISO date in
#: range, Unix times as strings); the document states the part a client can rely on.
ISO_TIMESTAMP = (
    r"^20(0[1-9]|[1-9][0-9])-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{3}|\.[0-9]{6})?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])?$"
)


def event_timestamp_schema() -> dict[str, Any]:
    """``Event.timestamp``, from the events contract's ranges (:mod:`recsvc.core.contract`): Unix
    seconds, or milliseconds / microseconds in their own ranges, or an ISO-8601 string."""
    ranges = [(float(MIN_TIMESTAMP), float(MAX_TIMESTAMP))] + [(low, high) for low, high, _ in EPOCH_UNITS]
    numbers = [{"minimum": int(low), "maximum": int(high)} for low, high in ranges]
    return {
        "description": "Unix time in seconds, milliseconds or microseconds (after 1970, before 2100), "
        "or ISO-8601 (naive = UTC).",
        "anyOf": [
            *({"type": "number", **bounds, "exclusiveMaximum": True} for bounds in numbers),
            {"type": "string", "pattern": ISO_TIMESTAMP},
        ],
    }
