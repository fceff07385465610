"""The repurchase model in Redis: item parameters once per version, bought items per customer.

Layout (names from :mod:`recsvc.storage.keys`)::

    recsvc:v:<V>:repurchase          hash  rate, log_interval, buyers, repeat_buyers (numpy bytes),
                                           hyper (JSON: within_var, between_var, strength, dispersion,
                                           ranker when the version has one)
    recsvc:v:<V>:repurchase:<b>      hash  user_id -> the customer's packed bought items

A customer's record is ``pace`` (float32) followed by four columns of ``n`` entries: item indices
(the version's index dtype), last purchase (uint32 unix seconds), occasions (uint16, capped) and
the customer's mean log interval (float32); a version with a ranker adds a fifth, the
recency-weighted occasions (float32; the hyper's ``ranker`` says which layout to read). At most
:data:`~recsvc.core.repurchase.MAX_ITEMS_PER_USER` items are kept: the most recently bought.
Versions published without a repurchase model have none of these keys; serving then exempts only
the operator's repurchase categories and the buy-again endpoint answers from popularity.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from recsvc.core.artifact import Artifact
from recsvc.core.repurchase import MAX_ITEMS_PER_USER, RepurchaseParams, UserHistory, newest
from recsvc.storage import keys

PART = keys.REPURCHASE_PART
_MAX_COUNT = np.iinfo(np.uint16).max
_ITEM_FIELDS = (("rate", "<f4"), ("log_interval", "<f4"), ("buyers", "<i4"), ("repeat_buyers", "<i4"))


def item_mapping(params: RepurchaseParams) -> dict[str, bytes]:
    """The fields of the version hash."""
    out = {
        name: np.ascontiguousarray(getattr(params, name), dtype=dtype).tobytes()
        for name, dtype in _ITEM_FIELDS
    }
    hyper: dict[str, Any] = {
        "within_var": params.within_var,
        "between_var": params.between_var,
        "strength": params.strength,
        "dispersion": params.dispersion,
    }
    if params.ranker is not None:  # absent for versions trained before it: their bytes are unchanged
        hyper["ranker"] = list(params.ranker)
    out["hyper"] = json.dumps(hyper, sort_keys=True).encode()
    return out


def params_from_mapping(stored: Mapping[bytes, bytes]) -> RepurchaseParams | None:
    """The parameters from the version hash as read (None when the version has none)."""
    if not stored or b"hyper" not in stored:
        return None
    arrays = {name: np.frombuffer(stored[name.encode()], dtype=dtype) for name, dtype in _ITEM_FIELDS}
    for arr in arrays.values():
        arr.flags.writeable = False
    hyper = json.loads(stored[b"hyper"])
    return RepurchaseParams(
        **arrays,
        within_var=float(hyper["within_var"]),
        between_var=float(hyper["between_var"]),
        strength=float(hyper["strength"]),
        dispersion=float(hyper.get("dispersion", 1.0)),
        ranker=tuple(float(x) for x in hyper["ranker"]) if "ranker" in hyper else None,
    )


def _entry_bytes(index_dtype: str, recent: bool = False) -> int:
    return np.dtype(index_dtype).itemsize + 4 + 2 + 4 + (4 if recent else 0)


def pack_history(history: UserHistory, index_dtype: str) -> bytes:
    """One customer's record (see the module docstring)."""
    h = newest(history, MAX_ITEMS_PER_USER)
    return b"".join(
        (
            np.float32(h.pace).tobytes(),
            np.ascontiguousarray(h.items, dtype=index_dtype).tobytes(),
            np.clip(h.last, 0, np.iinfo(np.uint32).max).astype("<u4").tobytes(),
            np.minimum(h.count, _MAX_COUNT).astype("<u2").tobytes(),
            np.ascontiguousarray(h.log_interval, dtype="<f4").tobytes(),
            b"" if h.recent is None else np.ascontiguousarray(h.recent, dtype="<f4").tobytes(),
        )
    )


