"""The Redis broker: nodes share publications through Redis Pub/Sub (one server, Sentinel or Cluster).

Owns: the node's Redis connections and their supervision. Publishing goes through a small blocking
pool of ordinary connections (PUBLISH, or SPUBLISH for sharded channels; bounded by ``timeout_s``,
failures raise :class:`BrokerUnavailable`); on a Redis Cluster through redis-py's ``RedisCluster``
(slot map, node discovery, MOVED handling), under Sentinel to the primary Sentinel names (asked again
after a failure). Receiving goes through the *listener container*, which this module drives itself
instead of redis-py's ``PubSub``/``ClusterPubSub`` helpers (whose auto-reconnect has lost
subscriptions, redis-py #2089 and #2417, and which report neither a reconnect nor a moved slot, so a
gap would go unnoticed):

- subscriptions are placed on *shards*, one pub/sub connection (a *link*) each: the ``main`` link
  carries classic channels and patterns (the only link on a single server or under Sentinel; on a
  cluster it connects to any node, since classic Pub/Sub is broadcast cluster-wide); with sharded
  Pub/Sub on a cluster, every primary that owns the slot of a room channel this node needs gets a link
  of its own that SSUBSCRIBEs those channels, one command per slot;
- per link, a supervisor task connects, (re)subscribes everything placed on it, and on any failure
  disconnects and retries with exponential back-off (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``, reset after a successful connection);
- per link, a reader task parses every reply in order and calls ``on_publication`` synchronously; it
  never awaits anything but the socket, so a slow WebSocket can never make Redis drop this node as a
  slow subscriber;
- per link, a control loop applies subscribe/unsubscribe requests and PINGs the connection after
  ``health_check_s`` of silence; no reply within ``timeout_s`` means the connection is dead (a hung
  Redis or a silently dropped TCP connection);
- on a cluster, a router task re-reads the slot map (redis-py's ``NodesManager``) whenever a link
  saw a sign of change — a lost connection, a ``MOVED``/``ASK`` reply to SSUBSCRIBE, or a
  ``sunsubscribe`` Redis pushes by itself when a slot leaves the node (resharding, failover) — and
  moves each sharded subscription to the primary that owns its slot now;
- a subscription that may have missed publications (its link dropped, it moved to another primary,
  or ``subscribe()`` returned before Redis confirmed it) is a *gap*: once Redis confirms it again,
  ``on_gap`` gets the destinations it serves. Pub/Sub is at-most-once and anything published
  meanwhile is gone; the chat layer repairs from the database.

Delivery: every node, the publisher included, receives each publication exactly once through Redis
(a chat node also delivers its own room messages locally at once; its sequencer drops the copy that
comes back by ``seq``). Publishing pipelines a batch of commands in one round trip (on a cluster, one
per primary). When several Redis subscriptions of this node match one message (a room channel and a
pattern), Redis sends one copy per subscription; only the copy of one canonical subscription is used,
decided from the subscription state confirmed in-band, so the result is exact. Decoded publications
are delivered only if the node is subscribed to their destination (exactly or by Ant pattern).

Metrics: ``chat_gateway_redis_reconnects_total`` counts the pub/sub connections made again after
one was lost or failed (:mod:`gateway.metrics`).

Channel naming lives in :mod:`gateway.broker.channels`, URL forms in
:mod:`gateway.broker.redis_urls`. Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, RedisError

from gateway.broker.base import (
    BrokerUnavailable,
    GapHandler,
    Publication,
    PublicationHandler,
    RoomPayloadReader,
)
from gateway.broker.channels import ChannelMapper, RedisSubscription, SpringChannelMapper, glob_matches
from gateway.broker.redis_urls import RedisTarget, cluster_client, parse_redis_url, sentinel_manager
from gateway.metrics import REDIS_RECONNECTS
from gateway.settings import default

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.1
SUBSCRIBE_CHUNK = 1000
"""Most channels named in one SUBSCRIBE/UNSUBSCRIBE command."""
YIELD_EVERY = 64
"""The reader yields to the event loop after this many messages read without waiting."""
MAIN = "main"
"""The shard key of the classic link: the only one on a single server or Sentinel, and on a cluster
the connection (to any node) that carries classic channels and patterns."""
REFRESH_MIN_S = 0.2
"""Shortest interval between two slot-map refreshes of a cluster (bounds a MOVED loop)."""
DOWN_REFRESH_S = 1.0
"""Slot-map refresh interval while a cluster primary's link is down (to find a promoted replica)."""


