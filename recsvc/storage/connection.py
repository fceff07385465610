"""Redis clients with explicit timeouts and bounded retries: a slow Redis must never hang a request.

``REDIS_URL`` names one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster:
``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS). Any
reachable node of the cluster is enough; the client discovers the others. Every component gets
the same kind of client from :func:`connect`, and the key layout (:mod:`recsvc.storage.keys`)
keeps every multi-key operation in one slot, so the same code runs on both.

A client can report every round trip (command name, seconds, error or None) to an observer -- the
service's metrics -- without this package knowing what is done with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
)

from recsvc.core.config import Config

#: Redis failures that mean "unreachable or too slow" (serve a fallback), as opposed to bugs. A
#: cluster adds its own: a cluster marked down or redirecting too often, a slot without a master.
#: Cross-slot errors are bugs of the key layout and stay out of this list.
REDIS_DOWN_ERRORS: tuple[
    type[redis.ConnectionError],
    type[redis.TimeoutError],
    type[OSError],
    type[ClusterError],
    type[SlotNotCoveredError],
] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    ClusterError,
    SlotNotCoveredError,
)

#: Called after each round trip: ``(command, seconds, error or None)``.
Observer = Callable[[str, float, BaseException | None], None]


def _observed_call(observer: Observer, command: str, call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        result = call()
    except NoScriptError:
        # A script's first EVALSHA on a server: the client loads it and retries; not a failure.
        observer(command, time.perf_counter() - started, None)
        raise
    except BaseException as e:
        observer(command, time.perf_counter() - started, e)
        raise
    observer(command, time.perf_counter() - started, None)
    return result


class ObservedRedis(redis.Redis):
    """A client that reports each command and each pipeline (one round trip) to ``observer``."""

    observer: Observer

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return _observed_call(
            self.observer, str(args[0]), lambda: super(ObservedRedis, self).execute_command(*args, **options)
        )

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = ObservedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.observer = self.observer
        return pipe


class ObservedPipeline(Pipeline):
    """A pipeline whose ``execute`` (one round trip: ``MULTI`` or ``PIPELINE``) is reported."""

    observer: Observer

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        # `transaction` is an attribute of a pipeline but a method of the client class it extends.
        command = "MULTI" if vars(self).get("transaction") or self.explicit_transaction else "PIPELINE"
        return _observed_call(
            self.observer, command, lambda: super(ObservedPipeline, self).execute(raise_on_error)
        )


class Cluster(RedisCluster):
    """redis-py's cluster client, retrying as :func:`connect` retries a single server: a broken
    connection or a moved slot map, never a timeout (a timed-out write may still run when Redis
    wakes, and a slow cluster would cost the request the timeout twice)."""

    # redis-py types this as its own four errors; ours leaves TimeoutError out.
    ERRORS_ALLOW_RETRY = (redis.ConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

    #: Told about every command and pipeline when set (see :data:`Observer`).
    observer: Observer | None = None

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.observer is None:
            return super().execute_command(*args, **kwargs)
        return _observed_call(
            self.observer, str(args[0]), lambda: super(Cluster, self).execute_command(*args, **kwargs)
        )

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        observer = self.observer
        if observer is not None:
            run = pipe.execute
            command = "MULTI" if transaction else "PIPELINE"

            def execute(raise_on_error: bool = True) -> list[Any]:
                return cast("list[Any]", _observed_call(observer, command, lambda: run(raise_on_error)))

            pipe.execute = execute
        return pipe


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str | None) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return bool(url) and urlsplit(str(url)).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Startup nodes and connection options of a cluster URL.

    Raises
    ------
    ValueError
        Not a cluster URL, no node, a port that is not a number, or a database other than 0
        (a cluster has only database 0).
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (expected redis+cluster://host:port,...): {url!r}")
    netloc = parts.netloc
    options: dict[str, Any] = {}
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    nodes = []
    for item in filter(None, (n.strip() for n in netloc.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"REDIS_URL: cluster node {item!r} must be host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"REDIS_URL: no cluster node in {url!r}")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    if parts.scheme == "rediss+cluster":
        options["ssl"] = True
    return nodes, options


class LazyCluster:
    """A :class:`RedisCluster` built on first use, so a service starts while the cluster is down.

    ``RedisCluster`` asks a node for the slot map in its constructor; a single-node client only
    connects when a command runs. This wrapper gives the cluster the single-node behaviour: until
    a node answers, every command raises :class:`redis.ConnectionError` (a fallback, not a crash),
    and the next command tries again.
    """

    def __init__(self, factory: Callable[[], RedisCluster]):
        self._factory = factory
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> RedisCluster:
        """The connected cluster client (raises :class:`redis.ConnectionError` while unreachable)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except RedisClusterException as e:
                        raise redis.ConnectionError(f"Redis Cluster unreachable: {e}") from e
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def connect(
    url: str, config: Config | None = None, *, observer: Observer | None = None, **kwargs: Any
) -> redis.Redis:
    """A client with explicit timeouts and bounded retries (never hang the storefront).

    A ``redis+cluster://`` URL gives a cluster client (:class:`LazyCluster` around
    :class:`Cluster`); it offers the command API of :class:`redis.Redis`, which is the type the
    rest of the code is written against.

    Parameters
    ----------
    url : str
        ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://`` or ``rediss+cluster://`` URL.
    config : Config, optional
        Timeouts and retries (``config.redis``); the defaults when None.
    observer : callable, optional
        Told about every round trip (see :data:`Observer`).
    """
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    config = config or Config()
    options: dict[str, Any] = dict(
        socket_timeout=config.redis.socket_timeout_s,
        socket_connect_timeout=config.redis.connect_timeout_s,
        # Retry a broken connection (a pooled socket that a Redis restart closed), never a timeout:
        # a slow Redis would cost the request the timeout twice (the fallback is the answer then),
        # and a timed-out write may still run when Redis wakes -- repeating it runs it twice.
        retry=Retry(ConstantBackoff(0.01), config.redis.retries, supported_errors=(redis.ConnectionError,)),
    )
    options.update(kwargs)
    if is_cluster_url(url):
        nodes, url_options = cluster_nodes(url)
        options.update(url_options)

        def build() -> RedisCluster:
            cluster = Cluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes], **options)
            cluster.observer = observer
            return cluster

        return cast("redis.Redis", LazyCluster(build))
    options.setdefault("health_check_interval", 30)
    if observer is None:
        return redis.Redis.from_url(url, **options)
    client = cast(ObservedRedis, ObservedRedis.from_url(url, **options))
    client.observer = observer
    return client


def connect_admin(url: str) -> redis.Redis:
    """A client for batch work (publish, dump, retrain): generous timeouts, same retries."""
    return connect(url, socket_timeout=30.0, socket_connect_timeout=5.0)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, LazyCluster | RedisCluster)


def node_clients_for(client: Any, keys: Iterable[bytes | str]) -> list[redis.Redis]:
    """The single-node client that serves each of ``keys`` (the client itself off a cluster).

    For commands written straight to a node's connection (the publish writer): on a cluster each
    key goes to the master that owns its slot.
    """
    if not is_cluster(client):
        return [client for _ in keys]
    cluster = client.cluster if isinstance(client, LazyCluster) else client
    out = []
    for key in keys:
        node = cluster.get_node_from_key(key)
        out.append(cluster.get_redis_connection(node))
    return out


def masters(client: Any) -> list[redis.Redis]:
    """One single-node client per master (the client itself off a cluster)."""
    if not is_cluster(client):
        return [client]
    cluster = client.cluster if isinstance(client, LazyCluster) else client
    return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]
