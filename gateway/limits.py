"""Abuse limits of one node: SEND rate per user, sessions per user, sessions per client address.

Owns:

- :class:`RefusalMeter`: per session, how many SENDs were refused lately (the session is closed once
  about ``send_rate_close_after`` were refused within 10 s: repeated abuse);
- the SEND token bucket per key (``user:<name>``; in the anonymous mode ``addr:<client address>``):
  :class:`LocalRateLimiter` per node, :class:`RedisRateLimiter` cluster-wide;
- sessions per user: :class:`LocalSessionCounter` per node, :class:`RedisSessionCounter` cluster-wide;
- :class:`AddressCounter`: STOMP sessions per client address on this node;
- :class:`NodeLimits`, the bundle a node builds from its settings (:func:`create_limits`).

Cluster-wide SEND rate without a Redis call per message. Each node keeps, per key, a *view* of the
key's bucket and decides every SEND locally against it (no I/O). Every ``rate_limit_sync_s`` a node
sends, in one Lua call for all keys it saw lately, what each key spent on it since the last call;
Redis keeps the real bucket (refill ``send_rate_per_s``, capacity ``send_burst``), subtracts, and
answers each key's tokens left, which become the node's new view. The bucket may go into debt (down
to minus one burst): what several nodes let through in one interval before they saw each other's
spending is paid back before any node accepts that user's next SEND. So the cost is one Redis call
per node per interval whatever the message rate, the long-run rate is exact, and in one interval a
user on k nodes can get up to k times its tokens left (never more than k bursts). The first SEND of
a key this node has not seen for a minute waits for one call (so a new user's burst is counted
cluster-wide at once); when Redis does not answer, the views go on as per-node buckets.

Cluster-wide sessions per user: each node keeps its own hash ``{<prefix>gateway:sessions}:<node>``
(user -> sessions on that node) with a TTL it refreshes, listed in ``{<prefix>gateway:sessions}:nodes``
(the presence scheme, :mod:`gateway.chat.presence`): a CONNECT is one Lua call that sums the user's
sessions over live nodes and counts the new one only if the sum is under the limit. The braces are a
Redis Cluster hash tag (every key of a script in one slot); the rate buckets are
``{<prefix>gateway:ratelimit}:<key>`` for the same reason. A node that dies stops refreshing: its
sessions stop counting after ``presence_ttl_s``.

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.settings import Settings

log = logging.getLogger(__name__)

RATE_LIMIT_MESSAGE = "rate limit exceeded"
#: How long the refusals of a session are remembered (see :class:`RefusalMeter`).
REFUSAL_WINDOW_S = 10.0
#: A key's view is dropped after this long without a SEND on this node.
FORGET_AFTER_S = 60.0
#: Keys with a SEND this recently are refreshed at every sync even when they spent nothing.
REFRESH_RECENT_S = 2.0
#: Most keys in one Lua call.
SYNC_CHUNK = 500


class RefusalMeter:
    """Refusals of one session, forgiven at ``limit / REFUSAL_WINDOW_S`` per second: :meth:`refuse`
    returns True once the level passes ``limit`` (about ``limit`` refusals within 10 s)."""

    __slots__ = ("_level", "_rate", "_updated", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rate = limit / REFUSAL_WINDOW_S
        self._level = 0.0
        self._updated = 0.0

    def refuse(self, now: float) -> bool:
        if self.limit <= 0:
            return False
        self._level = max(0.0, self._level - (now - self._updated) * self._rate) + 1.0
        self._updated = now
        return self._level > self.limit


class RateLimiter(Protocol):
    def try_acquire(self, key: str) -> bool | None:
        """Take one token for ``key`` without waiting: True, False (over the limit), or None when this
        node knows nothing of the key yet (then call :meth:`acquire`)."""

    async def acquire(self, key: str) -> bool:
        """Like :meth:`try_acquire`, waiting for what the node needs to decide."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalRateLimiter:
    """Token buckets on this node only (no Redis): refill ``rate`` per second up to ``burst``."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, updated)
        self._swept = clock()

    def try_acquire(self, key: str) -> bool:
        now = self.clock()
        tokens, updated = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if now - self._swept > FORGET_AFTER_S:
            self._sweep(now)
        return allowed

    async def acquire(self, key: str) -> bool:
        return self.try_acquire(key)

    def _sweep(self, now: float) -> None:
        self._swept = now
        full = [k for k, (tokens, updated) in self._buckets.items()
                if tokens + (now - updated) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


# KEYS = bucket keys; ARGV[1] = rate/s, ARGV[2] = burst, ARGV[2 + i] = what KEYS[i] spent since the last
# call. Returns each key's tokens left (strings: Lua numbers would be truncated to integers).
_SYNC_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  tokens = math.max(-burst, tokens - tonumber(ARGV[2 + i]))
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(((burst - tokens) / rate + 1) * 1000))
  out[i] = tostring(tokens)
end
return out
"""


