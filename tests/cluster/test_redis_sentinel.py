"""Two gateway processes on Redis Sentinel: 1 primary, 1 replica, 3 Sentinels (real processes).

The nodes use ``redis+sentinel://s1,s2,s3/mymaster``. Chat flows; then the primary is SIGKILLed under
traffic and the Sentinels promote the replica: every acknowledged (RECEIPTed) message is stored once
and delivered once, in order, to every subscriber, and delivery resumes within ``RESUME_S``. Every
node's listener reconnected to the new primary and reported a gap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cluster.chat_checks import RoomWatch, Traffic, check_all
from tests.support.redis_cluster import RedisSentinelGroup

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

RESUME_S = 45.0
NODE_SETTINGS = {"redis_reconnect_max_s": 1, "redis_timeout_s": 2, "redis_health_check_s": 2}




async def test_primary_killed_under_traffic_loses_nothing_acknowledged(
        cluster_factory: Any, sentinel_group: RedisSentinelGroup) -> None:
    cluster = await cluster_factory(2, redis_url=sentinel_group.url, settings=NODE_SETTINGS)
    rooms = [await cluster.create_room(f"sentinel-room-{i}", node=i % 2) for i in range(2)]
    watches = [await RoomWatch.open(cluster, room) for room in rooms]
    traffic = await Traffic.open(cluster, rooms)
    await traffic.send_round(per_room=5)
    await check_all(cluster, traffic, watches, RESUME_S)

    old_port = sentinel_group.primary.port
    stop = asyncio.Event()
    sending = asyncio.create_task(traffic.run_until(stop))
    await asyncio.sleep(0.5)
    promoted = await asyncio.to_thread(sentinel_group.kill_primary)
    assert promoted.port != old_port
    await asyncio.sleep(1.0)  # traffic after the promotion too
    stop.set()
    assert await sending >= 2
    await traffic.send_round(per_room=3)
    await check_all(cluster, traffic, watches, RESUME_S)

    for index, node in enumerate(cluster.nodes):
        text = node.log_text()
        assert f"connected to 127.0.0.1:{promoted.port}" in text, "the listener follows the new primary"
        assert "after a gap" in text
        ready = await cluster.get("/readyz", index)
        assert ready["broker"] is True
    clients = promoted.command("CLIENT", "LIST")
    assert isinstance(clients, bytes)
    for node in range(2):
        assert f"name=gateway:node{node}:pubsub".encode() in clients
