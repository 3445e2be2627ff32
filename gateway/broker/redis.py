"""The Redis broker: nodes of one cluster share publications through Redis Pub/Sub.

Owns: the node's Redis connections and their supervision. Publishing goes through a small blocking
pool of ordinary connections (PUBLISH, bounded by ``timeout_s``, failures raise
:class:`BrokerUnavailable`). Receiving goes through ONE pub/sub connection per node, the *listener
container*, which this module drives itself instead of redis-py's ``PubSub`` helper (whose
auto-reconnect has lost subscriptions, redis-py #2089 and #2417):

- a supervisor task connects, (re)subscribes every wanted channel and pattern, and on any failure
  disconnects and retries with exponential back-off (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``, reset after a successful connection);
- a reader task parses every reply in order and calls ``on_publication`` synchronously; it never
  awaits anything but the socket, so a slow WebSocket can never make Redis drop this node as a slow
  subscriber;
- a control loop applies subscribe/unsubscribe requests and PINGs the connection after
  ``health_check_s`` of silence; no reply within ``timeout_s`` means the connection is dead (a hung
  Redis or a silently dropped TCP connection);
- after every reconnect, once the re-subscription is confirmed, ``on_gap`` gets every subscribed
  destination: Pub/Sub is at-most-once and anything published meanwhile is gone.

Delivery: every node, the publisher included, receives each publication exactly once through Redis
(a chat node also delivers its own room messages locally at once; its sequencer drops the copy that
comes back by ``seq``). Publishing pipelines a batch of PUBLISH commands in one round trip. When several Redis subscriptions of
this node match one message (a room channel and a pattern), Redis sends one copy per subscription;
only the copy of one canonical subscription is used, decided from the subscription state confirmed
in-band, so the result is exact. Decoded publications are delivered only if the node is subscribed
to their destination (exactly or by Ant pattern).

Channel naming lives in :mod:`gateway.broker.channels`. Must not import Starlette, the transport
layer or the chat domain.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.broker.base import (
    BrokerUnavailable,
    GapHandler,
    Publication,
    PublicationHandler,
    RoomPayloadReader,
)
from gateway.broker.channels import ChannelMapper, RedisSubscription, SpringChannelMapper, glob_matches
from gateway.broker.patterns import is_pattern, matches

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.1
SUBSCRIBE_CHUNK = 1000
"""Most channels named in one SUBSCRIBE/UNSUBSCRIBE command."""
YIELD_EVERY = 64
"""The reader yields to the event loop after this many messages read without waiting."""


def backoff_delays(first: float, maximum: float) -> Iterator[float]:
    """Reconnect delays: ``first``, doubling, capped at ``maximum`` (forever)."""
    delay = min(first, maximum)
    while True:
        yield delay
        delay = min(delay * 2, maximum)


class _ConnectionLost(Exception):
    """The pub/sub connection is gone or unresponsive."""


@dataclass(eq=False)
class _Link:
    """One pub/sub connection and what Redis has confirmed on it (reset on every reconnect)."""

    conn: AbstractConnection
    sent: set[RedisSubscription] = field(default_factory=set)
    pending: Counter[RedisSubscription] = field(default_factory=Counter)
    channels: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    ready: bool = False
    last_rx: float = 0.0
    ping_sent_at: float | None = None

    def confirmed(self, sub: RedisSubscription) -> bool:
        held = self.patterns if sub.is_pattern else self.channels
        return sub.name in held and not self.pending[sub]


class RedisBroker:
    """A :class:`~gateway.broker.base.Broker` over Redis Pub/Sub (see the module docstring)."""

    def __init__(self, url: str, *, node_id: str, channel_mapper: ChannelMapper,
                 reconnect_min_s: float = RECONNECT_MIN_S, reconnect_max_s: float = 30.0,
                 timeout_s: float = 2.0, health_check_s: float = 5.0, pool_size: int = 16) -> None:
        if min(reconnect_min_s, reconnect_max_s, timeout_s, health_check_s) <= 0 or pool_size < 1:
            raise ValueError("Redis broker delays, timeouts and pool size must be positive")
        self.url = url
        self.node_id = node_id
        self.mapper = channel_mapper
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.timeout_s = timeout_s
        self.health_check_s = health_check_s
        self.pool_size = pool_size
        self._url_kwargs: dict[str, Any] = dict(parse_url(url))
        self._handler: PublicationHandler | None = None
        self._gap_handler: GapHandler | None = None
        self._exact: Counter[str] = Counter()
        self._patterns: Counter[str] = Counter()
        self._wanted: Counter[RedisSubscription] = Counter()
        self._link: _Link | None = None
        self._healthy = False
        self._gap_pending = False
        self._waiters: list[asyncio.Future[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._pool: BlockingConnectionPool | None = None
        self.connections = 0
        """Pub/sub connections established so far (the first one included)."""
        self.undecodable = 0
        """Messages received on a subscribed channel that were not a publication of ours."""

    @classmethod
    def from_settings(cls, settings: Settings, room_reader: RoomPayloadReader | None = None) -> RedisBroker:
        if settings.redis_url is None:
            raise ValueError("redis_url is not set")
        return cls(settings.redis_url, node_id=settings.node_id,
                   channel_mapper=SpringChannelMapper.from_settings(settings, room_reader),
                   reconnect_max_s=settings.redis_reconnect_max_s, timeout_s=settings.redis_timeout_s,
                   health_check_s=settings.redis_health_check_s, pool_size=settings.redis_pool_size)

    # --- Broker protocol -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def start(self, on_publication: PublicationHandler, on_gap: GapHandler | None = None) -> None:
        """Connect; returns once subscribed, or after ``timeout_s`` with the supervisor still trying."""
        if self._supervisor is not None:
            raise RuntimeError("the Redis broker is already started")
        self._handler = on_publication
        self._gap_handler = on_gap
        self._gap_pending = False
        self._pool = BlockingConnectionPool(
            max_connections=self.pool_size, timeout=self.timeout_s,
            **self._connection_kwargs(f"gateway:{self.node_id}:publish", socket_timeout=self.timeout_s))
        self._client = Redis(connection_pool=self._pool)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"redis-listener-{self.node_id}")
        await self._wait(lambda: self._healthy, self.timeout_s)
        if not self._healthy:
            log.warning("Redis at %s not reachable yet; node %s keeps retrying", self._where(), self.node_id)

    async def stop(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        self._handler = None
        self._gap_handler = None
        if supervisor is not None:
            supervisor.cancel()
            try:
                await supervisor
            except asyncio.CancelledError:
                pass
        self._healthy = False
        self._notify()
        client, pool = self._client, self._pool
        self._client = self._pool = None
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.disconnect()

    async def subscribe(self, destination: str) -> None:
        """Want ``destination``; while connected, returns once Redis confirmed the subscription."""
        counter = self._patterns if is_pattern(destination) else self._exact
        counter[destination] += 1
        subs = self.mapper.subscriptions(destination)
        if counter[destination] == 1:
            for sub in subs:
                self._wanted[sub] += 1
        link = self._link
        if link is None:
            return
        link.wake.set()

        def settled() -> bool:
            return self._link is not link or all(link.confirmed(sub) for sub in subs)

        await self._wait(settled, self.timeout_s)
        if not settled():
            log.warning("Redis did not confirm the subscription to %s in %.1f s", destination, self.timeout_s)

    async def unsubscribe(self, destination: str) -> None:
        counter = self._patterns if is_pattern(destination) else self._exact
        if counter[destination] <= 0:
            del counter[destination]
            return
        counter[destination] -= 1
        if counter[destination] > 0:
            return
        del counter[destination]
        for sub in self.mapper.subscriptions(destination):
            self._wanted[sub] -= 1
            if self._wanted[sub] <= 0:
                del self._wanted[sub]
        if self._link is not None:
            self._link.wake.set()

    async def publish(self, publication: Publication) -> None:
        await self.publish_many((publication,))

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        """PUBLISH every publication, in order, in one pipelined round trip on one connection."""
        client = self._client
        if client is None:
            raise BrokerUnavailable("the Redis broker is not started")
        if not publications:
            return
        encoded = [self.mapper.encode(pub if pub.origin else replace(pub, origin=self.node_id))
                   for pub in publications]
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(encoded) == 1:
                    await client.publish(*encoded[0])
                else:
                    async with client.pipeline(transaction=False) as pipe:
                        for channel, payload in encoded:
                            pipe.publish(channel, payload)
                        await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"publishing to Redis at {self._where()} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> bool:
        """One PING on the publishing pool, within ``timeout_s``."""
        client = self._client
        if client is None:
            return False
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    # --- introspection ---------------------------------------------------------------------------

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern this node is subscribed to."""
        return frozenset(self._exact) | frozenset(self._patterns)

    # --- connections -------------------------------------------------------------------------------

    def _where(self) -> str:
        kwargs = self._url_kwargs
        return str(kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}")

    def _connection_kwargs(self, client_name: str, *, socket_timeout: float | None) -> dict[str, Any]:
        kwargs = dict(self._url_kwargs)
        kwargs.update(
            socket_timeout=socket_timeout, socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_error=[], health_check_interval=0,
            client_name=client_name, protocol=2, decode_responses=False)
        kwargs.pop("max_connections", None)  # pool options a URL may carry; ours win
        kwargs.pop("timeout", None)
        return kwargs

    def _new_pubsub_connection(self) -> AbstractConnection:
        kwargs = self._connection_kwargs(f"gateway:{self.node_id}:pubsub", socket_timeout=None)
        connection_class: type[AbstractConnection] = kwargs.pop("connection_class", Connection)
        return connection_class(**kwargs)

    # --- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
        while True:
            link: _Link | None = None
            connected = False
            try:
                conn = self._new_pubsub_connection()
                link = _Link(conn)
                async with asyncio.timeout(self.timeout_s):
                    await conn.connect()  # type: ignore[no-untyped-call]
                connected = True
                self.connections += 1
                log.info("node %s: Redis pub/sub connected to %s", self.node_id, self._where())
                await self._run(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("node %s: Redis pub/sub connection to %s %s: %s: %s", self.node_id, self._where(),
                            "lost" if connected else "failed", type(exc).__name__, exc)
            finally:
                if link is not None:
                    self._link = None
                    await self._close(link.conn)
                self._healthy = False
                self._gap_pending = True
                self._notify()
            if link is not None and link.ready:
                delays = backoff_delays(self.reconnect_min_s, self.reconnect_max_s)
            await asyncio.sleep(next(delays))

    @staticmethod
    async def _close(conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except Exception:
            log.debug("closing a Redis connection failed", exc_info=True)

    async def _run(self, link: _Link) -> None:
        """Subscribe, then read and health-check until the connection fails (always raises)."""
        loop = asyncio.get_running_loop()
        link.last_rx = loop.time()
        self._link = link
        await self._sync(link)
        self._check_ready(link)
        reader = asyncio.create_task(self._read(link), name=f"redis-reader-{self.node_id}")
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

    async def _sync(self, link: _Link) -> None:
        """Send the (P)SUBSCRIBE/(P)UNSUBSCRIBE commands that make Redis match what is wanted."""
        wanted = {sub for sub, count in self._wanted.items() if count > 0}
        add = sorted(wanted - link.sent)
        remove = sorted(link.sent - wanted)
        for subs, verb in ((add, "SUBSCRIBE"), (remove, "UNSUBSCRIBE")):
            for is_pat, group in itertools.groupby(subs, key=lambda s: s.is_pattern):
                batch = list(group)
                for start in range(0, len(batch), SUBSCRIBE_CHUNK):
                    chunk = batch[start:start + SUBSCRIBE_CHUNK]
                    for sub in chunk:
                        link.pending[sub] += 1
                        if verb == "SUBSCRIBE":
                            link.sent.add(sub)
                        else:
                            link.sent.discard(sub)
                    await self._send(link, (("P" if is_pat else "") + verb, *(s.name for s in chunk)))

    def _check_ready(self, link: _Link) -> None:
        if link.ready or self._link is not link or +link.pending:
            return
        link.ready = True
        self._healthy = True
        self._notify()
        if self._gap_pending:
            self._gap_pending = False
            destinations = self.destinations()
            log.info("node %s: Redis re-subscribed %d destinations after a reconnect (gap)",
                     self.node_id, len(destinations))
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
                reply = await conn.read_response()
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

    def _handle(self, link: _Link, reply: object) -> None:
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            return  # a PONG outside subscribed mode: liveness only
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self._deliver(reply[1], reply[2])
        elif kind == b"pmessage" and len(reply) == 4:
            if self._canonical_pattern(link, reply[1], reply[2]):
                self._deliver(reply[2], reply[3])
        elif kind in (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe") and len(reply) == 3:
            is_pat = kind.startswith(b"p")
            name = reply[1].decode("utf-8", "surrogateescape") if isinstance(reply[1], bytes) else ""
            held = link.patterns if is_pat else link.channels
            if kind.endswith(b"unsubscribe"):
                held.discard(name)
            else:
                held.add(name)
            sub = RedisSubscription(is_pat, name)
            if link.pending[sub] > 0:
                link.pending[sub] -= 1
                if not link.pending[sub]:
                    del link.pending[sub]
            self._check_ready(link)
            self._notify()

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
        destination = publication.destination
        if destination not in self._exact and not any(matches(p, destination) for p in self._patterns):
            return
        try:
            handler(publication)
        except Exception:
            log.exception("on_publication failed for %s", destination)

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