@dataclass(slots=True)
class _View:
    tokens: float
    updated: float
    last_used: float
    pending: int = 0     # spent on this node since the last sync was sent


def rate_limit_key_prefix(prefix: str = "") -> str:
    return "{" + prefix + "gateway:ratelimit}:"


class RedisRateLimiter:
    """Cluster-wide token buckets kept in Redis and mirrored per node (see the module docstring)."""

    def __init__(self, redis: Any, rate: float, burst: int, *, sync_s: float, timeout_s: float,
                 prefix: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self.rate = rate
        self.burst = float(burst)
        self.sync_s = sync_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._prefix = rate_limit_key_prefix(prefix)
        self._views: dict[str, _View] = {}
        self._wanted: set[str] = set()
        self._next_sync: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._script: Any = None
        self._failing = False
        self.syncs = 0   # Redis calls made (for tests and logs)

    async def start(self) -> None:
        self._script = self._redis.register_script(_SYNC_SCRIPT)
        self._task = asyncio.create_task(self._loop(), name="rate-limit-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._next_sync is not None and not self._next_sync.done():
            self._next_sync.set_result(None)
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    def try_acquire(self, key: str) -> bool | None:
        view = self._views.get(key)
        if view is None:
            return None
        now = self.clock()
        view.tokens = min(self.burst, view.tokens + (now - view.updated) * self.rate)
        view.updated = now
        view.last_used = now
        if view.tokens < 1.0:
            return False
        view.tokens -= 1.0
        view.pending += 1
        self._wake.set()
        return True

    async def acquire(self, key: str) -> bool:
        allowed = self.try_acquire(key)
        if allowed is not None:
            return allowed
        if self._task is None or self._task.done():
            self._adopt(key)   # not started (or stopped): a per-node bucket
        else:
            self._wanted.add(key)
            if self._next_sync is None:
                self._next_sync = asyncio.get_running_loop().create_future()
            waiter = self._next_sync
            self._wake.set()
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await asyncio.shield(waiter)
            except TimeoutError:
                pass
            if key not in self._views:
                self._adopt(key)
        return bool(self.try_acquire(key))

    def _adopt(self, key: str) -> _View:
        now = self.clock()
        view = self._views[key] = _View(self.burst, now, now)
        return view

    async def _loop(self) -> None:
        last = 0.0
        while True:
            await self._wake.wait()
            if not self._wanted:
                # Spending alone waits for the interval; a key nobody has seen goes at once.
                delay = last + self.sync_s - self.clock()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            while not self._wanted:
                                self._wake.clear()
                                await self._wake.wait()
            self._wake.clear()
            last = self.clock()
            waiter, self._next_sync = self._next_sync, None
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: views go on as per-node buckets
                if not self._failing:
                    log.warning("rate limit: Redis sync failed, limiting per node until it answers: %s", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("rate limit: Redis answers again, limiting cluster-wide")
                self._failing = False
            finally:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if any(view.pending for view in self._views.values()):
                self._wake.set()

    async def _sync(self) -> None:
        now = self.clock()
        wanted, self._wanted = self._wanted, set()
        for key in [k for k, v in self._views.items() if not v.pending and now - v.last_used > FORGET_AFTER_S]:
            del self._views[key]
        keys = [k for k, v in self._views.items() if v.pending or now - v.last_used <= REFRESH_RECENT_S]
        keys += [k for k in wanted if k not in self._views]
        sent: dict[str, int] = {}
        for key in keys:
            view = self._views.get(key)
            sent[key] = view.pending if view is not None else 0
            if view is not None:
                view.pending = 0
        try:
            for start in range(0, len(keys), SYNC_CHUNK):
                chunk = keys[start:start + SYNC_CHUNK]
                async with asyncio.timeout(self.timeout_s):
                    left = await self._script(keys=[self._prefix + k for k in chunk],
                                              args=[repr(self.rate), repr(self.burst), *(sent[k] for k in chunk)])
                self.syncs += 1
                answered = self.clock()
                for key, raw in zip(chunk, left, strict=True):
                    tokens = float(raw.decode() if isinstance(raw, bytes) else raw)
                    view = self._views.get(key)
                    if view is None:
                        view = self._views[key] = _View(tokens, answered, answered)
                    else:
                        # What was spent here while the call was in flight is not in Redis's answer yet.
                        view.tokens = tokens - view.pending
                        view.updated = answered
        except BaseException:
            for key in wanted:
                if key not in self._views:
                    self._adopt(key)
            raise


class SessionCounter(Protocol):
    async def acquire(self, user: str, limit: int) -> bool:
        """Count one more session of ``user`` unless it already has ``limit``; True when counted."""

    def release(self, user: str) -> None:
        """One session of ``user`` ended (only after an :meth:`acquire` that returned True)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalSessionCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def acquire(self, user: str, limit: int) -> bool:
        if self.counts[user] >= limit:
            return False
        self.counts[user] += 1
        return True

    def release(self, user: str) -> None:
        self.counts[user] -= 1
        if self.counts[user] <= 0:
            del self.counts[user]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def sessions_key_prefix(prefix: str = "") -> str:
    return "{" + prefix + "gateway:sessions}:"


# KEYS[1] = nodes set; ARGV = node hash prefix, this node, user, limit, ttl s. Returns {1, total} when
# the session was counted, {0, total} when the user already has ``limit``.
_ACQUIRE_SCRIPT = """
local total = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. node
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], node)
  else
    local v = redis.call('HGET', key, ARGV[3])
    if v then total = total + tonumber(v) end
  end
end
if total >= tonumber(ARGV[4]) then return {0, total} end
local own = ARGV[1] .. ARGV[2]
redis.call('HINCRBY', own, ARGV[3], 1)
redis.call('HSET', own, '__alive__', 0)
redis.call('EXPIRE', own, tonumber(ARGV[5]))
redis.call('SADD', KEYS[1], ARGV[2])
return {1, total + 1}
"""

_RELEASE_SCRIPT = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return left
"""


class RedisSessionCounter:
    """Sessions per user summed over every live node's hash (see the module docstring)."""

    def __init__(self, redis: Any, *, node_id: str, ttl_s: int, timeout_s: float, prefix: str = "") -> None:
        self._redis = redis
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._node_prefix = sessions_key_prefix(prefix)
        self._nodes_key = self._node_prefix + "nodes"
        self._node_key = self._node_prefix + node_id
        self._local = LocalSessionCounter()     # this node's sessions per user (the truth for its hash)
        self.counts = self._local.counts
        self._acquire: Any = None
        self._release: Any = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._acquire = self._redis.register_script(_ACQUIRE_SCRIPT)
        self._release = self._redis.register_script(_RELEASE_SCRIPT)
        with contextlib.suppress(Exception):
            await self._publish()
        self._task = asyncio.create_task(self._refresh(), name="session-count-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, self.timeout_s)
        with contextlib.suppress(Exception):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._node_key)
                pipe.srem(self._nodes_key, self.node_id)
                await pipe.execute()
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    async def acquire(self, user: str, limit: int) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                counted, _total = await self._acquire(
                    keys=[self._nodes_key], args=[self._node_prefix, self.node_id, user, limit, self.ttl_s])
        except Exception as exc:
            # Redis is down: this node's own sessions are all it can count.
            log.warning("sessions per user: Redis unavailable, counting on this node only: %s", exc)
            return await self._local.acquire(user, limit)
        if int(counted) != 1:
            return False
        self.counts[user] += 1
        return True

    def release(self, user: str) -> None:
        self._local.release(user)
        task = asyncio.get_running_loop().create_task(self._release_one(user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_one(self, user: str) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._release(keys=[self._node_key], args=[user])
        except Exception as exc:  # the next refresh rewrites the hash from self.counts
            log.info("sessions per user: release of %r not written to Redis (%s); the refresh repairs it",
                     user, exc)

    async def _publish(self) -> None:
        """Rewrite this node's whole hash from its own counts, and refresh its TTL."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._node_key)
            counts = {user: n for user, n in self.counts.items() if n > 0}
            if counts:
                pipe.hset(self._node_key, mapping=counts)
            pipe.hset(self._node_key, "__alive__", 0)
            pipe.expire(self._node_key, self.ttl_s)
            pipe.sadd(self._nodes_key, self.node_id)
            await pipe.execute()

    async def _refresh(self) -> None:
        interval = max(self.ttl_s / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sessions per user: refresh failed: %s", exc)


def address_of(remote: str) -> str:
    """The host part of a ``host:port`` remote address (IPv6 hosts keep their colons)."""
    host, sep, port = remote.rpartition(":")
    return host if sep and port.isdigit() else remote


class AddressCounter:
    """STOMP sessions per client address on this node. The first refusal of an address logs one
    warning; the next one for that address only after it dropped under the limit again."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self._refusing: set[str] = set()

    def acquire(self, address: str) -> bool:
        if self.limit and self.counts[address] >= self.limit:
            if address not in self._refusing:
                self._refusing.add(address)
                log.warning("refusing STOMP sessions from %s: %d open, limit %d (max_connections_per_ip)",
                            address, self.counts[address], self.limit)
            return False
        self.counts[address] += 1
        return True

    def release(self, address: str) -> None:
        self.counts[address] -= 1
        if self.counts[address] <= 0:
            del self.counts[address]
        if self._refusing and self.counts[address] < self.limit:
            self._refusing.discard(address)


@dataclass(eq=False)
class NodeLimits:
    """The limits one node enforces (built by :func:`create_limits`, started and stopped with the hub)."""

    settings: Settings
    rate: RateLimiter | None
    sessions: SessionCounter
    addresses: AddressCounter

    async def start(self) -> None:
        if self.rate is not None:
            await self.rate.start()
        await self.sessions.start()

    async def stop(self) -> None:
        if self.rate is not None:
            await self.rate.stop()
        await self.sessions.stop()


def create_limits(settings: Settings) -> NodeLimits:
    rate: RateLimiter | None = None
    sessions: SessionCounter = LocalSessionCounter()
    if settings.redis_url is None:
        if settings.send_rate_per_s > 0:
            rate = LocalRateLimiter(settings.send_rate_per_s, settings.send_burst)
    else:
        from gateway.broker.redis_urls import data_client, parse_redis_url

        target = parse_redis_url(settings.redis_url)
        if settings.send_rate_per_s > 0:
            rate = RedisRateLimiter(data_client(target, timeout_s=settings.redis_timeout_s),
                                    settings.send_rate_per_s, settings.send_burst,
                                    sync_s=settings.rate_limit_sync_s, timeout_s=settings.redis_timeout_s,
                                    prefix=settings.redis_channel_prefix)
        if settings.max_sessions_per_user > 0:
            sessions = RedisSessionCounter(data_client(target, timeout_s=settings.redis_timeout_s),
                                           node_id=settings.node_id, ttl_s=settings.presence_ttl_s,
                                           timeout_s=settings.redis_timeout_s,
                                           prefix=settings.redis_channel_prefix)
    return NodeLimits(settings, rate, sessions, AddressCounter(settings.max_connections_per_ip))
