"""Outbound batching: frames already queued for a session leave in one WebSocket message, and every
real client reads such messages. ``outbound_batch_bytes=0`` sends one frame per message (Spring)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import stomp

from tests.support.live_server import LiveServer, live_server
from tests.support.node import NodeScript
from tests.support.stomp_wire import WsStompClient, frame, server_frames

COUNT = 200
DESTINATION = "/sub/burst"


async def publish_burst(server: LiveServer, count: int = COUNT) -> None:
    """Every SEND in ONE WebSocket message: the server fans them out before the writer runs."""
    publisher = await WsStompClient.open(server.ws_url)
    await publisher.connect()
    burst = b"".join(frame("SEND", {"destination": "/pub/echo", "x-to": DESTINATION,
                                    "content-type": "text/plain"}, f"m{i}") for i in range(count))
    await publisher.send(burst)
    await publisher.send_frame("DISCONNECT", {"receipt": "done"})
    await publisher.next_frame()
    await publisher.close()


async def received_messages(server: LiveServer) -> tuple[list[str], int]:
    subscriber = await WsStompClient.open(server.ws_url)
    await subscriber.connect()
    await subscriber.subscribe(DESTINATION, "0")
    await publish_burst(server)
    bodies = [(await subscriber.next_frame()).body.decode() for _ in range(COUNT)]
    ws_messages = len(subscriber.messages) - 2   # minus CONNECTED and RECEIPT
    await subscriber.close()
    return bodies, ws_messages


async def test_queued_frames_share_websocket_messages() -> None:
    with live_server() as server:
        bodies, ws_messages = await received_messages(server)
    assert bodies == [f"m{i}" for i in range(COUNT)]
    assert ws_messages < COUNT


async def test_zero_sends_one_frame_per_message_like_spring() -> None:
    with live_server(outbound_batch_bytes=0) as server:
        subscriber = await WsStompClient.open(server.ws_url)
        await subscriber.connect()
        await subscriber.subscribe(DESTINATION, "0")
        await publish_burst(server, 20)
        for _ in range(20):
            await subscriber.next_frame()
        for raw in subscriber.messages:
            assert len(server_frames([raw if isinstance(raw, bytes) else raw.encode()])) == 1
        await subscriber.close()


async def test_a_batch_never_exceeds_the_setting() -> None:
    with live_server(outbound_batch_bytes=1000) as server:
        bodies, _ = await received_messages(server)
        assert bodies == [f"m{i}" for i in range(COUNT)]
    # Each MESSAGE here is ~110 bytes: at most 9 fit in 1000.
    subscriber_sizes: list[int] = []
    with live_server(outbound_batch_bytes=1000) as server:
        subscriber = await WsStompClient.open(server.ws_url)
        await subscriber.connect()
        await subscriber.subscribe(DESTINATION, "0")
        await publish_burst(server)
        for _ in range(COUNT):
            await subscriber.next_frame()
        subscriber_sizes = [len(m) for m in subscriber.messages[2:]]
        await subscriber.close()
    assert max(subscriber_sizes) <= 1000


@pytest.mark.node
@pytest.mark.parametrize("client", ["stompjs7", "stompjs-legacy", "webstomp"])
async def test_javascript_clients_read_batched_messages(client: str) -> None:
    with live_server() as server:
        script = NodeScript("burst.mjs", {"url": server.ws_url, "client": client, "destination": DESTINATION,
                                          "count": COUNT})
        await asyncio.to_thread(script.wait_event, "subscribed")
        await publish_burst(server)
        result = await asyncio.to_thread(script.result)
    assert result["bodies"] == [f"m{i}" for i in range(COUNT)]


async def test_stomp_py_reads_batched_messages() -> None:
    bodies: list[str] = []
    done = threading.Event()
    subscribed = threading.Event()

    class Listener(stomp.ConnectionListener):  # type: ignore[misc]
        def on_receipt(self, frame: Any) -> None:
            subscribed.set()

        def on_message(self, message: Any) -> None:
            bodies.append(message.body)
            if len(bodies) == COUNT:
                done.set()

    with live_server() as server:
        conn = stomp.WSConnection([("127.0.0.1", server.port)], ws_path="/ws-stomp/websocket")
        conn.set_listener("l", Listener())
        await asyncio.to_thread(conn.connect, wait=True)
        conn.subscribe(DESTINATION, id="0", receipt="sub")
        assert await asyncio.to_thread(subscribed.wait, 20)
        await publish_burst(server)
        assert await asyncio.to_thread(done.wait, 20)
        conn.disconnect()
    assert bodies == [f"m{i}" for i in range(COUNT)]
