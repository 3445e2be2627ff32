"""The Broker contract, run against the memory broker and the Redis broker (room and single mode).

Every test drives started brokers through the protocol only (start/subscribe/unsubscribe/publish/
stop) and asserts on what ``on_publication`` received. Multi-node tests need a shared bus and run
against Redis only (``redis_bus``): several brokers on one redis-server, as several gateway nodes.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from gateway.broker.base import Broker, BrokerUnavailable, Publication
from tests.broker.conftest import Bus, Node

ROOM_PREFIX = "/sub/chat/room/"


def chat_message(room_id: str, text: str = "hi", sender: str = "happydaddy", count: int = 0) -> bytes:
    return json.dumps({"type": "TALK", "roomId": room_id, "sender": sender, "message": text,
                       "userCount": count}, ensure_ascii=False).encode()


def room() -> tuple[str, str]:
    room_id = str(uuid.uuid4())
    return room_id, ROOM_PREFIX + room_id


def essence(publication: Publication) -> tuple[str, bytes, str | None, tuple[tuple[str, str], ...]]:
    """What every receiver must get exactly as published (the origin is not kept for raw rooms)."""
    return publication.destination, publication.body, publication.content_type, publication.headers


async def test_is_a_broker(bus: Bus) -> None:
    node = await bus.node()
    assert isinstance(node.broker, Broker)
    assert node.broker.healthy


async def test_room_publication_delivered_once_as_published(bus: Bus) -> None:
    node = await bus.node()
    room_id, destination = room()
    await node.broker.subscribe(destination)
    publication = Publication(destination, chat_message(room_id, "안녕 ✓"))
    await node.broker.publish(publication)
    await node.wait_received(1)
    await bus.settle(node)
    assert [essence(p) for p in node.received] == [essence(publication)]


async def test_generic_publication_keeps_headers_content_type_and_binary_body(bus: Bus) -> None:
    node = await bus.node()
    await node.broker.subscribe("/sub/other/x")
    binary = Publication("/sub/other/x", bytes(range(256)), None, (("a", "1"), ("b", "x:y")))
    text = Publication("/sub/other/x", b"plain text", "text/plain")
    await node.broker.publish(binary)
    await node.broker.publish(text)
    await node.wait_received(2)
    await bus.settle(node)
    assert [essence(p) for p in node.received] == [essence(binary), essence(text)]


async def test_room_publication_that_spring_could_not_read_still_arrives_intact(bus: Bus) -> None:
    node = await bus.node()
    room_id, destination = room()
    await node.broker.subscribe(destination)
    with_header = Publication(destination, chat_message(room_id), "application/json", (("seq", "7"),))
    other_type = Publication(destination, b"not json", "text/plain")
    wrong_room = Publication(destination, chat_message("another-room"))
    for publication in (with_header, other_type, wrong_room):
        await node.broker.publish(publication)
    await node.wait_received(3)
    await bus.settle(node)
    assert [essence(p) for p in node.received] == [essence(with_header), essence(other_type),
                                                    essence(wrong_room)]


async def test_only_the_channels_held_are_delivered(bus: Bus) -> None:
    node = await bus.node()
    _, destination = room()
    other_id, other = room()
    await node.broker.subscribe(destination)
    await node.broker.publish(Publication(other, chat_message(other_id)))
    await node.broker.publish(Publication("/sub/other/never", b"x"))
    await bus.settle(node)
    assert node.received == []
    if bus.mode == "single":
        # Spring's single channel carries every room: the broker hands on what its channel carries
        # (no second filter in the broker) and the receive path's fan-out finds no subscriber.
        assert [p.destination for p in node.unmatched] == [other]


async def test_unsubscribe_stops_delivery(bus: Bus) -> None:
    node = await bus.node()
    room_id, destination = room()
    await node.broker.subscribe(destination)
    await node.broker.publish(Publication(destination, chat_message(room_id, "before")))
    await node.wait_received(1)
    await node.broker.unsubscribe(destination)
    await node.broker.publish(Publication(destination, chat_message(room_id, "after")))
    await bus.settle(node)
    assert node.bodies() == [chat_message(room_id, "before")]


async def test_subscribe_is_idempotent(bus: Bus) -> None:
    # The node subscribes a destination once, for its first local subscriber (the hub's registry
    # counts subscribers, the broker does not): a second subscribe changes nothing, one unsubscribe
    # releases it.
    node = await bus.node()
    room_id, destination = room()
    await node.broker.subscribe(destination)
    await node.broker.subscribe(destination)
    await node.broker.publish(Publication(destination, chat_message(room_id, "once")))
    await node.wait_received(1)
    await node.broker.unsubscribe(destination)
    await node.broker.publish(Publication(destination, chat_message(room_id, "gone")))
    await bus.settle(node)
    assert node.bodies() == [chat_message(room_id, "once")]


async def test_resubscribe_after_unsubscribe(bus: Bus) -> None:
    node = await bus.node()
    room_id, destination = room()
    await node.broker.subscribe(destination)
    await node.broker.unsubscribe(destination)
    await node.broker.subscribe(destination)
    await node.broker.publish(Publication(destination, chat_message(room_id)))
    await node.wait_received(1)
    await bus.settle(node)
    assert node.bodies() == [chat_message(room_id)]


async def test_single_segment_pattern_matches_rooms_only(bus: Bus) -> None:
    node = await bus.node()
    await node.broker.subscribe("/sub/chat/room/*")
    a_id, a = room()
    b_id, b = room()
    await node.broker.publish(Publication(a, chat_message(a_id)))
    await node.broker.publish(Publication("/sub/other/x", b"no"))
    await node.broker.publish(Publication("/sub/chat/room/deeper/x", b"no"))
    await node.broker.publish(Publication(b, chat_message(b_id), "application/json", (("h", "v"),)))
    await bus.settle(node)
    if bus.sharded:  # Redis has no sharded pattern subscription: only the (classic) envelope channel matches
        assert [p.destination for p in node.received] == [b]
    else:
        assert [p.destination for p in node.received] == [a, b]


async def test_double_star_pattern_matches_rooms_and_other_destinations(bus: Bus) -> None:
    node = await bus.node()
    await node.broker.subscribe("/sub/**")
    a_id, a = room()
    await node.broker.publish(Publication(a, chat_message(a_id)))
    await node.broker.publish(Publication("/sub/other/x", b"yes"))
    await node.broker.publish(Publication("/app/not/sub", b"no"))
    await bus.settle(node)
    expected = ["/sub/other/x"] if bus.sharded else [a, "/sub/other/x"]  # see the test above
    assert [p.destination for p in node.received] == expected


async def test_generic_pattern(bus: Bus) -> None:
    node = await bus.node()
    await node.broker.subscribe("/sub/other/{name}")
    a_id, a = room()
    await node.broker.publish(Publication("/sub/other/x", b"1"))
    await node.broker.publish(Publication("/sub/other/x/y", b"2"))
    await node.broker.publish(Publication(a, chat_message(a_id)))
    await node.broker.publish(Publication("/sub/otherwise", b"3"))
    await bus.settle(node)
    assert node.bodies() == [b"1"]


async def test_overlapping_subscriptions_deliver_once(bus: Bus) -> None:
    node = await bus.node()
    a_id, a = room()
    await node.broker.subscribe(a)
    await node.broker.subscribe("/sub/chat/room/*")
    await node.broker.subscribe("/sub/**")
    await node.broker.subscribe("/sub/other/*")
    await node.broker.subscribe("/sub/other/x")
    await node.broker.publish(Publication(a, chat_message(a_id, "same")))
    await node.broker.publish(Publication(a, chat_message(a_id, "same")))
    await node.broker.publish(Publication("/sub/other/x", b"o"))
    await bus.settle(node)
    assert node.bodies() == [chat_message(a_id, "same"), chat_message(a_id, "same"), b"o"]


async def test_unsubscribing_a_pattern_keeps_exact_subscription(bus: Bus) -> None:
    node = await bus.node()
    a_id, a = room()
    b_id, b = room()
    await node.broker.subscribe(a)
    await node.broker.subscribe("/sub/chat/room/*")
    await node.broker.unsubscribe("/sub/chat/room/*")
    await node.broker.publish(Publication(a, chat_message(a_id)))
    await node.broker.publish(Publication(b, chat_message(b_id)))
    await bus.settle(node)
    assert [p.destination for p in node.received] == [a]


async def test_publications_of_one_publisher_keep_their_order(bus: Bus) -> None:
    node = await bus.node()
    a_id, a = room()
    await node.broker.subscribe(a)
    await node.broker.subscribe("/sub/other/x")
    expected = []
    for i in range(200):
        if i % 3:
            publication = Publication(a, chat_message(a_id, f"m{i}"))
        else:
            publication = Publication("/sub/other/x", f"g{i}".encode(), "text/plain")
        expected.append(essence(publication))
        await node.broker.publish(publication)
    await node.wait_received(200)
    await bus.settle(node)
    assert [essence(p) for p in node.received] == expected


async def test_subscribe_before_start_takes_effect(bus: Bus) -> None:
    node = await bus.node(start=False)
    a_id, a = room()
    await node.broker.subscribe(a)
    await node.start()
    await node.broker.publish(Publication(a, chat_message(a_id)))
    await node.wait_received(1)
    assert node.bodies() == [chat_message(a_id)]


async def test_publish_before_start_and_after_stop_raises(bus: Bus) -> None:
    node = await bus.node(start=False)
    with pytest.raises(BrokerUnavailable):
        await node.broker.publish(Publication("/sub/other/x", b"x"))
    await node.start()
    assert node.broker.healthy
    await node.broker.stop()
    assert not node.broker.healthy
    with pytest.raises(BrokerUnavailable):
        await node.broker.publish(Publication("/sub/other/x", b"x"))


# --- several nodes on one bus (Redis only) ------------------------------------------------------


async def test_every_subscribed_node_receives_once(redis_bus: Bus) -> None:
    nodes = [await redis_bus.node() for _ in range(4)]
    a_id, a = room()
    for node in nodes[:3]:
        await node.broker.subscribe(a)
    await nodes[1].broker.subscribe("/sub/chat/room/*")
    publication = Publication(a, chat_message(a_id, "to all"))
    await nodes[0].broker.publish(publication)
    await redis_bus.settle(nodes[0])
    for node in nodes[:3]:
        assert [essence(p) for p in node.received] == [essence(publication)], node.name
    assert nodes[3].received == []


async def test_no_callbacks_after_stop(redis_bus: Bus) -> None:
    node = await redis_bus.node()
    publisher = await redis_bus.node()
    a_id, a = room()
    await node.broker.subscribe(a)
    await publisher.broker.subscribe(a)
    await node.broker.stop()
    await publisher.broker.publish(Publication(a, chat_message(a_id)))
    await redis_bus.settle(publisher, [publisher])
    assert publisher.bodies() == [chat_message(a_id)]
    assert node.received == []


async def test_publisher_need_not_be_subscribed(redis_bus: Bus) -> None:
    publisher = await redis_bus.node()
    receiver = await redis_bus.node()
    await receiver.broker.subscribe("/sub/other/x")
    await publisher.broker.publish(Publication("/sub/other/x", b"x", "text/plain", (("k", "v"),)))
    await redis_bus.settle(publisher)
    assert receiver.bodies() == [b"x"]
    assert receiver.received[0].origin == "n0"
    assert publisher.received == []


async def test_every_node_sees_one_publishers_order(redis_bus: Bus) -> None:
    nodes: list[Node] = [await redis_bus.node() for _ in range(3)]
    a_id, a = room()
    for node in nodes:
        await node.broker.subscribe(a)
    bodies = [chat_message(a_id, f"m{i}") for i in range(100)]
    for body in bodies:
        await nodes[2].broker.publish(Publication(a, body))
    await redis_bus.settle(nodes[2])
    for node in nodes:
        assert node.bodies() == bodies, node.name


async def test_concurrent_publishers_each_keep_their_order(redis_bus: Bus) -> None:
    nodes = [await redis_bus.node() for _ in range(3)]
    a_id, a = room()
    for node in nodes:
        await node.broker.subscribe(a)

    async def run(node: Node) -> None:
        for i in range(50):
            await node.broker.publish(Publication(a, chat_message(a_id, f"{node.name}-{i}")))

    await asyncio.gather(*(run(node) for node in nodes))
    for node in nodes:
        await redis_bus.settle(node)
    for receiver in nodes:
        texts = [json.loads(body)["message"] for body in receiver.bodies()]
        assert len(texts) == 150
        for sender in nodes:
            assert [t for t in texts if t.startswith(sender.name + "-")] == [
                f"{sender.name}-{i}" for i in range(50)]
