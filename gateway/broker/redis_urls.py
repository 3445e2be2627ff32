"""Redis deployments the gateway can use, named by one URL: a single server, Sentinel or Cluster.

Owns: parsing ``redis_url`` into a :class:`RedisTarget` and building redis-py clients for it. Used
by the broker (:mod:`gateway.broker.redis`), presence and ``chat-gateway check``.

URL forms (``[user:password@]`` and ``?option=value`` as in redis-py's own URLs):

- ``redis://host:port/db``, ``rediss://…``, ``unix:///path?db=0`` — one server (redis-py's forms);
- ``redis+sentinel://host:port,host:port/<service>[/db]`` (``rediss+sentinel://`` for TLS to the
  data nodes): the Sentinels to ask, and the name of the monitored primary (the ``mymaster`` of
  ``sentinel monitor mymaster …``). The user and password are the data nodes'; the Sentinels' own
  are the query options ``sentinel_username`` and ``sentinel_password``. Port defaults to 26379;
- ``redis+cluster://host:port,host:port[/0]`` (``rediss+cluster://`` for TLS): any reachable nodes of
  a Redis Cluster (seeds; the rest is discovered from ``CLUSTER SLOTS``). Port defaults to 6379.
  A cluster has only database 0.

The ``+sentinel`` / ``+cluster`` schemes are what Celery/Kombu and several Redis clients use for a
multi-host URL; redis-py's ``RedisCluster.from_url`` takes a single seed, and one setting that names
the whole deployment keeps ``GATEWAY_REDIS_URL`` the only thing an operator changes.

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel

Kind = Literal["single", "sentinel", "cluster"]
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
URL_SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


class RedisUrlError(ValueError):
    """``redis_url`` is not a URL of a form listed in the module docstring."""


@dataclass(frozen=True)
class RedisTarget:
    """One Redis deployment: what kind, where, and the connection options of its data nodes."""

    kind: Kind
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    """Sentinels (sentinel) or seed nodes (cluster); empty for a single server."""
    service: str = ""
    """The Sentinel service name of the primary."""
    options: dict[str, Any] = field(default_factory=dict)
    """redis-py connection keyword arguments for the data nodes (credentials, db, TLS, URL options)."""
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    @property
    def display(self) -> str:
        """Where it is, without credentials (for logs)."""
        if self.kind == "single":
            opts = self.options
            return str(opts.get("path") or f"{opts.get('host', 'localhost')}:{opts.get('port', 6379)}")
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"sentinel {hosts} service {self.service}" if self.kind == "sentinel" else f"cluster {hosts}"


def _split_hosts(netloc: str, default_port: int, url: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    userinfo, _, hostlist = netloc.rpartition("@")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise RedisUrlError(f"bad port in {item!r} of {redact(url)}") from None
        if not host or not 0 < port < 65536:
            raise RedisUrlError(f"bad host:port {item!r} in {redact(url)}")
        hosts.append((unquote(host), port))
    if not hosts:
        raise RedisUrlError(f"{redact(url)} names no host")
    return userinfo, tuple(hosts)


def parse_redis_url(url: str) -> RedisTarget:
    """The deployment ``url`` names; raises :class:`RedisUrlError` if it names none."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in URL_SCHEMES:
        raise RedisUrlError(f"redis_url must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}")
    if scheme in SINGLE_SCHEMES:
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise RedisUrlError(f"{redact(url)}: {exc}") from None
        return RedisTarget("single", url, options=options)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    kind: Kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    userinfo, hosts = _split_hosts(netloc, 26379 if kind == "sentinel" else 6379, url)
    parts = [unquote(p) for p in path.split("/") if p]
    params = parse_qs(query)
    sentinel_options = {k: params.pop(k)[0] for k in _SENTINEL_OPTIONS if k in params}
    service = ""
    if kind == "sentinel":
        if not parts or len(parts) > 2:
            raise RedisUrlError(f"{redact(url)}: the path must be /<service>[/db], e.g. /mymaster")
        service = parts[0]
        db = parts[1] if len(parts) == 2 else "0"
    else:
        if len(parts) > 1 or (parts and parts[0] != "0"):
            raise RedisUrlError(f"{redact(url)}: a Redis Cluster has only database 0")
        db = "0"
    # redis-py parses credentials, TLS and query options of a one-host URL; reuse it for the data nodes.
    base = "rediss" if scheme.startswith("rediss") else "redis"
    host0, port0 = hosts[0]
    single = (f"{base}://{userinfo + '@' if userinfo else ''}{quote(host0, safe=':')}:{port0}/{db}"
              f"{'?' + urlencode(params, doseq=True) if params else ''}")
    try:
        options = dict(parse_url(single))
    except ValueError as exc:
        raise RedisUrlError(f"{redact(url)}: {exc}") from None
    for key in ("host", "port"):
        options.pop(key, None)
    return RedisTarget(kind, url, hosts, service, options, sentinel_options)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostpart = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostpart}{slash}{tail}"


def _cluster_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as RedisCluster keyword arguments (it takes ``ssl=True``, not a connection class)."""
    kwargs = dict(options)
    connection_class = kwargs.pop("connection_class", None)
    if connection_class is not None and issubclass(connection_class, SSLConnection):
        kwargs["ssl"] = True
    kwargs.pop("db", None)
    for key in ("max_connections", "timeout", "path"):
        kwargs.pop(key, None)
    return kwargs


def cluster_client(target: RedisTarget, **overrides: Any) -> RedisCluster:
    """A redis-py cluster client seeded with the URL's hosts (slot map and node discovery are its own)."""
    kwargs = _cluster_kwargs(target.options)
    kwargs.update(overrides)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], **kwargs)


def sentinel_manager(target: RedisTarget, *, timeout_s: float) -> Sentinel:
    """A redis-py Sentinel manager for ``target`` (discovers the current primary)."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if "sentinel_username" in target.sentinel_options:
        sentinel_kwargs["username"] = target.sentinel_options["sentinel_username"]
    if "sentinel_password" in target.sentinel_options:
        sentinel_kwargs["password"] = target.sentinel_options["sentinel_password"]
    kwargs = {k: v for k, v in target.options.items() if k not in ("max_connections", "timeout", "path")}
    connection_class = kwargs.pop("connection_class", None)
    if connection_class is not None and issubclass(connection_class, SSLConnection):
        kwargs["ssl"] = True
    return Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call]


def data_client(target: RedisTarget, *, timeout_s: float) -> Redis | RedisCluster:
    """A general-purpose client for keys (presence, ``check``): the primary, or the whole cluster."""
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if target.kind == "cluster":
        return cluster_client(target, **timeouts)
    if target.kind == "sentinel":
        client: Redis = sentinel_manager(target, timeout_s=timeout_s).master_for(target.service, **timeouts)
        return client
    return Redis.from_url(target.url, **timeouts)
