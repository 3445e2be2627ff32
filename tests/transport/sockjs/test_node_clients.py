"""Real JavaScript clients (sockjs-client 1.6.1 + stompjs 2.3.3 / @stomp/stompjs 7) in Node 20,
each forced onto one SockJS transport, against our SockJS routes on a live uvicorn server.

The STOMP side is a small fake (CONNECTED, SUBSCRIBE, every SEND broadcast as MESSAGE, RECEIPT and
close on DISCONNECT) built
on the gateway's sans-I/O codec: the layer under test is the SockJS transport. The same Node script
(``sockjs_client_stomp.mjs``) is meant to run later against the full app with the real STOMP layer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.stomp.codec import FrameParser, serialize
from gateway.stomp.frames import Frame
from gateway.transport.base import FrameSink
from gateway.transport.sockjs import create_sockjs_routes
from tests.support.ci import skip_or_fail
from tests.support.polling import eventually
from tests.transport.sockjs.conftest import SwitchApp, make_settings

pytestmark = [pytest.mark.node, pytest.mark.asyncio(loop_scope="module")]

SCRIPT = Path(__file__).with_name("sockjs_client_stomp.mjs")
REPO = Path(__file__).resolve().parents[3]
NODE = shutil.which("node")


def _require_node() -> None:
    missing = None
    if NODE is None:
        missing = "node is not installed"
    elif not (REPO / "node_modules" / "sockjs-client").is_dir():
        missing = "node_modules/sockjs-client is missing (make node-deps)"
    if missing:
        skip_or_fail(missing, tests="the SockJS Node client tests")


@dataclass
class FakeStompBroker:
    subscriptions: list[tuple[FakeStompConnection, str, str]] = field(default_factory=list)
    connections: list[FakeStompConnection] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def __call__(self, sink: FrameSink, *, transport: str, remote: str) -> FakeStompConnection:
        connection = FakeStompConnection(self, sink, transport)
        self.connections.append(connection)
        return connection


class FakeStompConnection:
    """Just enough STOMP for the clients: a fake of gateway.transport.base.Connection."""

    def __init__(self, broker: FakeStompBroker, sink: FrameSink, transport: str) -> None:
        self.broker = broker
        self.sink = sink
        self.transport = transport
        self.parser = FrameParser(max_frame_bytes=1 << 20, max_headers=64, max_header_line_bytes=1 << 16)
        self.commands: list[str] = []
        self.lost_calls = 0
        self.closed = False

    async def start(self) -> None:
        pass

    async def receive(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            self.commands.append(frame.command)
            await self._handle(frame)

    async def _handle(self, frame: Frame) -> None:
        if frame.command in ("CONNECT", "STOMP"):
            versions = (frame.get("accept-version") or "1.0").split(",")
            version = next((v for v in ("1.2", "1.1") if v in versions), "1.0")
            await self.sink.send(serialize(Frame.build("CONNECTED", {"version": version, "heart-beat": "0,0",
                                                                     "user-name": "fake"})))
        elif frame.command == "SUBSCRIBE":
            self.broker.subscriptions.append((self, frame.get("id") or "", frame.get("destination") or ""))
        elif frame.command == "SEND":
            for connection, sub_id, destination in list(self.broker.subscriptions):
                message = Frame.build("MESSAGE", {"destination": destination, "subscription": sub_id,
                                                  "message-id": str(next(self.broker.ids)),
                                                  "content-type": frame.get("content-type") or "text/plain"},
                                      frame.body)
                await connection.sink.send(serialize(message))
        elif frame.command == "DISCONNECT":
            receipt = frame.get("receipt")
            if receipt:
                await self.sink.send(serialize(Frame.build("RECEIPT", {"receipt-id": receipt})))
            self.closed = True
            await self.sink.close(1000, "Normal closure")

    async def connection_lost(self) -> None:
        self.lost_calls += 1
        self.closed = True
        self.broker.subscriptions = [s for s in self.broker.subscriptions if s[0] is not self]


async def run_node(*args: str, timeout: float = 30.0) -> tuple[int, list[dict[str, Any]], str]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, str(SCRIPT), *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_PROXY": "*", "no_proxy": "*"})
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    events = [json.loads(line) for line in stdout.decode().split("\n") if line.strip()]
    return process.returncode or 0, events, stderr.decode()


@pytest.fixture
def node_ready() -> None:
    _require_node()


@pytest.mark.usefixtures("node_ready")
@pytest.mark.parametrize("client", ["stompjs", "stomp7"])
@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling", "eventsource"])
async def test_real_clients_over_each_transport(server: tuple[str, SwitchApp], transport: str,
                                                client: str) -> None:
    url, switch = server
    broker = FakeStompBroker()
    # A small streaming limit makes streaming clients reconnect mid-test; a short disconnect delay
    # reaps the session quickly when the client leaves between two polls (HTTP transports have no
    # client-side close in SockJS) without having sent DISCONNECT.
    routes = create_sockjs_routes(make_settings(sockjs_streaming_limit_bytes=1024, sockjs_disconnect_delay_s=1.0),
                                  broker)
    switch.current = Starlette(routes=[Mount("/ws-stomp", routes=routes)])
    try:
        body = '{"message":"m{i} 안녕 😀 \u2028 </script>","n":{i}}'
        code, events, stderr = await run_node(
            "--url", f"{url}/ws-stomp", "--transport", transport, "--client", client,
            "--subscribe", "/sub/chat/room/1", "--send-to", "/pub/chat/message", "--count", "12",
            "--body", body)
        assert code == 0, (events, stderr[-2000:])
        connected = events[0]
        assert connected["event"] == "connected"
        assert connected["transport"] == transport
        assert connected["version"] == "1.2" if client == "stomp7" else connected["version"] in ("1.1", "1.2")
        messages = [e for e in events if e["event"] == "message"]
        assert [m["body"] for m in messages] == [body.replace("{i}", str(i)) for i in range(12)]
        assert all(m["destination"] == "/sub/chat/room/1" for m in messages)
        assert events[-1] == {"event": "done", "received": 12}
        (connection,) = broker.connections
        assert connection.transport == "sockjs-" + transport.replace("-polling", "").replace("-", "_")
        assert connection.commands[:2] == ["CONNECT", "SUBSCRIBE"]
        await eventually(lambda: connection.lost_calls == 1, "connection_lost after the client left")
    finally:
        await routes.registry.close_all(flush_timeout_s=0.5)
        switch.current = None
