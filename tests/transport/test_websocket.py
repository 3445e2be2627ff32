"""The raw WebSocket STOMP endpoint over a real uvicorn server, driven by a raw ``websockets`` client
that speaks STOMP by hand: subprotocol choice, text/binary in and out, split and batched frames,
errors and closes, the CONNECT deadline, heart-beats both ways and the origin policy.

(The slow-consumer tests are in test_websocket_slow.py.)
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.live_server import ServerFactory
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient, frame
from tests.transport.conftest import ServerLog

# -- subprotocols ----------------------------------------------------------------------------


@pytest.mark.parametrize(("offered", "chosen"), [
    (["v10.stomp", "v11.stomp", "v12.stomp"], "v12.stomp"),   # webstomp-client's order
    (["v12.stomp", "v11.stomp", "v10.stomp"], "v12.stomp"),   # @stomp/stompjs's order
    (["v10.stomp", "v11.stomp"], "v11.stomp"),                # legacy stomp.js
    (["v11.stomp", "v10.stomp"], "v11.stomp"),
    (["v10.stomp"], "v10.stomp"),
    (["mqtt", "v11.stomp"], "v11.stomp"),
])
async def test_highest_offered_subprotocol_is_chosen(gateway_server: ServerFactory, offered: list[str],
                                                     chosen: str) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url, subprotocols=offered)
    assert client.subprotocol == chosen
    connected = await client.connect()
    assert connected.get("version") == "1.2"     # STOMP version comes from accept-version
    await client.close()


async def test_no_subprotocol_offered_is_accepted(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url, subprotocols=None)
    assert client.subprotocol is None
    connected = await client.connect({"accept-version": "1.2"}, command="STOMP")
    assert connected.get("version") == "1.2"
    await client.close()


async def test_only_unknown_subprotocols_get_none(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url, subprotocols=["mqtt"])
    assert client.subprotocol is None
    await client.connect()
    await client.close()


# -- text and binary -------------------------------------------------------------------------


async def test_text_and_binary_inbound(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.send(frame("CONNECT", {"accept-version": "1.2"}), binary=True)
    assert (await client.next_frame()).command == "CONNECTED"
    await client.send_frame("SUBSCRIBE", {"id": "0", "destination": "/sub/echo", "receipt": "s"})
    assert (await client.next_frame()).command == "RECEIPT"
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "from-binary", binary=True)
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "from-text")
    bodies = [(await client.next_frame()).body for _ in range(2)]
    assert bodies == [b"from-binary", b"from-text"]
    await client.close()


async def test_outbound_is_text_unless_the_frame_is_not_utf8(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.subscribe("/sub/echo", "0")
    blob = bytes(range(256)) + b"\x00\xff\xfe"
    await client.send_frame("SEND", {"destination": "/pub/echo", "content-type": "application/octet-stream",
                                     "content-length": str(len(blob))}, blob, binary=True)
    await client.send_frame("SEND", {"destination": "/pub/echo", "content-type": "text/plain;charset=utf-8"},
                            "héllo ✓")
    binary_message = await client.next_frame()
    text_message = await client.next_frame()
    assert binary_message.body == blob
    assert binary_message.get("content-type") == "application/octet-stream"
    assert text_message.body == "héllo ✓".encode()
    assert isinstance(client.messages[-2], bytes)       # the binary MESSAGE came as a binary message
    assert isinstance(client.messages[-1], str)
    assert all(isinstance(m, str) for m in client.messages[:-2])  # CONNECTED, RECEIPT
    await client.close()


# -- framing ---------------------------------------------------------------------------------


async def test_frames_split_across_websocket_messages(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    for i in range(0, len(connect := frame("CONNECT", {"accept-version": "1.2", "host": "h"})), 3):
        await client.send(connect[i:i + 3], binary=True)
    assert (await client.next_frame()).command == "CONNECTED"
    await client.subscribe("/sub/echo", "0")
    body = "x" * 50_000
    send = frame("SEND", {"destination": "/pub/echo", "content-length": str(len(body))}, body)
    for i in range(0, len(send), 1000):               # @stomp/stompjs maxWebSocketChunkSize style
        await client.send(send[i:i + 1000])
    message = await client.next_frame()
    assert message.command == "MESSAGE" and message.body == body.encode()
    await client.close()


async def test_several_frames_in_one_websocket_message(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    batch = (frame("CONNECT", {"accept-version": "1.2"}) + b"\n"
             + frame("SUBSCRIBE", {"id": "0", "destination": "/sub/echo", "receipt": "r1"}) + b"\r\n\n"
             + frame("SEND", {"destination": "/pub/echo", "receipt": "r2"}, "one")
             + frame("SEND", {"destination": "/pub/echo"}, "two"))
    await client.send(batch)
    got = [await client.next_frame() for _ in range(5)]
    assert [f.command for f in got] == ["CONNECTED", "RECEIPT", "MESSAGE", "RECEIPT", "MESSAGE"]
    assert [f.get("receipt-id") for f in got if f.command == "RECEIPT"] == ["r1", "r2"]
    assert [f.body for f in got if f.command == "MESSAGE"] == [b"one", b"two"]
    await client.close()


async def test_message_frame_bytes_on_the_wire(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    connected = await client.connect()
    await client.subscribe("/sub/echo", "sub-0")
    await client.send_frame("SEND", {"destination": "/pub/echo", "content-type": "application/json"}, '{"a":1}')
    await client.next_frame()
    session = connected.get("session")
    assert client.messages[-1] == ("MESSAGE\ndestination:/sub/echo\ncontent-type:application/json\n"
                                   f"subscription:sub-0\nmessage-id:{session}-0\ncontent-length:7\n\n"
                                   '{"a":1}\x00')
    await client.close()


# -- receipts, errors and closes -------------------------------------------------------------


async def test_disconnect_receipt_then_normal_close(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.send_frame("DISCONNECT", {"receipt": "bye"})
    receipt = await client.next_frame()
    assert receipt.command == "RECEIPT" and receipt.get("receipt-id") == "bye"
    assert (await client.closed())[0] == 1000
    await eventually(lambda: server.session_count == 0, "the session to be removed")


async def test_frame_before_connect_gets_error_then_1002(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.send_frame("SUBSCRIBE", {"id": "0", "destination": "/sub/x", "receipt": "early"})
    error = await client.next_frame()
    assert error.command == "ERROR" and error.get("receipt-id") == "early"
    assert error.get("message") == "SUBSCRIBE frame received before CONNECT"
    assert (await client.closed())[0] == 1002
    await eventually(lambda: server.session_count == 0, "the session to be removed")


async def test_frame_over_the_size_limit_gets_error_then_1002(gateway_server: ServerFactory) -> None:
    server = gateway_server(max_frame_bytes=4096, max_header_line_bytes=1024)
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "x" * 5000)
    error = await client.next_frame()
    assert error.command == "ERROR" and "4096" in (error.get("message") or "")
    assert (await client.closed())[0] == 1002


async def test_handler_rejection_gets_error_with_receipt_id(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.send_frame("SEND", {"destination": "/pub/reject", "receipt": "r"}, "x")
    error = await client.next_frame()
    assert error.command == "ERROR" and error.get("receipt-id") == "r"
    assert error.get("message") == "rejected by the handler"
    assert (await client.closed())[0] == 1002


async def test_send_to_an_unmapped_application_destination_is_an_error(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.send_frame("SEND", {"destination": "/pub/nowhere", "receipt": "r"}, "x")
    error = await client.next_frame()
    assert error.command == "ERROR" and "/pub/nowhere" in (error.get("message") or "")
    assert (await client.closed())[0] == 1002


async def test_handler_crash_is_an_error_without_details(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.send_frame("SEND", {"destination": "/pub/chat/message"}, "not json")  # handler raises
    error = await client.next_frame()
    assert error.command == "ERROR" and error.get("message") == "Internal server error"
    assert b"Traceback" not in error.body and b"JSON" not in error.body
    assert (await client.closed())[0] is not None


async def test_abrupt_client_close_removes_the_session(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.subscribe("/sub/chat/room/1", "0")
    assert server.gateway.hub.registry.count("/sub/chat/room/1") == 1
    client.ws.transport.abort()
    await eventually(lambda: server.session_count == 0, "the session to be removed")
    assert server.gateway.hub.registry.count("/sub/chat/room/1") == 0


# -- timers ----------------------------------------------------------------------------------


async def test_connect_timeout_closes_a_silent_socket(gateway_server: ServerFactory) -> None:
    server = gateway_server(connect_timeout_s=0.3)
    client = await WsStompClient.open(server.ws_url)
    error = await client.next_frame(timeout=10)
    assert error.command == "ERROR" and error.get("message") == "No CONNECT frame within 0.3 s"
    assert (await client.closed())[0] == 1008
    await eventually(lambda: server.session_count == 0, "the session to be removed")


async def test_server_heart_beats_at_the_negotiated_interval(gateway_server: ServerFactory) -> None:
    server = gateway_server(heartbeat_send_min_ms=100)
    client = await WsStompClient.open(server.ws_url)
    connected = await client.connect({"heart-beat": "0,100"})
    assert connected.get("heart-beat") == "100,10000"
    await client.wait_heartbeats(3, timeout=10)
    assert client.messages.count("\n") >= 3            # each beat is one EOL in its own text message
    await client.close()


async def test_no_server_heart_beats_when_the_client_asks_none(gateway_server: ServerFactory) -> None:
    """Ordered by events, not by a sleep: while a client that asked for heart-beats (connected later)
    receives three, the one that asked none receives none."""
    server = gateway_server(heartbeat_send_min_ms=50)
    client = await WsStompClient.open(server.ws_url)
    await client.connect({"heart-beat": "0,0"})
    await client.subscribe("/sub/echo", "0")
    beating = await WsStompClient.open(server.ws_url)
    await beating.connect({"heart-beat": "0,50"})
    await beating.wait_heartbeats(3, timeout=30)
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "x")
    assert (await client.next_frame()).command == "MESSAGE"   # read everything sent before it
    assert client.heartbeats == 0
    await beating.close()
    await client.close()


async def test_silent_client_is_closed_after_the_grace(gateway_server: ServerFactory) -> None:
    server = gateway_server(heartbeat_receive_ms=100, heartbeat_grace=2.0)
    client = await WsStompClient.open(server.ws_url)
    connected = await client.connect({"heart-beat": "100,0"})
    assert connected.get("heart-beat") == "1000,100"
    code, _ = await client.closed(timeout=10)
    assert code == 1002
    await eventually(lambda: server.session_count == 0, "the session to be removed")


async def test_beating_client_stays_connected(gateway_server: ServerFactory) -> None:
    """Ordered by events, not by a time window: the beating client connects first, a silent one after
    it; once the server has closed the silent one, the beating one is past the deadline it would have
    had without beats, and must still be served. (Beats every 50 ms against a 1 s window.)"""
    server = gateway_server(heartbeat_receive_ms=250, heartbeat_grace=4.0)
    client = await WsStompClient.open(server.ws_url)
    await client.connect({"heart-beat": "250,0"})
    await client.subscribe("/sub/echo", "0")
    silent = await WsStompClient.open(server.ws_url)
    await silent.connect({"heart-beat": "250,0"})
    silent_closed = asyncio.create_task(silent.closed(timeout=60))
    while not silent_closed.done():
        await client.send("\n")
        await asyncio.wait([silent_closed], timeout=0.05)
    assert silent_closed.result()[0] == 1002
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "still here")
    assert (await client.next_frame()).body == b"still here"
    await client.close()


# -- origin policy ---------------------------------------------------------------------------


async def _rejected(url: str, origin: str) -> bool:
    try:
        client = await WsStompClient.open(url, origin=origin)
    except InvalidStatus as exc:
        assert exc.response.status_code == 403
        return True
    await client.close()
    return False


async def test_same_origin_by_default(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    assert await _rejected(server.ws_url, "http://evil.example")
    assert await _rejected(server.ws_url, "null")
    assert not await _rejected(server.ws_url, f"http://127.0.0.1:{server.port}")
    client = await WsStompClient.open(server.ws_url)    # no Origin header: non-browser client
    await client.connect()
    await client.close()


async def test_allowed_origins_list(gateway_server: ServerFactory) -> None:
    server = gateway_server(allowed_origins=("http://app.example", "https://chat.example:8443"))
    assert not await _rejected(server.ws_url, "http://app.example")
    assert not await _rejected(server.ws_url, "https://CHAT.example:8443")
    assert await _rejected(server.ws_url, "http://evil.example")
    assert await _rejected(server.ws_url, f"http://127.0.0.1:{server.port}")   # the list replaces same-origin


async def test_any_origin_with_star(gateway_server: ServerFactory) -> None:
    server = gateway_server(allowed_origins=("*",))
    assert not await _rejected(server.ws_url, "http://evil.example")
    assert not await _rejected(server.ws_url, "null")


# -- refused handshakes: one INFO/DEBUG line, never an ERROR ---------------------------------------


@pytest.mark.parametrize(("path", "origin", "level", "reason"), [
    ("/ws-stomp/websocket", "http://evil.example", logging.INFO, "origin 'http://evil.example' not allowed"),
    ("/ws-stomp/000/abc/websocket", "http://evil.example", logging.INFO, "origin 'http://evil.example' not allowed"),
    ("/ws-stomp/foo", None, logging.DEBUG, "no SockJS websocket at this URL"),
    ("/ws-stomp/000/a.b/websocket", None, logging.DEBUG, "no SockJS websocket at this URL"),   # bad session id
    ("/ws-stomp/000/abc/xhr_streaming", None, logging.DEBUG, "no SockJS websocket at this URL"),
    ("/ws-stomp/websocket/x", None, logging.DEBUG, "no SockJS websocket at this URL"),
])
async def test_refused_handshake_logs_one_line_with_reason_and_address_and_no_error(
        gateway_server: ServerFactory, server_log: ServerLog, path: str, origin: str | None, level: int,
        reason: str) -> None:
    server = gateway_server()
    server_log.attach()  # after uvicorn's logging setup
    with pytest.raises(InvalidStatus) as info:
        await WsStompClient.open(f"ws://127.0.0.1:{server.port}{path}", origin=origin)
    # A handshake the server completes normally afterwards: whatever the refused one logged is in by now.
    client = await WsStompClient.open(server.ws_url)
    await client.connect()
    await client.close()
    assert server_log.errors() == []
    (line,) = server_log.refusals()
    message = line.getMessage()
    assert line.levelno == level, message
    assert repr(path) in message and reason in message and "from 127.0.0.1:" in message, message
    assert info.value.response.status_code == 403


# -- receipts and broker sends on the wire -------------------------------------------------


async def test_receipt_for_every_client_frame_in_order(gateway_server: ServerFactory) -> None:
    server = gateway_server()
    client = await WsStompClient.open(server.ws_url)
    await client.send_frame("CONNECT", {"accept-version": "1.2", "receipt": "r-connect"})
    assert (await client.next_frame()).command == "CONNECTED"
    assert (await client.next_frame()).get("receipt-id") == "r-connect"
    await client.send_frame("SUBSCRIBE", {"id": "0", "destination": "/sub/echo", "ack": "client-individual",
                                          "receipt": "r-subscribe"})
    assert (await client.next_frame()).get("receipt-id") == "r-subscribe"
    await client.send_frame("SEND", {"destination": "/pub/echo", "receipt": "r-send"}, "a")
    await client.send_frame("SEND", {"destination": "/pub/echo"}, "b")
    first, receipt, second = [await client.next_frame() for _ in range(3)]
    assert (first.command, receipt.get("receipt-id"), second.command) == ("MESSAGE", "r-send", "MESSAGE")
    frames = [
        ("ACK", {"id": first.get("ack") or "", "receipt": "r-ack"}),
        ("NACK", {"id": second.get("ack") or "", "receipt": "r-nack"}),
        ("BEGIN", {"transaction": "t", "receipt": "r-begin"}),
        ("COMMIT", {"transaction": "t", "receipt": "r-commit"}),
        ("BEGIN", {"transaction": "t2", "receipt": "r-begin2"}),
        ("ABORT", {"transaction": "t2", "receipt": "r-abort"}),
        ("UNSUBSCRIBE", {"id": "0", "receipt": "r-unsubscribe"}),
        ("DISCONNECT", {"receipt": "r-disconnect"}),
    ]
    for command, headers in frames:
        await client.send_frame(command, headers)
    got = [(await client.next_frame()) for _ in frames]
    assert [f.command for f in got] == ["RECEIPT"] * len(frames)
    assert [f.get("receipt-id") for f in got] == [h["receipt"] for _, h in frames]
    assert (await client.closed())[0] == 1000


async def test_broker_send_when_allowed_reaches_others_without_credentials(gateway_server: ServerFactory) -> None:
    server = gateway_server(allow_client_broker_send=True)
    reader = await WsStompClient.open(server.ws_url)
    await reader.connect()
    await reader.subscribe("/sub/chat/room/*", "0")
    writer = await WsStompClient.open(server.ws_url)
    await writer.connect({"login": "mallory", "passcode": "pw"})
    await writer.send_frame("SEND", [("destination", "/sub/chat/room/7"), ("content-type", "text/plain"),
                                     ("token", "jwt-secret"), ("Authorization", "Bearer jwt-secret"),
                                     ("login", "mallory"), ("passcode", "pw"), ("x-trace", "t-1"),
                                     ("receipt", "sent")], "direct")
    assert (await writer.next_frame()).get("receipt-id") == "sent"
    message = await reader.next_frame()
    assert message.body == b"direct" and message.get("destination") == "/sub/chat/room/7"
    assert message.get("content-type") == "text/plain" and message.get("x-trace") == "t-1"
    assert b"jwt-secret" not in reader.messages[-1].encode() and b"pw" not in reader.messages[-1].encode()
    for name in ("token", "Authorization", "login", "passcode", "receipt"):
        assert name not in message
    await reader.close()
    await writer.close()
