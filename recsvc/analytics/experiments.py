"""A/B experiments: definitions, validation, deterministic assignment, rec ids and storage.

An experiment splits users between *variants*. Each variant names what it serves: a ``strategy``
(``personalized``, ``popular`` or ``realtime``) and optionally a published ``model_version``.

Assignment
    ``bucket = blake2b(salt + "\\x1f" + user_id) mod 10000``. The salt defaults to the experiment
    name, so the same user lands in independent buckets in different experiments, and in the same
    bucket in every worker, process and restart (never Python's ``hash()``, which is salted per
    process). Each variant *owns* a set of bucket ranges; a share of 12.34 % is 1234 buckets.
Stickiness
    When shares change, :func:`rebalance` moves the fewest buckets possible: a variant that shrinks
    gives up buckets at one end of its range, a variant that grows takes the free buckets nearest to
    its own, and every other bucket keeps its owner. So only the users whose bucket changed owner
    change variant (50/50 -> 70/30 moves exactly the 20 % between the old and the new boundary).
Rec ids
    Every recommendation answer carries a ``rec_id`` the storefront sends back on ``click``,
    ``cart`` and ``purchase`` events. It encodes the experiment, the variant and the second it was
    served (``<experiment>.<variant>.<token>``, or just ``<token>`` outside an experiment), so an
    events file alone is enough to attribute; see :func:`new_rec_id` and :func:`parse_rec_id`.
Storage
    Definitions come from ``Config.experiments_file`` (JSON or TOML, read-only at runtime) and from
    Redis (hash :data:`EXPERIMENTS_KEY`, written by the admin endpoint). :class:`ExperimentRegistry`
    merges both, caches them in process and re-reads at most once per ``refresh_s``.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.core.contract import parse_timestamp
from recsvc.core.ids import is_valid_version

log = logging.getLogger(__name__)

#: Users are hashed into this many buckets; a share of 0.01 % is one bucket.
BUCKETS = 10_000
#: What a variant can serve.
STRATEGIES: tuple[str, ...] = ("personalized", "popular", "realtime")
#: Experiment and variant names. No "." or ":" so they can be packed into a rec id unambiguously.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_EXPERIMENTS = 50
MAX_VARIANTS = 10
MAX_DESCRIPTION = 500
MAX_SALT = 64
MAX_DEFINITION_BYTES = 64 * 1024
MAX_FILE_BYTES = 1 << 20

#: Redis hash: experiment name -> JSON definition (with its bucket layout).
EXPERIMENTS_KEY = "recsvc:experiments"
#: Incremented on every change so other processes notice without re-reading every definition.
EXPERIMENTS_REV_KEY = "recsvc:experiments:rev"
#: Capped Redis list of served experiment answers (time, rec id, user, surface, items).
SERVED_KEY = "recsvc:experiments:served"
#: Records kept (the newest); about 100-200 bytes each in Redis.
SERVED_MAXLEN = 1_000_000

#: Fields a definition and a variant may have (anything else is rejected, naming the field).
DEFINITION_FIELDS = ("name", "description", "salt", "start", "end", "control", "variants")
VARIANT_FIELDS = ("name", "share", "strategy", "model_version", "buckets")

# rec id token: 7 base-36 digits of the serving second + 16 base-32 characters (80 random bits).
_TS_DIGITS = 7
_RANDOM_CHARS = 16
_TOKEN_LENGTH = _TS_DIGITS + _RANDOM_CHARS
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
REC_ID_PATTERN = re.compile(
    r"(?:(?P<experiment>[A-Za-z0-9_-]{1,32})\.(?P<variant>[A-Za-z0-9_-]{1,32})\.)?"
    r"(?P<ts>[0-9a-z]{7})(?P<random>[a-z2-7]{16})"
)


class ExperimentError(ValueError):
    """A definition breaks a rule. ``field`` is a path such as ``variants[1].share``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


class ExperimentFileError(ValueError):
    """The experiments file cannot be used; the message names the file (and line and column when known)."""

    def __init__(self, message: str, *, file: str, line: int | None = None, column: int | None = None):
        where = file if line is None else f"{file}:{line}" + ("" if column is None else f":{column}")
        super().__init__(f"{where}: {message}")
        self.file, self.line, self.column = file, line, column


