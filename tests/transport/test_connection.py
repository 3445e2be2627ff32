"""Unit tests of gateway.transport.connection.StompConnection with a fake FrameSink (the layer under
test is the connection: its queue, writer, timers and event execution) over a real Hub and
MemoryBroker. Socket-level behaviour is tested in test_websocket*.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.auth import create_authenticator
from gateway.broker.base import Publication
from gateway.broker.memory import MemoryBroker
from gateway.hub import Hub, HubListener, InboundMessage, MessageRouter, SessionInfo
from gateway.receive import LocalFanout, compose
from gateway.settings import Settings, load_settings
from gateway.stomp.frames import Frame
from gateway.transport.connection import StompConnection, session_config
from tests.support.polling import eventually
from tests.support.stomp_wire import frame, server_frames


class FakeSink:
    """Records sends; ``block()`` makes every send hang like a peer that stopped reading."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self._open = asyncio.Event()
        self._open.set()

    def block(self) -> None:
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    async def send(self, data: bytes) -> None:
        await self._open.wait()
        self.sent.append(data)

    async def close(self, code: int, reason: str) -> None:
        await self._open.wait()
        self.closes.append((code, reason))

    def frames(self) -> list[Frame]:
        return server_frames(b"".join(self.sent))


def settings(**values: Any) -> Settings:
    return load_settings(environ={}, node_id="n1", **values)


async def make(hub: Hub | None = None, **values: Any) -> tuple[StompConnection, FakeSink, Hub]:
    cfg = settings(**values)
    if hub is None:
        hub = Hub(MemoryBroker(), MessageRouter(cfg.app_prefixes), node_id="n1")
        await hub.start(compose([], LocalFanout(hub.registry)))
    sink = FakeSink()
    connection = StompConnection(hub, cfg, session_config(cfg), sink, transport="fake", remote="test",
                                 authenticator=create_authenticator(cfg))
    await connection.start()
    return connection, sink, hub


async def connect(connection: StompConnection, sink: FakeSink, **headers: str) -> None:
    await connection.receive(frame("CONNECT", {"accept-version": "1.2", **headers}))
    await eventually(lambda: bool(sink.sent), "the first frame")
    assert sink.frames()[0].command == "CONNECTED"


async def test_receipts_a_client_never_reads_are_bounded() -> None:
    connection, sink, hub = await make(outbound_max_bytes=4096)
    await connect(connection, sink)
    sink.block()
    for i in range(200):                           # 200 receipts of ~1 KB each, nobody reading
        await connection.receive(frame("BEGIN", {"transaction": f"t{i}", "receipt": "r" * 1000}))
        if connection.closed:
            break
    assert connection.closed and i < 10
    # released without waiting for the blocked send:
    await eventually(lambda: not hub.sessions, "the session to be released")
    sink.unblock()
    await eventually(lambda: bool(sink.closes), "the close")
    assert sink.closes == [(4500, "Send limit exceeded")]


async def test_one_large_frame_into_an_empty_queue_is_not_a_slow_consumer() -> None:
    connection, sink, hub = await make(outbound_max_bytes=1024)
    await connect(connection, sink)
    await connection.receive(frame("SUBSCRIBE", {"id": "0", "destination": "/sub/big"}))
    await hub.publish(Publication("/sub/big", b"x" * 100_000))
    await eventually(lambda: len(sink.sent) == 2, "the second frame")
    assert sink.frames()[1].body == b"x" * 100_000
    assert not connection.closed


async def test_blocked_send_times_out_with_4500() -> None:
    connection, sink, hub = await make(outbound_send_timeout_s=0.1)
    await connect(connection, sink)
    sink.block()
    await connection.receive(frame("BEGIN", {"transaction": "t", "receipt": "r"}))
    await eventually(lambda: not hub.sessions, "the session to be released")
    sink.unblock()
    await eventually(lambda: bool(sink.closes), "the close")
    assert sink.closes == [(4500, "Send time limit exceeded")]


async def test_disconnect_hooks_run_once_whoever_ends_the_session() -> None:
    connection, sink, hub = await make()
    ended: list[str] = []

    class Ends(HubListener):
        async def session_ended(self, info: SessionInfo) -> None:
            ended.append(info.session_id)
    hub.listeners.append(Ends())
    await connect(connection, sink)
    await connection.receive(frame("DISCONNECT", {"receipt": "bye"}))
    await eventually(lambda: bool(sink.closes), "the close")
    await connection.connection_lost()             # the transport reports the loss too
    await connection.connection_lost()
    assert ended == [connection.info.session_id]
    assert sink.frames()[-1].get("receipt-id") == "bye"
    assert sink.closes == [(1000, "DISCONNECT")]


