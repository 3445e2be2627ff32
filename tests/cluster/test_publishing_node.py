"""The publishing node delivers its own committed messages at once, without the Redis round trip;
the bus carries ``seq`` next to the body when asked to. Real gateway processes, a real redis-server.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.conftest import ROOM_PREFIX, chat_body, read_chat
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient

pytestmark = pytest.mark.cluster


async def receipts(ws: WsStompClient, count: int, timeout: float = 30.0) -> list[str | None]:
    out = []
    while len(out) < count:
        frame = await ws.next_frame(timeout)
        if frame.command == "RECEIPT":
            out.append(frame.get("receipt-id"))
    return out


async def test_a_frozen_redis_does_not_stop_delivery_on_the_publishing_node(
        cluster_factory: Any, redis: RedisServer) -> None:
    cluster = await cluster_factory(2, redis=redis)
    room = await cluster.create_room()
    local, remote = await cluster.client(0), await cluster.client(1)
    for ws in (local, remote):
        await ws.subscribe(ROOM_PREFIX + room, "s")
    sender = await cluster.client(0)
    await sender.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "first"},
                            chat_body(room, "first"))
    assert await receipts(sender, 1) == ["first"]
    for ws in (local, remote):
        assert [m["message"] for m in await read_chat(ws, 1)] == ["first"]

    redis.pause()   # SIGSTOP: connections stay open, nothing answers
    try:
        for i in range(20):
            await sender.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": f"r{i}"},
                                    chat_body(room, f"frozen-{i}"))
        assert await receipts(sender, 20) == [f"r{i}" for i in range(20)]
        got = await read_chat(local, 20, timeout=30)
        assert [m["message"] for m in got] == [f"frozen-{i}" for i in range(20)]
        assert [m["seq"] for m in got] == list(range(2, 22))
    finally:
        redis.resume()
    # The other node gets them once Redis answers again (re-publish or seq repair), once, in order.
    got = await read_chat(remote, 20, timeout=60)
    assert [m["seq"] for m in got] == list(range(2, 22))
    assert len(await cluster.history(room)) == 21


@pytest.mark.parametrize("payloads", [("envelope", "envelope"), ("envelope", "spring")])
async def test_room_payload_forms_deliver_once_in_order_across_nodes(
        cluster_factory: Any, redis: RedisServer, payloads: tuple[str, str]) -> None:
    cluster = await cluster_factory(2, redis=redis, per_node=[{"redis_payload": p} for p in payloads])
    room = await cluster.create_room()
    listeners = [await cluster.client(node) for node in (0, 1)]
    for ws in listeners:
        await ws.subscribe(ROOM_PREFIX + room, "s")
    senders = [await cluster.client(node) for node in (0, 1)]
    for i in range(30):
        await senders[i % 2].send_frame("SEND", {"destination": "/pub/chat/message"},
                                        chat_body(room, f"m{i}", clientMsgId=f"c{i}"))
    for ws in listeners:
        got = await read_chat(ws, 30, timeout=40)
        assert [m["seq"] for m in got] == list(range(1, 31))
        assert sorted(m["message"] for m in got) == sorted(f"m{i}" for i in range(30))
    history = await cluster.history(room)
    assert [m["seq"] for m in history] == list(range(1, 31))