# --------------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment.

    Attributes
    ----------
    name : str
        ``[A-Za-z0-9_-]{1,32}``, unique within the experiment.
    share : float
        Percentage of all users (0..100, a multiple of 0.01).
    strategy : str
        ``personalized`` (the model's precomputed list, no real-time fold-in), ``popular``
        (popularity list) or ``realtime`` (fold in recent events when there are any).
    model_version : str or None
        A published model version to serve from; None means the live version.
    buckets : tuple of (start, end)
        Half-open bucket ranges this variant owns; their total size is ``share * 100``.
    """

    name: str
    share: float
    strategy: str = "personalized"
    model_version: str | None = None
    buckets: tuple[tuple[int, int], ...] = ()

    @property
    def bucket_count(self) -> int:
        return sum(end - start for start, end in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "share": self.share,
            "strategy": self.strategy,
            "model_version": self.model_version,
            "buckets": [list(r) for r in self.buckets],
        }


@dataclass(frozen=True)
class Experiment:
    """A validated experiment; build it with :func:`parse_experiment`.

    ``start``/``end`` are Unix seconds (None: open); the experiment is active for
    ``start <= now < end``. ``control`` names the variant the others are compared against.
    """

    name: str
    variants: tuple[Variant, ...]
    start: int | None = None
    end: int | None = None
    salt: str = ""
    control: str = ""
    description: str = ""
    # bucket -> variant index (-1: the bucket is in no variant); derived, for O(1) assignment.
    owner: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = np.full(BUCKETS, -1, dtype=np.int8)
        for index, variant in enumerate(self.variants):
            for start, end in variant.buckets:
                owner[start:end] = index
        owner.flags.writeable = False
        object.__setattr__(self, "owner", owner)
        if not self.salt:
            object.__setattr__(self, "salt", self.name)
        if not self.control and self.variants:
            object.__setattr__(self, "control", self.variants[0].name)

    def status(self, now: float) -> str:
        """``scheduled``, ``active`` or ``ended`` at time ``now`` (Unix seconds)."""
        if self.start is not None and now < self.start:
            return "scheduled"
        if self.end is not None and now >= self.end:
            return "ended"
        return "active"

    def is_active(self, now: float) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)

    def bucket(self, user_id: str) -> int:
        """The user's bucket in ``[0, BUCKETS)`` for this experiment (stable everywhere)."""
        return bucket_of(self.salt, user_id)

    def variant_for(self, user_id: str) -> Variant | None:
        """The variant that owns the user's bucket, or None when the bucket is unallocated."""
        index = self.owner[bucket_of(self.salt, user_id)]
        return None if index < 0 else self.variants[index]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form (what is stored in Redis and returned by the admin API)."""
        return {
            "name": self.name,
            "description": self.description,
            "salt": self.salt,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "control": self.control,
            "variants": [v.to_dict() for v in self.variants],
        }


def _iso(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return _dt.datetime.fromtimestamp(seconds, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bucket_of(salt: str, user_id: str) -> int:
    """Hash ``salt`` and ``user_id`` into a bucket in ``[0, BUCKETS)``.

    blake2b is keyed by nothing process-specific, so every worker and every restart agrees. The
    64-bit digest makes the modulo bias negligible (< 1e-15).
    """
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def _ranges(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open runs of True in a boolean bucket mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return tuple((int(s), int(e)) for s, e in zip(starts, ends, strict=True))


def contiguous_layout(counts: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
    """Lay variants out one after another from bucket 0: ``[0, c0), [c0, c0 + c1), ...``."""
    if sum(counts) > BUCKETS or any(c < 0 for c in counts):
        raise ValueError(f"bucket counts must be >= 0 and add up to at most {BUCKETS}")
    out, position = [], 0
    for count in counts:
        out.append(((position, position + count),) if count else ())
        position += count
    return out


def rebalance(
    previous: Mapping[str, Iterable[tuple[int, int]]], counts: Mapping[str, int]
) -> dict[str, tuple[tuple[int, int], ...]]:
    """New bucket ranges for ``counts`` that keep as many users as possible where they were.

    Parameters
    ----------
    previous : mapping of variant name -> bucket ranges
        The current layout. Variants missing from ``counts`` release all their buckets.
    counts : mapping of variant name -> number of buckets wanted
        The new sizes (``share * 100``), adding up to at most :data:`BUCKETS`.

    Returns
    -------
    dict of variant name -> tuple of (start, end)
        For every variant ``v``, ``|old(v) & new(v)| == min(|old(v)|, counts[v])``: a shrinking
        variant gives up buckets at one end of its range (the end next to a growing variant, else
        its highest), a growing one keeps all of its own and takes the free buckets nearest to
        them. No other bucket changes owner.
    """
    if sum(counts.values()) > BUCKETS or any(c < 0 for c in counts.values()):
        raise ValueError(f"bucket counts must be >= 0 and add up to at most {BUCKETS}")
    names = list(counts)
    owner = np.full(BUCKETS, -1, dtype=np.int16)
    for index, name in enumerate(names):
        for start, end in previous.get(name, ()):
            if not 0 <= start < end <= BUCKETS:
                raise ValueError(f"bucket range {start}..{end} of {name!r} is outside 0..{BUCKETS}")
            if (owner[start:end] >= 0).any():
                raise ValueError(f"bucket range {start}..{end} of {name!r} overlaps another variant")
            owner[start:end] = index
    old_counts = {index: int(np.count_nonzero(owner == index)) for index in range(len(names))}
    growing = {index for index, name in enumerate(names) if counts[name] > old_counts[index]}
    for index, name in enumerate(names):
        mine = np.flatnonzero(owner == index)
        excess = len(mine) - counts[name]
        if excess <= 0:
            continue
        # Give up buckets at the end that touches a growing neighbour, so it can take them over
        # and both stay contiguous (50/50 -> 70/30 moves the boundary); otherwise the top ones.
        below = int(owner[mine[0] - 1]) if mine[0] > 0 else -2
        above = int(owner[mine[-1] + 1]) if mine[-1] + 1 < BUCKETS else -2
        from_bottom = below in growing and above not in growing
        owner[mine[:excess] if from_bottom else mine[len(mine) - excess :]] = -1
    for index, name in enumerate(names):
        need = counts[name] - int(np.count_nonzero(owner == index))
        if need <= 0:
            continue
        free = np.flatnonzero(owner == -1)
        mine = np.flatnonzero(owner == index)
        if len(mine):
            # Nearest free buckets first (keeps the variant's ranges few), lower ones on ties.
            pos = np.searchsorted(mine, free)
            left = np.abs(free - mine[np.maximum(pos - 1, 0)])
            right = np.abs(mine[np.minimum(pos, len(mine) - 1)] - free)
            free = free[np.lexsort((free, np.minimum(left, right)))]
        owner[free[:need]] = index
    return {name: _ranges(owner == index) for index, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_name(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise ExperimentError(field_name, "must be 1-32 characters of [A-Za-z0-9_-]")
    return value


def _parse_time(value: Any, field_name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):  # TOML datetimes
        value = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        value = value.timestamp()
    elif isinstance(value, _dt.date):
        value = _dt.datetime(value.year, value.month, value.day, tzinfo=_dt.UTC).timestamp()
    try:
        return parse_timestamp(value)
    except (ValueError, TypeError, OverflowError):
        raise ExperimentError(
            field_name, "must be an ISO-8601 time or Unix seconds between 2000 and 2100"
        ) from None


def _share_to_buckets(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExperimentError(field_name, "must be a number of percent (0..100)")
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise ExperimentError(field_name, "must be between 0 and 100 (percent of users)")
    buckets = round(value * BUCKETS / 100)
    if abs(value * BUCKETS / 100 - buckets) > 1e-6:
        raise ExperimentError(field_name, "must be a multiple of 0.01 (percent)")
    return buckets


def _parse_bucket_ranges(value: Any, field_name: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list | tuple) or len(value) > BUCKETS:
        raise ExperimentError(field_name, "must be a list of [start, end) bucket ranges")
    out = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            or not 0 <= item[0] < item[1] <= BUCKETS
        ):
            raise ExperimentError(
                f"{field_name}[{i}]", f"must be [start, end] with 0 <= start < end <= {BUCKETS}"
            )
        out.append((int(item[0]), int(item[1])))
    return tuple(sorted(out))


def _reject_unknown(raw: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ExperimentError(f"{prefix}{unknown[0]}", f"unknown field (expected one of: {', '.join(known)})")


def parse_experiment(
    raw: Any, *, previous: Experiment | None = None, name: str | None = None, prefix: str = ""
) -> Experiment:
    """Validate a definition (a JSON/TOML object) and lay out its buckets.

    Parameters
    ----------
    raw : mapping
        ``name``, ``variants`` (list of ``{name, share, strategy?, model_version?, buckets?}``),
        and optionally ``start``, ``end`` (ISO-8601 or Unix seconds), ``control`` (a variant
        name; default the first), ``salt`` (default the name), ``description``.
    previous : Experiment, optional
        The definition being replaced. When the salt is unchanged and no variant gives explicit
        ``buckets``, the new layout is :func:`rebalance` of the previous one (sticky users).
    name : str, optional
        The name from the URL; ``raw["name"]``, when present, must match it.
    prefix : str
        Prepended to field paths in errors (e.g. ``"experiments[2]."``).

    Returns
    -------
    Experiment

    Raises
    ------
    ExperimentError
        With ``field`` naming the offending field (``variants[1].share``) and a message.
    """
    if not isinstance(raw, Mapping):
        raise ExperimentError(prefix.rstrip(".") or "body", "an experiment must be an object")
    _reject_unknown(raw, DEFINITION_FIELDS, prefix)
    if name is not None:
        if raw.get("name") not in (None, name):
            raise ExperimentError(f"{prefix}name", f"does not match the name in the path ({name!r})")
        raw = {**raw, "name": name}
    exp_name = _check_name(raw.get("name"), f"{prefix}name")
    description = raw.get("description") or ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ExperimentError(
            f"{prefix}description", f"must be a string of at most {MAX_DESCRIPTION} characters"
        )
    salt = raw.get("salt") or exp_name
    if not isinstance(salt, str) or not 1 <= len(salt) <= MAX_SALT or not salt.isprintable():
        raise ExperimentError(f"{prefix}salt", f"must be 1-{MAX_SALT} printable characters")
    start = _parse_time(raw.get("start"), f"{prefix}start")
    end = _parse_time(raw.get("end"), f"{prefix}end")
    if start is not None and end is not None and end <= start:
        raise ExperimentError(f"{prefix}end", "must be after start")

    raw_variants = raw.get("variants")
    if not isinstance(raw_variants, list | tuple) or not 2 <= len(raw_variants) <= MAX_VARIANTS:
        raise ExperimentError(f"{prefix}variants", f"must be a list of 2 to {MAX_VARIANTS} variants")
    parsed: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, rv in enumerate(raw_variants):
        where = f"{prefix}variants[{i}]."
        if not isinstance(rv, Mapping):
            raise ExperimentError(f"{prefix}variants[{i}]", "a variant must be an object")
        _reject_unknown(rv, VARIANT_FIELDS, where)
        vname = _check_name(rv.get("name"), f"{where}name")
        if vname in seen:
            raise ExperimentError(f"{where}name", f"duplicate variant name {vname!r}")
        seen.add(vname)
        strategy = rv.get("strategy") or "personalized"
        if strategy not in STRATEGIES:
            raise ExperimentError(f"{where}strategy", f"must be one of {', '.join(STRATEGIES)}")
        version = rv.get("model_version") or None
        if version is not None and not is_valid_version(version):
            raise ExperimentError(
                f"{where}model_version", "must be a model version name ([A-Za-z0-9][A-Za-z0-9._-]{0,63})"
            )
        ranges = _parse_bucket_ranges(rv["buckets"], f"{where}buckets") if rv.get("buckets") else None
        if "share" in rv:
            count = _share_to_buckets(rv["share"], f"{where}share")
            if ranges is not None and sum(e - s for s, e in ranges) != count:
                raise ExperimentError(
                    f"{where}buckets", f"cover {sum(e - s for s, e in ranges)} buckets, share says {count}"
                )
        elif ranges is not None:
            count = sum(e - s for s, e in ranges)
        else:
            raise ExperimentError(f"{where}share", "is required (percent of users, 0..100)")
        parsed.append(dict(name=vname, strategy=strategy, model_version=version, count=count, ranges=ranges))

    total = sum(p["count"] for p in parsed)
    if total > BUCKETS:
        raise ExperimentError(f"{prefix}variants", f"shares add up to {total / 100:g} %, more than 100 %")
    if total == 0:
        raise ExperimentError(f"{prefix}variants", "at least one variant needs a share above 0")
    control = raw.get("control") or parsed[0]["name"]
    if control not in seen:
        raise ExperimentError(f"{prefix}control", f"names no variant ({control!r})")

    explicit = [p["ranges"] is not None for p in parsed]
    if any(explicit) and not all(explicit):
        raise ExperimentError(f"{prefix}variants", "give buckets for every variant or for none")
    if all(explicit):
        owner = np.zeros(BUCKETS, dtype=np.int16)
        for i, p in enumerate(parsed):
            for s, e in p["ranges"]:
                if owner[s:e].any():
                    raise ExperimentError(
                        f"{prefix}variants[{i}].buckets", "overlap another variant's buckets"
                    )
                owner[s:e] = 1
        layout = {p["name"]: p["ranges"] for p in parsed}
    elif previous is not None and previous.salt == salt:
        layout = rebalance(
            {v.name: v.buckets for v in previous.variants}, {p["name"]: p["count"] for p in parsed}
        )
    else:
        layout = dict(
            zip((p["name"] for p in parsed), contiguous_layout([p["count"] for p in parsed]), strict=True)
        )
    variants = tuple(
        Variant(
            name=p["name"],
            share=p["count"] * 100 / BUCKETS,
            strategy=p["strategy"],
            model_version=p["model_version"],
            buckets=tuple(layout[p["name"]]),
        )
        for p in parsed
    )
    return Experiment(
        name=exp_name,
        variants=variants,
        start=start,
        end=end,
        salt=salt,
        control=control,
        description=description,
    )


def load_experiments_file(path: str | os.PathLike) -> list[Experiment]:
    """Read and validate an experiments file (``.json`` or ``.toml``).

    The file holds ``{"experiments": [definition, ...]}`` (TOML: ``[[experiments]]`` tables with
    ``[[experiments.variants]]``). Bucket layouts are contiguous in the order variants are listed
    unless a variant gives explicit ``buckets``.

    Raises
    ------
    ExperimentFileError
        Unreadable file, syntax error (with line and column), or a rule broken (with the path of
        the field, e.g. ``experiments[0].variants[1].share``).
    """
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ExperimentFileError(f"file is larger than {MAX_FILE_BYTES} bytes", file=name)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentFileError("file not found", file=name) from None
    except UnicodeDecodeError as e:
        raise ExperimentFileError(f"not UTF-8 (byte {e.start})", file=name) from None
    except OSError as e:
        raise ExperimentFileError(f"cannot read: {e.strerror}", file=name) from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line, column = _toml_position(str(e))
            raise ExperimentFileError(
                f"invalid TOML: {str(e).split(' (at')[0]}", file=name, line=line, column=column
            ) from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExperimentFileError(
                f"invalid JSON: {e.msg}", file=name, line=e.lineno, column=e.colno
            ) from None
    else:
        raise ExperimentFileError("unknown format: the file name must end in .json or .toml", file=name)
    if not isinstance(data, dict) or set(data) - {"experiments"}:
        raise ExperimentFileError('the top level must be an object with one key, "experiments"', file=name)
    items = data.get("experiments", [])
    if not isinstance(items, list):
        raise ExperimentFileError('"experiments" must be a list', file=name)
    if len(items) > MAX_EXPERIMENTS:
        raise ExperimentFileError(f"more than {MAX_EXPERIMENTS} experiments", file=name)
    out: list[Experiment] = []
    seen: set[str] = set()
    for i, raw in enumerate(items):
        try:
            experiment = parse_experiment(raw, prefix=f"experiments[{i}].")
        except ExperimentError as e:
            raise ExperimentFileError(str(e), file=name) from None
        if experiment.name in seen:
            raise ExperimentFileError(
                f"experiments[{i}].name: duplicate experiment {experiment.name!r}", file=name
            )
        seen.add(experiment.name)
        out.append(experiment)
    return out


def _toml_position(message: str) -> tuple[int | None, int | None]:
    found = re.search(r"line (\d+), column (\d+)", message)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


# --------------------------------------------------------------------------------------------
# Rec ids
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Redis storage
# --------------------------------------------------------------------------------------------


def store_experiment(client: Any, experiment: Experiment) -> bool:
    """Save a definition in Redis; returns True when it is new.

    Raises
    ------
    ExperimentError
        When :data:`MAX_EXPERIMENTS` are stored already and this one is new.
    """
    payload = json.dumps(experiment.to_dict(), separators=(",", ":"))
    created = False

    def write(pipe: Any) -> None:
        nonlocal created
        created = not pipe.hexists(EXPERIMENTS_KEY, experiment.name)
        if created and pipe.hlen(EXPERIMENTS_KEY) >= MAX_EXPERIMENTS:
            raise ExperimentError(
                "name", f"{MAX_EXPERIMENTS} experiments are stored already; delete one first"
            )
        pipe.multi()
        pipe.hset(EXPERIMENTS_KEY, experiment.name, payload)
        pipe.incr(EXPERIMENTS_REV_KEY)

    client.transaction(write, EXPERIMENTS_KEY)
    return created


def delete_stored_experiment(client: Any, name: str) -> bool:
    """Remove a stored definition; False when there was none. Events already logged stay attributable."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(EXPERIMENTS_KEY, name)
    pipe.incr(EXPERIMENTS_REV_KEY)
    removed, _ = pipe.execute()
    return bool(removed)


def load_stored_experiments(client: Any) -> dict[str, Experiment]:
    """Every definition stored in Redis. A corrupt entry is skipped and logged, never fatal."""
    out: dict[str, Experiment] = {}
    for raw_name, raw_value in client.hgetall(EXPERIMENTS_KEY).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        try:
            out[name] = parse_experiment(json.loads(raw_value))
        except (ValueError, TypeError) as e:
            log.error("stored experiment %r is invalid and is ignored: %s", name[:40], e)
    return out


# --------------------------------------------------------------------------------------------
# Registry and assignment (the per-request path)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """What one request serves and how it is tagged.

    ``experiment``/``variant`` are None when the user is in no active experiment; then
    ``strategy`` and ``model_version`` are None too (serve as usual). ``rec_id`` is always set.
    """

    rec_id: str
    experiment: str | None = None
    variant: str | None = None
    strategy: str | None = None
    model_version: str | None = None

    def fields(self) -> dict[str, str | None]:
        """The three fields every recommendation and bundle answer carries."""
        return {"experiment": self.experiment, "variant": self.variant, "rec_id": self.rec_id}

    def untagged(self) -> Assignment:
        """The same request outside any experiment (used when a variant cannot be served as defined)."""
        return Assignment(rec_id=parse_token(self.rec_id))


def parse_token(rec_id: str) -> str:
    """The ``<token>`` part of a rec id (the id itself outside an experiment)."""
    return rec_id.rsplit(".", 1)[-1]


class ExperimentRegistry:
    """Experiments from the file and from Redis, cached per process.

    Parameters
    ----------
    experiments_file : path or None
        Read at construction (errors raise :class:`ExperimentFileError` so a bad file stops the
        service at start-up) and re-read when its modification time changes (a bad edit is
        logged and the previous definitions stay).
    client : redis client or None
        Where admin-defined experiments live. Read at most once per ``refresh_s``; when Redis is
        unreachable the last definitions seen keep serving (and the next try waits ``retry_s``).
    refresh_s, retry_s : float
        Cache lifetime, and back-off after a Redis error.
    clock : callable
        Returns Unix seconds (tests pass a fake).
    """

    def __init__(
        self,
        experiments_file: str | os.PathLike | None = None,
        client: Any = None,
        *,
        refresh_s: float = 1.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.experiments_file = Path(experiments_file) if experiments_file else None
        self.client = client
        self.refresh_s, self.retry_s, self.clock = refresh_s, retry_s, clock
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._file: dict[str, Experiment] = {}
        self._stored: dict[str, Experiment] = {}
        self._stored_rev: bytes | None = None
        self._merged: tuple[Experiment, ...] = ()
        self._next_refresh = 0.0
        if self.experiments_file is not None:
            self._file = {e.name: e for e in load_experiments_file(self.experiments_file)}
            self._file_mtime = self._mtime()
        self._merge()

    # -- reading ---------------------------------------------------------------------------------

    def _mtime(self) -> float | None:
        try:
            return self.experiments_file.stat().st_mtime if self.experiments_file else None
        except OSError:
            return None

    def _merge(self) -> None:
        # A file definition wins over a stored one of the same name (the admin API refuses to
        # create such a clash; this only matters if the file gains a name later).
        merged = {**self._stored, **self._file}
        self._merged = tuple(sorted(merged.values(), key=lambda e: (e.start or 0, e.name)))

    def refresh(self, force: bool = False) -> None:
        """Re-read the file (if changed) and Redis (if its revision changed). Never raises."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is refreshing; serve what we have
        try:
            self._next_refresh = now + self.refresh_s
            if self.experiments_file is not None:
                mtime = self._mtime()
                if mtime != self._file_mtime:
                    try:
                        self._file = {e.name: e for e in load_experiments_file(self.experiments_file)}
                    except ExperimentFileError as e:
                        log.error(
                            "experiments file changed but is invalid; keeping the previous definitions: %s", e
                        )
                    self._file_mtime = mtime
            if self.client is not None:
                try:
                    rev = self.client.get(EXPERIMENTS_REV_KEY)
                    if force or rev != self._stored_rev:
                        self._stored = load_stored_experiments(self.client)
                        self._stored_rev = rev
                except Exception as e:  # noqa: BLE001 - Redis down must not break serving
                    log.warning(
                        "cannot read experiments from Redis (%s); using the last definitions seen",
                        type(e).__name__,
                    )
                    self._next_refresh = now + self.retry_s
            self._merge()
        finally:
            self._lock.release()

    def all(self) -> tuple[Experiment, ...]:
        """Every known experiment (active or not), ordered by start then name."""
        self.refresh()
        return self._merged

    def get(self, name: str) -> Experiment | None:
        self.refresh()
        return next((e for e in self._merged if e.name == name), None)

    def source_of(self, name: str) -> str | None:
        """``"file"`` or ``"redis"`` (where the definition in use comes from), None when unknown."""
        if name in self._file:
            return "file"
        return "redis" if name in self._stored else None

    # -- assignment --------------------------------------------------------------------------------

    def assign(self, user_id: str | None, now: float | None = None, *, refresh: bool = True) -> Assignment:
        """Which experiment and variant serve ``user_id`` now, and a fresh rec id.

        Active experiments are tried in (start, name) order; the first whose variants own the
        user's bucket claims the user (so two overlapping experiments never both change one
        answer). Users in no experiment, and requests without a user, get an untagged rec id.
        ``user_id`` must already satisfy the id contract. ``refresh=False`` uses the definitions in
        memory without touching Redis (for when Redis is known to be down).
        """
        now = self.clock() if now is None else now
        if user_id is not None:
            if refresh:
                self.refresh()
            for experiment in self._merged:  # usually empty: then this is the whole cost
                if not experiment.is_active(now):
                    continue
                variant = experiment.variant_for(user_id)
                if variant is not None:
                    return Assignment(
                        rec_id=new_rec_id(experiment.name, variant.name, now),
                        experiment=experiment.name,
                        variant=variant.name,
                        strategy=variant.strategy,
                        model_version=variant.model_version,
                    )
        return Assignment(rec_id=new_rec_id(now=now))


# --------------------------------------------------------------------------------------------
# Server-side log of what was served (exposure), written off the request path
# --------------------------------------------------------------------------------------------


class ServedLog:
    """Log experiment answers into a capped Redis list without slowing requests down.

    :meth:`record` appends a tuple to an in-process bounded queue (O(1), never raises); a daemon
    thread writes the queue every ``flush_interval_s`` with one ``RPUSH`` of compact records and
    an ``LTRIM`` that keeps the newest ``maxlen`` (one round trip, and little work while holding
    the GIL, so request threads are not held up). Each record is
    ``"<ts>\\t<rec_id>\\t<user_id>\\t<surface>\\t<item,item,...>"``; experiment and variant are in
    the rec id. When Redis is down or the queue is full, records are dropped and counted in
    :attr:`dropped` -- the rec ids in the storefront's events still carry experiment and variant,
    so attribution never depends on this log; it only adds exposure of users who sent no event.
    """

    def __init__(
        self,
        client: Any,
        *,
        key: str = SERVED_KEY,
        maxlen: int = SERVED_MAXLEN,
        max_pending: int = 10_000,
        max_items: int = 50,
        flush_interval_s: float = 0.25,
        background: bool = True,
    ):
        self.client, self.key, self.maxlen = client, key, maxlen
        self.max_items, self.flush_interval_s, self.background = max_items, flush_interval_s, background
        self._pending: deque[tuple[int, str, str, str, Sequence[str]]] = deque(maxlen=max_pending)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._closed = False
        self._flush_lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    def record(
        self,
        assignment: Assignment,
        user_id: str,
        items: Sequence[str],
        surface: str,
        now: float | None = None,
    ) -> None:
        """Queue one served answer (experiment traffic only; others are not needed for reports)."""
        if assignment.experiment is None:
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1  # deque drops the oldest on append
        ts = int(time.time() if now is None else now)
        self._pending.append((ts, assignment.rec_id, user_id, surface, items))
        if self.background and self._pid != os.getpid():
            self._start()  # lazily, in the process that serves (gunicorn forks after import)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="recsvc-served-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a worker that exits cleanly writes what it still holds

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Stop the background thread and write what is pending (safe to call twice)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=2)
        self._thread, self._pid = None, None
        self.flush()

    def flush(self) -> int:
        """Write what is pending; returns how many records were written. Never raises."""
        with self._flush_lock:
            batch = []
            while self._pending and len(batch) < 5000:
                ts, rec_id, user_id, surface, items = self._pending.popleft()
                batch.append(f"{ts}\t{rec_id}\t{user_id}\t{surface}\t{','.join(items[: self.max_items])}")
            if not batch:
                return 0
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.rpush(self.key, *batch)
                pipe.ltrim(self.key, -self.maxlen, -1)
                pipe.execute()
            except Exception as e:  # noqa: BLE001 - logging exposure must never break serving
                self.dropped += len(batch)
                log.warning("served log: dropped %d records (%s)", len(batch), type(e).__name__)
                return 0
            self.written += len(batch)
            return len(batch)

    @property
    def pending(self) -> int:
        return len(self._pending)


