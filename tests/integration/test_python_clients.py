"""Real Python STOMP clients against a gateway served by uvicorn on a free port:

- ``stomp-py`` (``stomp.WSConnection``: sends ``STOMP``, offers no WebSocket subprotocol) with
  receipts, Ant patterns, transactions, client-individual ACK/NACK, binary WebSocket frames and
  heart-beats both ways;
- frames built by ``stomper`` 0.4.3 (the design's package; STOMP 1.1, never escaped) sent over a raw
  WebSocket.

The gateway is an inline app (tests.support.live_server.echo_component) in a background thread, so the
blocking stomp-py client can drive it from the test thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stomp
import stomper

from gateway import __version__
from tests.support.live_server import LiveServer, live_server
from tests.support.polling import eventually_sync
from tests.support.stomp_wire import WsStompClient


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(heartbeat_send_min_ms=100, heartbeat_receive_ms=200, heartbeat_grace=4.0) as srv:
        yield srv


class Recorder(stomp.ConnectionListener):  # type: ignore[misc]
    """Everything a stomp-py connection saw, for polling from the test thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connected: list[dict[str, str]] = []
        self.messages: list[tuple[dict[str, str], Any]] = []
        self.receipts: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.heartbeats = 0
        self.disconnected = 0
        self.heartbeat_timeouts = 0

    def on_connected(self, frame: Any) -> None:
        with self.lock:
            self.connected.append(dict(frame.headers))

    def on_message(self, frame: Any) -> None:
        with self.lock:
            self.messages.append((dict(frame.headers), frame.body))

    def on_receipt(self, frame: Any) -> None:
        with self.lock:
            self.receipts.append(frame.headers["receipt-id"])

    def on_error(self, frame: Any) -> None:
        with self.lock:
            self.errors.append(dict(frame.headers))

    def on_heartbeat(self) -> None:
        with self.lock:
            self.heartbeats += 1

    def on_heartbeat_timeout(self) -> None:
        with self.lock:
            self.heartbeat_timeouts += 1

    def on_disconnected(self) -> None:
        with self.lock:
            self.disconnected += 1


def open_stomp_py(server: LiveServer, *, heartbeats: tuple[int, int] = (0, 0), binary: bool = False,
                  login: str | None = None) -> tuple[stomp.WSConnection, Recorder]:
    conn = stomp.WSConnection([("127.0.0.1", server.port)], ws_path="/ws-stomp/websocket",
                              heartbeats=heartbeats, binary_mode=binary, reconnect_attempts_max=1)
    recorder = Recorder()
    conn.set_listener("recorder", recorder)
    conn.connect(login, None, wait=True)
    eventually_sync(lambda: bool(recorder.connected), "on_connected")   # stomp-py may return before listeners ran
    return conn, recorder


def receipt(conn: stomp.WSConnection, recorder: Recorder, rid: str, action: Callable[..., Any], *args: Any,
            **kwargs: Any) -> None:
    action(*args, receipt=rid, **kwargs)
    eventually_sync(lambda: rid in recorder.receipts, f"receipt {rid}")


def test_stomp_py_connects_with_stomp_and_no_subprotocol(server: LiveServer) -> None:
    conn, recorder = open_stomp_py(server, login="pyuser")
    (connected,) = recorder.connected
    assert connected["version"] == "1.2"
    assert connected["user-name"] == "pyuser"
    assert connected["server"] == f"chat-gateway/{__version__}"
    assert conn.transport.socket.getsubprotocol() is None
    conn.disconnect(receipt="bye")
    assert "bye" in recorder.receipts


def test_stomp_py_application_destination_reaches_another_sessions_subscription(server: LiveServer) -> None:
    reader, seen = open_stomp_py(server)
    writer, written = open_stomp_py(server)
    receipt(reader, seen, "s1", reader.subscribe, "/sub/chat/room/py-1", id="exact")
    receipt(reader, seen, "s2", reader.subscribe, "/sub/chat/room/*", id="pattern")
    receipt(reader, seen, "s3", reader.subscribe, "/sub/**", id="all")
    body = json.dumps({"type": "TALK", "roomId": "py-1", "sender": "py", "message": "héllo"})
    receipt(writer, written, "p1", writer.send, "/pub/chat/message", body, content_type="application/json")
    eventually_sync(lambda: len(seen.messages) == 3, "three deliveries")
    by_sub = {headers["subscription"]: (headers, text) for headers, text in seen.messages}
    assert set(by_sub) == {"exact", "pattern", "all"}
    for headers, text in by_sub.values():
        assert text == body
        assert headers["destination"] == "/sub/chat/room/py-1"
        assert headers["content-type"] == "application/json"
    writer.disconnect()
    reader.disconnect()


def test_stomp_py_transaction_commit_and_abort(server: LiveServer) -> None:
    conn, recorder = open_stomp_py(server)
    receipt(conn, recorder, "s", conn.subscribe, "/sub/py-tx", id="0")
    tx = conn.begin()
    conn.send("/pub/echo", "in-tx", headers={"x-to": "/sub/py-tx", "transaction": tx})
    receipt(conn, recorder, "marker-1", conn.send, "/pub/echo", "outside", headers={"x-to": "/sub/py-tx"})
    eventually_sync(lambda: len(recorder.messages) == 1, "the message sent outside the transaction")
    assert [m[1] for m in recorder.messages] == ["outside"]       # the transaction's SEND is held
    conn.commit(tx)
    tx2 = conn.begin()
    conn.send("/pub/echo", "aborted", headers={"x-to": "/sub/py-tx", "transaction": tx2})
    conn.abort(tx2)
    receipt(conn, recorder, "marker-2", conn.send, "/pub/echo", "end", headers={"x-to": "/sub/py-tx"})
    eventually_sync(lambda: len(recorder.messages) == 3, "all messages")
    assert [m[1] for m in recorder.messages] == ["outside", "in-tx", "end"]
    conn.disconnect()


