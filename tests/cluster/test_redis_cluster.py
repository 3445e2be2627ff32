"""Three gateway processes on a real 3-primary + 3-replica Redis Cluster with sharded Pub/Sub.

One cluster per module (``redis-server --cluster-enabled yes`` x 6 + ``redis-cli --cluster create``).
Rooms are created until every primary owns the channels of two of them (``CLUSTER KEYSLOT``), so
traffic crosses every shard. Each test then checks, on every subscriber of every node, that each
acknowledged (RECEIPTed) message is stored once and delivered once, in seq order:

- plain chat, and that each room channel is SSUBSCRIBEd on its own shard only (PUBSUB SHARDNUMSUB),
  never classically (PUBSUB NUMSUB); presence counts are fleet-wide (keys in one hash slot);
- a primary SIGKILLed under traffic and its replica promoted (CLUSTER FAILOVER FORCE);
- a slot holding a test room migrated to another primary under traffic (CLUSTER SETSLOT steps).

Bounds are generous (loaded CI machines): delivery resumes within ``RESUME_S`` of the fault being over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cluster.chat_checks import RoomWatch, Traffic, check_all
from tests.cluster.conftest import ROOM_PREFIX, Cluster
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

RESUME_S = 45.0
"""Longest wait for every subscriber to catch up once a fault is over."""
ROOMS_PER_PRIMARY = 2
NODE_SETTINGS = {"redis_sharded_pubsub": True, "redis_reconnect_max_s": 1, "redis_timeout_s": 2,
                 "redis_health_check_s": 2}




async def gateways(cluster_factory: Any, redis_cluster: RedisClusterProcesses, count: int = 3) -> Cluster:
    cluster: Cluster = await cluster_factory(count, redis_url=redis_cluster.url, settings=NODE_SETTINGS)
    return cluster


async def rooms_on_every_shard(cluster: Cluster, redis_cluster: RedisClusterProcesses) -> dict[int, list[str]]:
    """Create rooms until every primary owns ``ROOMS_PER_PRIMARY`` room channels; port -> room ids."""
    owned: dict[int, list[str]] = {p.port: [] for p in redis_cluster.primaries()}
    for attempt in range(200):
        if all(len(rooms) >= ROOMS_PER_PRIMARY for rooms in owned.values()):
            return owned
        room = await cluster.create_room(f"shard-room-{attempt}", node=attempt % len(cluster.nodes))
        port = redis_cluster.owner(redis_cluster.keyslot(room)).port
        if len(owned[port]) < ROOMS_PER_PRIMARY:
            owned[port].append(room)
    raise AssertionError(f"could not spread rooms over the primaries: {owned}")


def shard_subscribers(server: RedisServer, channel: str) -> int:
    reply = server.command("PUBSUB", "SHARDNUMSUB", channel)
    assert isinstance(reply, list) and isinstance(reply[1], int)
    return reply[1]


def classic_subscribers(server: RedisServer, channel: str) -> int:
    reply = server.command("PUBSUB", "NUMSUB", channel)
    assert isinstance(reply, list) and isinstance(reply[1], int)
    return reply[1]


async def wait_shard_subscribers(redis_cluster: RedisClusterProcesses, room: str, count: int,
                                 timeout_s: float = RESUME_S) -> RedisServer:
    """Wait until the room channel's current owner has ``count`` shard subscribers; return the owner."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        owner = redis_cluster.owner(redis_cluster.keyslot(room))
        if shard_subscribers(owner, room) == count:
            return owner
        if loop.time() > deadline:
            raise AssertionError(f"{room}: {shard_subscribers(owner, room)} shard subscribers on its owner "
                                 f"{owner.port}, want {count}")
        await asyncio.sleep(0.1)


async def setup(cluster_factory: Any, redis_cluster: RedisClusterProcesses
                ) -> tuple[Cluster, dict[int, list[str]], Traffic, list[RoomWatch]]:
    cluster = await gateways(cluster_factory, redis_cluster)
    by_shard = await rooms_on_every_shard(cluster, redis_cluster)
    rooms = [room for rooms in by_shard.values() for room in rooms]
    watches = [await RoomWatch.open(cluster, room) for room in rooms]
    traffic = await Traffic.open(cluster, rooms)
    return cluster, by_shard, traffic, watches


