"""Every limit of issue 10 crossed over the wire, against a real ``chat-gateway serve`` process:
SEND rate (refusal keeps the session open; repeated abuse closes it), sessions per user, STOMP
sessions per client address, SockJS sessions per node, buffered transaction bytes, token expiry."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import pytest

from gateway.jwt_auth import key_from_secret, mint_token
from gateway.settings import SettingsError, load_settings
from tests.limits.conftest import chat_send, create_room, history
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient

pytestmark = pytest.mark.timeout(120)

RATE_LIMITED = "rate limit exceeded"


async def _answers(client: WsStompClient, count: int) -> list[Any]:
    """The next ``count`` RECEIPT/ERROR frames (MESSAGEs skipped)."""
    out: list[Any] = []
    while len(out) < count:
        got = await client.next_frame(20)
        if got.command in ("RECEIPT", "ERROR"):
            out.append(got)
    return out


async def test_sends_over_the_rate_get_an_error_in_order_and_the_session_stays_open(gateway_factory: Any) -> None:
    gateway = gateway_factory(send_rate_per_s=1, send_burst=5, send_rate_close_after=0)
    room = await create_room(gateway)
    client = await WsStompClient.open(gateway.ws_url)
    await client.connect()
    # 12 SENDs in one WebSocket message: the burst (5) passes, the rest is refused.
    await client.send(b"".join(chat_send(room, f"m{i}", receipt=f"r{i}") for i in range(12)))
    answers = await _answers(client, 12)
    assert [a.get("receipt-id") for a in answers] == [f"r{i}" for i in range(12)]   # SEND order kept
    assert [a.command for a in answers[:5]] == ["RECEIPT"] * 5
    refused = [a for a in answers if a.command == "ERROR"]
    assert len(refused) >= 6 and all(a.get("message") == RATE_LIMITED for a in refused)
    accepted = [a.get("receipt-id") for a in answers if a.command == "RECEIPT"]
    # Nothing refused was stored; everything answered with a RECEIPT was.
    stored = [m["message"] for m in await history(gateway, room)]
    assert stored == [f"m{receipt[1:]}" for receipt in accepted]
    # The session is still open: once the bucket refills, a SEND is accepted again.
    await asyncio.sleep(1.5)
    await client.send(chat_send(room, "later", receipt="later"))
    (answer,) = await _answers(client, 1)
    assert (answer.command, answer.get("receipt-id")) == ("RECEIPT", "later")
    await client.close()


async def test_repeated_refusals_close_the_session(gateway_factory: Any) -> None:
    gateway = gateway_factory(send_rate_per_s=1, send_burst=2, send_rate_close_after=5)
    room = await create_room(gateway)
    client = await WsStompClient.open(gateway.ws_url)
    await client.connect()
    await client.send(b"".join(chat_send(room, f"m{i}", receipt=f"r{i}") for i in range(40)))
    code, _reason = await client.closed(20)
    assert code == 1002
    errors = [f for f in client.frames if f.command == "ERROR"]
    assert errors and all(e.get("message") == RATE_LIMITED for e in errors)
    assert 5 <= len(errors) <= 8          # closed at about the 6th refusal, not after all 38
    assert "closed after repeated SENDs over the rate limit" in gateway.log_text()


async def test_sessions_per_user_are_limited(gateway_factory: Any) -> None:
    gateway = gateway_factory(max_sessions_per_user=2)
    first, second = await WsStompClient.open(gateway.ws_url), await WsStompClient.open(gateway.ws_url)
    await first.connect({"login": "alice"})
    await second.connect({"login": "alice"})
    third = await WsStompClient.open(gateway.ws_url)
    await third.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "login": "alice"})
    refused = await third.next_frame()
    assert refused.command == "ERROR"
    assert refused.get("message") == "Too many sessions for user 'alice' (limit 2)"
    assert (await third.closed())[0] == 1002
    other = await WsStompClient.open(gateway.ws_url)
    await other.connect({"login": "bob"})        # another user is not affected
    await first.close()

    async def alice_connects() -> bool:
        client = await WsStompClient.open(gateway.ws_url)
        await client.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "login": "alice"})
        ok = (await client.next_frame()).command == "CONNECTED"
        if not ok:
            await client.close()
        return ok

    await eventually(alice_connects, "a new session of alice once one ended")  # type: ignore[arg-type]  # async condition
    for client in (second, other):
        await client.close()


async def test_stomp_sessions_per_client_address_are_limited(gateway_factory: Any) -> None:
    gateway = gateway_factory(max_connections_per_ip=3)
    clients = [await WsStompClient.open(gateway.ws_url) for _ in range(3)]
    for client in clients:
        await client.connect()
    fourth = await WsStompClient.open(gateway.ws_url)
    refused = await fourth.next_frame()
    assert refused.command == "ERROR"
    assert refused.get("message") == "Too many connections from this address (limit 3)"
    assert (await fourth.closed())[0] == 1008
    await clients[0].close()

    async def connects() -> bool:
        client = await WsStompClient.open(gateway.ws_url)
        await client.send_frame("CONNECT", {"accept-version": "1.2", "host": "x"})
        ok = (await client.next_frame()).command == "CONNECTED"
        clients.append(client)
        return ok

    await eventually(connects, "a new session once one from the address ended")  # type: ignore[arg-type]  # async condition
    assert gateway.log_text().count("refusing STOMP sessions from 127.0.0.1") == 1
    for client in clients[1:]:
        await client.close()


async def test_sockjs_sessions_per_node_are_limited(gateway_factory: Any) -> None:
    gateway = gateway_factory(sockjs_max_sessions=2)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for session in ("one", "two"):
            opened = await http.post(f"/ws-stomp/000/{session}/xhr")
            assert opened.text == "o\n"
        refused = await http.post("/ws-stomp/000/three/xhr")
        assert refused.status_code == 200
        assert refused.text == 'c[1013,"Too many SockJS sessions"]\n'
        again = await http.post("/ws-stomp/000/four/xhr")
        assert again.text == 'c[1013,"Too many SockJS sessions"]\n'
    assert gateway.log_text().count("refusing new SockJS sessions") == 1


async def test_buffered_transaction_bytes_are_limited(gateway_factory: Any) -> None:
    gateway = gateway_factory(max_transaction_bytes=1000)
    room = await create_room(gateway)
    client = await WsStompClient.open(gateway.ws_url)
    await client.connect()
    await client.send_frame("BEGIN", {"transaction": "tx"})
    text = "x" * 400
    for i in range(3):
        await client.send(chat_send(room, text, sender=f"s{i}").replace(b"SEND\n", b"SEND\ntransaction:tx\n", 1))
    error = await client.next_frame()
    assert error.command == "ERROR"
    assert error.get("message") == "Transactions exceed the limit of 1000 buffered bytes per session"
    assert (await client.closed())[0] == 1002
    assert await history(gateway, room) == []


async def test_a_session_is_closed_when_its_token_expires(gateway_factory: Any) -> None:
    secret = base64.b64encode(b"k" * 32).decode()
    gateway = gateway_factory(auth="jwt", jwt_secret=secret)
    lifetime_s = 4
    token = mint_token("alice", key_from_secret(secret), ttl_s=lifetime_s)
    expires = int(time.time()) + lifetime_s   # mint_token's exp (whole seconds)
    client = await WsStompClient.open(gateway.ws_url)
    await client.connect({"token": token})
    await client.subscribe("/sub/chat/room/x", "s1")
    error = await client.next_frame(lifetime_s + 20)
    assert error.command == "ERROR" and error.get("message") == "token expired"
    assert time.time() >= expires - 1      # not long before exp
    assert (await client.closed())[0] == 1008
    # A new token connects again.
    fresh = await WsStompClient.open(gateway.ws_url)
    await fresh.connect({"token": mint_token("alice", key_from_secret(secret))})
    await fresh.close()


@pytest.mark.parametrize(("name", "value"), [
    ("send_rate_per_s", -1), ("send_burst", 0), ("send_rate_close_after", -1), ("rate_limit_sync_s", 0),
    ("max_connections_per_ip", -1), ("sockjs_max_sessions", -1), ("http_request_timeout_s", 0),
    ("max_http_connections", -1), ("max_transaction_bytes", 0), ("max_sessions_per_user", -1)])
def test_invalid_limit_settings_are_refused(name: str, value: float) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(environ={}, **{name: value})  # type: ignore[arg-type]


def test_limit_defaults() -> None:
    settings = load_settings(environ={})
    assert (settings.send_rate_per_s, settings.send_burst, settings.send_rate_close_after) == (50.0, 500, 100)
    assert settings.max_sessions_per_user == 20
    assert settings.max_connections_per_ip == 1000
    assert settings.sockjs_max_sessions == 10000
    assert settings.max_transaction_bytes == 1 << 20
    assert settings.http_request_timeout_s == 10.0


