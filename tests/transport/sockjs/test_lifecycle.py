"""Session lifetime: disconnect-delay reaping, connection_lost exactly once, slow consumers,
back-pressure, close_all on shutdown, and SockJS's JSON encoding round trips (real HTTP/WebSocket)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.transport.sockjs.registry import SessionRegistry
from gateway.transport.sockjs.session import SLOW_CONSUMER_REASON, Receiver, SockJSSession
from tests.support.polling import eventually
from tests.transport.sockjs.conftest import FakeFactory, Live, make_settings, streaming

pytestmark = pytest.mark.asyncio(loop_scope="module")
StartLive = Callable[..., Awaitable[Live]]


def new_session(prefix: str = "/echo") -> tuple[str, str]:
    session_id = str(uuid.uuid4())
    return f"{prefix}/000/{session_id}", session_id


def frames_of(body: bytes) -> list[str]:
    """The messages of a sequence of ``a[...]\\n`` frames (``h`` frames skipped)."""
    messages: list[str] = []
    for line in body.decode().splitlines():
        if line.startswith("a"):
            messages += json.loads(line[1:])
    return messages


# --- reaping ---------------------------------------------------------------------------------------


async def test_abandoned_session_is_reaped_once(start_live: StartLive) -> None:
    live = await start_live(sockjs_disconnect_delay_s=0.2)
    url, session_id = new_session()
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    connection = live.echo.factory.only()
    await eventually(lambda: live.echo.registry.get(session_id) is None, "session reaped")
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    # The id is free again: a poll starts a new session with a new connection.
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    assert len(live.echo.factory.connections) == 2
    assert (await live.client.post(url + "/xhr_send", content=b'["new"]')).status_code == 204
    assert (await live.client.post(url + "/xhr")).content == b'a["new"]\n'
    assert connection.lost_calls == 1
    assert live.echo.factory.connections[1].lost_calls == 0


async def test_session_created_without_any_poll_after_o_is_reaped(start_live: StartLive) -> None:
    live = await start_live(sockjs_disconnect_delay_s=0.2)
    for _ in range(3):
        await live.client.post(new_session()[0] + "/xhr")
    await eventually(lambda: len(live.echo.registry) == 0, "all sessions reaped")
    await eventually(lambda: all(c.lost_calls == 1 for c in live.echo.factory.connections), "lost")


async def test_polling_keeps_the_session_alive(start_live: StartLive) -> None:
    live = await start_live(sockjs_disconnect_delay_s=0.5, sockjs_heartbeat_s=0.05)
    url, session_id = new_session()
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    until = time.monotonic() + 1.5  # three disconnect delays
    polls = 0
    while time.monotonic() < until:
        assert (await live.client.post(url + "/xhr")).content == b"h\n"
        polls += 1
    assert polls >= 10
    assert live.echo.registry.get(session_id) is not None
    assert live.echo.factory.only().lost_calls == 0


async def test_attached_stream_keeps_the_session_alive(start_live: StartLive) -> None:
    live = await start_live(sockjs_disconnect_delay_s=0.1, sockjs_heartbeat_s=0.05)
    url, session_id = new_session()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        assert await stream.read_until(b"\n") == b"o\n"
        for _ in range(10):  # ten heartbeats: five times the disconnect delay
            assert await stream.read_until(b"\n") == b"h\n"
        assert live.echo.registry.get(session_id) is not None
        assert live.echo.factory.only().lost_calls == 0


async def test_closed_session_is_remembered_for_the_delay_then_forgotten(start_live: StartLive) -> None:
    live = await start_live(sockjs_disconnect_delay_s=0.3)
    url, session_id = new_session("/close")
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    assert (await live.client.post(url + "/xhr")).content == b'c[3000,"Go away!"]\n'
    await eventually(lambda: live.close.registry.get(session_id) is None, "closed session forgotten")
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    first, second = live.close.factory.connections
    assert first.lost_calls == 1
    await eventually(lambda: second.lost_calls == 1, "second connection lost")


# --- closing from the connection side -----------------------------------------------------------------


async def test_input_after_the_connection_closed_is_not_delivered(live: Live) -> None:
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    await live.client.post(url + "/xhr_send", content=b'["!close 4000 Done", "after", "more"]')
    assert live.echo.factory.only().received == [b"!close 4000 Done"]
    assert (await live.client.post(url + "/xhr")).content == b'c[4000,"Done"]\n'


async def test_connection_failure_ends_the_session_1011(live: Live) -> None:
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    response = await live.client.post(url + "/xhr_send", content=b'["!raise", "after"]')
    assert response.status_code == 204
    assert (await live.client.post(url + "/xhr")).content == b'c[1011,"Internal error"]\n'
    connection = live.echo.factory.only()
    assert connection.received == [b"!raise"]
    assert connection.lost_calls == 1


# --- slow consumers and back-pressure -------------------------------------------------------------------


async def test_cache_limit_without_receiver_closes_4500(start_live: StartLive) -> None:
    live = await start_live(sockjs_max_cached_messages=5)
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    assert (await live.client.post(url + "/xhr_send", content=b'["!burst 10"]')).status_code == 204
    assert (await live.client.post(url + "/xhr")).content == b'a["m0","m1","m2","m3","m4"]\n'
    expected = f'c[4500,"{SLOW_CONSUMER_REASON}"]\n'.encode()
    assert (await live.client.post(url + "/xhr")).content == expected
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")


async def test_cache_limit_exactly_reached_is_fine(start_live: StartLive) -> None:
    live = await start_live(sockjs_max_cached_messages=5)
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    await live.client.post(url + "/xhr_send", content=b'["!burst 4"]')
    await live.client.post(url + "/xhr_send", content=b'["fifth"]')
    assert (await live.client.post(url + "/xhr")).content == b'a["m0","m1","m2","m3","fifth"]\n'
    assert live.echo.factory.only().lost_calls == 0


async def test_attached_receiver_drains_a_burst_beyond_the_cache(start_live: StartLive) -> None:
    live = await start_live(sockjs_max_cached_messages=5, sockjs_streaming_limit_bytes=1 << 20)
    url, session_id = new_session()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        assert await stream.read_until(b"\n") == b"o\n"
        assert (await live.client.post(url + "/xhr_send", content=b'["!burst 200"]')).status_code == 204
        received: list[str] = []
        while len(received) < 200:
            received += frames_of(await stream.read_until(b"\n"))
        assert received == [f"m{i}" for i in range(200)]
        assert not live.echo.registry.get(session_id).closed


async def test_receiver_that_never_drains_closes_4500() -> None:
    """Session level: a receiver attached but not taking frames bounds send() by outbound_send_timeout_s."""
    settings = make_settings(sockjs_max_cached_messages=3, outbound_send_timeout_s=0.05)
    factory = FakeFactory()
    registry = SessionRegistry(settings, factory)
    session = await registry.get_or_create("s1", transport="xhr_streaming", remote="test")
    receiver = session.attach()
    assert isinstance(receiver, Receiver)
    for i in range(3):
        await session.send(f"m{i}".encode())
    assert not session.closed
    await session.send(b"m3")
    assert session.close_status == (4500, SLOW_CONSUMER_REASON)
    await eventually(lambda: factory.only().lost_calls == 1, "connection_lost")
    assert await session.next_frame(receiver, 1.0) == "o"
    assert await session.next_frame(receiver, 1.0) == 'a["m0","m1","m2"]'
    assert await session.next_frame(receiver, 1.0) == f'c[4500,"{SLOW_CONSUMER_REASON}"]'
    session.detach(receiver)
    await registry.close_all()


async def test_send_after_close_is_dropped() -> None:
    factory = FakeFactory()
    registry = SessionRegistry(make_settings(), factory)
    session: SockJSSession = await registry.get_or_create("s2", transport="xhr", remote="test")
    await session.close(4000, "done")
    await session.send(b"late")
    assert session.queued == 0
    await eventually(lambda: factory.only().lost_calls == 1, "connection_lost")
    await session.terminate(3000, "again")
    assert session.close_status == (4000, "done")
    assert factory.only().lost_calls == 1
    await registry.close_all()


# --- close_all (draining) -----------------------------------------------------------------------------------


async def test_close_all(live: Live) -> None:
    stream_url, _ = new_session()
    poll_url, poll_id = new_session()
    assert (await live.client.post(poll_url + "/xhr")).content == b"o\n"
    registry = live.echo.registry
    async with streaming(live.client, "POST", stream_url + "/xhr_streaming") as stream, \
            connect(f"{live.ws_url}/echo/0/{uuid.uuid4()}/websocket", proxy=None) as ws:
        await stream.read_until(b"\n")
        assert await stream.read_until(b"\n") == b"o\n"
        assert await asyncio.wait_for(ws.recv(), 5) == "o"
        assert len(registry) == 3

        await registry.close_all()

        assert await stream.read_until(b"\n") == b'c[3000,"Go away!"]\n'
        assert await stream.rest() == b""
        assert await asyncio.wait_for(ws.recv(), 5) == 'c[3000,"Go away!"]'
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3000
    assert (await live.client.post(poll_url + "/xhr")).content == b'c[3000,"Go away!"]\n'
    assert registry.get(poll_id) is not None
    connections = live.echo.factory.connections
    assert len(connections) == 3
    assert [c.lost_calls for c in connections] == [1, 1, 1]
    # Draining: no new sessions.
    assert (await live.client.post(new_session()[0] + "/xhr")).status_code == 503
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{live.ws_url}/echo/0/{uuid.uuid4()}/websocket", proxy=None):
            pass
    assert refused.value.response.status_code == 403  # a refused handshake is always 403 (ASGI websocket.close)
    assert len(connections) == 3
    await registry.close_all()
    assert [c.lost_calls for c in connections] == [1, 1, 1]


async def test_close_all_with_code_and_reason(live: Live) -> None:
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    await live.echo.registry.close_all(1012, "Server restarting")
    assert (await live.client.post(url + "/xhr")).content == b'c[1012,"Server restarting"]\n'


# --- JSON encoding round trips ----------------------------------------------------------------------------

SERVER_ESCAPES = [*range(0x200C, 0x2010), *range(0x2028, 0x2030), *range(0x2060, 0x2070), *range(0xFFF0, 0x10000)]


async def test_server_escapes_unsafe_characters(live: Live) -> None:
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    raw = "".join(chr(code) for code in SERVER_ESCAPES)
    response = await live.client.post(url + "/xhr_send", content=('["' + raw + '"]').encode())
    assert response.status_code == 204
    body = (await live.client.post(url + "/xhr")).content.decode()
    escaped = '"' + "".join(f"\\u{code:04x}" for code in SERVER_ESCAPES) + '"'
    assert body == "a[" + escaped + "]\n"


async def test_server_decodes_every_escaped_bmp_character(live: Live) -> None:
    url, _ = new_session()
    await live.client.post(url + "/xhr")
    codes = [code for code in range(0x10000) if not 0xD800 <= code <= 0xDFFF]
    payload = '["' + "".join(f"\\u{code:04x}" for code in codes) + '"]'
    assert (await live.client.post(url + "/xhr_send", content=payload.encode())).status_code == 204
    body = (await live.client.post(url + "/xhr")).content.decode()
    assert json.loads(body.strip()[1:]) == ["".join(chr(code) for code in codes)]
    assert live.echo.factory.only().received == ["".join(chr(code) for code in codes).encode()]