async def test_chat_across_every_shard_is_stored_and_delivered_once_in_order(
        cluster_factory: Any, redis_cluster: RedisClusterProcesses) -> None:
    cluster, by_shard, traffic, watches = await setup(cluster_factory, redis_cluster)
    for port, rooms in by_shard.items():
        owner = redis_cluster.by_address(f"127.0.0.1:{port}")
        for room in rooms:
            assert shard_subscribers(owner, room) == len(cluster.nodes), "one SSUBSCRIBE per node, on the owner"
            for other in redis_cluster.primaries():
                assert classic_subscribers(other, room) == 0, "room channels are never classic subscriptions"
                if other is not owner:
                    assert shard_subscribers(other, room) == 0
    await traffic.send_round(per_room=10)
    await check_all(cluster, traffic, watches, RESUME_S)
    for index in range(len(cluster.nodes)):
        ready = await cluster.get("/readyz", index)
        assert ready["broker"] is True

    # Presence on a cluster: its keys share one hash slot ({gateway:presence}), counts are fleet-wide.
    lobby = await cluster.create_room("presence")
    for node in range(len(cluster.nodes)):
        ws = await cluster.client(node, login=f"member{node}")
        await ws.subscribe(ROOM_PREFIX + lobby, "p", receipt=False)

    async def lobby_counts() -> list[int]:
        counts = []
        for node in range(len(cluster.nodes)):
            listed = await cluster.get("/chat/rooms", node)
            counts.extend(r["userCount"] for r in listed if r["roomId"] == lobby)
        return counts

    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESUME_S
    while await lobby_counts() != [3, 3, 3]:
        assert loop.time() < deadline, f"presence counts {await lobby_counts()}, want 3 on every node"
        await asyncio.sleep(0.2)
    keys_owner = redis_cluster.owner(redis_cluster.keyslot("{gateway:presence}:nodes"))
    members = keys_owner.command("SMEMBERS", "{gateway:presence}:nodes")
    assert isinstance(members, list) and {b"node0", b"node1", b"node2"} <= set(members)


async def test_primary_killed_under_traffic_loses_nothing_acknowledged(
        cluster_factory: Any, redis_cluster: RedisClusterProcesses) -> None:
    cluster, by_shard, traffic, watches = await setup(cluster_factory, redis_cluster)
    await traffic.send_round(per_room=3)
    await check_all(cluster, traffic, watches, RESUME_S)
    victim_port = next(iter(by_shard))
    victim = redis_cluster.by_address(f"127.0.0.1:{victim_port}")
    stop = asyncio.Event()
    sending = asyncio.create_task(traffic.run_until(stop))
    await asyncio.sleep(0.5)
    promoted = await asyncio.to_thread(redis_cluster.fail_over, victim)
    for room in by_shard[victim_port]:
        owner = await wait_shard_subscribers(redis_cluster, room, len(cluster.nodes))
        assert owner is promoted
    await asyncio.sleep(1.0)  # traffic after the promotion too
    stop.set()
    rounds = await sending
    assert rounds >= 2
    await traffic.send_round(per_room=2)
    await check_all(cluster, traffic, watches, RESUME_S)
    assert_rerouted_with_gap(cluster)


def assert_rerouted_with_gap(cluster: Cluster) -> None:
    """Every node moved shard subscriptions to the new owner and reported the gap (its log says so)."""
    for node in cluster.nodes:
        text = node.log_text()
        assert "moves from" in text, f"{node.settings.get('node_id')} never re-placed a shard channel"
        assert "after a gap" in text, f"{node.settings.get('node_id')} never reported a gap"


async def test_slot_migrated_under_traffic_loses_nothing_acknowledged(
        cluster_factory: Any, redis_cluster: RedisClusterProcesses) -> None:
    cluster, by_shard, traffic, watches = await setup(cluster_factory, redis_cluster)
    await traffic.send_round(per_room=3)
    await check_all(cluster, traffic, watches, RESUME_S)
    port, rooms = next(iter(by_shard.items()))
    room = rooms[0]
    slot = redis_cluster.keyslot(room)
    source = redis_cluster.by_address(f"127.0.0.1:{port}")
    target = next(p for p in redis_cluster.primaries() if p is not source)
    stop = asyncio.Event()
    sending = asyncio.create_task(traffic.run_until(stop))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
    owner = await wait_shard_subscribers(redis_cluster, room, len(cluster.nodes))
    assert owner is target
    assert shard_subscribers(source, room) == 0
    await asyncio.sleep(1.0)
    stop.set()
    assert await sending >= 2
    await traffic.send_round(per_room=2)
    await check_all(cluster, traffic, watches, RESUME_S)
    assert_rerouted_with_gap(cluster)
    for index in range(len(cluster.nodes)):
        ready = await cluster.get("/readyz", index)
        assert ready["broker"] is True