def test_stomp_py_client_individual_ack_and_nack(server: LiveServer) -> None:
    conn, recorder = open_stomp_py(server)
    receipt(conn, recorder, "s", conn.subscribe, "/sub/py-ack", id="acks", ack="client-individual")
    for i in range(3):
        conn.send("/pub/echo", f"m{i}", headers={"x-to": "/sub/py-ack"})
    eventually_sync(lambda: len(recorder.messages) == 3, "messages")
    headers = [h for h, _ in recorder.messages]
    assert all(h["ack"] == h["message-id"] for h in headers)
    conn.ack(headers[1]["ack"])
    conn.nack(headers[0]["ack"])
    receipt(conn, recorder, "r", conn.ack, headers[2]["ack"])
    assert recorder.errors == []
    conn.ack(headers[2]["ack"])                                   # twice: the server says no
    eventually_sync(lambda: bool(recorder.errors), "ERROR")
    assert "already acknowledged" in recorder.errors[0]["message"]
    eventually_sync(lambda: not conn.is_connected(), "close after ERROR")


def test_stomp_py_binary_websocket_frames(server: LiveServer) -> None:
    conn, recorder = open_stomp_py(server, binary=True)
    receipt(conn, recorder, "s", conn.subscribe, "/sub/py-bin", id="0")
    receipt(conn, recorder, "p", conn.send, "/pub/echo", "sent in a binary WebSocket message",
            headers={"x-to": "/sub/py-bin"})
    eventually_sync(lambda: len(recorder.messages) == 1, "message")
    assert recorder.messages[0][1] == "sent in a binary WebSocket message"
    conn.disconnect()


def test_stomp_py_heart_beats_both_ways(server: LiveServer) -> None:
    # stomp-py beats every 300 ms (the server closes a client silent for 300 ms x 4 = 1.2 s) and asks
    # for server beats every 500 ms: three of them take 1.5 s, longer than the server's patience.
    conn, recorder = open_stomp_py(server, heartbeats=(300, 500))
    assert recorder.connected[0]["heart-beat"] == "100,200"
    eventually_sync(lambda: recorder.heartbeats >= 3, "server heart-beats")
    assert conn.is_connected() and recorder.heartbeat_timeouts == 0 and recorder.disconnected == 0
    receipt(conn, recorder, "alive", conn.send, "/pub/echo", "x", headers={"x-to": "/sub/none"})
    conn.disconnect()


def test_stomp_py_error_for_send_to_a_broker_destination(server: LiveServer) -> None:
    conn, recorder = open_stomp_py(server)
    conn.send("/sub/chat/room/1", "x", headers={"receipt": "bad"})
    eventually_sync(lambda: bool(recorder.errors), "ERROR")
    assert recorder.errors[0]["receipt-id"] == "bad"
    assert "not allowed" in recorder.errors[0]["message"]
    eventually_sync(lambda: recorder.disconnected > 0, "close after ERROR")


# -- stomper ------------------------------------------------------------------------------------


async def test_stomper_built_frames_are_accepted(server: LiveServer) -> None:
    client = await WsStompClient.open(server.ws_url, subprotocols=None)
    await client.send(stomper.connect("stomper-user", "secret", "localhost", heartbeats=(0, 0)))
    connected = await client.next_frame()
    assert connected.command == "CONNECTED" and connected.get("version") == "1.1"
    assert connected.get("user-name") == "stomper-user"
    await client.send(stomper.subscribe("/sub/stomper", "sub-1", ack="client"))
    await client.send(stomper.send("/pub/echo", "hello from stomper"))           # no x-to: /sub/echo
    frame = stomper.Frame()
    frame.cmd = "SEND"
    frame.headers = {"destination": "/pub/echo", "x-to": "/sub/stomper", "receipt": "r-1"}
    frame.body = "packed by stomper.Frame"
    await client.send(frame.pack())
    message = await client.next_frame()           # the handler ran (and broadcast) before the receipt
    assert message.body == b"packed by stomper.Frame" and message.get("subscription") == "sub-1"
    receipt_frame = await client.next_frame()
    assert receipt_frame.command == "RECEIPT" and receipt_frame.get("receipt-id") == "r-1"
    await client.send(stomper.begin("tx-1"))
    await client.send(stomper.ack(message.get("message-id"), "sub-1", "tx-1"))
    await client.send(stomper.send("/pub/echo", "in tx", transactionid="tx-1"))
    await client.send(stomper.commit("tx-1"))
    await client.send(stomper.begin("tx-2"))
    await client.send(stomper.abort("tx-2"))
    await client.send(stomper.unsubscribe("sub-1"))
    closing = stomper.Frame()
    closing.cmd = "DISCONNECT"
    closing.headers = {"receipt": "bye"}
    await client.send(closing.pack())
    last = await client.next_frame()
    assert last.command == "RECEIPT" and last.get("receipt-id") == "bye"   # no ERROR on the way
    code, _ = await client.closed()
    assert code == 1000
    await asyncio.sleep(0)