def unpack_history(value: bytes, index_dtype: str, recent: bool = False) -> UserHistory:
    """The inverse of :func:`pack_history`; ``recent``: the record has the fifth column (the
    version's parameters have a ranker).

    Raises
    ------
    ValueError
        The record's length does not fit the layout (a corrupt value).
    """
    width = np.dtype(index_dtype).itemsize
    n, rest = divmod(len(value) - 4, _entry_bytes(index_dtype, recent))
    if len(value) < 4 or rest:
        raise ValueError(f"repurchase record of {len(value)} bytes does not fit the layout")
    # Views into the reply, no copies (read-only, like every per-request array).
    pace = float(np.frombuffer(value, dtype="<f4", count=1)[0])
    items = np.frombuffer(value, dtype=index_dtype, count=n, offset=4)
    at = 4 + n * width
    last = np.frombuffer(value, dtype="<u4", count=n, offset=at)
    count = np.frombuffer(value, dtype="<u2", count=n, offset=at + 4 * n)
    log_interval = np.frombuffer(value, dtype="<f4", count=n, offset=at + 6 * n)
    weighted = np.frombuffer(value, dtype="<f4", count=n, offset=at + 10 * n) if recent else None
    return UserHistory(items, last, count, log_interval, pace, weighted)


def customers(artifact: Artifact) -> np.ndarray:
    """User indices of the customers with a record (bought at least one item)."""
    if artifact.repurchase is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.diff(artifact.repurchase.history.indptr)).astype(np.int64)


def write(
    hset: Callable[[bytes, list[bytes], list[bytes]], None],
    artifact: Artifact,
    n_buckets: int,
    index_dtype: str,
    flush: Callable[[], None] | None = None,
    chunk: int = 1000,
) -> int:
    """Queue the per-customer records of ``artifact`` through ``hset(key, names, values)``.

    ``hset`` and ``flush`` are publish's bulk writer (``flush`` after every ``chunk`` customers
    bounds what is queued); the version hash is written by :func:`write_params`. Returns the
    number of records.
    """
    model = artifact.repurchase
    if model is None:
        return 0
    who = customers(artifact)
    if len(who) == 0:
        return 0
    version = artifact.version
    names = [artifact.user_ids[u].encode("utf-8") for u in who.tolist()]
    buckets = np.fromiter(
        (keys.user_bucket(artifact.user_ids[u], n_buckets) for u in who.tolist()), np.int64, len(who)
    )
    order = np.argsort(buckets, kind="stable")
    bucket_keys = [keys.bucket(version, PART, b).encode() for b in range(n_buckets)]
    history = model.history
    for lo in range(0, len(order), chunk):
        part = order[lo : lo + chunk]
        part_buckets = buckets[part]
        cuts = np.flatnonzero(np.diff(part_buckets)) + 1
        bounds = [0, *cuts.tolist(), len(part)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            members = part[a:b].tolist()
            values = [pack_history(history.row(int(who[m])), index_dtype) for m in members]
            hset(bucket_keys[int(part_buckets[a])], [names[m] for m in members], values)
        if flush is not None:
            flush()
    return len(who)


def write_params(client: Any, artifact: Artifact) -> None:
    """Write the version hash (nothing when the artifact has no repurchase model)."""
    if artifact.repurchase is not None:
        client.hset(keys.version(artifact.version, PART), mapping=item_mapping(artifact.repurchase.params))


def verify(client: Any, artifact: Artifact, n_buckets: int, index_dtype: str, sample: int = 64) -> str | None:
    """What differs between Redis and ``artifact``'s repurchase model (None when nothing does)."""
    version = artifact.version
    stored = client.hgetall(keys.version(version, PART))
    if artifact.repurchase is None:
        return "repurchase model in Redis, none in the artifact" if stored else None
    for name, value in item_mapping(artifact.repurchase.params).items():
        if stored.get(name.encode()) != value:
            return f"repurchase field {name!r} differs from the artifact"
    who = customers(artifact)
    pipe = client.pipeline(transaction=False)
    for b in range(n_buckets):
        pipe.hlen(keys.bucket(version, PART, b))
    found = sum(pipe.execute())
    if found != len(who):
        return f"{found} repurchase records in Redis, artifact has {len(who)}"
    picks = (
        who[np.unique(np.linspace(0, len(who) - 1, min(sample, len(who))).astype(int))] if len(who) else who
    )
    pipe = client.pipeline(transaction=False)
    for u in picks.tolist():
        user = artifact.user_ids[u]
        pipe.hget(keys.bucket(version, PART, keys.user_bucket(user, n_buckets)), user)
    for u, value in zip(picks.tolist(), pipe.execute(), strict=True):
        want = pack_history(artifact.repurchase.history.row(u), index_dtype)
        if value != want:
            return f"repurchase record of {artifact.user_ids[u]!r} differs from the artifact"
    return None