def backoff_delays(first: float, maximum: float) -> Iterator[float]:
    """Reconnect delays: ``first``, doubling, capped at ``maximum`` (forever)."""
    delay = min(first, maximum)
    while True:
        yield delay
        delay = min(delay * 2, maximum)


def channel_slot(name: str) -> int:
    """The cluster hash slot of a channel name (hash tags count, as for keys)."""
    return key_slot(name.encode("utf-8", "surrogateescape"))


class _ConnectionLost(Exception):
    """The pub/sub connection is gone or unresponsive."""


@dataclass(eq=False)
class _Shard:
    """Where a group of subscriptions lives: the classic link, or one cluster primary's sharded link."""

    key: str
    address: tuple[str, int] | None = None
    """A cluster primary; None = resolved on every connect (single server, Sentinel, any cluster node)."""
    subs: set[RedisSubscription] = field(default_factory=set)
    link: _Link | None = None
    task: asyncio.Task[None] | None = None
    connected_to: str = ""
    down: bool = False
    """The last connection attempt failed or the connection was lost (False while first connecting)."""


@dataclass(eq=False)
class _Link:
    """One pub/sub connection and what Redis has confirmed on it (reset on every reconnect)."""

    conn: AbstractConnection
    shard: _Shard
    where: str = ""
    sent: set[RedisSubscription] = field(default_factory=set)
    pending: Counter[RedisSubscription] = field(default_factory=Counter)
    channels: set[str] = field(default_factory=set)
    shard_channels: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)
    refused: set[RedisSubscription] = field(default_factory=set)
    """Sharded subscriptions this node refused (MOVED) or dropped (``sunsubscribe`` push): not re-sent
    here until the slot map has been read again."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    ready: bool = False
    last_rx: float = 0.0
    ping_sent_at: float | None = None

    def held(self, sub: RedisSubscription) -> set[str]:
        if sub.is_pattern:
            return self.patterns
        return self.shard_channels if sub.sharded else self.channels

    def confirmed(self, sub: RedisSubscription) -> bool:
        return sub.name in self.held(sub) and not self.pending[sub]


class RedisBroker:
    """A :class:`~gateway.broker.base.Broker` over Redis Pub/Sub (see the module docstring)."""

    def __init__(self, url: str, *, node_id: str, channel_mapper: ChannelMapper,
                 reconnect_min_s: float = RECONNECT_MIN_S,
                 reconnect_max_s: float = default("redis_reconnect_max_s"),
                 timeout_s: float = default("redis_timeout_s"),
                 health_check_s: float = default("redis_health_check_s"),
                 pool_size: int = default("redis_pool_size")) -> None:
        if min(reconnect_min_s, reconnect_max_s, timeout_s, health_check_s) <= 0 or pool_size < 1:
            raise ValueError("Redis broker delays, timeouts and pool size must be positive")
        self.url = url
        self.target: RedisTarget = parse_redis_url(url)
        self.node_id = node_id
        self.mapper = channel_mapper
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.timeout_s = timeout_s
        self.health_check_s = health_check_s
        self.pool_size = pool_size
        self._handler: PublicationHandler | None = None
        self._gap_handler: GapHandler | None = None
        # The destinations (and patterns) the node holds on the bus: the hub subscribes a destination
        # once, at its first local subscriber, and unsubscribes after its last (the hub's registry
        # owns who is subscribed; this is only the bus side). A Redis subscription can serve several
        # destinations (one channel in ``single`` mode, a pattern), hence the counts in _wanted.
        self._destinations: set[str] = set()
        self._wanted: Counter[RedisSubscription] = Counter()
        self._routes: dict[RedisSubscription, str] = {}
        self._unrouted: set[RedisSubscription] = set()
        self._shards: dict[str, _Shard] = {MAIN: _Shard(MAIN)}
        self._gap_subs: set[RedisSubscription] = set()
        self._started = False
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._router: asyncio.Task[None] | None = None
        self._topology_dirty = asyncio.Event()
        self._cluster_initialized = False
        self._map_failing = False
        self._main_rotation = 0
        self._client: Redis | RedisCluster | None = None
        self._pool: BlockingConnectionPool | None = None
        self._sentinel: Sentinel | None = None
        self._publish_address: tuple[str, int] | None = None
        self._publish_stale = True
        self.connections = 0
        """Pub/sub connections established so far, over all shards (the first one included)."""
        self.undecodable = 0
        """Messages received on a subscribed channel that were not a publication of ours."""
        self.reroutes = 0
        """Sharded subscriptions moved to another cluster primary (resharding or failover)."""
        self.redirects = 0
        """MOVED/ASK replies to SSUBSCRIBE (the slot map this node had was stale)."""

    @classmethod
    def from_settings(cls, settings: Settings, room_reader: RoomPayloadReader | None = None) -> RedisBroker:
        if settings.redis_url is None:
            raise ValueError("redis_url is not set")
        return cls(settings.redis_url, node_id=settings.node_id,
                   channel_mapper=SpringChannelMapper.from_settings(settings, room_reader),
                   reconnect_max_s=settings.redis_reconnect_max_s, timeout_s=settings.redis_timeout_s,
                   health_check_s=settings.redis_health_check_s, pool_size=settings.redis_pool_size)

    @property
    def cluster(self) -> bool:
        return self.target.kind == "cluster"

    # --- Broker protocol -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Every needed link is connected with its subscriptions confirmed, and none is unplaced."""
        if not self._started or self._unrouted:
            return False
        for shard in self._shards.values():
            link = shard.link
            if link is None or not link.ready or link.refused:
                return False
        return True

    async def start(self, on_publication: PublicationHandler, on_gap: GapHandler | None = None) -> None:
        """Connect; returns once subscribed, or after ``timeout_s`` with the supervisors still trying."""
        if self._started:
            raise RuntimeError("the Redis broker is already started")
        self._started = True
        self._handler = on_publication
        self._gap_handler = on_gap
        self._gap_subs.clear()
        self._publish_stale = True
        kind = self.target.kind
        if kind == "cluster":
            self._client = cluster_client(
                self.target, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                max_connections=max(self.pool_size, 2), client_name=f"gateway:{self.node_id}:publish",
                protocol=2, decode_responses=False)
            self._topology_dirty.set()
            self._router = asyncio.create_task(self._route_loop(), name=f"redis-router-{self.node_id}")
        elif kind == "sentinel":
            self._sentinel = sentinel_manager(self.target, timeout_s=self.timeout_s)
        else:
            self._make_pool(None)
        for shard in list(self._shards.values()):
            shard.down = False
            self._start_shard(shard)
        await self._wait(lambda: self.healthy, self.timeout_s)
        if not self.healthy:
            log.warning("Redis at %s not reachable yet; node %s keeps retrying", self.target.display, self.node_id)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._handler = None
        self._gap_handler = None
        tasks = [t for t in (self._router, *(s.task for s in self._shards.values()), *self._tasks)
                 if t is not None]
        self._router = None
        for shard in self._shards.values():
            shard.task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._notify()
        await self._close_publisher()
        self._sentinel = None
        self._cluster_initialized = False

    async def subscribe(self, destination: str) -> None:
        """Want ``destination``; while connected, returns once Redis confirmed the subscription."""
        subs = self.mapper.subscriptions(destination)
        if destination not in self._destinations:
            self._destinations.add(destination)
            for sub in subs:
                self._wanted[sub] += 1
                if self._wanted[sub] == 1:
                    self._place(sub)
        if not self._started:
            return
        for sub in subs:
            link = self._link_of(sub)
            if link is not None:
                link.wake.set()

        def settled_one(sub: RedisSubscription) -> bool:
            """Confirmed, or known not to be confirmable now (its link or the slot map is down)."""
            key = self._routes.get(sub)
            shard = self._shards.get(key) if key is not None else None
            if shard is None:
                return self._map_failing
            if shard.link is None:
                return shard.down
            return shard.link.confirmed(sub)

        def settled() -> bool:
            return all(settled_one(sub) for sub in subs)

        await self._wait(settled, self.timeout_s)
        unconfirmed = {sub for sub in subs if not self._confirmed(sub) and self._wanted[sub] > 0}
        if unconfirmed:
            # Anything published before the subscription takes effect is missed: report it as a gap.
            self._gap_subs |= unconfirmed
            if not settled():
                log.warning("Redis did not confirm the subscription to %s in %.1f s", destination, self.timeout_s)
            for sub in unconfirmed:
                link = self._link_of(sub)
                if link is not None:
                    self._flush_gaps(link)

    async def unsubscribe(self, destination: str) -> None:
        if destination not in self._destinations:
            return
        self._destinations.discard(destination)
        for sub in self.mapper.subscriptions(destination):
            self._wanted[sub] -= 1
            if self._wanted[sub] <= 0:
                del self._wanted[sub]
                self._gap_subs.discard(sub)
                self._displace(sub)

    async def publish(self, publication: Publication) -> None:
        await self.publish_many((publication,))

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        """(S)PUBLISH every publication, in order, in one pipelined round trip (one per shard on a cluster)."""
        if not self._started:
            raise BrokerUnavailable("the Redis broker is not started")
        if not publications:
            return
        mapper = self.mapper
        commands = []
        for pub in publications:
            channel, payload = mapper.encode(pub if pub.origin else replace(pub, origin=self.node_id))
            commands.append(("SPUBLISH" if mapper.is_sharded(channel) else "PUBLISH", channel, payload))
        try:
            async with asyncio.timeout(self.timeout_s):
                client = await self._publisher()
                if len(commands) == 1:
                    await client.execute_command(*commands[0])
                else:
                    async with client.pipeline(transaction=False) as pipe:
                        for command in commands:
                            pipe.execute_command(*command)
                        await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._publish_stale = True
            raise BrokerUnavailable(f"publishing to Redis at {self.target.display} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        """One PING through the publishing client (every primary of a cluster), within ``timeout_s``."""
        if not self._started:
            return False
        try:
            async with asyncio.timeout(self.timeout_s):
                client = await self._publisher()
                if isinstance(client, RedisCluster):  # the primaries; a lost replica does not stop the bus
                    return bool(await client.execute_command("PING", target_nodes=RedisCluster.PRIMARIES))
                return bool(await client.ping())
        except (RedisError, OSError, TimeoutError, BrokerUnavailable):
            self._publish_stale = True
            return False

    # --- introspection ---------------------------------------------------------------------------

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern this node is subscribed to."""
        return frozenset(self._destinations)

    def links(self) -> dict[str, str]:
        """Shard key -> the address its pub/sub connection is connected to ('' while down)."""
        return {key: shard.connected_to if shard.link is not None else "" for key, shard in self._shards.items()}

    # --- publishing clients --------------------------------------------------------------------------

    def _make_pool(self, address: tuple[str, int] | None) -> None:
        kwargs = self._connection_kwargs(f"gateway:{self.node_id}:publish", socket_timeout=self.timeout_s)
        if address is not None:
            kwargs.update(host=address[0], port=address[1])
        self._pool = BlockingConnectionPool(max_connections=self.pool_size, timeout=self.timeout_s, **kwargs)
        self._client = Redis(connection_pool=self._pool)
        self._publish_address = address

    async def _publisher(self) -> Redis | RedisCluster:
        """The client to publish with; under Sentinel, re-asks for the primary after a failure."""
        if self._sentinel is not None and (self._client is None or self._publish_stale):
            address = await self._sentinel.discover_master(self.target.service)
            if address != self._publish_address:
                await self._close_publisher()
                self._make_pool(address)
        self._publish_stale = False
        if self._client is None:
            raise BrokerUnavailable("the Redis broker is not started")
        return self._client

    async def _close_publisher(self) -> None:
        client, pool = self._client, self._pool
        self._client = self._pool = None
        self._publish_address = None
        with contextlib.suppress(Exception):  # TimeoutError included: closing must not hang a shutdown
            async with asyncio.timeout(self.timeout_s):
                if client is not None:
                    await client.aclose()
                if pool is not None:
                    await pool.disconnect()

    # --- connections -------------------------------------------------------------------------------

    def _connection_kwargs(self, client_name: str, *, socket_timeout: float | None) -> dict[str, Any]:
        kwargs = dict(self.target.options)
        kwargs.update(
            socket_timeout=socket_timeout, socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_error=[], health_check_interval=0,
            client_name=client_name, protocol=2, decode_responses=False)
        kwargs.pop("max_connections", None)  # pool options a URL may carry; ours win
        kwargs.pop("timeout", None)
        return kwargs

    async def _resolve(self, shard: _Shard) -> tuple[str, int] | None:
        """Where ``shard`` connects now (None: the URL's single server)."""
        if shard.address is not None:
            return shard.address
        if self._sentinel is not None:
            host, port = await self._sentinel.discover_master(self.target.service)
            return str(host), int(port)
        if self.cluster:
            candidates = list(self.target.hosts)
            client = self._client
            if isinstance(client, RedisCluster) and self._cluster_initialized:
                known = [(n.host, int(n.port)) for n in client.get_primaries()]
                candidates = known + [h for h in candidates if h not in known]
            self._main_rotation += 1
            return candidates[self._main_rotation % len(candidates)]
        return None

    async def _connect(self, shard: _Shard) -> _Link:
        address = await self._resolve(shard)
        kwargs = self._connection_kwargs(f"gateway:{self.node_id}:pubsub", socket_timeout=None)
        if address is not None:
            kwargs.update(host=address[0], port=address[1])
            kwargs.pop("path", None)
        connection_class: type[AbstractConnection] = kwargs.pop("connection_class", Connection)
        conn = connection_class(**kwargs)
        where = f"{address[0]}:{address[1]}" if address is not None else self.target.display
        link = _Link(conn, shard, where)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            if self._sentinel is not None:
                await conn.send_command("ROLE", check_health=False)
                role = await conn.read_response()
                if not (isinstance(role, list) and role and role[0] == b"master"):
                    raise _ConnectionLost(f"{where} is not the primary (Sentinel failover under way)")
        except BaseException:
            await self._close(conn)
            raise
        return link

    @staticmethod
    async def _close(conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except Exception:
            log.debug("closing a Redis connection failed", exc_info=True)

    # --- placement (which shard holds which subscription) -------------------------------------------

    def _route_key(self, sub: RedisSubscription) -> str | None:
        """The shard ``sub`` belongs on now; None while a cluster's slot map is unknown."""
        if not (self.cluster and sub.sharded):
            return MAIN
        client = self._client
        if not isinstance(client, RedisCluster) or not self._cluster_initialized:
            return None
        try:
            node = client.nodes_manager.get_node_from_slot(channel_slot(sub.name))
        except RedisError:
            return None
        return str(node.name)

    def _place(self, sub: RedisSubscription) -> None:
        key = self._route_key(sub)
        if key is None:
            self._unrouted.add(sub)
            self._topology_dirty.set()
            return
        self._unrouted.discard(sub)
        shard = self._shards.get(key)
        if shard is None:
            host, _, port = key.rpartition(":")
            shard = self._shards[key] = _Shard(key, (host, int(port)))
            if self._started:
                self._start_shard(shard)
        shard.subs.add(sub)
        self._routes[sub] = key
        if shard.link is not None:
            shard.link.wake.set()

    def _displace(self, sub: RedisSubscription) -> None:
        self._unrouted.discard(sub)
        key = self._routes.pop(sub, None)
        if key is None:
            return
        shard = self._shards.get(key)
        if shard is None:
            return
        shard.subs.discard(sub)
        if shard.link is not None:
            shard.link.refused.discard(sub)
            shard.link.wake.set()
        if not shard.subs and key != MAIN:
            self._drop_shard(shard)

    def _link_of(self, sub: RedisSubscription) -> _Link | None:
        key = self._routes.get(sub)
        shard = self._shards.get(key) if key is not None else None
        return shard.link if shard is not None else None

    def _confirmed(self, sub: RedisSubscription) -> bool:
        link = self._link_of(sub)
        return link is not None and link.confirmed(sub)

    def _start_shard(self, shard: _Shard) -> None:
        shard.task = asyncio.create_task(self._supervise(shard), name=f"redis-listener-{self.node_id}-{shard.key}")

    def _drop_shard(self, shard: _Shard) -> None:
        """Close the link of a primary that owns nothing this node needs any more."""
        if self._shards.get(shard.key) is shard:
            del self._shards[shard.key]
        task, shard.task = shard.task, None
        if task is not None:
            task.cancel()
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._notify()

    def _reroute(self) -> None:
        """Move every sharded subscription to the primary the slot map now names (cluster only)."""
        for sub in list(self._wanted):
            new = self._route_key(sub)
            old = self._routes.get(sub)
            if new == old:
                continue
            if old is not None:
                self.reroutes += 1
                log.info("node %s: shard channel %r moves from %s to %s", self.node_id, sub.name, old, new)
                self._gap_subs.add(sub)  # published while it moves: repaired once the new owner confirms
                self._displace(sub)
            self._place(sub)
        for shard in self._shards.values():
            if shard.link is not None and shard.link.refused:
                shard.link.refused.clear()  # the map still names this primary: ask it again
                shard.link.wake.set()
        self._notify()

    async def _route_loop(self) -> None:
        """Reads the cluster's slot map whenever a link saw a sign that it changed, and re-places."""
        delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
        while True:
            # While a primary's link is down, poll the map too: its replica may be promoted long before
            # the link's next (backed-off) reconnect attempt would mark the map dirty.
            any_down = any(shard.down for key, shard in self._shards.items() if key != MAIN)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DOWN_REFRESH_S if any_down else None):
                    await self._topology_dirty.wait()
            self._topology_dirty.clear()
            client = self._client
            if not isinstance(client, RedisCluster):
                return
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    if not self._cluster_initialized:
                        await client.initialize()
                        self._cluster_initialized = True
                    else:
                        await client.nodes_manager.initialize()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node %s: reading the Redis Cluster slot map failed: %s: %s", self.node_id,
                            type(exc).__name__, exc)
                self._map_failing = True
                self._notify()
                self._topology_dirty.set()
                await asyncio.sleep(next(delays))
                continue
            delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
            self._map_failing = False
            self._reroute()
            await asyncio.sleep(REFRESH_MIN_S)

    # --- supervision ---------------------------------------------------------------------------

    async def _supervise(self, shard: _Shard) -> None:
        delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
        while True:
            link: _Link | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    link = await self._connect(shard)
                self.connections += 1
                if shard.down:
                    REDIS_RECONNECTS.inc()
                shard.connected_to = link.where
                shard.down = False
                log.info("node %s: Redis pub/sub connected to %s", self.node_id, link.where)
                await self._run(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node %s: Redis pub/sub connection to %s %s: %s: %s", self.node_id,
                            link.where if link is not None else
                            (f"{shard.address[0]}:{shard.address[1]}" if shard.address else self.target.display),
                            "lost" if link is not None else "failed", type(exc).__name__, exc)
            finally:
                if link is not None:
                    await self._close(link.conn)
                if shard.link is link or link is None:
                    shard.link = None
                    shard.connected_to = ""
                shard.down = True
                if self._started and self._shards.get(shard.key) is shard:
                    self._gap_subs |= shard.subs  # anything published meanwhile is gone
                    if self.cluster:
                        self._topology_dirty.set()  # a failover may have moved the slots
                self._notify()
            if link is not None and link.ready:
                delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
            await asyncio.sleep(next(delays))

    async def _run(self, link: _Link) -> None:
        """Subscribe, then read and health-check until the connection fails (always raises)."""
        loop = asyncio.get_running_loop()
        link.last_rx = loop.time()
        link.shard.link = link
        await self._sync(link)
        self._check_ready(link)
        reader = asyncio.create_task(self._read(link), name=f"redis-reader-{self.node_id}-{link.shard.key}")
        try:
            while True:
                now = loop.time()
                if link.ping_sent_at is not None:
                    deadline = link.ping_sent_at + self.timeout_s
                else:
                    deadline = link.last_rx + self.health_check_s
                if deadline > now:
                    try:
                        async with asyncio.timeout(deadline - now):
                            await link.wake.wait()
                    except TimeoutError:
                        pass
                link.wake.clear()
                if link.error is not None:
                    raise _ConnectionLost(f"{type(link.error).__name__}: {link.error}") from link.error
                await self._sync(link)
                now = loop.time()
                if link.ping_sent_at is not None:
                    if now - link.ping_sent_at >= self.timeout_s:
                        raise _ConnectionLost(f"no reply to PING within {self.timeout_s} s")
                elif now - link.last_rx >= self.health_check_s:
                    link.ping_sent_at = now
                    await self._send(link, ("PING",))
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass

    async def _send(self, link: _Link, command: Iterable[str]) -> None:
        conn = link.conn
        if not conn.is_connected:  # never let redis-py reconnect behind our back
            raise _ConnectionLost("connection closed")
        try:
            async with asyncio.timeout(self.timeout_s):
                await conn.send_command(*command, check_health=False)
        except TimeoutError as exc:
            raise _ConnectionLost(f"sending to Redis blocked for {self.timeout_s} s") from exc

    def _batches(self, subs: list[RedisSubscription]) -> Iterator[tuple[str, list[RedisSubscription]]]:
        """(command prefix, subscriptions) groups one command may name: same kind, and on a cluster one
        slot per sharded command (Redis refuses CROSSSLOT)."""
        def kind(sub: RedisSubscription) -> tuple[str, int]:
            prefix = "P" if sub.is_pattern else ("S" if sub.sharded else "")
            return prefix, channel_slot(sub.name) if (sub.sharded and self.cluster) else 0

        for (prefix, _), group in itertools.groupby(sorted(subs, key=kind), key=kind):
            batch = list(group)
            for start in range(0, len(batch), SUBSCRIBE_CHUNK):
                yield prefix, batch[start:start + SUBSCRIBE_CHUNK]

    async def _sync(self, link: _Link) -> None:
        """Send the (P|S)SUBSCRIBE/(P|S)UNSUBSCRIBE commands that make Redis match what is wanted here."""
        wanted = link.shard.subs - link.refused
        add = sorted(wanted - link.sent)
        remove = sorted(link.sent - wanted)
        for subs, verb in ((add, "SUBSCRIBE"), (remove, "UNSUBSCRIBE")):
            for prefix, chunk in self._batches(subs):
                for sub in chunk:
                    link.pending[sub] += 1
                    if verb == "SUBSCRIBE":
                        link.sent.add(sub)
                    else:
                        link.sent.discard(sub)
                await self._send(link, (prefix + verb, *(s.name for s in chunk)))

    def _check_ready(self, link: _Link) -> None:
        if link.shard.link is not link:
            return
        if not link.ready and not +link.pending:
            link.ready = True
            self._notify()
        self._flush_gaps(link)

    def _flush_gaps(self, link: _Link) -> None:
        """Report the destinations whose lost subscriptions ``link`` has confirmed again (once ready)."""
        if not link.ready or not self._gap_subs or link.shard.link is not link:
            return
        key = link.shard.key
        back = {sub for sub in self._gap_subs if self._routes.get(sub) == key and link.confirmed(sub)}
        if not back:
            return
        self._gap_subs -= back
        destinations = frozenset(d for d in self.destinations() if self.mapper.subscriptions(d) & back)
        if not destinations:
            return
        log.info("node %s: Redis re-subscribed %d destinations on %s after a gap",
                 self.node_id, len(destinations), link.where)
        gap_handler = self._gap_handler
        if gap_handler is not None:
            try:
                gap_handler(destinations)
            except Exception:
                log.exception("on_gap callback failed")

    # --- receiving ---------------------------------------------------------------------------------

    async def _read(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        conn = link.conn
        try:
            for count in itertools.count(1):
                try:
                    reply = await conn.read_response()
                except AskError as exc:  # MOVED or ASK to an SSUBSCRIBE: the slot is not this node's
                    self._refused(link, exc.slot_id, f"{type(exc).__name__} {exc}")
                    continue
                link.last_rx = loop.time()
                if link.ping_sent_at is not None:
                    link.ping_sent_at = None
                    link.wake.set()  # the control loop re-arms its idle timer
                self._handle(link, reply)
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a burst already buffered never suspends the read
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            link.error = exc
            link.wake.set()

    def _refused(self, link: _Link, slot: int, why: str) -> None:
        """A sharded subscription command for ``slot`` was redirected: re-read the slot map."""
        self.redirects += 1
        subs = [s for s in list(link.pending) if s.sharded and channel_slot(s.name) == slot]
        log.info("node %s: %s refused shard channels of slot %d (%s); reading the slot map",
                 self.node_id, link.where, slot, why)
        for sub in subs:
            del link.pending[sub]
            link.sent.discard(sub)
            link.shard_channels.discard(sub.name)
            if self._wanted[sub] > 0 and self._routes.get(sub) == link.shard.key:
                link.refused.add(sub)
                self._gap_subs.add(sub)
        self._topology_dirty.set()
        self._check_ready(link)
        self._notify()

    def _handle(self, link: _Link, reply: object) -> None:
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            return  # a PONG outside subscribed mode: liveness only
        kind = reply[0]
        if kind in (b"message", b"smessage") and len(reply) == 3:
            self._deliver(reply[1], reply[2])
        elif kind == b"pmessage" and len(reply) == 4:
            if self._canonical_pattern(link, reply[1], reply[2]):
                self._deliver(reply[2], reply[3])
        elif kind in (b"subscribe", b"psubscribe", b"ssubscribe",
                      b"unsubscribe", b"punsubscribe", b"sunsubscribe") and len(reply) == 3:
            name = reply[1].decode("utf-8", "surrogateescape") if isinstance(reply[1], bytes) else ""
            sub = RedisSubscription(kind.startswith(b"p"), name, kind in (b"ssubscribe", b"sunsubscribe"))
            held = link.held(sub)
            if kind.endswith(b"unsubscribe"):
                held.discard(name)
            else:
                held.add(name)
            if link.pending[sub] > 0:
                link.pending[sub] -= 1
                if not link.pending[sub]:
                    del link.pending[sub]
            elif kind == b"sunsubscribe":
                self._dropped_by_server(link, sub)
            self._check_ready(link)
            self._notify()

    def _dropped_by_server(self, link: _Link, sub: RedisSubscription) -> None:
        """Redis unsubscribed a shard channel by itself: its slot moved (resharding or failover)."""
        log.info("node %s: %s dropped shard channel %r (its slot moved); reading the slot map",
                 self.node_id, link.where, sub.name)
        link.sent.discard(sub)
        if self._wanted[sub] > 0:
            self._gap_subs.add(sub)
            if self.cluster:
                link.refused.add(sub)
            else:
                link.wake.set()  # one server: subscribe again right away
        self._topology_dirty.set()

    @staticmethod
    def _canonical_pattern(link: _Link, pattern: object, channel: object) -> bool:
        """Whether this pattern's copy of a message is the one to use (see module docstring)."""
        if not isinstance(pattern, bytes) or not isinstance(channel, bytes):
            return False
        pattern_name = pattern.decode("utf-8", "surrogateescape")
        channel_name = channel.decode("utf-8", "surrogateescape")
        if channel_name in link.channels:
            return False  # the channel subscription's copy is used
        if len(link.patterns) <= 1:
            return True
        matching = [p for p in link.patterns if glob_matches(p, channel_name)]
        if pattern_name not in matching:
            return not matching
        return pattern_name == min(matching)

    def _deliver(self, channel: object, payload: object) -> None:
        handler = self._handler
        if handler is None or not isinstance(channel, bytes) or not isinstance(payload, bytes):
            return
        try:
            channel_name = channel.decode("utf-8")
        except UnicodeDecodeError:
            self._undecodable(channel, "channel name is not UTF-8")
            return
        publication = self.mapper.decode(channel_name, payload)
        if publication is None:
            self._undecodable(channel, "not a publication")
            return
        # Which local sessions (if any) receive it is the receive path's question (gateway.receive).
        try:
            handler(publication)
        except Exception:
            log.exception("on_publication failed for %s", publication.destination)

    def _undecodable(self, channel: bytes, why: str) -> None:
        self.undecodable += 1
        if self.undecodable == 1 or self.undecodable % 1000 == 0:
            log.warning("node %s: ignored a Redis message on %r (%s; %d so far)",
                        self.node_id, channel[:200], why, self.undecodable)

    # --- waiting -------------------------------------------------------------------------------------

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, condition: Callable[[], bool], timeout: float) -> None:
        """Wait until ``condition()`` holds (re-checked on every state change) or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return
