"""Room presence: how many sessions are in each room, cluster-wide.

Owns: the user counts shown in ``/chat/rooms`` and in every message's ``userCount``.

Every message's ``userCount`` comes from :meth:`Presence.cached`, which never waits: the hot path
makes no Redis call per message.

- :class:`MemoryPresence` — single node.
- :class:`RedisPresence` — every node keeps its own hash ``{<prefix>gateway:presence}:<node>``
  (roomId -> this node's session count) with a TTL it refreshes every ``ttl/3`` seconds, and is listed
  in the set ``{<prefix>gateway:presence}:nodes``. The braces are a Redis Cluster hash tag: every
  presence key hashes to one slot, so the Lua count script and the MULTI blocks that touch several of
  them run on one shard (a cluster refuses keys of different slots in one script or transaction).
  The client is the deployment's (one server, Sentinel primary or cluster; ``redis_urls``). A room's count is the sum over live nodes (one Lua
  call). A node that dies without running its QUITs stops refreshing; its hash expires after
  ``presence_ttl_s`` and the counts heal. Each node writes only its own hash, so there are no races
  and counts can never go negative (Spring's counter could). Counts read for messages are cached per
  room on the node: a join or leave on this node updates the room's entry at once (with the
  cluster-wide count Redis returns), and a timer re-reads, every ``refresh_s``, the rooms this node
  has sessions in or served messages for lately (one Lua call for all of them), so other nodes'
  joins, leaves and deaths show in messages within that bound.

Must not import Starlette or the transport layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from gateway.settings import default

log = logging.getLogger(__name__)


class Presence(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def join(self, room_id: str) -> int:
        """Count one more local session in the room; returns the room's cluster-wide count."""
    async def leave(self, room_id: str) -> int:
        """Count one less local session; returns the room's cluster-wide count."""
    async def count(self, room_id: str) -> int: ...
    async def counts(self, room_ids: Iterable[str]) -> dict[str, int]: ...
    def cached(self, room_id: str) -> int:
        """The room's count as last known on this node, without waiting (for a message's userCount)."""


class MemoryPresence:
    def __init__(self) -> None:
        self._local: Counter[str] = Counter()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def join(self, room_id: str) -> int:
        self._local[room_id] += 1
        return self._local[room_id]

    async def leave(self, room_id: str) -> int:
        if self._local[room_id] > 0:
            self._local[room_id] -= 1
        if self._local[room_id] == 0:
            del self._local[room_id]
        return self._local.get(room_id, 0)

    async def count(self, room_id: str) -> int:
        return self._local.get(room_id, 0)

    async def counts(self, room_ids: Iterable[str]) -> dict[str, int]:
        return {room_id: self._local.get(room_id, 0) for room_id in room_ids}

    def cached(self, room_id: str) -> int:
        return self._local.get(room_id, 0)


def presence_key_prefix(prefix: str = "") -> str:
    """What every presence key starts with: ``{<prefix>gateway:presence}:`` (one cluster hash slot)."""
    return "{" + prefix + "gateway:presence}:"


# KEYS[1] = nodes set; ARGV[1] = node hash prefix; ARGV[2..] = room ids. Returns counts in order and
# drops nodes whose hash expired.
_COUNT_SCRIPT = """
local nodes = redis.call('SMEMBERS', KEYS[1])
local totals = {}
for i = 2, #ARGV do totals[i - 1] = 0 end
for _, node in ipairs(nodes) do
  local key = ARGV[1] .. node
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], node)
  else
    for i = 2, #ARGV do
      local v = redis.call('HGET', key, ARGV[i])
      if v then totals[i - 1] = totals[i - 1] + tonumber(v) end
    end
  end
end
return totals
"""


