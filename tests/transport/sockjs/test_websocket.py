"""The SockJS websocket transport over a real WebSocket (uvicorn server, ``websockets`` client)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.polling import eventually
from tests.transport.conftest import ServerLog
from tests.transport.sockjs.conftest import Live

pytestmark = pytest.mark.asyncio(loop_scope="module")

StartLive = Callable[..., Awaitable[Live]]


def ws_url(live: Live, prefix: str = "/echo", session: str | None = None) -> str:
    return f"{live.ws_url}{prefix}/000/{session or uuid.uuid4()}/websocket"


def open_ws(url: str, **kwargs: Any) -> Any:
    return connect(url, proxy=None, open_timeout=5, close_timeout=2, **kwargs)


async def recv(ws: ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(message, str)
    return message


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None, "no close frame received"
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_transport(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["a"]')
        assert await recv(ws) == 'a["a"]'
        await ws.send('"single"')
        assert await recv(ws) == 'a["single"]'
        await ws.send('["b", "c"]')
        received = await recv(ws)
        if received == 'a["b"]':
            received = 'a["b",' + (await recv(ws))[2:]
        assert received == 'a["b","c"]'
    connection = live.echo.factory.only()
    assert connection.transport == "sockjs-websocket"
    assert connection.received == [b"a", b"single", b"b", b"c"]
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")


async def test_empty_messages_are_ignored(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send("")
        await ws.send("[]")
        await ws.send('["a"]')
        assert await recv(ws) == 'a["a"]'
    assert live.echo.factory.only().received == [b"a"]


async def test_binary_message_holding_json_is_accepted(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send(b'["bin"]')
        assert await recv(ws) == 'a["bin"]'


async def test_close_service(live: Live) -> None:
    async with open_ws(ws_url(live, "/close")) as ws:
        assert await recv(ws) == "o"
        assert await recv(ws) == 'c[3000,"Go away!"]'
        assert await closed_with(ws) == (3000, "Go away!")
    assert live.close.factory.only().lost_calls == 1


async def test_connection_close_sends_frame_then_closes(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["bye", "!close 4000 Session ended"]')
        assert await recv(ws) == 'a["bye"]'
        assert await recv(ws) == 'c[4000,"Session ended"]'
        assert await closed_with(ws) == (4000, "Session ended")
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")


async def test_close_code_not_valid_on_websocket_becomes_1000(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["!close 2999 Odd code"]')
        assert await recv(ws) == 'c[2999,"Odd code"]'
        assert (await closed_with(ws))[0] == 1000


async def test_long_close_reason_is_cut_to_fit_the_websocket_close_frame(live: Live) -> None:
    reason = "é" * 100
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send(f'["!close 4000 {reason}"]')
        assert await recv(ws) == f'c[4000,"{reason}"]'
        code, sent_reason = await closed_with(ws)
        assert code == 4000
        assert sent_reason == "é" * 61  # 122 bytes: the longest whole-character prefix of 123


@pytest.mark.parametrize("payload", ['["a', "{}", "[1]", '[["x"]]', "nonsense"])
async def test_broken_json_closes_1007(live: Live, payload: str) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send(payload)
        code, _ = await closed_with(ws)
        assert code == 1007
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    assert connection.received == []


async def test_invalid_utf8_binary_closes_1007(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send(b"\xff\xfe")
        assert (await closed_with(ws))[0] == 1007


async def test_payload_limit_closes_1009(start_live: StartLive) -> None:
    live = await start_live(sockjs_max_send_bytes=64)
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["' + "x" * 60 + '"]')
        assert await recv(ws) == 'a["' + "x" * 60 + '"]'
        await ws.send('["' + "é" * 31 + '"]')  # 66 bytes in UTF-8, 35 characters
        assert (await closed_with(ws))[0] == 1009
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    assert connection.received == [b"x" * 60]


async def test_session_id_may_be_reused_by_websockets(live: Live) -> None:
    url = ws_url(live)
    async with open_ws(url) as first, open_ws(url) as second:
        assert await recv(first) == "o"
        assert await recv(second) == "o"
        await first.send('["a"]')
        assert await recv(first) == 'a["a"]'
        await second.send('["b"]')
        assert await recv(second) == 'a["b"]'
    async with open_ws(url) as again:
        assert await recv(again) == "o"
        await again.send('["c"]')
        assert await recv(again) == 'a["c"]'
    assert len(live.echo.factory.connections) == 3


async def test_client_close_calls_connection_lost_once(live: Live) -> None:
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["x"]')
        assert await recv(ws) == 'a["x"]'
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    await eventually(lambda: len(live.echo.registry) == 0, "session forgotten")
    assert connection.lost_calls == 1


def refused_once(log: ServerLog, level: int, reason: str) -> str:
    """The handshake was refused with exactly one log line at ``level`` naming ``reason`` and the
    client's address, and nothing was logged at ERROR (uvicorn included)."""
    assert log.errors() == []
    (line,) = log.refusals()
    message = line.getMessage()
    assert line.levelno == level, message
    assert reason in message and "from 127.0.0.1:" in message, message
    return message


