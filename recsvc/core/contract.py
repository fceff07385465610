"""The events and catalog input contract, shared by the file loader and ``POST /v1/events``.

events: ``user_id, item_id, event, timestamp`` required; optional ``order_id, quantity, price, rec_id``.
``event`` is one of :data:`EVENT_TYPES`; ``timestamp`` is ISO-8601 (naive = UTC) or Unix seconds.
catalog: ``item_id`` required; optional ``title, category, price, available`` (default true).

The file loader (``training.events``) applies these rules vectorised; :func:`validate_event` applies
them to one JSON event. Both report the same reason codes (:data:`REASONS`).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np

from recsvc.core.errors import BadInput
from recsvc.core.ids import MAX_ID_LENGTH, is_valid_id

# Order matters: codes are stored as int8 in event tables. impression/click come from the
# storefront's A/B attribution; they carry little preference signal and are weighted accordingly.
EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "impression", "click")
EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}
VIEW, CART, PURCHASE, IMPRESSION, CLICK = range(len(EVENT_TYPES))

EVENT_REQUIRED = ("user_id", "item_id", "event", "timestamp")
EVENT_OPTIONAL = ("order_id", "quantity", "price", "rec_id")
CATALOG_REQUIRED = ("item_id",)
CATALOG_OPTIONAL = ("title", "category", "price", "available")

MAX_TITLE_LENGTH = 512
MAX_CATEGORY_LENGTH = 128
MAX_QUANTITY = 10_000
# Unix seconds after the epoch and before 2100-01-01 are events (public data sets and old catalogues
# go back to the 1990s); 0 and negative values are missing values, not events.
MIN_TIMESTAMP = 1
MAX_TIMESTAMP = 4_102_444_800
# Numbers too large to be seconds are read as milliseconds or microseconds when the result is an
# instant from 1973 to 2100: a clickstream export in ms is common, and never a typo for seconds.
EPOCH_UNITS: tuple[tuple[float, float, float], ...] = (
    (1e11, MAX_TIMESTAMP * 1e3, 1e3),  # milliseconds
    (1e14, MAX_TIMESTAMP * 1e6, 1e6),  # microseconds
)

REASONS: dict[str, str] = {
    "missing_field": "a required field is empty or missing",
    "invalid_user_id": "user_id is not 1-128 characters of [A-Za-z0-9._:-]",
    "invalid_item_id": "item_id is not 1-128 characters of [A-Za-z0-9._:-]",
    "invalid_order_id": "order_id is not 1-128 characters of [A-Za-z0-9._:-]",
    "invalid_rec_id": "rec_id is not 1-128 characters of [A-Za-z0-9._:-]",
    "unknown_event": f"event is not one of {', '.join(EVENT_TYPES)}",
    "invalid_timestamp": "timestamp is not ISO-8601 or a Unix time (s, ms or µs) after 1970 and before 2100",
    "invalid_quantity": f"quantity is not a number in 0..{MAX_QUANTITY} (negative quantities are rejected)",
    "invalid_price": "price is not a finite number >= 0",
}


class ContractError(BadInput):
    """One field of one record breaks the contract."""

    field: str  # always set (RecsvcError allows None)

    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


def parse_timestamp(value: Any) -> int:
    """Unix seconds from an int/float, a numeric string, or an ISO-8601 string (naive = UTC)."""
    if isinstance(value, bool):
        raise ValueError("boolean timestamp")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=_dt.UTC)
            seconds = parsed.timestamp()
    else:
        raise ValueError("empty timestamp")
    converted, ok = epoch_seconds(np.array([seconds], dtype=np.float64))
    if not ok[0]:
        raise ValueError("timestamp out of range")
    return int(converted[0])


def epoch_seconds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds (int64) from Unix times in seconds, milliseconds or microseconds, and which are valid.

    Seconds must lie in ``[MIN_TIMESTAMP, MAX_TIMESTAMP)``; larger numbers are divided per
    :data:`EPOCH_UNITS` when they fall in a unit's range; anything else (0, negative, non-finite,
    between the ranges) is invalid. Fractions of a second are truncated.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    safe = np.where(finite, values, 0.0)
    seconds = safe.copy()
    ok = finite & (safe >= MIN_TIMESTAMP) & (safe < MAX_TIMESTAMP)
    for low, high, divisor in EPOCH_UNITS:
        in_unit = finite & (safe >= low) & (safe < high)
        seconds = np.where(in_unit, safe / divisor, seconds)
        ok |= in_unit
    return np.where(ok, np.trunc(seconds), 0).astype(np.int64), ok


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("boolean")
    return float(value)


def validate_event(raw: Any) -> dict[str, Any]:
    """Check one event (a JSON object) and return it normalised, or raise :class:`ContractError`.

    The result has ``user_id, item_id, event, timestamp`` (int seconds) and whichever of
    ``order_id, quantity, price, rec_id`` were given. Unknown fields are rejected so typos such as
    ``"item"`` for ``"item_id"`` are noticed rather than silently dropped.
    """
    if not isinstance(raw, dict):
        raise ContractError("event", "missing_field", "each event must be a JSON object")
    unknown = sorted(set(raw) - set(EVENT_REQUIRED) - set(EVENT_OPTIONAL))
    if unknown:
        raise ContractError(unknown[0], "unknown_field", f"unknown field {unknown[0]!r}")
    for name in EVENT_REQUIRED:
        if raw.get(name) in (None, ""):
            raise ContractError(name, "missing_field", f"{name} is required")
    out: dict[str, Any] = {}
    for name in ("user_id", "item_id"):
        if not is_valid_id(raw[name]):
            raise ContractError(
                name, f"invalid_{name}", f"{name} must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._:-]"
            )
        out[name] = raw[name]
    if raw["event"] not in EVENT_CODE:
        raise ContractError("event", "unknown_event", REASONS["unknown_event"])
    out["event"] = raw["event"]
    try:
        out["timestamp"] = parse_timestamp(raw["timestamp"])
    except (ValueError, TypeError, OverflowError):
        raise ContractError("timestamp", "invalid_timestamp", REASONS["invalid_timestamp"]) from None
    for name in ("order_id", "rec_id"):
        if raw.get(name) not in (None, ""):
            if not is_valid_id(raw[name]):
                raise ContractError(name, f"invalid_{name}", REASONS[f"invalid_{name}"])
            out[name] = raw[name]
    if raw.get("quantity") is not None:
        try:
            quantity = _number(raw["quantity"])
        except (TypeError, ValueError):
            quantity = -1.0
        if not (math.isfinite(quantity) and 0 <= quantity <= MAX_QUANTITY):
            raise ContractError("quantity", "invalid_quantity", REASONS["invalid_quantity"])
        out["quantity"] = quantity
    if raw.get("price") is not None:
        try:
            price = _number(raw["price"])
        except (TypeError, ValueError):
            price = -1.0
        if not (math.isfinite(price) and price >= 0):
            raise ContractError("price", "invalid_price", REASONS["invalid_price"])
        out["price"] = price
    return out


class BatchError(BadInput):
    """One event of a batch breaks the contract; nothing of the batch may be stored.

    Attributes
    ----------
    index : int or None
        Position of the first bad event in the batch (None when the body was a single event).
    field : str
        ``events[<index>].<field>`` (or just ``<field>`` for a single event / the body itself).
    reason : str
        A reason code of :data:`recsvc.core.contract.REASONS` (or ``too_many_events`` / ``no_events``).
    """

    field: str  # always set (RecsvcError allows None)

    def __init__(self, index: int | None, field: str, reason: str, message: str):
        super().__init__(message)
        self.index, self.field, self.reason, self.message = index, field, reason, message


def validate_batch(payload: Any, max_events: int) -> list[dict[str, Any]]:
    """Validate the body of ``POST /v1/events``: one event, a list, or ``{"events": [...]}``.

    Parameters
    ----------
    payload : Any
        The decoded JSON body.
    max_events : int
        Largest batch accepted.

    Returns
    -------
    list of dict
        The events normalised by :func:`recsvc.core.contract.validate_event`, in order.

    Raises
    ------
    BatchError
        For the first bad event (its index and field are named), an empty batch, or one over
        ``max_events``.
    """
    single = isinstance(payload, dict) and "events" not in payload
    if single:
        items: Any = [payload]
    elif isinstance(payload, dict):
        extra = sorted(set(payload) - {"events"})
        if extra:
            raise BatchError(None, extra[0], "unknown_field", f"unknown field {extra[0]!r} next to 'events'")
        items = payload["events"]
    else:
        items = payload
    if not isinstance(items, list):
        raise BatchError(
            None, "events", "missing_field", "body must be an event object, a list, or {'events': [...]}"
        )
    if not items:
        raise BatchError(None, "events", "no_events", "the batch has no events")
    if len(items) > max_events:
        raise BatchError(
            None, "events", "too_many_events", f"a batch holds at most {max_events} events, got {len(items)}"
        )
    out = []
    for index, raw in enumerate(items):
        try:
            out.append(validate_event(raw))
        except ContractError as e:
            if single:
                raise BatchError(None, e.field, e.reason, e.message) from None
            raise BatchError(
                index, f"events[{index}].{e.field}", e.reason, f"events[{index}]: {e.message}"
            ) from None
    return out