class RedisPresence:
    def __init__(self, redis_url: str, *, node_id: str, prefix: str = default("redis_channel_prefix"),
                 ttl_s: int = default("presence_ttl_s"), refresh_s: float = default("presence_refresh_s")) -> None:
        from gateway.broker.redis_urls import data_client, parse_redis_url

        self._redis: Any = data_client(parse_redis_url(redis_url), timeout_s=5)
        self.node_id = node_id
        self.ttl_s = ttl_s
        self._node_prefix = presence_key_prefix(prefix)
        self._nodes_key = self._node_prefix + "nodes"
        self._node_key = self._node_prefix + node_id
        self._local: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._count_script: Any = None
        self.refresh_s = refresh_s
        self._cache: dict[str, int] = {}      # room -> cluster-wide count as last read
        self._hot: set[str] = set()           # rooms read for messages since the last refresh
        self._cache_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._count_script = self._redis.register_script(_COUNT_SCRIPT)
        await self._publish_local()
        self._task = asyncio.create_task(self._refresh(), name="presence-refresh")
        self._cache_task = asyncio.create_task(self._refresh_cache(), name="presence-cache")

    async def stop(self) -> None:
        for task in (self._task, self._cache_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._node_key)
                pipe.srem(self._nodes_key, self.node_id)
                await pipe.execute()
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    async def _publish_local(self) -> None:
        """Write this node's whole hash (after start or a Redis restart lost it) and refresh its TTL."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._node_key)
            if self._local:
                pipe.hset(self._node_key, mapping={k: v for k, v in self._local.items() if v > 0})
            pipe.hset(self._node_key, "__alive__", 0)
            pipe.expire(self._node_key, self.ttl_s)
            pipe.sadd(self._nodes_key, self.node_id)
            await pipe.execute()

    async def _refresh(self) -> None:
        interval = max(self.ttl_s / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._publish_local()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence refresh failed: %s", exc)

    def cached(self, room_id: str) -> int:
        self._hot.add(room_id)
        value = self._cache.get(room_id)
        return self._local.get(room_id, 0) if value is None else value

    async def _refresh_cache(self) -> None:
        """Re-read the counts of the rooms that had messages lately, and forget the idle ones."""
        while True:
            await asyncio.sleep(self.refresh_s)
            hot, self._hot = self._hot, set()
            for room_id in [room for room in self._cache if room not in hot and room not in self._local]:
                del self._cache[room_id]
            rooms = hot | (self._cache.keys() & self._local.keys())
            if rooms:
                await self.counts(rooms)   # updates the cache; failures are logged there

    async def _change(self, room_id: str, delta: int) -> int:
        if delta < 0 and self._local[room_id] <= 0:
            return await self.count(room_id)
        self._local[room_id] += delta
        if self._local[room_id] <= 0:
            del self._local[room_id]
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if room_id in self._local:
                    pipe.hset(self._node_key, room_id, self._local[room_id])
                else:
                    pipe.hdel(self._node_key, room_id)
                pipe.expire(self._node_key, self.ttl_s)
                pipe.sadd(self._nodes_key, self.node_id)
                await pipe.execute()
            return await self.count(room_id)
        except Exception as exc:
            log.warning("presence update failed (will be rewritten on refresh): %s", exc)
            return self._local.get(room_id, 0)

    async def join(self, room_id: str) -> int:
        return await self._change(room_id, +1)

    async def leave(self, room_id: str) -> int:
        return await self._change(room_id, -1)

    async def count(self, room_id: str) -> int:
        return (await self.counts([room_id]))[room_id]

    async def counts(self, room_ids: Iterable[str]) -> dict[str, int]:
        rooms = list(room_ids)
        if not rooms:
            return {}
        try:
            totals = await self._count_script(keys=[self._nodes_key], args=[self._node_prefix, *rooms])
        except Exception as exc:
            log.warning("presence count failed, using local counts: %s", exc)
            return {room: self._local.get(room, 0) for room in rooms}
        result = {room: int(total) for room, total in zip(rooms, totals, strict=True)}
        self._cache.update(result)
        return result
