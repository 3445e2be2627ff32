"""The Redis broker under Sentinel (1 primary, 1 replica, 3 Sentinels; real processes, one group per module).

The listener connects to the primary the Sentinels name; when it is SIGKILLed and the replica is
promoted, the listener reconnects to the new primary and reports a gap, publishing asks the Sentinels
again, and traffic flows. Cluster operations run in a thread so the broker keeps its health checks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.broker.base import BrokerUnavailable, Publication
from gateway.broker.channels import SpringChannelMapper
from gateway.broker.redis import MAIN, RedisBroker
from gateway.chat.payload import peek_seq
from tests.broker.conftest import BARRIER, Node
from tests.broker.test_redis_faults import chat
from tests.support.redis_cluster import RedisSentinelGroup

pytestmark = pytest.mark.redis

OPTIONS: dict[str, Any] = {"timeout_s": 5.0, "health_check_s": 1.0, "reconnect_max_s": 0.5}




@pytest.fixture
async def node(sentinel_group: RedisSentinelGroup) -> AsyncIterator[Node]:
    mapper = SpringChannelMapper(prefix=f"t{uuid.uuid4().hex[:8]}:", node_id="s0", room_reader=peek_seq)
    made = Node("s0", RedisBroker(sentinel_group.url, node_id="s0", channel_mapper=mapper, **OPTIONS))
    await made.start()
    try:
        yield made
    finally:
        await made.broker.stop()


async def test_primary_failover_reconnects_to_the_new_primary_with_a_gap(
        node: Node, sentinel_group: RedisSentinelGroup) -> None:
    broker = node.broker
    assert isinstance(broker, RedisBroker)
    assert broker.links()[MAIN] == f"127.0.0.1:{sentinel_group.primary.port}"
    room_id = uuid.uuid4().hex
    room = "/sub/chat/room/" + room_id
    await broker.subscribe(room)
    await broker.publish(Publication(room, chat(room_id, "before")))
    await node.wait_for(lambda: node.bodies(room) == [chat(room_id, "before")], "the first publication")

    promoted = await asyncio.to_thread(sentinel_group.kill_primary)
    await node.wait_for(lambda: node.gaps == [frozenset({room, BARRIER})] and broker.healthy,
                        "the gap after the failover", timeout_s=60)
    assert broker.links()[MAIN] == f"127.0.0.1:{promoted.port}"

    async def published() -> bool:
        try:
            await broker.publish(Publication(room, chat(room_id, "after")))
        except BrokerUnavailable:
            return False
        return True

    deadline = asyncio.get_running_loop().time() + 30
    while not await published():  # the publishing pool learns the new primary on its next attempt
        assert asyncio.get_running_loop().time() < deadline, "publishing never reached the new primary"
        await asyncio.sleep(0.1)
    await node.wait_for(lambda: chat(room_id, "after") in node.bodies(room), "a publication after the failover")
