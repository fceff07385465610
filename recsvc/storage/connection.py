"""Redis clients with explicit timeouts and bounded retries: a slow Redis must never hang a request.

``REDIS_URL`` names one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster:
``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS). Any
reachable node of the cluster is enough; the client discovers the others. Every component gets
the same kind of client from :func:`connect`, and the key layout (:mod:`recsvc.storage.keys`)
keeps every multi-key operation in one slot, so the same code runs on both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, SlotNotCoveredError

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


def connect(url: str, config: Config | None = None, **kwargs: Any) -> redis.Redis:
    """A client with explicit timeouts and bounded retries (never hang the storefront).

    A ``redis+cluster://`` URL gives a cluster client (:class:`LazyCluster` around
    :class:`redis.cluster.RedisCluster`); it offers the command API of :class:`redis.Redis`, which
    is the type the rest of the code is written against.
    """
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    config = config or Config()
    options: dict[str, Any] = dict(
        socket_timeout=config.redis.socket_timeout_s,
        socket_connect_timeout=config.redis.connect_timeout_s,
        retry=Retry(ConstantBackoff(0.01), config.redis.retries),
    )
    options.update(kwargs)
    if is_cluster_url(url):
        nodes, url_options = cluster_nodes(url)
        options.update(url_options)

        def build() -> RedisCluster:
            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes], **options)

        return cast("redis.Redis", LazyCluster(build))
    options.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    options.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **options)


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
