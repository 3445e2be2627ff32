"""xhr polling and xhr_send over real HTTP (uvicorn on 127.0.0.1, httpx), against fake connections."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.support.polling import eventually
from tests.transport.sockjs.conftest import Live, background_request

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOT_CACHED = "no-store, no-cache, must-revalidate, max-age=0"


def session_url(prefix: str = "/echo", server: str = "000") -> str:
    return f"{prefix}/{server}/{uuid.uuid4()}"


async def test_simple_session(live: Live) -> None:
    url = session_url()
    response = await live.client.post(url + "/xhr", headers={"Origin": "http://test.example"})
    assert response.status_code == 200
    assert response.content == b"o\n"
    assert response.headers["content-type"] == "application/javascript;charset=UTF-8"
    assert response.headers["cache-control"] == NOT_CACHED
    assert response.headers["access-control-allow-origin"] == "http://test.example"
    assert response.headers["access-control-allow-credentials"] == "true"

    sent = await live.client.post(url + "/xhr_send", content=b'["x"]', headers={"Origin": "http://test.example"})
    assert sent.status_code == 204
    assert sent.content == b""
    assert sent.headers["content-type"] == "text/plain;charset=UTF-8"
    assert sent.headers["cache-control"] == NOT_CACHED
    assert sent.headers["access-control-allow-origin"] == "http://test.example"

    response = await live.client.post(url + "/xhr")
    assert response.status_code == 200
    assert response.content == b'a["x"]\n'
    connection = live.echo.factory.only()
    assert connection.received == [b"x"]
    assert connection.started == 1
    assert connection.transport == "sockjs-xhr"
    assert connection.remote.startswith("127.0.0.1:")


async def test_server_id_is_ignored(live: Live) -> None:
    session = uuid.uuid4()
    assert (await live.client.post(f"/echo/000/{session}/xhr")).content == b"o\n"
    assert (await live.client.post(f"/echo/000/{session}/xhr_send", content=b'["a"]')).status_code == 204
    assert (await live.client.post(f"/echo/999/{session}/xhr")).content == b'a["a"]\n'


async def test_any_server_and_session_values(live: Live) -> None:
    tag = uuid.uuid4().hex[:6]
    for part in (f"/a/a{tag}", f"/_/_{tag}", f"/1/{tag}", f"/abcdefgh_i-j%20/abcdefg_i-j%20{tag}"):
        response = await live.client.post(f"/echo{part}/xhr")
        assert response.status_code == 200, part
        assert response.content == b"o\n", part
    assert len(live.echo.factory.connections) == 4


async def test_xhr_send_to_unknown_session_is_404(live: Live) -> None:
    response = await live.client.post(session_url() + "/xhr_send", content=b'["x"]')
    assert response.status_code == 404
    assert live.echo.factory.connections == []


async def test_bad_payloads(live: Live) -> None:
    url = session_url()
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    for body in (b'["x', b"[1]", b'{"a":"b"}', b"\xff\xfe", b'["a"] trailing'):
        response = await live.client.post(url + "/xhr_send", content=body)
        assert response.status_code == 500, body
        assert b"Broken JSON encoding." in response.content
    response = await live.client.post(url + "/xhr_send", content=b"")
    assert response.status_code == 500
    assert b"Payload expected." in response.content
    response = await live.client.post(url + "/xhr_send", content=b'["a"]')
    assert response.status_code == 204
    assert (await live.client.post(url + "/xhr")).content == b'a["a"]\n'
    assert live.echo.factory.only().received == [b"a"]


async def test_any_content_type_is_accepted(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    content_types = ["text/plain", "T", "application/json", "application/xml", "",
                     "application/json; charset=utf-8", "text/xml; charset=utf-8", "text/xml"]
    for content_type in content_types:
        response = await live.client.post(url + "/xhr_send", content=b'["a"]',
                                          headers={"Content-Type": content_type})
        assert response.status_code == 204
    response = await live.client.post(url + "/xhr")
    assert response.content == b"a[" + b",".join([b'"a"'] * len(content_types)) + b"]\n"


async def test_empty_frames_and_single_strings(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    assert (await live.client.post(url + "/xhr_send", content=b"[]")).status_code == 204
    assert (await live.client.post(url + "/xhr_send", content=b'"single"')).status_code == 204
    assert (await live.client.post(url + "/xhr_send", content=b'["a","b"]')).status_code == 204
    assert (await live.client.post(url + "/xhr")).content == b'a["single","a","b"]\n'
    assert live.echo.factory.only().received == [b"single", b"a", b"b"]


async def test_messages_are_queued_between_polls_in_order(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    for i in range(5):
        await live.client.post(url + "/xhr_send", content=f'["{i}"]'.encode())
    assert (await live.client.post(url + "/xhr")).content == b'a["0","1","2","3","4"]\n'


async def test_pending_poll_gets_the_next_message(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    poll = await background_request(live.client, "POST", url + "/xhr")
    session = live.echo.registry.get(url.rsplit("/", 1)[1])
    await eventually(lambda: session.has_receiver, "poll attached")
    assert (await live.client.post(url + "/xhr_send", content=b'["late"]')).status_code == 204
    assert (await poll).content == b'a["late"]\n'


async def test_second_receiver_gets_2010_and_first_keeps_the_session(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    first = await background_request(live.client, "POST", url + "/xhr")
    session = live.echo.registry.get(url.rsplit("/", 1)[1])
    await eventually(lambda: session.has_receiver, "first poll attached")
    second = await live.client.post(url + "/xhr")
    assert second.status_code == 200
    assert second.content == b'c[2010,"Another connection still open"]\n'
    await live.client.post(url + "/xhr_send", content=b'["still here"]')
    assert (await first).content == b'a["still here"]\n'
    assert not session.closed
    assert live.echo.factory.only().lost_calls == 0


async def test_close_service_serves_close_frame_repeatedly(live: Live) -> None:
    url = session_url("/close")
    assert (await live.client.post(url + "/xhr")).content == b"o\n"
    for _ in range(3):
        response = await live.client.post(url + "/xhr")
        assert response.status_code == 200
        assert response.content == b'c[3000,"Go away!"]\n'
    connection = live.close.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    assert connection.lost_calls == 1


async def test_connection_close_delivers_queued_messages_first(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    await live.client.post(url + "/xhr_send", content=b'["before", "!close 4000 Bye now"]')
    assert (await live.client.post(url + "/xhr")).content == b'a["before"]\n'
    assert (await live.client.post(url + "/xhr")).content == b'c[4000,"Bye now"]\n'
    assert (await live.client.post(url + "/xhr")).content == b'c[4000,"Bye now"]\n'
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost")
    # Messages sent to a closed (but still remembered) session are accepted and dropped.
    assert (await live.client.post(url + "/xhr_send", content=b'["after"]')).status_code == 204
    assert connection.received == [b"before", b"!close 4000 Bye now"]


async def test_connection_close_reaches_a_waiting_poll(live: Live) -> None:
    url = session_url()
    session_id = url.rsplit("/", 1)[1]
    await live.client.post(url + "/xhr")
    await live.client.post(url + "/xhr_send", content=b'["x"]')
    assert (await live.client.post(url + "/xhr")).content == b'a["x"]\n'
    poll = await background_request(live.client, "POST", url + "/xhr")
    session = live.echo.registry.get(session_id)
    await eventually(lambda: session.has_receiver, "poll attached")
    await session.connection.sink.close(4001, "Closed by STOMP")
    assert (await poll).content == b'c[4001,"Closed by STOMP"]\n'


async def test_aborted_poll_closes_the_session_with_1002(live: Live) -> None:
    url = session_url()
    session_id = url.rsplit("/", 1)[1]
    await live.client.post(url + "/xhr")
    poll = await background_request(live.client, "POST", url + "/xhr")
    session = live.echo.registry.get(session_id)
    await eventually(lambda: session.has_receiver, "poll attached")
    second = await live.client.post(url + "/xhr")
    assert second.content == b'c[2010,"Another connection still open"]\n'
    poll.cancel()  # the client gives up: its TCP connection is closed
    await asyncio.gather(poll, return_exceptions=True)
    connection = live.echo.factory.only()
    await eventually(lambda: connection.lost_calls == 1, "connection_lost after abort")
    third = await live.client.post(url + "/xhr")
    assert third.content == b'c[1002,"Connection interrupted"]\n'
    assert connection.lost_calls == 1


async def test_jsessionid_cookie(live: Live) -> None:
    url = session_url()
    response = await live.client.post(url + "/xhr")
    assert response.headers["set-cookie"] == "JSESSIONID=dummy;path=/"
    other = session_url()
    response = await live.client.post(other + "/xhr", headers={"Cookie": "a=b; JSESSIONID=abcdef"})
    assert response.headers["set-cookie"] == "JSESSIONID=abcdef;path=/"
    response = await live.client.post(other + "/xhr_send", content=b"[]", headers={"Cookie": "JSESSIONID=x y"})
    assert response.headers["set-cookie"] == "JSESSIONID=dummy;path=/"


async def test_invalid_utf8_from_the_connection_is_replaced(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    await live.client.post(url + "/xhr_send", content=b'["!bytes"]')
    response = await live.client.post(url + "/xhr")
    assert response.content == b'a["ok \\ufffd\\ufffd end"]\n'


async def test_payload_limit(start_live: object) -> None:
    live: Live = await start_live(sockjs_max_send_bytes=64)  # type: ignore[operator]
    url = session_url()
    await live.client.post(url + "/xhr")
    at_limit = b'["' + b"x" * 60 + b'"]'
    assert len(at_limit) == 64
    assert (await live.client.post(url + "/xhr_send", content=at_limit)).status_code == 204
    too_big = b'["' + b"x" * 61 + b'"]'
    response = await live.client.post(url + "/xhr_send", content=too_big)
    assert response.status_code == 413
    assert live.echo.factory.only().received == [b"x" * 60]


async def test_unicode_from_client_reaches_connection_as_utf8(live: Live) -> None:
    url = session_url()
    await live.client.post(url + "/xhr")
    text = "안녕 😀 \u2028 é"
    await live.client.post(url + "/xhr_send", content=('["' + text + '", "\\ud83d\\ude80"]').encode())
    assert live.echo.factory.only().received == [text.encode(), "🚀".encode()]
    body = (await live.client.post(url + "/xhr")).content
    assert body == 'a["안녕 \\ud83d\\ude00 \\u2028 é","\\ud83d\\ude80"]\n'.encode()
