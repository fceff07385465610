"""Rec ids: the token every answer carries, which the storefront sends back on clicks and purchases.

A rec id encodes the experiment, the variant and the second it was served
(``<experiment>.<variant>.<token>``, or just ``<token>`` outside an experiment), so an events file
alone is enough to attribute a sale to the variant that showed the item.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

# rec id token: 7 base-36 digits of the serving second + 16 base-32 characters (80 random bits).
_TS_DIGITS = 7


_RANDOM_CHARS = 16


_TOKEN_LENGTH = _TS_DIGITS + _RANDOM_CHARS


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


REC_ID_PATTERN = re.compile(
    r"(?:(?P<experiment>[A-Za-z0-9_-]{1,32})\.(?P<variant>[A-Za-z0-9_-]{1,32})\.)?"
    r"(?P<ts>[0-9a-z]{7})(?P<random>[a-z2-7]{16})"
)


@dataclass(frozen=True)
class RecIdInfo:
    """What a rec id says: experiment and variant (None outside an experiment) and when it was served."""

    experiment: str | None
    variant: str | None
    served_at: int


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits))


# Every answer gets a rec id, so making one is on the hot path: the second's base-36 digits are
# reused within the second, and the random part is encoded 10 bits at a time from a table (the
# same text as lower-case base64.b32encode, at about half the cost).
_B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


_B32_PAIRS = tuple(a + b for a in _B32_ALPHABET for b in _B32_ALPHABET)


_last_second: tuple[int, str] = (-1, "")


def _b32_80(raw: bytes) -> str:
    """10 bytes (80 bits) as 16 lower-case base-32 characters: ``base64.b32encode(raw).lower()``."""
    v = int.from_bytes(raw, "big")
    t = _B32_PAIRS
    return (
        t[v >> 70] + t[(v >> 60) & 1023] + t[(v >> 50) & 1023] + t[(v >> 40) & 1023]
        + t[(v >> 30) & 1023] + t[(v >> 20) & 1023] + t[(v >> 10) & 1023] + t[v & 1023]
    )  # fmt: skip


def new_rec_id(experiment: str | None = None, variant: str | None = None, now: float | None = None) -> str:
    """A fresh rec id: ``<experiment>.<variant>.<token>`` or ``<token>``.

    The token is the serving second in 7 base-36 digits followed by 80 random bits in base 32, so
    ids are unique in practice and satisfy the id contract (at most 89 characters).
    """
    global _last_second
    seconds = int(time.time() if now is None else now)
    last = _last_second
    if last[0] != seconds:
        last = _last_second = (seconds, _base36(seconds, _TS_DIGITS))
    token = last[1] + _b32_80(os.urandom(10))
    if experiment is None:
        return token
    return f"{experiment}.{variant}.{token}"


def parse_rec_id(rec_id: str) -> RecIdInfo | None:
    """Decode a rec id made by :func:`new_rec_id`; None for anything else (e.g. a storefront's own ids)."""
    found = REC_ID_PATTERN.fullmatch(rec_id) if isinstance(rec_id, str) else None
    if found is None:
        return None
    return RecIdInfo(found.group("experiment"), found.group("variant"), int(found.group("ts"), 36))


def parse_token(rec_id: str) -> str:
    """The ``<token>`` part of a rec id (the id itself outside an experiment)."""
    return rec_id.rsplit(".", 1)[-1]
