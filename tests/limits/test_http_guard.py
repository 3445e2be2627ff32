"""Unfinished HTTP requests and the node's connection cap, against a real ``chat-gateway serve``.

2,000 connections that never finish their request headers are all closed after
``http_request_timeout_s`` while a new STOMP client connects and chats; past ``max_http_connections``
a new connection is closed on accept (its descriptor returned at once) with exactly one WARNING line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import Iterator

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient

pytestmark = pytest.mark.timeout(180)

HALF_OPEN = 2000
PARTIAL_REQUEST = b"GET /chat/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Enough descriptors in this process (and the gateway it starts) for the half-open sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HALF_OPEN + 1024   # the gateway raises its own soft limit to its hard limit
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _half_open(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PARTIAL_REQUEST)
        await writer.drain()
        return reader, writer

    out: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, count, 200):   # in waves: the listen backlog is finite
        out += await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    return out


async def _closed_by_server(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        with contextlib.suppress(Exception):
            writer.close()


async def test_2000_half_open_connections_are_closed_and_a_new_client_connects_meanwhile(
        many_descriptors: None) -> None:
    timeout_s = 15.0
    with GatewayProcess({"http_request_timeout_s": timeout_s, "heartbeat_receive_ms": 0}) as gateway:
        conns = await _half_open(gateway.port, HALF_OPEN)
        try:
            # While all 2,000 are open: a real STOMP client connects, subscribes and gets a RECEIPT.
            client = await WsStompClient.open(gateway.ws_url)
            connected = await client.connect({"login": "newcomer"})
            assert connected.command == "CONNECTED"
            await client.subscribe("/sub/chat/room/lobby", "s1")
            still_open = sum(1 for reader, _ in conns if not reader.at_eof())
            assert still_open == HALF_OPEN, f"only {still_open} half-open connections were still open"
            # Then every one of them is closed by the server (bound: the timeout plus a loaded machine).
            results = await asyncio.gather(*(_closed_by_server(reader, timeout_s + 30) for reader, _ in conns))
            assert all(results), f"{results.count(False)} of {HALF_OPEN} half-open connections were never closed"
            # The STOMP session was not touched by the deadline (it finished its HTTP request: the upgrade).
            await client.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "r1"},
                                    '{"type":"TALK","roomId":"lobby","message":"hi"}')
            frame = await client.next_frame(10)
            assert frame.command in ("RECEIPT", "MESSAGE", "ERROR"), frame
            await client.close()
        finally:
            _close_all(conns)


async def test_past_the_connection_cap_new_connections_are_closed_on_accept_with_one_warning() -> None:
    cap = 40
    with GatewayProcess({"max_http_connections": cap, "http_request_timeout_s": 60,
                         "heartbeat_receive_ms": 0}) as gateway:
        conns = await _half_open(gateway.port, cap + 30)
        try:
            # The request deadline is a minute away: whatever closes now was refused on accept.
            closed = await asyncio.gather(*(_closed_by_server(reader, 15) for reader, _ in conns))
            refused = closed.count(True)
            assert refused >= 30, f"{refused} of {cap + 30} connections refused"
            assert closed.count(False) >= cap - 5   # the rest stay open (health checks may hold a few)
            await eventually(lambda: "refusing connections" in gateway.log_text(), "the warning line")
            # Once the half-open ones are gone, new clients get in again.
            _close_all(conns)

            async def stomp_connects() -> bool:
                try:
                    client = await WsStompClient.open(gateway.ws_url)
                    await client.connect()
                    await client.close()
                    return True
                except Exception:
                    return False

            await eventually(stomp_connects, "a new STOMP client to connect", timeout_s=30)  # type: ignore[arg-type]  # async condition
            log = gateway.log_text()
            assert log.count("refusing connections") == 1, log
            # One JSON line per record (gateway.logs: stderr is a file here).
            assert json.loads(next(line for line in log.splitlines() if "refusing connections" in line))[
                "level"] == "warning"
        finally:
            _close_all(conns)


async def test_the_deadline_also_covers_a_kept_alive_connections_next_request_and_a_body() -> None:
    with GatewayProcess({"http_request_timeout_s": 2, "heartbeat_receive_ms": 0}) as gateway:
        # A whole request is answered; the next one on the same connection never finishes: closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readexactly(3), 10)          # "ok\n"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        assert await _closed_by_server(reader, 30)
        writer.close()
        # A POST whose body never completes: closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /chat/room HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\nname=slow")
        await writer.drain()
        assert await _closed_by_server(reader, 30)
        writer.close()