async def refused_status(url: str, **kwargs: Any) -> int:
    try:
        async with open_ws(url, **kwargs):
            pass
    except InvalidStatus as exc:
        return exc.response.status_code
    raise AssertionError(f"the handshake to {url} was accepted")


async def test_disabled_websocket_is_refused_with_403_and_one_debug_line(live: Live, server_log: ServerLog) -> None:
    status = await refused_status(ws_url(live, "/disabled_websocket_echo"))
    refused_once(server_log, logging.DEBUG, "websocket transport is disabled")
    assert status == 403
    assert live.wsoff.factory.connections == []


@pytest.mark.parametrize("path", ["/echo/000/a.b/websocket", "/echo/000//websocket", "/echo/websocket",
                                  "/echo/000/abc/xhr", "/echo/info", "/echo/a/b/c/websocket"])
async def test_websocket_on_other_urls_is_refused_with_403_and_one_debug_line(live: Live, server_log: ServerLog,
                                                                             path: str) -> None:
    status = await refused_status(live.ws_url + path)
    message = refused_once(server_log, logging.DEBUG, "no SockJS websocket at this URL")
    assert repr(path) in message
    assert status == 403
    assert live.echo.factory.connections == []


async def test_origin_policy(start_live: StartLive, server_log: ServerLog) -> None:
    live = await start_live(allowed_origins=())
    status = await refused_status(ws_url(live), origin="http://evil.example")
    refused_once(server_log, logging.INFO, "origin 'http://evil.example' not allowed")
    assert status == 403
    assert live.echo.factory.connections == []
    async with open_ws(ws_url(live), origin=live.url) as same_origin:  # type: ignore[arg-type]
        assert await recv(same_origin) == "o"
    async with open_ws(ws_url(live)) as no_origin:
        assert await recv(no_origin) == "o"
    assert len(server_log.refusals()) == 1 and server_log.errors() == []


async def test_websocket_while_draining_is_refused_with_403_and_one_info_line(live: Live,
                                                                              server_log: ServerLog) -> None:
    await live.echo.registry.close_all()
    status = await refused_status(ws_url(live))
    refused_once(server_log, logging.INFO, "server is draining")
    assert status == 403
    assert live.echo.factory.connections == []


async def test_heartbeat(start_live: StartLive) -> None:
    live = await start_live(sockjs_heartbeat_s=0.05)
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        assert await recv(ws) == "h"
        await ws.send('["x"]')
        received = await recv(ws)
        while received == "h":
            received = await recv(ws)
        assert received == 'a["x"]'
        assert await recv(ws) == "h"


async def test_unicode_round_trip(live: Live) -> None:
    text = "안녕 😀 \u2028\u200d é \x01"
    async with open_ws(ws_url(live)) as ws:
        assert await recv(ws) == "o"
        await ws.send('["안녕 😀 \\u2028\\u200d é \\u0001"]')
        frame = await recv(ws)
        assert frame == 'a["안녕 \\ud83d\\ude00 \\u2028\\u200d é \\u0001"]'
    assert live.echo.factory.only().received == [text.encode()]