async def test_subscription_finished_after_the_connection_was_lost_is_removed() -> None:
    connection, sink, hub = await make()
    await connect(connection, sink)
    gate = asyncio.Event()

    authorizing = asyncio.Event()

    class SlowAuthorization(HubListener):
        async def authorize_subscribe(self, info: SessionInfo, sub_id: str, destination: str) -> None:
            authorizing.set()
            await gate.wait()                      # e.g. a database lookup
    hub.listeners.append(SlowAuthorization())
    subscribing = asyncio.create_task(connection.receive(frame("SUBSCRIBE", {"id": "0", "destination": "/sub/x"})))
    await asyncio.wait_for(authorizing.wait(), 10)  # the SUBSCRIBE is inside the authorization
    await connection.connection_lost()             # the socket died meanwhile
    gate.set()
    await subscribing
    assert hub.registry.count("/sub/x") == 0
    assert not hub.sessions and not hub.registry.subscribers()


async def test_broker_unavailable_is_an_error_with_receipt_id() -> None:
    connection, sink, hub = await make(allow_client_broker_send=True)
    await connect(connection, sink)
    await hub.stop()                               # the memory broker refuses to publish when stopped
    await connection.receive(frame("SEND", {"destination": "/sub/x", "receipt": "r"}, "x"))
    await eventually(lambda: bool(sink.closes), "the close")
    error = sink.frames()[-1]
    assert error.command == "ERROR" and error.get("receipt-id") == "r"
    assert error.get("message") == "Message broker unavailable, try again"
    assert sink.closes == [(1002, error.get("message") or "")]


async def test_receipt_for_send_comes_after_the_handler_ran() -> None:
    connection, sink, hub = await make()
    order: list[str] = []

    async def handler(message: InboundMessage) -> None:
        await asyncio.sleep(0.01)
        order.append(message.body.decode())
    hub.router.add("/work", handler)
    await connect(connection, sink)
    await connection.receive(frame("SEND", {"destination": "/pub/work", "receipt": "done"}, "job"))
    await eventually(lambda: len(sink.sent) == 2, "the second frame")
    assert order == ["job"] and sink.frames()[1].get("receipt-id") == "done"


async def test_internal_error_in_the_session_becomes_an_error_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    connection, sink, _hub = await make()
    await connect(connection, sink)

    def broken(data: bytes, now: float) -> list[Any]:
        raise RuntimeError("bug with /secret/path")
    monkeypatch.setattr(connection.session, "receive_data", broken)   # fault injection: a bug
    await connection.receive(frame("SEND", {"destination": "/pub/x"}))
    await eventually(lambda: bool(sink.closes), "the close")
    error = sink.frames()[-1]
    assert error.command == "ERROR" and error.get("message") == "Internal server error"
    assert b"secret" not in b"".join(sink.sent)
    assert sink.closes[0][0] == 1011


async def test_heart_beats_are_sent_when_idle() -> None:
    connection, sink, _hub = await make(heartbeat_send_min_ms=50)
    await connect(connection, sink, **{"heart-beat": "0,50"})
    await eventually(lambda: sink.sent.count(b"\n") >= 2, "two heart-beats")
    await connection.connection_lost()


async def test_connect_timeout_sends_error_and_closes_1008() -> None:
    _connection, sink, hub = await make(connect_timeout_s=0.05)
    await eventually(lambda: bool(sink.closes), "the close")
    (error,) = sink.frames()
    assert error.get("message") == "No CONNECT frame within 0.05 s"
    assert sink.closes == [(1008, "CONNECT timeout")]
    assert not hub.sessions


async def test_max_sessions_per_user_is_crossed() -> None:
    first, sink1, hub = await make(max_sessions_per_user=1)
    await connect(first, sink1, login="alice")
    second, sink2, _ = await make(hub, max_sessions_per_user=1)
    await second.receive(frame("CONNECT", {"accept-version": "1.2", "login": "alice"}))
    await eventually(lambda: bool(sink2.closes), "the second session's close")
    assert sink2.frames()[0].get("message") == "Too many sessions for user 'alice' (limit 1)"
    await first.receive(frame("DISCONNECT"))
    await eventually(lambda: first.info.session_id not in hub.sessions, "alice's session to end")
    third, sink3, _ = await make(hub, max_sessions_per_user=1)
    await connect(third, sink3, login="alice")


async def test_too_many_sessions_error_to_a_stomp_1_0_connect_is_not_escaped() -> None:
    first, sink1, hub = await make(max_sessions_per_user=1)
    await connect(first, sink1, login="ns:alice")
    second, sink2, _ = await make(hub, max_sessions_per_user=1)
    await second.receive(frame("CONNECT", {"login": "ns:alice"}))  # no accept-version: STOMP 1.0
    await eventually(lambda: bool(sink2.closes), "the second session's close")
    assert b"".join(sink2.sent) == (b"ERROR\nmessage:Too many sessions for user 'ns:alice' (limit 1)\n"
                                    b"content-length:0\n\n\x00")
