"""The Redis broker against a real redis-server that dies, hangs, restarts or kills our connection.

Each test owns its redis-server (``private_redis``), so it can SIGKILL, SIGSTOP or restart it.
The brokers use short timeouts here (``FAST``) so that detection and reconnection happen quickly;
the tests only wait (polling) for the observable outcome, they never assert on durations.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.broker.base import BrokerUnavailable, Publication
from gateway.broker.redis import RedisBroker, backoff_delays
from tests.broker.conftest import BARRIER, Bus, Node
from tests.support.polling import eventually
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

FAST = {"timeout_s": 1.0, "health_check_s": 0.2, "reconnect_max_s": 0.2}


@pytest.fixture
async def fault_bus(private_redis: RedisServer) -> AsyncIterator[Bus]:
    bus = Bus("redis-room", private_redis)
    try:
        yield bus
    finally:
        await bus.close()


def chat(room_id: str, text: str) -> bytes:
    return json.dumps({"type": "TALK", "roomId": room_id, "sender": "x", "message": text,
                       "userCount": 0}).encode()


def redis_broker(node: Node) -> RedisBroker:
    assert isinstance(node.broker, RedisBroker)
    return node.broker


async def wait_healthy(node: Node, healthy: bool = True) -> None:
    await node.wait_for(lambda: node.broker.healthy is healthy, f"healthy={healthy}")


async def delivered_again(bus: Bus, node: Node, destination: str, body: bytes) -> None:
    """Publish and wait until it arrives (the node publishes to itself through Redis)."""
    await node.broker.publish(Publication(destination, body))
    await node.wait_for(lambda: body in node.bodies(destination), f"{body!r} after recovery")


def client_list(server: RedisServer, *filters: str) -> list[dict[str, str]]:
    raw = server.command("CLIENT", "LIST", *filters)
    assert isinstance(raw, bytes)
    return [dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            for line in raw.decode().splitlines() if line]


async def test_killed_redis_is_detected_and_recovered_with_a_gap(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(**FAST)
    room_id = str(uuid.uuid4())
    room = f"/sub/chat/room/{room_id}"
    await node.broker.subscribe(room)
    await node.broker.subscribe("/sub/other/*")
    await delivered_again(fault_bus, node, room, chat(room_id, "before"))
    assert node.gaps == []

    server.kill()
    await wait_healthy(node, False)
    with pytest.raises(BrokerUnavailable):
        await node.broker.publish(Publication(room, chat(room_id, "while down")))

    server.restart()
    await wait_healthy(node)
    assert node.gaps == [frozenset({room, "/sub/other/*", BARRIER})]
    await delivered_again(fault_bus, node, room, chat(room_id, "after"))
    await node.broker.publish(Publication("/sub/other/x", b"pattern too"))
    await node.wait_for(lambda: b"pattern too" in node.bodies("/sub/other/x"), "the pattern publication")
    assert chat(room_id, "while down") not in node.bodies()
    assert len(node.gaps) == 1


async def test_other_nodes_publications_flow_again_after_restart(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    receiver = await fault_bus.node(**FAST)
    publisher = await fault_bus.node(**FAST)
    room_id = str(uuid.uuid4())
    room = f"/sub/chat/room/{room_id}"
    await receiver.broker.subscribe(room)
    server.kill()
    await wait_healthy(receiver, False)
    await wait_healthy(publisher, False)
    server.restart()
    await wait_healthy(receiver)
    await publisher.broker.publish(Publication(room, chat(room_id, "from the other node")))
    await receiver.wait_for(lambda: receiver.bodies(room) == [chat(room_id, "from the other node")],
                            "the other node's publication")
    assert receiver.gaps == [frozenset({room, BARRIER})]


async def test_client_kill_of_the_pubsub_connection_reconnects_with_a_gap(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(**FAST)
    room_id = str(uuid.uuid4())
    room = f"/sub/chat/room/{room_id}"
    await node.broker.subscribe(room)
    broker = redis_broker(node)
    assert broker.connections == 1
    killed = server.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed == 1
    await node.wait_for(lambda: len(node.gaps) == 1 and node.broker.healthy, "the reconnect gap")
    assert node.gaps == [frozenset({room, BARRIER})]
    assert broker.connections == 2
    await delivered_again(fault_bus, node, room, chat(room_id, "after client kill"))


async def test_subscribe_while_redis_is_down_takes_effect_when_it_returns(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(**FAST)
    old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
    old, new = f"/sub/chat/room/{old_id}", f"/sub/chat/room/{new_id}"
    await node.broker.subscribe(old)
    server.kill()
    await wait_healthy(node, False)
    await node.broker.subscribe(new)
    await node.broker.unsubscribe(old)
    server.restart()
    await wait_healthy(node)
    assert node.gaps == [frozenset({new, BARRIER})]
    await node.broker.publish(Publication(old, chat(old_id, "unsubscribed meanwhile")))
    await delivered_again(fault_bus, node, new, chat(new_id, "subscribed while down"))
    await fault_bus.settle(node)
    assert node.bodies(old) == []


async def test_hung_redis_is_detected_by_the_health_check(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(**FAST)
    room_id = str(uuid.uuid4())
    room = f"/sub/chat/room/{room_id}"
    await node.broker.subscribe(room)
    server.pause()
    try:
        await wait_healthy(node, False)
        with pytest.raises(BrokerUnavailable):
            await node.broker.publish(Publication(room, chat(room_id, "into a hung server")))
    finally:
        server.resume()
    await wait_healthy(node)
    assert node.gaps == [frozenset({room, BARRIER})]
    await delivered_again(fault_bus, node, room, chat(room_id, "after the hang"))


async def test_idle_connection_is_pinged_and_stays_up(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(timeout_s=2.0, health_check_s=0.05, reconnect_max_s=0.2)

    def pings() -> int:
        stats = server.command("INFO", "commandstats")
        assert isinstance(stats, bytes)
        for line in stats.decode().splitlines():
            if line.startswith("cmdstat_ping:"):
                return int(line.split("calls=", 1)[1].split(",", 1)[0])
        return 0

    await eventually(lambda: pings() >= 5, "five health-check PINGs")
    assert node.broker.healthy
    assert redis_broker(node).connections == 1
    assert node.gaps == []


async def test_start_while_redis_is_down_connects_later(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    server.kill()
    node = await fault_bus.node(start=False, **FAST)
    await node.start()  # returns after timeout_s, still trying
    assert not node.broker.healthy
    with pytest.raises(BrokerUnavailable):
        await node.broker.publish(Publication("/sub/other/x", b"x"))
    server.restart()
    await wait_healthy(node)
    assert node.gaps == [frozenset({BARRIER})]
    await node.broker.subscribe("/sub/other/x")
    await node.broker.publish(Publication("/sub/other/x", b"now", "text/plain"))
    await node.wait_for(lambda: node.bodies() == [b"now"], "the publication")


async def test_one_pubsub_connection_per_node_and_a_bounded_publish_pool(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node(pool_size=2)
    rooms = [f"/sub/chat/room/{uuid.uuid4()}" for _ in range(50)]
    for room in rooms:
        await node.broker.subscribe(room)
    await node.broker.subscribe("/sub/**")
    bodies = [f"m{i}".encode() for i in range(60)]
    await asyncio.gather(*(node.broker.publish(Publication("/sub/other/x", body, "text/plain"))
                           for body in bodies))
    await node.wait_for(lambda: sorted(node.bodies()) == sorted(bodies), "60 concurrent publications")
    pubsub = [c for c in client_list(server) if c.get("name") == "gateway:n0:pubsub"]
    publish = [c for c in client_list(server) if c.get("name") == "gateway:n0:publish"]
    assert len(pubsub) == 1
    assert int(pubsub[0]["sub"]) == 2 * len(rooms) + 1  # room channel + envelope channel each, barrier
    assert int(pubsub[0]["psub"]) == 2  # /sub/**: rooms and envelopes
    assert 1 <= len(publish) <= 2


async def test_a_failing_callback_does_not_stop_the_listener(fault_bus: Bus) -> None:
    received: list[bytes] = []

    def on_publication(publication: Publication) -> None:
        if publication.body == b"boom":
            raise RuntimeError("callback bug")
        received.append(publication.body)

    node = await fault_bus.node(start=False)
    await node.broker.start(on_publication)
    await node.broker.subscribe("/sub/other/x")
    for body in (b"boom", b"fine"):
        await node.broker.publish(Publication("/sub/other/x", body, "text/plain"))
    await eventually(lambda: received == [b"fine"], "the publication after the failing one")
    assert redis_broker(node).connections == 1


async def test_foreign_messages_on_subscribed_channels_are_ignored(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node()
    await node.broker.subscribe("/sub/other/x")
    channel = fault_bus.prefix + "gateway:dest:/sub/other/x"
    server.command("PUBLISH", channel, b"not an envelope")
    server.command("PUBLISH", channel, b'{"v":1,"destination":"/sub/other/y","body":"wrong"}')
    await node.broker.publish(Publication("/sub/other/x", b"good", "text/plain"))
    await node.wait_for(lambda: node.bodies() == [b"good"], "the good publication")
    assert redis_broker(node).undecodable == 2


def test_backoff_doubles_from_the_minimum_up_to_the_maximum() -> None:
    assert list(itertools.islice(backoff_delays(0.1, 1.0), 7)) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert list(itertools.islice(backoff_delays(0.1, 0.05), 2)) == [0.05, 0.05]


def test_invalid_options_are_rejected() -> None:
    from gateway.broker.channels import SpringChannelMapper

    with pytest.raises(ValueError):
        RedisBroker("redis://127.0.0.1:1/0", node_id="n", channel_mapper=SpringChannelMapper(), timeout_s=0)
    with pytest.raises(ValueError):
        RedisBroker("redis://127.0.0.1:1/0", node_id="n", channel_mapper=SpringChannelMapper(), pool_size=0)


async def test_redis_subscriptions_follow_the_nodes_destinations(fault_bus: Bus) -> None:
    server = fault_bus.server
    assert server is not None
    node = await fault_bus.node()

    def counts() -> tuple[int, int]:
        (pubsub,) = [c for c in client_list(server) if c.get("name") == "gateway:n0:pubsub"]
        return int(pubsub["sub"]), int(pubsub["psub"])

    assert counts() == (1, 0)  # the barrier destination
    rooms = [f"/sub/chat/room/{uuid.uuid4()}" for _ in range(3)]
    for room in rooms:
        await node.broker.subscribe(room)
        await node.broker.subscribe(room)
    await node.broker.subscribe("/sub/other/*")
    assert counts() == (7, 1)
    await node.broker.unsubscribe("/sub/other/*")
    await node.broker.unsubscribe("/sub/never/subscribed")
    await eventually(lambda: counts() == (7, 0), "the pattern's PUNSUBSCRIBE")
    for room in rooms:  # subscribed twice, released by one unsubscribe (the hub counts subscribers)
        await node.broker.unsubscribe(room)
    await eventually(lambda: counts() == (1, 0), "every room's UNSUBSCRIBE")
