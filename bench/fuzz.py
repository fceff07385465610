"""Fuzz the running service against the OpenAPI document it serves (schemathesis).

    .venv/bin/python bench/fuzz.py --base http://127.0.0.1:8000 --api-key KEY [--max-examples 30] [--seed 16]

Runs ``schemathesis run <base>/openapi.json`` (all checks, positive and negative data, every phase:
coverage, fuzzing, stateful) as a subprocess with a fixed seed, reads its NDJSON event log, and
prints / returns a summary: generated cases, HTTP requests sent, answers by status, 5xx answers and
every distinct spec/behaviour mismatch (check code, operation, status, the schemathesis message,
and the request that shows it). Nothing is hidden or filtered: the caller decides what is known.

Without --base it starts its own Redis + sample model + ``recsvc serve`` (bench/harness.py).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

# Checks whose failures are spec/behaviour mismatches (everything schemathesis reports except 5xx).
SERVER_ERROR_CHECK = "not_a_server_error"


@dataclass
class Mismatch:
    check: str  # schemathesis check name, e.g. positive_data_acceptance
    code: str  # ST201...
    operation: str  # e.g. "GET /v1/popular"
    method: str
    path: str
    status: int | None
    message: str
    request: dict = field(default_factory=dict)  # query, headers (keys filtered), body
    answer: str = ""  # the start of the response body (why the service refused, say)


@dataclass
class FuzzResult:
    seed: int
    max_examples: int
    seconds: float
    exit_code: int
    generated: int  # test cases schemathesis generated
    requests: int  # HTTP requests it sent (interactions recorded)
    statuses: dict[str, int]
    server_errors: list[Mismatch]
    mismatches: list[Mismatch]
    operations_tested: int
    report: str  # path of the NDJSON log

    @property
    def n_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) >= 500)

    def by_check(self) -> dict[str, int]:
        return dict(collections.Counter(m.check for m in self.mismatches))

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_5xx"] = self.n_5xx
        d["mismatches_by_check"] = self.by_check()
        return d


def _schemathesis_bin() -> str:
    candidate = Path(sys.executable).parent / "schemathesis"
    return str(candidate) if candidate.exists() else "schemathesis"


def run_fuzz(
    base: str,
    api_key: str | None,
    out_dir: Path,
    max_examples: int = 30,
    seed: int = 16,
    timeout_s: float = 240,
    workers: int = 1,
) -> FuzzResult:
    """Run schemathesis once against ``base`` and summarise its NDJSON log."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ndjson = out_dir / "schemathesis.ndjson"
    ndjson.unlink(missing_ok=True)
    cmd = [
        _schemathesis_bin(),
        "run",
        f"{base}/openapi.json",
        "--checks", "all",
        "--mode", "all",
        "--max-examples", str(max_examples),
        "--seed", str(seed),
        "--generation-deterministic",
        "--workers", str(workers),
        "--request-timeout", "10",
        "--report", "ndjson",
        "--report-ndjson-path", str(ndjson),
        "--no-color",
        "--output-truncate", "true",
    ]  # fmt: skip
    if api_key:
        cmd += ["-H", f"Authorization: Bearer {api_key}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(out_dir / "schemathesis.out", "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=env, cwd=out_dir,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    seconds = time.monotonic() - t0
    if not ndjson.exists():
        raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}); see {out_dir}")
    return parse_ndjson(ndjson, seed, max_examples, seconds, proc.returncode)


def _request_of(case: dict) -> dict:
    req = {k: case.get(k) for k in ("query", "headers", "body", "path_parameters") if case.get(k) is not None}
    return req


