"""Slow consumers over a real uvicorn server: a client that stops reading is closed (4500) while a fast
subscriber of the same destination keeps receiving everything.

The slow client is a raw ``websockets`` client with a small socket receive buffer that simply stops
calling ``recv``; once its TCP window is full the server's sends block. Messages are published in
small batches and the fast client reads each batch before the next, so only the slow client can fall
behind, whatever the machine's speed.
"""

from __future__ import annotations

import os

import pytest

from gateway.broker.base import Publication
from tests.support.live_server import LiveServer, ServerFactory
from tests.support.stomp_wire import WsStompClient

BODY = os.urandom(6000).hex().encode()    # 12 KB, incompressible, valid UTF-8
BATCH = 8
MAX_PUBLISHED = 64 << 20                  # give up (fail) past 64 MB: the slow client was never cut


async def _publish(server: LiveServer, count: int, destination: str = "/sub/flood") -> None:
    async def publish() -> None:
        for _ in range(count):
            await server.gateway.hub.publish(Publication(destination, BODY, content_type="text/plain"))
    await _run_on_server(server, publish)


async def _run_on_server(server: LiveServer, factory: object) -> None:
    import asyncio

    assert server.loop is not None
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), server.loop))  # type: ignore[operator]


@pytest.mark.parametrize("limit", ["queue-bytes", "send-time"])
async def test_slow_consumer_is_closed_while_a_fast_one_keeps_receiving(gateway_server: ServerFactory,
                                                                        limit: str) -> None:
    if limit == "queue-bytes":     # the queue limit trips first; a blocked send alone would wait 30 s
        server = gateway_server(outbound_max_bytes=256 * 1024, outbound_send_timeout_s=30.0)
    else:                          # the send-time limit trips first; the queue could hold 64 MB
        server = gateway_server(outbound_max_bytes=64 << 20, outbound_send_timeout_s=0.5)
    slow = await WsStompClient.open(server.ws_url, receive_buffer=4096, max_queue=1)
    slow_id = (await slow.connect()).get("session")
    await slow.subscribe("/sub/flood", "slow")
    fast = await WsStompClient.open(server.ws_url)
    await fast.connect()
    await fast.subscribe("/sub/flood", "fast")

    published = 0
    while slow_id in server.gateway.hub.sessions:
        assert published * len(BODY) < MAX_PUBLISHED, "the slow consumer was never closed"
        await _publish(server, BATCH)
        published += BATCH
        for _ in range(BATCH):
            message = await fast.next_frame()
            assert message.command == "MESSAGE" and message.body == BODY
    # The fast subscriber is unaffected and still receives.
    await _publish(server, BATCH)
    published += BATCH
    for _ in range(BATCH):
        assert (await fast.next_frame()).body == BODY
    assert server.gateway.hub.registry.count("/sub/flood") == 1

    # The slow client reads again: what was already in flight, then the 4500 close.
    code, reason = await slow.closed(timeout=30)
    assert code == 4500, (code, reason)
    got = sum(1 for f in slow.frames if f.command == "MESSAGE")
    assert 0 < got < published
    await fast.close()
