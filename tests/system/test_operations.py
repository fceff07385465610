"""Operating a real multi-worker ``recsvc serve``: metrics summed across workers (also across a killed
worker), the JSON request log without keys, start-up warnings, and the embedded Redis restarted by
its owner while the service runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter as Tally
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.system.conftest import KEYS, Target, harness

pytestmark = pytest.mark.faults

REC = "/v1/users/<user_id>/recommendations"


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """3 workers, no gunicorn access log (recsvc's own request log only), a mistyped variable."""
    t = Target(tmp_path_factory.mktemp("ops"), workers=3, RECSVC_API_KEY="a-typo-of-the-keys-variable")
    yield t
    t.stop()


def scrape(target: Target) -> dict[tuple[str, frozenset], float]:
    r = target.http().get("/metrics", harness.bearer(KEYS[0]))
    assert r.status == 200, r.body[:300]
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def served_count(target: Target) -> float:
    labels = frozenset({"endpoint": REC, "method": "GET", "status": "200"}.items())
    return scrape(target).get(("recsvc_http_request_duration_seconds_count", labels), 0.0)


def request_lines(target: Target) -> list[dict]:
    out = []
    for line in target.service.log_text().splitlines():
        if line.startswith("{"):
            body = json.loads(line)
            if body.get("logger") == "recsvc.request":
                out.append(body)
        # Every line of recsvc and gunicorn is JSON here (not a terminal): nothing else is printed
        # by the workers.
    return out


def _load(target: Target, users: list[str], requests: int, threads: int = 6) -> list[int]:
    """``requests`` recommendation requests, each on a new connection (so every worker gets some)."""
    statuses: list[int] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        for i in range(k, requests, threads):
            status, _, _ = harness.http_once(
                target.base, "GET", f"/v1/users/{users[i % len(users)]}/recommendations?n=3"
            )
            with lock:
                statuses.append(status)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return statuses


def test_counters_add_up_across_workers_and_survive_a_killed_worker(ops):
    before = served_count(ops)
    lines_before = len([r for r in request_lines(ops) if r["endpoint"] == REC])
    assert _load(ops, ops.shop.users, 60) == [200] * 60
    # Workers write log lines and counts in batches (RECSVC_LOG_FLUSH_S, RECSVC_METRICS_FLUSH_S):
    # all 60 are out before the kill (a SIGKILL loses what a worker still holds, by design).
    harness.wait_until(
        lambda: len([r for r in request_lines(ops) if r["endpoint"] == REC]) == lines_before + 60,
        10,
        what="the first 60 request lines",
    )
    harness.wait_until(lambda: served_count(ops) - before == 60, 10, what="the first 60 counted")
    victim = ops.service.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    harness.wait_until(
        lambda: victim not in ops.service.worker_pids() and len(ops.service.worker_pids()) == 3,
        30,
        what="a replacement worker",
    )
    assert _load(ops, ops.shop.users, 60) == [200] * 60
    # Every request counted once, whichever worker served it -- the killed one's included.
    harness.wait_until(lambda: served_count(ops) - before >= 120, 10, what="120 counted")
    assert served_count(ops) - before == 120
    harness.wait_until(
        lambda: len([r for r in request_lines(ops) if r["endpoint"] == REC]) >= lines_before + 120,
        10,
        what="120 request lines",
    )
    served = [r for r in request_lines(ops) if r["endpoint"] == REC][lines_before:]
    assert len(served) == 120
    by_worker = Tally(r["pid"] for r in served)
    assert len(by_worker) >= 2 and victim in by_worker, by_worker
    # The dead worker's files were folded into the archive, not left behind.
    metrics_dir = Path(ops.env["RECSVC_VAR_DIR"]) / "run" / f"127.0.0.1-{ops.service.port}" / "metrics"
    files = {p.name for p in metrics_dir.glob("*.db")}
    assert f"counter_{victim}.db" not in files and f"histogram_{victim}.db" not in files
    assert {"counter_archive.db", "histogram_archive.db"} <= files
    assert (metrics_dir.parent / "gunicorn.ctl").exists()  # this instance's own control socket


def test_a_second_server_on_the_same_address_leaves_the_first_ones_metrics_alone(ops):
    harness.http_once(ops.base, "GET", f"/v1/users/{ops.shop.users[0]}/recommendations?n=3")
    harness.wait_until(lambda: served_count(ops) > 0, 10, what="a counted request")
    counted = served_count(ops)
    second = harness.recsvc(
        ["serve", "--host", "127.0.0.1", "--port", str(ops.service.port), "--workers", "1"],
        ops.env,
        ops.workdir,
        timeout_s=60,
        check=False,
    )
    assert second.returncode == 1 and "already serves" in second.stderr, second.stderr[-500:]
    assert served_count(ops) >= counted  # its metric files were not emptied


def test_the_log_is_json_lines_with_one_line_per_request_and_never_a_key(ops):
    key = KEYS[1]
    http = ops.http()
    sends = [
        http.get("/v1/admin/experiments", harness.bearer(key)),
        http.get("/v1/admin/experiments", {"X-API-Key": key}),
        http.get("/v1/admin/experiments", harness.basic(key)),
        http.get(f"/v1/admin/experiments?api_key={key}"),
        http.post_json("/v1/events", {"user_id": key, "note": key}, harness.bearer(key)),
        http.get("/v1/users/nobody/recommendations?n=2", {"X-Request-ID": "ops-probe-1"}),
    ]
    assert all(r.status for r in sends) and sends[-1].status == 200  # answered (codes are not the point)
    probe = harness.wait_until(
        lambda: [r for r in request_lines(ops) if r.get("request_id") == "ops-probe-1"], 10, what="log line"
    )[0]
    assert probe["endpoint"] == REC and probe["status"] == 200 and probe["source"] == "fallback"
    assert probe["reason"] == "unknown_user" and probe["model_version"] == ops.shop.version_a
    assert probe["latency_ms"] > 0 and probe["level"] == "info"
    text = ops.service.log_text()
    assert key not in text
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)
    # Start-up warned once (by the command line) about the mistyped variable, with a suggestion.
    assert text.count("RECSVC_API_KEY is not a recsvc setting (did you mean RECSVC_API_KEYS?)") == 1