def read_served(
    client: Any, experiment: str, *, key: str = SERVED_KEY, limit: int = SERVED_MAXLEN
) -> dict[str, np.ndarray]:
    """Served records of one experiment (the newest ``limit`` records are scanned).

    Returns
    -------
    dict with ``user_id``, ``rec_id`` (object arrays) and ``timestamp`` (int64)
    """
    users: list[str] = []
    recs: list[str] = []
    stamps: list[int] = []
    prefix = f"{experiment}."
    end = -1
    scanned = 0
    while scanned < limit:
        start = end - min(10_000, limit - scanned) + 1
        chunk = client.lrange(key, start, end)
        if not chunk:
            break
        for raw in chunk:
            parts = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).split("\t")
            if len(parts) == 5 and parts[1].startswith(prefix):
                try:
                    stamps.append(int(parts[0]))
                except ValueError:
                    continue
                recs.append(parts[1])
                users.append(parts[2])
        scanned += len(chunk)
        if len(chunk) < end - start + 1:
            break  # reached the oldest record
        end = start - 1
    return {
        "user_id": np.array(users, dtype=object),
        "rec_id": np.array(recs, dtype=object),
        "timestamp": np.array(stamps, dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------
# Serving hooks (called from the recommendation path and the shared answer helper)
# --------------------------------------------------------------------------------------------

#: Key of the per-app :class:`ExperimentState` in ``app.extensions``.
EXTENSION = "recsvc.analytics.experiments"
#: Answers degraded for these reasons are not what any variant defines: they are served untagged.
_DEGRADED_REASONS = ("redis_unavailable", "not_published")
#: Endpoints where a variant's strategy and model version are applied (by :func:`serve_variant`).
VARIANT_ENDPOINTS = frozenset({"recommendations.recommendations"})


@dataclass
class ExperimentState:
    """Per-app (per gunicorn worker) experiment registry and served log."""

    registry: ExperimentRegistry
    served_log: ServedLog


def init_app(app: Any) -> ExperimentState:
    """Create the app's :class:`ExperimentState` (idempotent); a bad experiments file raises here.

    Called when the experiments blueprint is registered, i.e. inside ``create_app``, so an invalid
    ``RECSVC_EXPERIMENTS_FILE`` stops the service at start-up with the file's error message.
    """
    state = app.extensions.get(EXTENSION)
    if state is None:
        services = app.extensions["recsvc"]
        config = services.config
        registry = ExperimentRegistry(
            config.experiments_file,
            services.client,
            refresh_s=float(config.extra.get("experiments_refresh_s", 1.0)),
            retry_s=config.redis_down_recheck_s,
        )
        served_log = ServedLog(
            services.client, maxlen=int(config.extra.get("experiments_served_maxlen", SERVED_MAXLEN))
        )
        state = app.extensions[EXTENSION] = ExperimentState(registry, served_log)
    return state


def assignment_for_request(user_id: str | None) -> Assignment:
    """This request's :class:`Assignment` for ``user_id`` (computed once per request, kept on ``g``).

    Without the experiments blueprint (no state on the app) every answer still gets a rec id.
    ``user_id`` must already satisfy the id contract.
    """
    from flask import current_app, g

    cached = g.get("_recsvc_assignment")
    if cached is not None and cached[0] == user_id:
        return cached[1]
    state: ExperimentState | None = current_app.extensions.get(EXTENSION)
    if state is None:
        assignment = Assignment(rec_id=new_rec_id())
    else:
        services = current_app.extensions.get("recsvc")
        if services is not None and services.health.is_down():
            # Do not wait on a Redis that is known to be down: use the definitions in memory.
            assignment = state.registry.assign(user_id, refresh=False)
        else:
            assignment = state.registry.assign(user_id)
    g._recsvc_assignment = (user_id, assignment)
    return assignment


def served_as_defined(assignment: Assignment, body: Mapping[str, Any], *, strict: bool = True) -> bool:
    """Whether an answer is what the assignment's variant defines (else it must not count for it).

    Degraded answers (Redis down, nothing published) never are. With ``strict`` (the
    recommendations endpoint, where :func:`serve_variant` applies variants) neither are a model
    version other than the variant's, a non-popular answer for the ``popular`` strategy, nor a
    real-time answer for the ``personalized`` strategy. Surfaces that do not apply variants
    (bundles) are the same for every arm, so they stay tagged: unbiased, only diluted.
    """
    if assignment.experiment is None:
        return True
    if body.get("reason") in _DEGRADED_REASONS:
        return False
    if not strict:
        return True
    if assignment.model_version is not None and body.get("model_version") != assignment.model_version:
        return False
    source = body.get("source")
    if assignment.strategy == "popular" and source not in (None, "fallback"):
        return False
    return not (assignment.strategy == "personalized" and source == "realtime")


def tag_answer(body: dict[str, Any], user_id: str | None = None) -> dict[str, Any]:
    """Add ``experiment``, ``variant`` and ``rec_id`` to an answer body and log the exposure.

    The one call the shared answer helper makes. ``user_id`` defaults to ``body["user_id"]``;
    answers without a user (similar items, popular, item bundles) get an untagged rec id. An
    answer that is not what the user's variant defines (see :func:`served_as_defined`; strict on
    :data:`VARIANT_ENDPOINTS`) is tagged as outside the experiment, so it cannot bias the report.
    Idempotent: a body with a ``rec_id`` is left alone.
    """
    from flask import current_app, request

    if "rec_id" in body:
        return body
    user_id = user_id if user_id is not None else body.get("user_id")
    assignment = assignment_for_request(user_id)
    if assignment.experiment is None:  # most answers: no experiment, nothing to check or log
        body["experiment"] = body["variant"] = None
        body["rec_id"] = assignment.rec_id
        return body
    if not served_as_defined(assignment, body, strict=request.endpoint in VARIANT_ENDPOINTS):
        assignment = assignment.untagged()
    body.update(assignment.fields())
    state: ExperimentState | None = current_app.extensions.get(EXTENSION)
    if state is not None and assignment.experiment is not None and user_id is not None:
        items = [
            item["item_id"] for item in body.get("items", ()) if isinstance(item, dict) and "item_id" in item
        ]
        state.served_log.record(assignment, user_id, items, request.endpoint or "")
    return body


def serve_variant(user_id: str, n: int, wanted: Any) -> dict[str, Any] | None:
    """The recommendation body for a user whose variant changes what is served, else None.

    Handles every variant that is not plain default serving: a ``model_version`` (that published
    version, loaded once per process), ``popular`` (the model's popularity list with the asked
    filters; ``source: fallback``, ``reason: experiment``), ``personalized`` (the cached top-K,
    never folded in) and ``realtime`` (:func:`recsvc.realtime.recommend` when it applies, else the
    cached top-K). Returns None
    -- and the caller serves as usual -- for users in no experiment, when Redis is down, or when
    the variant's version is no longer published; :func:`tag_answer` then tags that answer as
    outside the experiment.

    Parameters
    ----------
    user_id : str
        Already validated.
    n : int
        Items wanted.
    wanted : recsvc.api.common.FilterArgs
        The request's filters.
    """
    assignment = assignment_for_request(user_id)
    if assignment.experiment is None:
        return None
    from recsvc.api.common import FALLBACK, PERSONALIZED, REALTIME, recommendation_body, services
    from recsvc.core import ranking
    from recsvc.serving import REDIS_DOWN_ERRORS, ModelNotPublished, fetch_user

    svc = services()
    if svc.health.is_down():
        return None
    try:
        if assignment.model_version is not None:
            model = svc.models.model_for(svc.client, assignment.model_version)
            _live, record = fetch_user(svc.client, model, user_id)
        else:
            model = svc.models.current() or svc.models.get(svc.client, force_check=True)
            if model is None:
                return None
            live, record = fetch_user(svc.client, model, user_id)
            if live is None:
                return None
            if live != model.version:
                model = svc.models.switch(svc.client, live)
                record = fetch_user(svc.client, model, user_id)[1]
    except REDIS_DOWN_ERRORS as e:
        svc.health.mark_down(e)
        return None
    except ModelNotPublished:
        log.warning(
            "experiment %s variant %s: model version %s is not published; serving the default",
            assignment.experiment,
            assignment.variant,
            assignment.model_version,
        )
        return None

    config = svc.config
    filters = wanted.for_model(model, config, record.purchased if record is not None else None)
    if assignment.strategy == "popular":
        items, scores = ranking.popular_items(model, filters, n)
        body = recommendation_body(
            model, items, scores, source=FALLBACK, user_id=user_id, reason="experiment"
        )
        return tag_answer(body, user_id)
    if assignment.strategy == "realtime":
        folded = _realtime(model, svc.client, user_id, filters, n, record is not None, config.history_length)
        if folded is not None:
            body = recommendation_body(model, folded[0], folded[1], source=REALTIME, user_id=user_id)
            return tag_answer(body, user_id)
    if record is None:
        items, scores = ranking.popular_items(model, filters, n)
        body = recommendation_body(
            model, items, scores, source=FALLBACK, user_id=user_id, reason="unknown_user"
        )
        return tag_answer(body, user_id)
    items, scores, _how = ranking.recommend_from_cache(
        model, record.topk_items, record.topk_scores, record.vector, filters, n
    )
    return tag_answer(
        recommendation_body(model, items, scores, source=PERSONALIZED, user_id=user_id), user_id
    )


def _realtime(
    model: Any, client: Any, user_id: str, filters: Any, n: int, known_user: bool, history_length: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Real-time top ``n`` from :func:`recsvc.realtime.recommend` (None when it does not apply)."""
    from recsvc import realtime

    try:
        folded = realtime.recommend(
            model, client, user_id, filters, n, known_user=known_user, history_length=history_length
        )
    except Exception as e:  # noqa: BLE001 - fall back to the cached list, never a 5xx
        log.warning(
            "real-time fold-in failed for an experiment user (%s); serving the cached list", type(e).__name__
        )
        return None
    return None if folded is None else (folded[0], folded[1])
