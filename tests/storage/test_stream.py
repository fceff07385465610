"""Ingestion, recent history, rate limits and the exactly-once dump, against a real Redis."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.core.contract import EVENT_CODE, BatchError, validate_batch
from recsvc.storage import dump, keys
from recsvc.storage.connection import connect_admin
from recsvc.storage.dump import DumpError, DumpLocked, dump_commit_key, dump_events, stream_status
from recsvc.storage.keys import EVENTS_DUMP_LOCK as DUMP_LOCK
from recsvc.storage.ratelimit import rate_limit
from recsvc.storage.stream import (
    StreamFull,
    append_events,
    parse_recent,
    read_stream_events,
    recent_events,
    stream_length,
)

STREAM = "recsvc:events"
T = 1_718_000_000

pytestmark = pytest.mark.redis_backends("single", "cluster")


def _append(client, events, history_length=200, **kwargs):
    return append_events(
        client, events, stream=STREAM, history_length=history_length, history_ttl_s=3600, **kwargs
    )


def _length(client) -> int:
    return stream_length(client, STREAM)


def _events(n: int, users: int = 3, start: int = 0) -> list[dict]:
    kinds = ["view", "cart", "purchase", "click", "impression"]
    out = []
    for k in range(start, start + n):
        event = {"user_id": f"u{k % users}", "item_id": f"sku-{k % 17}", "event": kinds[k % 5]}
        event["timestamp"] = T + k
        if event["event"] == "purchase":
            event |= {"order_id": f"o{k}", "quantity": 2, "price": 9.5}
        if k % 7 == 0:
            event["rec_id"] = f"r{k}"
        out.append(event)
    return validate_batch(out, max_events=10_000)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _key(row: dict) -> tuple:
    """An event as a comparable tuple, whether it came from a dict event or a dumped CSV row."""

    def num(v):
        return None if v in (None, "") else float(v)

    return (
        row["user_id"],
        row["item_id"],
        row["event"],
        int(row["timestamp"]),
        row.get("order_id") or "",
        num(row.get("quantity")),
        num(row.get("price")),
        row.get("rec_id") or "",
    )


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_validate_batch_shapes():
    one = {"user_id": "u1", "item_id": "i1", "event": "view", "timestamp": T}
    assert validate_batch(one, 10) == [one]
    assert len(validate_batch([one, one], 10)) == 2
    assert len(validate_batch({"events": [one, one, one]}, 10)) == 3
    iso = validate_batch({**one, "timestamp": "2024-06-10T06:13:20Z"}, 10)[0]
    assert iso["timestamp"] == T


@pytest.mark.parametrize(
    "body, index, field, reason",
    [
        ({"events": [{"user_id": "u", "item_id": "i", "event": "view", "timestamp": T}] * 2 + [{}]}, 2,
         "events[2].user_id", "missing_field"),
        ([{"user_id": "u", "item_id": "i", "event": "view", "timestamp": "yesterday"}], 0,
         "events[0].timestamp", "invalid_timestamp"),
        ([{"user_id": "u", "item_id": "i", "event": "view", "timestamp": T},
          {"user_id": "u u", "item_id": "i", "event": "view", "timestamp": T}], 1,
         "events[1].user_id", "invalid_user_id"),
        ({"user_id": "u", "item_id": "i", "event": "like", "timestamp": T}, None, "event", "unknown_event"),
        ({"user_id": "u", "item": "i", "event": "view", "timestamp": T}, None, "item", "unknown_field"),
        ({"events": []}, None, "events", "no_events"),
        ({"events": "x"}, None, "events", "missing_field"),
        ({"events": [], "extra": 1}, None, "extra", "unknown_field"),
        ("text", None, "events", "missing_field"),
        ([{"user_id": "u", "item_id": "i", "event": "view", "timestamp": T}] * 4, None, "events",
         "too_many_events"),
    ],
)  # fmt: skip
def test_validate_batch_names_first_bad_event(body, index, field, reason):
    with pytest.raises(BatchError) as info:
        validate_batch(body, max_events=3)
    assert (info.value.index, info.value.field, info.value.reason) == (index, field, reason)


# ------------------------------------------------------------------------------------------------
# Ingestion and history
# ------------------------------------------------------------------------------------------------


def test_append_writes_stream_and_recent_lists(redis_client):
    events = _events(10, users=2)
    ids = _append(redis_client, events, history_length=3)
    assert len(ids) == 10 and len(set(ids)) == 10
    # The whole batch is in one shard: the one of its first user's group.
    entries = redis_client.xrange(keys.stream_shard(STREAM, keys.user_group("u0")))
    assert [e[0].decode() for e in entries] == ids and _length(redis_client) == 10
    first = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert first == {
        "user_id": "u0",
        "item_id": "sku-0",
        "event": "view",
        "timestamp": str(T),
        "rec_id": "r0",
    }  # noqa: E501
    purchase = {k.decode(): v.decode() for k, v in entries[2][1].items()}
    assert purchase["quantity"] == "2.0" and purchase["price"] == "9.5" and purchase["order_id"] == "o2"

    # u0 had events 0, 2, 4, 6, 8: the list keeps the newest three, newest first.
    recent = recent_events(redis_client, "u0", limit=200)
    assert recent.item_ids == ["sku-8", "sku-6", "sku-4"]
    assert list(recent.timestamps) == [T + 8, T + 6, T + 4]
    assert list(recent.events) == [EVENT_CODE["click"], EVENT_CODE["cart"], EVENT_CODE["impression"]]
    assert recent.newest == T + 8
    assert 0 < redis_client.ttl(keys.recent("u0")) <= 3600
    assert recent_events(redis_client, "u1", limit=200).item_ids == ["sku-9", "sku-7", "sku-5"]
    assert len(recent_events(redis_client, "u0", limit=2)) == 2
    assert len(recent_events(redis_client, "nobody", limit=10)) == 0


def test_append_refuses_when_a_shard_is_full_and_stores_nothing(redis_client):
    maxlen = 2 * keys.GROUPS  # each shard may hold 2
    _append(redis_client, _events(2, users=1), stream_maxlen=maxlen)
    with pytest.raises(StreamFull):
        _append(redis_client, _events(1, users=1, start=100), stream_maxlen=maxlen)
    assert _length(redis_client) == 2  # nothing added, nothing trimmed
    assert recent_events(redis_client, "u0", limit=10).timestamps.tolist() == [T + 1, T]
    # Another group's shard has room: the refusal is per shard.
    other = next(f"v{k}" for k in range(100) if keys.user_group(f"v{k}") != keys.user_group("u0"))
    event = validate_batch({"user_id": other, "item_id": "sku-1", "event": "view", "timestamp": T}, 1)
    _append(redis_client, event, stream_maxlen=maxlen)
    assert _length(redis_client) == 3


def test_a_batch_of_several_groups_is_durable_in_one_shard_and_reaches_every_recent_list(redis_client):
    users = ["u0", *(f"w{k}" for k in range(40))]
    groups = {keys.user_group(u) for u in users}
    assert len(groups) > 1
    events = validate_batch(
        [
            {"user_id": u, "item_id": "sku-1", "event": "cart", "timestamp": T + k}
            for k, u in enumerate(users)
        ],
        100,
    )
    ids = _append(redis_client, events)
    lead = keys.stream_shard(STREAM, keys.user_group("u0"))
    assert [e[0].decode() for e in redis_client.xrange(lead)] == ids
    for k, user in enumerate(users):
        assert recent_events(redis_client, user, limit=5).timestamps.tolist() == [T + k]


def test_read_stream_merges_shards_newest_first(redis_client):
    users = [f"w{k}" for k in range(30)]
    for k, user in enumerate(users):  # one batch per user: the events spread over shards
        # Entry ids order shards by the millisecond (each shard numbers its own entries).
        time.sleep(0.002)
        _append(
            redis_client,
            validate_batch({"user_id": user, "item_id": "i", "event": "view", "timestamp": T + k}, 1),
        )
    table, skipped = read_stream_events(redis_client, STREAM, limit=10)
    assert skipped == 0 and list(table.user_id) == users[-10:]  # the newest ten, oldest first
    table, _ = read_stream_events(redis_client, STREAM)
    assert list(table.user_id) == users


def test_recent_key_rejects_bad_ids(redis_client):
    with pytest.raises(ValueError, match="user_id"):
        recent_events(redis_client, "u*", limit=5)


def test_parse_recent_skips_malformed_entries():
    parsed = parse_recent([b"1718000000|2|sku-1", "garbage", "12|99|x", "x|1|y", "1718000001|0|a|b"])
    assert parsed.item_ids == ["sku-1", "a|b"]
    assert list(parsed.events) == [2, 0]


def test_rate_limit_counts_per_key_and_window(redis_client):
    now = 60 * 1000 + 10.0
    decisions = [rate_limit(redis_client, "secret-key-1", 3, now=now) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[-1].retry_after_s == 50
    assert rate_limit(redis_client, "secret-key-2", 3, now=now).allowed  # other keys unaffected
    assert rate_limit(redis_client, "secret-key-1", 3, now=now + 60).allowed  # next window
    keys = [k.decode() for k in list(redis_client.scan_iter("*"))]
    assert keys and not any("secret" in k for k in keys)  # the key itself never reaches Redis
    assert all(0 < redis_client.ttl(k) <= 120 for k in keys)


# ------------------------------------------------------------------------------------------------
# Dump
# ------------------------------------------------------------------------------------------------


def test_dump_writes_every_event_once_and_drains_the_stream(redis_client, tmp_path):
    events = _events(57, users=5)
    _append(redis_client, events)
    result = dump_events(redis_client, tmp_path / "d1.csv", stream=STREAM, batch_size=10)
    assert result.count == 57 and result.path == tmp_path / "d1.csv" and result.remaining == 0
    rows = _read_csv(tmp_path / "d1.csv")
    assert [_key(r) for r in rows] == [_key(e) for e in events]
    assert _length(redis_client) == 0
    assert redis_client.get(dump_commit_key(STREAM)) is None and not redis_client.exists(DUMP_LOCK)
    assert list(tmp_path.iterdir()) == [tmp_path / "d1.csv"]  # no temporary file left

    again = dump_events(redis_client, tmp_path / "d2.csv", stream=STREAM)
    assert again.count == 0 and again.path is None and not (tmp_path / "d2.csv").exists()


def test_dump_file_is_read_by_the_training_loader(redis_client, tmp_path):
    """Retraining on history + dump sees exactly the history plus the accepted events."""
    from recsvc.core.eventfiles import load_events

    history = tmp_path / "history.csv"
    with open(history, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price"])
        w.writerow(["u0", "sku-1", "purchase", T - 100, "o-old", 1, 3.25])
        w.writerow(["u9", "sku-2", "view", T - 50, "", "", ""])
    events = _events(40, users=4)
    _append(redis_client, events)
    dump_events(redis_client, tmp_path / "dump.csv", stream=STREAM)
    dump_events(redis_client, tmp_path / "empty.csv", stream=STREAM)  # nothing: no file

    table, report = load_events([history, tmp_path / "dump.csv"], max_bad_fraction=0.0)
    assert report.rows_rejected == 0 and report.duplicates_dropped == 0
    got = sorted(
        _key(
            {
                "user_id": u, "item_id": i, "event": ["view", "cart", "purchase", "impression", "click"][e],
                "timestamp": t, "order_id": o, "quantity": None if np.isnan(q) else q,
                "price": None if np.isnan(p) else p, "rec_id": r,
            }
        )
        for u, i, e, t, o, q, p, r in zip(
            table.user_id, table.item_id, table.event, table.timestamp, table.order_id,
            table.quantity, table.price, table.rec_id, strict=True,
        )
    )  # fmt: skip
    expected_rows = [
        {"user_id": "u0", "item_id": "sku-1", "event": "purchase", "timestamp": T - 100, "order_id": "o-old",
         "quantity": 1.0, "price": 3.25},
        {"user_id": "u9", "item_id": "sku-2", "event": "view", "timestamp": T - 50, "quantity": 1.0},
    ]  # fmt: skip
    # The loader fills an absent quantity with 1.0.
    expected = sorted(_key(e | {"quantity": e.get("quantity", 1.0)}) for e in expected_rows + events)
    assert got == expected


def test_dump_parquet(redis_client, tmp_path):
    from recsvc.core.eventfiles import load_events

    events = _events(12)
    _append(redis_client, events)
    result = dump_events(redis_client, tmp_path / "d.parquet", stream=STREAM, batch_size=5)
    assert result.count == 12
    table, report = load_events(tmp_path / "d.parquet", max_bad_fraction=0.0)
    assert len(table) == 12 and report.rows_rejected == 0


def test_dump_into_a_folder_names_the_file(redis_client, tmp_path):
    _append(redis_client, _events(3))
    result = dump_events(redis_client, tmp_path, stream=STREAM)
    assert result.path.parent == tmp_path and result.path.name.startswith("events-")
    assert len(_read_csv(result.path)) == 3


def test_dump_max_events_leaves_the_rest(redis_client, tmp_path):
    events = _events(25)
    _append(redis_client, events)
    first = dump_events(redis_client, tmp_path / "a.csv", stream=STREAM, batch_size=4, max_events=10)
    assert first.count == 10 and first.remaining == 15
    second = dump_events(redis_client, tmp_path / "b.csv", stream=STREAM, batch_size=4)
    assert second.count == 15 and second.remaining == 0
    rows = _read_csv(tmp_path / "a.csv") + _read_csv(tmp_path / "b.csv")
    assert [_key(r) for r in rows] == [_key(e) for e in events]


def test_dump_refuses_existing_output_and_acknowledges_nothing(redis_client, tmp_path):
    _append(redis_client, _events(4))
    (tmp_path / "taken.csv").write_text("precious\n")
    with pytest.raises(DumpError, match="already exists"):
        dump_events(redis_client, tmp_path / "taken.csv", stream=STREAM)
    with pytest.raises(DumpError, match="does not exist"):
        dump_events(redis_client, tmp_path / "no" / "x.csv", stream=STREAM)
    assert (tmp_path / "taken.csv").read_text() == "precious\n"
    assert _length(redis_client) == 4


def test_dump_refuses_to_run_twice_at_once(redis_client, tmp_path):
    _append(redis_client, _events(4))
    redis_client.set(DUMP_LOCK, "someone-else", px=60_000)
    with pytest.raises(DumpLocked):
        dump_events(redis_client, tmp_path / "x.csv", stream=STREAM)
    assert _length(redis_client) == 4 and not (tmp_path / "x.csv").exists()


def _crashing_dump(url: str, out: str, where: str) -> None:
    """Run in a forked child: dump, and die hard (no cleanup at all) at ``where``."""

    def die(*args, **kwargs):
        os._exit(17)

    if where == "before_rename":
        dump._place = die
    else:
        dump._acknowledge_through = die
    client = connect_admin(url)
    dump.dump_events(client, out, stream=STREAM, batch_size=7)
    os._exit(0)


def _crash(url: str, out: Path, where: str) -> None:
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_crashing_dump, args=(url, str(out), where))
    child.start()
    child.join(30)
    assert child.exitcode == 17


def test_crash_before_rename_loses_nothing_and_duplicates_nothing(redis_client, redis_url, tmp_path):
    events = _events(30)
    _append(redis_client, events)
    _crash(redis_url, tmp_path / "crashed.csv", "before_rename")
    assert not (tmp_path / "crashed.csv").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".recsvc-dump-")  # the crash left its temp file
    status = stream_status(redis_client, STREAM)
    assert status["length"] == 30 and status["pending_from_interrupted_dump"] == 30
    assert status["commit_record"] and status["dump_lock_ttl_s"] > 0  # the dead dump's lock

    # Lock of the dead process: it would expire; here we lift it as an operator would after a crash.
    redis_client.delete(DUMP_LOCK)
    more = _events(5, start=1000)
    _append(redis_client, more)
    result = dump_events(redis_client, tmp_path / "next.csv", stream=STREAM, batch_size=7)
    assert result.count == 35 and result.recovered == 0
    # Rows come shard by shard: the two batches were written by users of different groups.
    assert sorted(_key(r) for r in _read_csv(tmp_path / "next.csv")) == sorted(_key(e) for e in events + more)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.csv"]  # temp file cleaned up
    assert _length(redis_client) == 0 and redis_client.get(dump_commit_key(STREAM)) is None


def test_crash_after_rename_is_finished_by_the_next_dump(redis_client, redis_url, tmp_path):
    events = _events(30)
    _append(redis_client, events)
    _crash(redis_url, tmp_path / "first.csv", "after_rename")
    assert [_key(r) for r in _read_csv(tmp_path / "first.csv")] == [_key(e) for e in events]
    assert _length(redis_client) == 30  # written but not yet acknowledged

    redis_client.delete(DUMP_LOCK)
    more = _events(4, start=500)
    _append(redis_client, more)
    result = dump_events(redis_client, tmp_path / "second.csv", stream=STREAM)
    assert result.recovered == 30 and result.count == 4
    assert [_key(r) for r in _read_csv(tmp_path / "second.csv")] == [_key(e) for e in more]
    assert _length(redis_client) == 0 and redis_client.get(dump_commit_key(STREAM)) is None


def test_events_posted_during_a_dump_are_kept_for_the_next(redis_client, tmp_path):
    events = _events(20)
    _append(redis_client, events)
    late = _events(6, start=300)
    posted = []

    def post_once(n):
        if not posted:
            posted.append(_append(redis_client, late))

    first = dump_events(redis_client, tmp_path / "a.csv", stream=STREAM, batch_size=8, on_batch=post_once)
    second = dump_events(redis_client, tmp_path / "b.csv", stream=STREAM)
    rows = _read_csv(tmp_path / "a.csv") + (_read_csv(tmp_path / "b.csv") if second.count else [])
    assert first.count >= 20 and first.count + second.count == 26
    assert sorted(_key(r) for r in rows) == sorted(_key(e) for e in events + late)


def test_cli_dump_and_status(redis_client, redis_url, tmp_path):
    from recsvc.cli import main

    _append(redis_client, _events(9))
    env = {"REDIS_URL": redis_url}
    runner = CliRunner()
    status = runner.invoke(main, ["events", "status"], env=env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["length"] == 9

    out = tmp_path / "cli.csv"
    done = runner.invoke(main, ["events", "dump", "--out", str(out)], env=env)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    assert summary["count"] == 9 and summary["path"] == str(out) and summary["remaining"] == 0
    assert len(_read_csv(out)) == 9

    again = runner.invoke(main, ["events", "dump", "--out", str(out)], env=env)
    assert again.exit_code == 2 and "already exists" in again.output

    redis_client.set(DUMP_LOCK, "x", px=10_000)
    locked = runner.invoke(main, ["events", "dump", "--out", str(tmp_path / "z.csv")], env=env)
    assert locked.exit_code == 4 and "another dump" in locked.output


def test_retraining_on_history_plus_dump_equals_training_on_all_events(redis_client, tmp_path):
    """The dump loses nothing and adds nothing: the model is the one trained on every event directly."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from recsvc.core.artifact import read_artifact
    from training.als import TrainParams
    from training.pipeline import train_model

    columns = ["user_id", "item_id", "event", "timestamp", "order_id", "quantity", "price", "rec_id"]
    history = _events(300, users=12)
    live = _events(120, users=15, start=300)  # three users the history has never seen

    def write(path, events):
        rows = {c: [] for c in columns}
        for e in events:
            for c in columns:
                rows[c].append(e.get(c, "" if c in ("order_id", "rec_id") else None))
        pa_csv.write_csv(pa.table(rows), path)

    write(tmp_path / "history.csv", history)
    write(tmp_path / "everything.csv", history + live)
    _append(redis_client, live)
    dump_events(redis_client, tmp_path / "dump.csv", stream=STREAM, batch_size=50)

    params = TrainParams(factors=4, iterations=3)
    options = dict(params=params, evaluate=False, seed=5, threads=1, show_progress=False)
    a = train_model([tmp_path / "history.csv", tmp_path / "dump.csv"], models_dir=tmp_path / "m1", **options)
    b = train_model([tmp_path / "everything.csv"], models_dir=tmp_path / "m2", **options)
    one, two = read_artifact(a.path), read_artifact(b.path)
    assert one.user_ids == two.user_ids and one.item_ids == two.item_ids
    assert {"u12", "u13"} <= set(one.user_ids)  # users only the dumped events know
    assert (one.interactions != two.interactions).nnz == 0
    assert (one.purchases != two.purchases).nnz == 0
    np.testing.assert_array_equal(one.user_factors, two.user_factors)
    assert a.manifest["trained_until"] == b.manifest["trained_until"]