def test_the_embedded_redis_is_restarted_while_the_service_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("embedded")
    env = harness.base_env("unused", workdir, RECSVC_API_KEYS=KEYS[0])
    del env["REDIS_URL"]  # the embedded server, owned by one process
    service = None
    try:
        shop = harness.make_shop(workdir, env, users=200, items=60)
        harness.recsvc(["publish", shop.version_a], env, workdir)
        service = harness.Service(env, workdir, workers=2, name="embedded").start(ready="ready")
        state = json.loads(harness.recsvc(["redis", "status", "--json"], env, workdir).stdout)
        assert state["mode"] == "embedded" and state["running"] and state["restarts"] == 0
        http = harness.Http(service.base)
        path = f"/v1/users/{shop.users[0]}/recommendations?n=3"
        assert http.get(path).json()["source"] == "personalized"

        os.kill(state["redis_pid"], signal.SIGKILL)
        seen: list[tuple[int, str | None, str | None]] = []

        def recovered() -> bool:
            r = http.get(path)
            body = r.json() or {}
            seen.append((r.status, body.get("source"), body.get("reason")))
            return r.status == 200 and body.get("source") == "personalized" and len(seen) > 1

        harness.wait_until(recovered, 30, interval_s=0.02, what="answers from the restarted Redis")
        assert (200, "fallback", "redis_unavailable") in seen, seen[:5]
        assert all(status == 200 for status, _, _ in seen)
        after = json.loads(harness.recsvc(["redis", "status", "--json"], env, workdir).stdout)
        assert after["restarts"] == 1 and after["owner_pid"] == state["owner_pid"]
    finally:
        if service is not None:
            service.stop()
        stopped = harness.recsvc(["redis", "stop"], env, workdir, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert harness.recsvc(["redis", "status"], env, workdir, check=False).returncode == 1
