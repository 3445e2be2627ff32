"""Streaming transports (xhr_streaming, eventsource, htmlfile) and heartbeats over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest
import pytest_asyncio

from gateway.transport.sockjs import protocol
from tests.support.polling import eventually
from tests.transport.sockjs.conftest import Live, streaming

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOT_CACHED = "no-store, no-cache, must-revalidate, max-age=0"
StartLive = Callable[..., Awaitable[Live]]


def session_url(prefix: str = "/echo") -> str:
    return f"{prefix}/000/{uuid.uuid4()}"


async def send(live: Live, url: str, body: bytes) -> None:
    response = await live.client.post(url + "/xhr_send", content=body)
    assert response.status_code == 204, response.content


# --- xhr_streaming -----------------------------------------------------------------------------------


async def test_xhr_streaming(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "POST", url + "/xhr_streaming",
                         headers={"Origin": "http://test.example"}) as stream:
        headers = stream.response.headers
        assert stream.response.status_code == 200
        assert headers["content-type"] == "application/javascript;charset=UTF-8"
        assert headers["cache-control"] == NOT_CACHED
        assert headers["access-control-allow-origin"] == "http://test.example"
        assert headers["access-control-allow-credentials"] == "true"
        assert headers["set-cookie"] == "JSESSIONID=dummy;path=/"
        assert "content-length" not in headers
        assert await stream.read_until(b"\n") == b"h" * 2048 + b"\n"
        assert await stream.read_until(b"\n") == b"o\n"
        await send(live, url, b'["x"]')
        assert await stream.read_until(b"\n") == b'a["x"]\n'
        await send(live, url, b'["y", "z"]')
        frames = await stream.read_until(b"\n")
        if frames == b'a["y"]\n':  # two frames or one, both are valid SockJS
            frames = b'a["y",' + (await stream.read_until(b"\n"))[2:]
        assert frames == b'a["y","z"]\n'
    assert live.echo.factory.only().transport == "sockjs-xhr_streaming"


async def test_xhr_streaming_response_limit(live: Live) -> None:
    """The test services close a streaming response after 4096 bytes; the session survives."""
    url = session_url()
    message = '"' + "x" * 128 + '"'
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        assert await stream.read_until(b"\n") == b"o\n"
        for _ in range(31):
            await send(live, url, f"[{message}]".encode())
            assert await stream.read_until(b"\n") == f"a[{message}]\n".encode()
        assert await stream.rest() == b""
    session = live.echo.registry.get(url.rsplit("/", 1)[1])
    assert not session.closed
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        await send(live, url, b'["again"]')
        assert await stream.read_until(b"\n") == b'a["again"]\n'  # no second "o"
    assert live.echo.factory.only().lost_calls == 0


async def test_messages_sent_between_streams_are_kept(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        await stream.read_until(b"\n")
        await send(live, url, b'["' + b"y" * 5000 + b'"]')
        await stream.read_until(b"\n")
        assert await stream.rest() == b""
    await send(live, url, b'["queued 1"]')
    await send(live, url, b'["queued 2"]')
    response = await live.client.post(url + "/xhr")
    assert response.content == b'a["queued 1","queued 2"]\n'


async def test_second_stream_gets_2010_and_ends(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as first:
        await first.read_until(b"\n")
        assert await first.read_until(b"\n") == b"o\n"
        async with streaming(live.client, "POST", url + "/xhr_streaming") as second:
            assert await second.read_until(b"\n") == b"h" * 2048 + b"\n"
            assert await second.read_until(b"\n") == b'c[2010,"Another connection still open"]\n'
            assert await second.rest() == b""
        await send(live, url, b'["x"]')
        assert await first.read_until(b"\n") == b'a["x"]\n'


async def test_close_frame_then_end_for_every_stream(live: Live) -> None:
    url = session_url("/close")
    async with streaming(live.client, "POST", url + "/xhr_streaming") as first:
        await first.read_until(b"\n")
        assert await first.read_until(b"\n") == b"o\n"
        assert await first.read_until(b"\n") == b'c[3000,"Go away!"]\n'
        assert await first.rest() == b""
    async with streaming(live.client, "POST", url + "/xhr_streaming") as second:
        await second.read_until(b"\n")
        assert await second.read_until(b"\n") == b'c[3000,"Go away!"]\n'
        assert await second.rest() == b""
    assert live.close.factory.only().lost_calls == 1


async def test_aborted_stream_closes_the_session_with_1002(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as first:
        await first.read_until(b"\n")
        assert await first.read_until(b"\n") == b"o\n"
    # Leaving the block closed the client's connection mid-response.
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost after abort")
    async with streaming(live.client, "POST", url + "/xhr_streaming") as again:
        await again.read_until(b"\n")
        assert await again.read_until(b"\n") == b'c[1002,"Connection interrupted"]\n'
        assert await again.rest() == b""
    assert connection.lost_calls == 1


async def test_streaming_close_by_connection(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "POST", url + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        await stream.read_until(b"\n")
        await send(live, url, b'["last words", "!close 4002 Done"]')
        assert await stream.read_until(b"\n") == b'a["last words"]\n'
        assert await stream.read_until(b"\n") == b'c[4002,"Done"]\n'
        assert await stream.rest() == b""


# --- eventsource ----------------------------------------------------------------------------------------


async def test_eventsource(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "GET", url + "/eventsource") as stream:
        headers = stream.response.headers
        assert stream.response.status_code == 200
        assert headers["content-type"] == "text/event-stream;charset=UTF-8"
        assert headers["cache-control"] == NOT_CACHED
        assert "expires" not in headers and "last-modified" not in headers
        assert await stream.read_exactly(2) == b"\r\n"
        assert await stream.read_until(b"\r\n\r\n") == b"data: o\r\n\r\n"
        await send(live, url, b'["x"]')
        assert await stream.read_until(b"\r\n\r\n") == b'data: a["x"]\r\n\r\n'
        await send(live, url, rb'["  \u0000\n\r "]')
        assert await stream.read_until(b"\r\n\r\n") == b'data: a["  \\u0000\\n\\r "]\r\n\r\n'
    assert live.echo.factory.only().transport == "sockjs-eventsource"


async def test_eventsource_response_limit(live: Live) -> None:
    url = session_url()
    message = '"' + "x" * 4096 + '"'
    async with streaming(live.client, "GET", url + "/eventsource") as stream:
        await stream.read_exactly(2)
        assert await stream.read_until(b"\r\n\r\n") == b"data: o\r\n\r\n"
        await send(live, url, f"[{message}]".encode())
        assert await stream.read_until(b"\r\n\r\n") == f"data: a[{message}]\r\n\r\n".encode()
        assert await stream.rest() == b""


# --- htmlfile ---------------------------------------------------------------------------------------------


async def test_htmlfile(live: Live) -> None:
    url = session_url()
    async with streaming(live.client, "GET", url + "/htmlfile?c=%63allback") as stream:
        headers = stream.response.headers
        assert stream.response.status_code == 200
        assert headers["content-type"] == "text/html;charset=UTF-8"
        assert headers["cache-control"] == NOT_CACHED
        head = await stream.read_until(b"</script>")
        assert head.decode() == protocol.htmlfile_prelude("callback").strip()
        tail = await stream.read_until(b"\r\n")
        assert len(head + tail) > 1024 and tail.strip() == b""
        assert await stream.read_until(b"</script>\r\n") == b'<script>\np("o");\n</script>\r\n'
        await send(live, url, b'["x"]')
        assert await stream.read_until(b"</script>\r\n") == b'<script>\np("a[\\"x\\"]");\n</script>\r\n'
        await send(live, url, b'["</script><b>"]')
        frame = await stream.read_until(b"</script>\r\n")
        assert frame == b'<script>\np("a[\\"\\u003c/script\\u003e\\u003cb\\u003e\\"]");\n</script>\r\n'


async def test_htmlfile_response_limit(live: Live) -> None:
    url = session_url()
    message = "x" * 4096
    async with streaming(live.client, "GET", url + "/htmlfile?c=callback") as stream:
        await stream.read_until(b"</script>")
        await stream.read_until(b"\r\n")
        assert await stream.read_until(b"</script>\r\n") == b'<script>\np("o");\n</script>\r\n'
        await send(live, url, f'["{message}"]'.encode())
        expected = '<script>\np("a[\\"' + message + '\\"]");\n</script>\r\n'
        assert await stream.read_until(b"</script>\r\n") == expected.encode()
        assert await stream.rest() == b""


# --- heartbeats ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def fast_heartbeat(start_live: StartLive) -> Live:
    return await start_live(sockjs_heartbeat_s=0.05, sockjs_disconnect_delay_s=5.0)


async def test_heartbeat_on_polling(fast_heartbeat: Live) -> None:
    live = fast_heartbeat
    url = session_url()
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    assert (await live.client.post(url + "/xhr")).content == b"h\n"
    await send(live, url, b'["x"]')
    assert (await live.client.post(url + "/xhr")).content == b'a["x"]\n'


async def test_heartbeat_on_streams(fast_heartbeat: Live) -> None:
    live = fast_heartbeat
    async with streaming(live.client, "POST", session_url() + "/xhr_streaming") as stream:
        await stream.read_until(b"\n")
        assert await stream.read_until(b"\n") == b"o\n"
        assert await stream.read_until(b"\n") == b"h\n"
        assert await stream.read_until(b"\n") == b"h\n"
    async with streaming(live.client, "GET", session_url() + "/eventsource") as stream:
        await stream.read_exactly(2)
        assert await stream.read_until(b"\r\n\r\n") == b"data: o\r\n\r\n"
        assert await stream.read_until(b"\r\n\r\n") == b"data: h\r\n\r\n"
    async with streaming(live.client, "GET", session_url() + "/htmlfile?c=cb") as stream:
        await stream.read_until(b"</script>")
        await stream.read_until(b"\r\n")
        assert await stream.read_until(b"</script>\r\n") == b'<script>\np("o");\n</script>\r\n'
        assert await stream.read_until(b"</script>\r\n") == b'<script>\np("h");\n</script>\r\n'
