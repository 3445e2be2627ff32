"""The Redis broker on a real Redis Cluster (3 primaries + 3 replicas, one per module).

Cluster operations run in a thread (``asyncio.to_thread``) so the brokers' event loop keeps serving
their health checks meanwhile.

- sharded Pub/Sub: one pub/sub link per primary that owns a room channel the node needs (plus the
  classic ``main`` link), each SSUBSCRIBEd only to its own channels; a link closes when its last
  channel goes;
- each SPUBLISH reaches exactly one shard (``INFO commandstats`` per primary);
- a migrated slot: Redis pushes ``sunsubscribe``, the broker re-reads the slot map, subscribes on the
  new owner and reports a gap for exactly the rooms of that slot;
- classic mode on a cluster (the default, for mixed fleets): one link to any node, PUBLISH broadcast.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.broker.base import Publication
from gateway.broker.channels import SpringChannelMapper
from gateway.broker.redis import MAIN, RedisBroker
from gateway.chat.payload import peek_seq
from tests.broker.conftest import Node
from tests.broker.test_redis_faults import chat, client_list
from tests.support.polling import eventually
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

FAST: dict[str, Any] = {"timeout_s": 5.0, "health_check_s": 1.0, "reconnect_max_s": 0.5}  # loaded CI: no false deaths
ROOM = "/sub/chat/room/"




class Nodes:
    def __init__(self, cluster: RedisClusterProcesses) -> None:
        self.cluster = cluster
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"
        self.nodes: list[Node] = []

    async def node(self, *, sharded: bool = True) -> Node:
        name = f"c{len(self.nodes)}"
        mapper = SpringChannelMapper(prefix=self.prefix, node_id=name, room_reader=peek_seq, sharded=sharded)
        node = Node(name, RedisBroker(self.cluster.url, node_id=name, channel_mapper=mapper, **FAST))
        self.nodes.append(node)
        await node.start()
        assert node.broker.healthy
        return node

    def room_on(self, primary: RedisServer) -> tuple[str, str]:
        """A fresh room id whose channel ``<prefix><id>`` hashes to a slot ``primary`` owns."""
        for _ in range(1000):
            room_id = uuid.uuid4().hex
            if self.cluster.owner(self.cluster.keyslot(self.prefix + room_id)) is primary:
                return room_id, ROOM + room_id
        raise AssertionError(f"no room on {primary.port}")


@pytest.fixture
async def nodes(redis_cluster: RedisClusterProcesses) -> AsyncIterator[Nodes]:
    made = Nodes(redis_cluster)
    try:
        yield made
    finally:
        for node in made.nodes:
            await node.broker.stop()


def broker(node: Node) -> RedisBroker:
    assert isinstance(node.broker, RedisBroker)
    return node.broker


def pubsub_clients(server: RedisServer, name: str) -> list[dict[str, str]]:
    return [c for c in client_list(server) if c.get("name") == f"gateway:{name}:pubsub"]


async def test_one_link_per_primary_that_owns_needed_channels(nodes: Nodes) -> None:
    primaries = nodes.cluster.primaries()
    node = await nodes.node()
    rooms = {p.port: [nodes.room_on(p) for _ in range(3)] for p in primaries[:2]}
    for room_list in rooms.values():
        for _, destination in room_list:
            await node.broker.subscribe(destination)
    links = broker(node).links()
    assert set(links) == {MAIN, *(f"127.0.0.1:{port}" for port in rooms)}
    for primary in primaries:
        # the room's envelope channels (classic) live on the main link, wherever it is
        sharded = [c for c in pubsub_clients(primary, node.name) if int(c.get("ssub", "0")) > 0]
        expected = 3 if primary.port in rooms else 0
        assert sum(int(c["ssub"]) for c in sharded) == expected
    for room_id, destination in rooms[primaries[0].port]:
        await node.broker.publish(Publication(destination, chat(room_id, "hi")))
        await node.wait_for(lambda: bool(node.bodies(destination)), "the sharded publication")  # noqa: B023
    for _, destination in rooms[primaries[0].port]:
        await node.broker.unsubscribe(destination)
    gone = f"127.0.0.1:{primaries[0].port}"
    await eventually(lambda: gone not in broker(node).links(), "the idle primary's link to close")
    await eventually(lambda: not [c for c in pubsub_clients(primaries[0], node.name)
                                  if int(c.get("ssub", "0")) > 0], "its connection to go")
    assert node.broker.healthy


async def test_each_spublish_reaches_exactly_one_shard(nodes: Nodes) -> None:
    primaries = nodes.cluster.primaries()
    node = await nodes.node()
    owner = primaries[1]
    room_id, destination = nodes.room_on(owner)
    await node.broker.subscribe(destination)
    for primary in primaries:
        primary.command("CONFIG", "RESETSTAT")
    bodies = [chat(room_id, f"m{i}") for i in range(20)]
    await node.broker.publish_many([Publication(destination, body) for body in bodies])
    await node.wait_for(lambda: node.bodies(destination) == bodies, "20 publications in order")
    for primary in primaries:
        stats = nodes.cluster.info(primary, "commandstats")
        spublish = stats.get("cmdstat_spublish", "calls=0").split(",")[0]
        publish = stats.get("cmdstat_publish", "calls=0").split(",")[0]
        assert spublish == ("calls=20" if primary is owner else "calls=0"), (primary.port, spublish)
        assert publish == "calls=0"


async def test_migrated_slot_is_resubscribed_on_the_new_owner_with_a_gap(nodes: Nodes) -> None:
    primaries = nodes.cluster.primaries()
    a, b = await nodes.node(), await nodes.node()
    source, target = primaries[0], primaries[2]
    moving_id, moving = nodes.room_on(source)
    staying_id, staying = nodes.room_on(primaries[1])
    for node in (a, b):
        await node.broker.subscribe(moving)
        await node.broker.subscribe(staying)
    slot = nodes.cluster.keyslot(nodes.prefix + moving_id)
    try:
        await asyncio.to_thread(nodes.cluster.migrate_slot, slot, target)
        for node in (a, b):
            await node.wait_for(lambda: bool(node.gaps), "the gap")  # noqa: B023
            await node.wait_for(lambda: node.broker.healthy, "healthy again")  # noqa: B023
            assert node.gaps == [frozenset({moving})]
            assert broker(node).reroutes == 1
        await a.broker.publish(Publication(moving, chat(moving_id, "after")))
        await a.broker.publish(Publication(staying, chat(staying_id, "still")))
        for node in (a, b):
            want = ([chat(moving_id, "after")], [chat(staying_id, "still")])
            await node.wait_for(lambda: (node.bodies(moving), node.bodies(staying)) == want,  # noqa: B023
                                "traffic on both rooms")
        reply = target.command("PUBSUB", "SHARDNUMSUB", nodes.prefix + moving_id)
        assert isinstance(reply, list) and reply[1] == 2, "both nodes SSUBSCRIBEd on the new owner"
    finally:
        await asyncio.to_thread(nodes.cluster.migrate_slot, slot, source)


async def test_classic_mode_on_a_cluster_uses_one_link_and_broadcast_publish(nodes: Nodes) -> None:
    a, b = await nodes.node(sharded=False), await nodes.node(sharded=False)
    room_id, destination = nodes.room_on(nodes.cluster.primaries()[0])
    await b.broker.subscribe(destination)
    assert set(broker(b).links()) == {MAIN}
    await a.broker.publish(Publication(destination, chat(room_id, "x")))
    await b.wait_for(lambda: b.bodies(destination) == [chat(room_id, "x")], "the broadcast publication")


async def test_ssubscribe_on_a_stale_slot_map_follows_moved(nodes: Nodes) -> None:
    """A slot moves while this node has no channel in it (no sunsubscribe push reaches it), so its
    slot map is stale; the SSUBSCRIBE goes to the old owner, gets MOVED, and lands on the new one."""
    primaries = nodes.cluster.primaries()
    source, target = primaries[0], primaries[1]
    node = await nodes.node()
    anchor_id, anchor = nodes.room_on(source)  # keeps a link to the source open
    await node.broker.subscribe(anchor)
    anchor_slot = nodes.cluster.keyslot(nodes.prefix + anchor_id)
    while True:
        room_id, destination = nodes.room_on(source)
        slot = nodes.cluster.keyslot(nodes.prefix + room_id)
        if slot != anchor_slot:
            break
    await asyncio.to_thread(nodes.cluster.migrate_slot, slot, target)
    try:
        await node.broker.subscribe(destination)
        await node.wait_for(lambda: node.broker.healthy and broker(node).reroutes == 1, "the re-placed channel")
        assert broker(node).redirects >= 1
        reply = target.command("PUBSUB", "SHARDNUMSUB", nodes.prefix + room_id)
        assert isinstance(reply, list) and reply[1] == 1
        await node.broker.publish(Publication(destination, chat(room_id, "moved")))
        await node.wait_for(lambda: node.bodies(destination) == [chat(room_id, "moved")], "the publication")
    finally:
        await asyncio.to_thread(nodes.cluster.migrate_slot, slot, source)

async def test_planned_switch_over_moves_subscriptions_with_a_gap(nodes: Nodes) -> None:
    """CLUSTER FAILOVER with both alive: the demoted primary pushes sunsubscribe, the node follows."""
    primaries = nodes.cluster.primaries()
    node = await nodes.node()
    room_id, destination = nodes.room_on(primaries[1])
    await node.broker.subscribe(destination)
    promoted = await asyncio.to_thread(nodes.cluster.switch_over, primaries[1])
    await node.wait_for(lambda: node.gaps == [frozenset({destination})] and node.broker.healthy,
                        "the gap and healthy again")
    assert f"127.0.0.1:{promoted.port}" in broker(node).links()
    await node.broker.publish(Publication(destination, chat(room_id, "after")))
    await node.wait_for(lambda: node.bodies(destination) == [chat(room_id, "after")], "the publication")

async def test_failover_moves_subscriptions_to_the_promoted_replica_with_a_gap(nodes: Nodes) -> None:
    """Last in the module: it kills a primary (SIGKILL, then CLUSTER FAILOVER FORCE on its replica)."""
    primaries = nodes.cluster.primaries()
    victim = next(p for p in primaries if _has_replica(nodes.cluster, p))
    node = await nodes.node()
    broker(node).reconnect_max_s = 5.0
    moving_id, moving = nodes.room_on(victim)
    staying_id, staying = nodes.room_on(next(p for p in primaries if p is not victim))
    await node.broker.subscribe(moving)
    await node.broker.subscribe(staying)
    main_on_victim = broker(node).links()[MAIN] == f"127.0.0.1:{victim.port}"
    promoted = await asyncio.to_thread(nodes.cluster.fail_over, victim)

    def gapped() -> set[str]:
        return set().union(*node.gaps)

    await node.wait_for(lambda: moving in gapped() and node.broker.healthy,
                        "the gap for the moved room and healthy again", timeout_s=60)
    if not main_on_victim:  # else the classic link moved too: a gap for every destination
        assert gapped() == {moving}
    assert broker(node).links().get(f"127.0.0.1:{promoted.port}")
    await node.broker.publish(Publication(moving, chat(moving_id, "after")))
    await node.broker.publish(Publication(staying, chat(staying_id, "still")))
    await node.wait_for(lambda: node.bodies(moving) == [chat(moving_id, "after")]
                        and node.bodies(staying) == [chat(staying_id, "still")], "traffic on both rooms")


def _has_replica(cluster: RedisClusterProcesses, primary: RedisServer) -> bool:
    try:
        cluster.replica_of(primary)
    except Exception:
        return False
    return True

