"""Nothing silently lost when Redis blips or a node dies; presence heals; a mixed fleet interoperates;
shutdown drains. Real gateway processes, a real redis-server, raw redis-py clients for Spring's side.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.cluster.conftest import ROOM_PREFIX, chat_body, read_chat
from tests.support.polling import eventually
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.cluster


async def test_messages_sent_while_redis_is_down_arrive_after_it_returns(
        cluster_factory: Any, redis: RedisServer) -> None:
    cluster = await cluster_factory(2, redis=redis)
    room = await cluster.create_room()
    listeners = [await cluster.client(node) for node in (0, 1)]
    for ws in listeners:
        await ws.subscribe(ROOM_PREFIX + room, "s")
    sender = await cluster.client(0, login="sam")
    await sender.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "before"},
                            chat_body(room, "before"))
    for ws in listeners:
        assert [m["message"] for m in await read_chat(ws, 1)] == ["before"]

    redis.kill()
    # Committed while the bus is gone: the RECEIPT still means "durable".
    for i in range(5):
        await sender.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": f"r{i}"},
                                chat_body(room, f"during-{i}"))
    receipts = []
    while len(receipts) < 6:
        frame = await sender.next_frame(20)
        if frame.command == "RECEIPT":
            receipts.append(frame.get("receipt-id"))
    assert receipts[-5:] == [f"r{i}" for i in range(5)]
    redis.restart()
    await sender.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, "after"))
    for ws in listeners:
        got = await read_chat(ws, 6, timeout=40)
        assert [m["message"] for m in got] == [f"during-{i}" for i in range(5)] + ["after"]
        assert [m["seq"] for m in got] == list(range(2, 8))
    assert len(await cluster.history(room)) == 7


async def test_a_killed_pubsub_connection_is_a_gap_that_gets_repaired(
        cluster_factory: Any, redis: RedisServer) -> None:
    cluster = await cluster_factory(2, redis=redis)
    room = await cluster.create_room()
    listener = await cluster.client(1)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    sender = await cluster.client(0)
    for i in range(3):
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await sender.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, f"m{i}"))
    got = await read_chat(listener, 3, timeout=40)
    assert [m["seq"] for m in got] == [1, 2, 3]


async def test_user_counts_are_cluster_wide_and_heal_when_a_node_is_killed(
        cluster_factory: Any, redis: RedisServer) -> None:
    cluster = await cluster_factory(3, redis=redis)
    room = await cluster.create_room()
    watcher = await cluster.client(0)
    await watcher.subscribe(ROOM_PREFIX + room, "w")
    alice = await cluster.client(1, login="alice")
    await alice.subscribe(ROOM_PREFIX + room, "a")
    enters = await read_chat(watcher, 1)
    bob = await cluster.client(2, login="bob")
    # No receipt wait: alice's ENTER may still be on its way to bob's node and arrive first.
    await bob.subscribe(ROOM_PREFIX + room, "b", receipt=False)
    enters += await read_chat(watcher, 1)
    assert [m["message"] for m in enters] == ["alice님이 방에 입장했습니다.", "bob님이 방에 입장했습니다."]
    assert enters[-1]["userCount"] == 3

    async def count_is(expected: int) -> bool:
        rooms = await cluster.get("/chat/rooms", node=0)
        return bool(rooms[0]["userCount"] == expected)

    for node in range(3):
        listed = await cluster.get("/chat/rooms", node=node)
        assert listed == [{"roomId": room, "name": "room", "userCount": 3}]

    cluster.nodes[2].kill()     # bob's node dies without running its QUIT
    # presence_ttl_s=3 in the cluster fixture
    await eventually(lambda: count_is(2), "the dead node's presence to expire", timeout_s=20, interval_s=0.1)
    # Messages carry the sending node's cached count, refreshed every presence_refresh_s: within
    # that bound alice's messages show the healed count too.
    deadline = time.monotonic() + 20
    while True:
        await alice.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, "still here"))
        talk = await read_chat(watcher, 1)
        if talk[0]["userCount"] == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert talk[0]["userCount"] == 2
    await alice.send_frame("DISCONNECT", {"receipt": "bye"})
    quit_msg = await read_chat(watcher, 1)
    assert quit_msg[0]["type"] == "QUIT" and quit_msg[0]["userCount"] == 1
    await eventually(lambda: count_is(1), "alice's QUIT in the count", timeout_s=20, interval_s=0.1)


@pytest.mark.parametrize("mode", ["room", "single"])
async def test_spring_nodes_and_gateway_nodes_share_one_redis(cluster_factory: Any, redis: RedisServer,
                                                              mode: str) -> None:
    cluster = await cluster_factory(2, redis=redis, settings={"redis_channel_mode": mode})
    room = await cluster.create_room()
    channel = room if mode == "room" else "chatroom"
    listeners = [await cluster.client(node) for node in (0, 1)]
    for ws in listeners:
        await ws.subscribe(ROOM_PREFIX + room, "s")
    client = aioredis.Redis.from_url(redis.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=5)  # subscribe confirmation
    try:
        # A Spring node publishes (no id, no seq): delivered by every gateway node, not persisted.
        spring = {"type": "TALK", "roomId": room, "sender": "spring-user", "message": "from spring", "userCount": 0}
        await client.publish(channel, json.dumps(spring))
        for ws in listeners:
            frame = await ws.next_frame(20)
            assert json.loads(frame.body) == spring
        # A gateway node publishes ChatMessage JSON that a Spring listener can read.
        sender = await cluster.client(1, login="gw-user")
        await sender.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, "from gateway"))
        payload: dict[str, Any] = {}
        deadline = time.monotonic() + 20
        while payload.get("sender") != "gw-user" and time.monotonic() < deadline:
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if raw is not None:
                payload = json.loads(raw["data"])  # the first one is our own Spring-format publish
        assert list(payload)[:5] == ["type", "roomId", "sender", "message", "userCount"]
        assert payload["roomId"] == room and payload["sender"] == "gw-user" and payload["seq"] == 1
        for ws in listeners:
            assert (await read_chat(ws, 1))[0]["message"] == "from gateway"
        assert [m["message"] for m in await cluster.history(room)] == ["from gateway"]
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_shutdown_drains_sessions_with_an_error_and_close_1012(cluster_factory: Any) -> None:
    cluster = await cluster_factory(1)
    ws = await cluster.client(0)
    cluster.nodes[0].stop()
    frame = await ws.next_frame(20)
    assert frame.command == "ERROR" and "shutting down" in (frame.get("message") or "")
    code, _ = await ws.closed()
    assert code == 1012
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert cluster.nodes[0].returncode in (0, -15)
    assert "Traceback" not in cluster.nodes[0].log_text()
