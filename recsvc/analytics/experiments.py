"""A/B experiments: definitions, validation, deterministic bucketing and sticky rebalancing.

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
Rec ids and storage
    :mod:`recsvc.analytics.recids` makes and parses the rec ids answers carry;
    :mod:`recsvc.analytics.registry` stores definitions in Redis and assigns users at serving time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
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


#: Fields a definition and a variant may have (anything else is rejected, naming the field).
DEFINITION_FIELDS = ("name", "description", "salt", "start", "end", "control", "variants")
VARIANT_FIELDS = ("name", "share", "strategy", "model_version", "buckets")


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
    out: list[tuple[tuple[int, int], ...]] = []
    position = 0
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
            field_name, "must be an ISO-8601 time or a Unix time after 1970 and before 2100"
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


# --------------------------------------------------------------------------------------------
# Redis storage
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Registry and assignment (the per-request path)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Server-side log of what was served (exposure), written off the request path
# --------------------------------------------------------------------------------------------