def parse_ndjson(path: Path, seed: int, max_examples: int, seconds: float, exit_code: int) -> FuzzResult:
    statuses: collections.Counter = collections.Counter()
    generated = requests = 0
    server_errors: list[Mismatch] = []
    mismatches: list[Mismatch] = []
    seen: set[tuple] = set()
    operations: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            rec = finished.get("recorder") or {}
            cases = rec.get("cases") or {}
            generated += len(cases)
            if cases:
                operations.add(rec.get("label", "?"))
            interactions = rec.get("interactions") or {}
            for cid, inter in interactions.items():
                resp = inter.get("response")
                status = resp.get("status_code") if resp else None
                requests += 1
                statuses[str(status)] += 1
                if status is not None and status >= 500:
                    case = (cases.get(cid) or {}).get("value", {})
                    server_errors.append(
                        Mismatch(
                            SERVER_ERROR_CHECK, "5xx", rec.get("label", "?"), case.get("method", "?"),
                            case.get("path", "?"), status, _body_text(resp), _request_of(case),
                        )
                    )  # fmt: skip
            for cid, checks in (rec.get("checks") or {}).items():
                for check in checks:
                    if check.get("status") != "failure" or check.get("name") == SERVER_ERROR_CHECK:
                        continue
                    info = (check.get("failure_info") or {}).get("failure") or {}
                    case = (cases.get(cid) or {}).get("value", {})
                    resp = (interactions.get(cid) or {}).get("response") or {}
                    message = (info.get("message") or "").strip()
                    key = (
                        check.get("name"),
                        info.get("operation") or rec.get("label"),
                        message.split("\n")[0],
                    )
                    if key in seen:
                        continue
                    seen.add(key)
                    mismatches.append(
                        Mismatch(
                            check.get("name", "?"), info.get("code", "?"),
                            info.get("operation") or rec.get("label", "?"), case.get("method", "?"),
                            case.get("path", "?"), resp.get("status_code"), message, _request_of(case),
                            _body_text(resp) if resp else "",
                        )
                    )  # fmt: skip
    return FuzzResult(
        seed=seed,
        max_examples=max_examples,
        seconds=round(seconds, 1),
        exit_code=exit_code,
        generated=generated,
        requests=requests,
        statuses=dict(sorted(statuses.items())),
        server_errors=server_errors,
        mismatches=mismatches,
        operations_tested=len(operations),
        report=str(path),
    )


def _body_text(resp: dict) -> str:
    content = resp.get("content") or {}
    raw = content.get("$base64")
    if raw:
        return base64.b64decode(raw)[:300].decode("utf-8", "replace")
    return str(content)[:300]


def render(result: FuzzResult) -> str:
    lines = [
        f"schemathesis: {result.generated} cases generated, {result.requests} requests, "
        f"{result.operations_tested} operations, seed {result.seed}, {result.seconds} s",
        f"answers by status: {result.statuses}",
        f"5xx answers: {result.n_5xx}",
        f"spec/behaviour mismatches: {len(result.mismatches)} {result.by_check()}",
    ]
    for m in result.server_errors[:20]:
        lines.append(
            f"  5xx  {m.operation}: {m.status} {m.message[:120]!r} request={json.dumps(m.request)[:200]}"
        )
    for m in result.mismatches:
        first = m.message.split("\n")
        detail = " | ".join(s.strip() for s in first[:3] if s.strip())
        lines.append(f"  {m.code} {m.check:<26} {m.method} {m.path} -> {m.status}: {detail[:160]}")
        lines.append(f"       request {json.dumps(m.request, sort_keys=True)[:200]}  answer {m.answer[:160]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a running service, e.g. http://127.0.0.1:8000 (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("FUZZ_API_KEY"))
    ap.add_argument("--max-examples", type=int, default=30, help="per operation (30 gives > 1,000 cases)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--out", default="bench/results/fuzz", help="report folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.base:
        result = run_fuzz(args.base, args.api_key, out, args.max_examples, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="recsvc-fuzz-") as tmp:
            with fuzz_target(Path(tmp)) as (base, key):
                result = run_fuzz(base, key, out, args.max_examples, args.seed)
    print(render(result))
    (out / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.n_5xx == 0 and not result.mismatches else 1


class fuzz_target:
    """Context manager: its own Redis, a small shop, a published model, ``recsvc serve`` (2 workers)."""

    KEY = "fuzz-key-0123456789abcdef0123456789"

    def __init__(self, workdir: Path, workers: int = 2):
        self.workdir, self.workers = Path(workdir), workers
        self.redis: harness.RedisProc | None = None
        self.service: harness.Service | None = None

    def __enter__(self) -> tuple[str, str]:
        try:
            self.redis = harness.RedisProc(self.workdir / "redis").start()
            env = harness.base_env(self.redis.url, self.workdir, RECSVC_API_KEYS=self.KEY)
            shop = harness.make_shop(self.workdir, env, users=300, items=120)
            harness.recsvc(["publish", shop.version_a], env, self.workdir)
            self.service = harness.Service(env, self.workdir, workers=self.workers, name="fuzz").start()
        except BaseException:
            self.__exit__()
            raise
        return self.service.base, self.KEY

    def __exit__(self, *exc: object) -> None:
        if self.service:
            self.service.stop()
        if self.redis:
            self.redis.stop()


if __name__ == "__main__":
    sys.exit(main())
