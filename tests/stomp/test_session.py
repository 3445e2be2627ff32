"""Sans-I/O tests of gateway.stomp.session: CONNECT, versions, heart-beats, receipts, errors,
destinations, subscriptions and MESSAGE rendering. Every answer is checked on the bytes the
session queued. (ACK/NACK and transactions: test_session_acks.py.)

Must not import asyncio or any transport.
"""

from __future__ import annotations

import pytest

from gateway.stomp.codec import MessageTemplate
from gateway.stomp.frames import Frame
from gateway.stomp.session import (
    AuthenticationFailed,
    CloseRequested,
    Connected,
    DisconnectRequested,
    MessageSent,
    ReceiptRequested,
    State,
    Subscribed,
    Unsubscribed,
)
from tests.stomp.session_helpers import (
    close_of,
    connected,
    deliver,
    frame,
    new_session,
    out,
    out_bytes,
    subscribe,
)
from tests.support.stomp_wire import server_frames

# -- version negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize(("offered", "chosen"), [
    ("1.0,1.1,1.2", "1.2"),
    ("1.2,1.1,1.0", "1.2"),
    ("1.1,1.0", "1.1"),          # legacy stomp.js 2.3.3
    ("1.0", "1.0"),
    ("1.1", "1.1"),
    ("1.0, 1.1", "1.1"),
    ("1.2,2.0", "1.2"),
    ("1.1,1.3", "1.1"),
])
def test_highest_common_version_wins(offered: str, chosen: str) -> None:
    session = new_session()
    events = session.receive_data(frame("CONNECT", {"accept-version": offered, "host": "h"}), 0.0)
    assert isinstance(events[0], Connected) and events[0].version == chosen
    (got,) = out(session)
    assert got.command == "CONNECTED" and got.get("version") == chosen
    assert session.version == chosen and session.state is State.CONNECTED


def test_no_accept_version_means_stomp_1_0() -> None:
    session = new_session()
    (event,) = session.receive_data(frame("CONNECT", {"login": "x"}), 0.0)
    assert isinstance(event, Connected) and event.version == "1.0"
    assert out(session)[0].get("version") == "1.0"


@pytest.mark.parametrize("offered", ["2.0", "0.9,1.3", "banana"])
def test_no_supported_version_is_an_error_with_the_version_header(offered: str) -> None:
    session = new_session()
    events = session.receive_data(frame("CONNECT", {"accept-version": offered, "receipt": "c1"}), 0.0)
    assert close_of(events).reason == "unsupported version" and len(events) == 1
    data = out_bytes(session)
    (error,) = server_frames(data)
    assert error.command == "ERROR"
    assert error.get("version") == "1.2,1.1,1.0"
    assert error.get("receipt-id") == "c1"
    assert "1.2,1.1,1.0" in (error.get("message") or "")
    assert b"CONNECTED" not in data
    assert session.closed


@pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
def test_connect_and_stomp_both_connect(command: str) -> None:
    session = new_session()
    events = session.receive_data(frame(command, {"accept-version": "1.2", "host": "h"}), 0.0)
    assert [type(e) for e in events] == [Connected]
    assert out(session)[0].command == "CONNECTED"


def test_connected_bytes_exactly() -> None:
    session = new_session()
    session.receive_data(frame("CONNECT", {"accept-version": "1.2", "host": "h", "heart-beat": "0,0"}), 0.0)
    assert out_bytes(session) == (b"CONNECTED\nversion:1.2\nheart-beat:1000,10000\nsession:s1\n"
                                  b"server:chat-gateway\n\n\x00")


def test_connected_has_user_name_when_known_and_server_name_is_a_setting() -> None:
    session = new_session(authenticator=lambda f: f.get("login"), server_name="gw/9")
    (event,) = session.receive_data(frame("CONNECT", {"accept-version": "1.2", "login": "alice"}), 0.0)
    assert isinstance(event, Connected) and event.user == "alice"
    got = out(session)[0]
    assert got.get("user-name") == "alice" and got.get("server") == "gw/9" and got.get("session") == "s1"
    assert [k for k, _ in got.headers] == ["version", "heart-beat", "session", "server", "user-name"]


def test_connected_has_no_user_name_for_anonymous() -> None:
    session = new_session(authenticator=lambda f: None)
    session.receive_data(frame("CONNECT", {"accept-version": "1.2"}), 0.0)
    assert "user-name" not in out(session)[0]


def test_connect_headers_are_not_unescaped() -> None:
    seen: list[str | None] = []

    def authenticator(f: Frame) -> str | None:
        seen.append(f.get("passcode"))
        return None
    session = new_session(authenticator=authenticator)
    session.receive_data(frame("CONNECT", {"accept-version": "1.2", "passcode": "a\\cb\\x"}), 0.0)
    assert seen == ["a\\cb\\x"]
    assert out(session)[0].command == "CONNECTED"


def test_second_connect_is_ignored() -> None:
    session = connected(authenticator=lambda f: f.get("login"))
    for command in ("CONNECT", "STOMP"):
        events = session.receive_data(frame(command, {"accept-version": "1.0", "login": "mallory"}), 1.0)
        assert events == []
        assert out_bytes(session) == b""
    assert session.version == "1.2" and session.user is None and session.state is State.CONNECTED
    # and the session still works
    assert isinstance(subscribe(session), Subscribed)


def test_authentication_failure_is_an_error_then_close() -> None:
    def refuse(f: Frame) -> str | None:
        raise AuthenticationFailed("Authentication failed: bad token")
    session = new_session(authenticator=refuse)
    events = session.receive_data(frame("CONNECT", {"accept-version": "1.2", "receipt": "r"}), 0.0)
    assert close_of(events) and len(events) == 1
    (error,) = out(session)
    assert error.command == "ERROR"
    assert error.get("message") == "Authentication failed: bad token"
    assert error.get("receipt-id") == "r"
    assert error.get("content-length") == "0"
    assert session.closed and session.user is None


def _refuse(f: Frame) -> str | None:
    raise AuthenticationFailed("Authentication failed: bad login or passcode")


@pytest.mark.parametrize("headers", [{}, {"accept-version": "1.0"}, {"accept-version": "1.0,2.0"}],
                         ids=["no-accept-version", "1.0", "1.0-and-unknown"])
def test_refused_stomp_1_0_connect_error_is_not_escaped(headers: dict[str, str]) -> None:
    """STOMP 1.0 has no header escaping, also for the ERROR refusing its CONNECT."""
    session = new_session(authenticator=_refuse)
    events = session.receive_data(frame("CONNECT", {**headers, "login": "a", "receipt": "r:1"}), 0.0)
    assert close_of(events) and len(events) == 1
    assert out_bytes(session) == (b"ERROR\nmessage:Authentication failed: bad login or passcode\n"
                                  b"receipt-id:r:1\ncontent-length:0\n\n\x00")
    assert session.closed and session.user is None


def test_refused_stomp_1_1_and_1_2_connect_errors_are_escaped() -> None:
    for version in ("1.1", "1.2"):
        session = new_session(authenticator=_refuse)
        session.receive_data(frame("CONNECT", {"accept-version": version, "receipt": "r:1"}), 0.0)
        assert out_bytes(session) == (b"ERROR\nmessage:Authentication failed\\c bad login or passcode\n"
                                      b"receipt-id:r\\c1\ncontent-length:0\n\n\x00")


def test_stomp_1_0_connect_refused_for_other_reasons_is_not_escaped() -> None:
    # an invalid user name from the authenticator
    session = new_session(authenticator=lambda f: "eve\nmessage:forged")
    session.receive_data(frame("CONNECT", {"login": "eve"}), 0.0)
    assert out_bytes(session) == (b"ERROR\nmessage:Authentication failed: invalid user name\n"
                                  b"content-length:0\n\n\x00")
    # a broken heart-beat header (the value is quoted into the message)
    session = new_session()
    session.receive_data(frame("CONNECT", {"heart-beat": "a:b"}), 0.0)
    assert out_bytes(session) == b"ERROR\nmessage:Invalid heart-beat header 'a:b'\ncontent-length:0\n\n\x00"


def test_an_authenticator_crash_is_an_error_without_details() -> None:
    def broken(f: Frame) -> str | None:
        raise RuntimeError("secret internals /etc/passwd")
    session = new_session(authenticator=broken)
    events = session.receive_data(frame("CONNECT", {"accept-version": "1.2"}), 0.0)
    assert close_of(events)
    data = out_bytes(session)
    assert data.startswith(b"ERROR\n")
    assert b"internals" not in data and b"Traceback" not in data and b"RuntimeError" not in data


# -- heart-beats -------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "floor", "want", "send_s", "receive_s"), [
    ("0,1000", 1000, 10000, 1.0, 0.0),      # the example: a beat at least every second
    ("0,500", 1000, 10000, 1.0, 0.0),       # never faster than the floor
    ("0,5000", 1000, 10000, 5.0, 0.0),      # the client's slower wish is granted
    ("0,0", 1000, 10000, 0.0, 0.0),         # 0 disables both ways
    ("3000,0", 1000, 10000, 0.0, 10.0),     # we never ask more often than heartbeat_receive_ms
    ("20000,20000", 1000, 10000, 20.0, 20.0),
    ("1000,1000", 0, 10000, 0.0, 10.0),     # floor 0: the server never beats
    ("1000,1000", 1000, 0, 1.0, 0.0),       # want 0: client beats not expected
    ("  5000 , 7000 ", 1000, 1000, 7.0, 5.0),
])
def test_heart_beat_negotiation(client: str, floor: int, want: int, send_s: float, receive_s: float) -> None:
    session = new_session(heartbeat_send_min_ms=floor, heartbeat_receive_ms=want)
    session.receive_data(frame("CONNECT", {"accept-version": "1.2", "heart-beat": client}), 0.0)
    assert out(session)[0].get("heart-beat") == f"{floor},{want}"
    assert session.send_interval_s == send_s
    assert session.receive_interval_s == receive_s


def test_missing_heart_beat_header_means_none() -> None:
    session = new_session()
    session.receive_data(frame("CONNECT", {"accept-version": "1.2"}), 0.0)
    assert out(session)[0].get("heart-beat") == "1000,10000"
    assert session.send_interval_s == 0 and session.receive_interval_s == 0
    assert session.next_timer(0.0) is None


def test_stomp_1_0_has_no_heart_beats() -> None:
    session = new_session()
    session.receive_data(frame("CONNECT", {"heart-beat": "1000,1000"}), 0.0)
    assert out(session)[0].get("heart-beat") == "0,0"
    assert session.send_interval_s == 0 and session.receive_interval_s == 0


@pytest.mark.parametrize("bad", ["abc", "1000", "1,2,3", "-1,0", "1000,x"])
def test_invalid_heart_beat_header_is_an_error(bad: str) -> None:
    session = new_session()
    events = session.receive_data(frame("CONNECT", {"accept-version": "1.2", "heart-beat": bad}), 0.0)
    assert close_of(events)
    (error,) = out(session)
    assert error.command == "ERROR" and "heart-beat" in (error.get("message") or "")


def test_server_heart_beat_due_with_an_injected_clock() -> None:
    session = connected(heart_beat="0,1000", now=100.0)
    assert not session.heartbeat_due(100.5)
    assert session.next_timer(100.5) == pytest.approx(0.5)
    assert session.heartbeat_due(101.0)
    session.note_sent(101.0)           # the transport sent something (a beat or a frame)
    assert not session.heartbeat_due(101.9)
    assert session.heartbeat_due(102.0)


def test_silent_client_times_out_after_the_grace_multiple() -> None:
    session = connected(heart_beat="1000,0", now=0.0, heartbeat_receive_ms=1000, heartbeat_grace=2.5)
    assert session.receive_interval_s == 1.0
    assert not session.peer_timed_out(2.5)
    assert session.peer_timed_out(2.51)
    session.receive_data(b"\n", 2.4)   # a heart-beat EOL counts as traffic
    assert not session.peer_timed_out(4.8)
    assert session.peer_timed_out(4.91)
    assert session.next_timer(4.0) == pytest.approx(0.9)


def test_partial_frames_count_as_traffic() -> None:
    session = connected(heart_beat="1000,0", heartbeat_receive_ms=1000, heartbeat_grace=2.0)
    session.receive_data(b"SEND\ndesti", 1.9)
    assert not session.peer_timed_out(3.8)
    assert session.peer_timed_out(3.91)


def test_no_timers_before_connect_or_after_close() -> None:
    session = new_session()
    assert session.next_timer(0.0) is None and not session.heartbeat_due(100.0)
    session = connected(heart_beat="1000,1000")
    session.receive_data(frame("DISCONNECT"), 0.0)
    assert session.next_timer(0.0) is None
    assert not session.heartbeat_due(100.0) and not session.peer_timed_out(100.0)


# -- receipts ---------------------------------------------------------------------------------


def test_receipt_on_connect() -> None:
    session = new_session()
    events = session.receive_data(frame("CONNECT", {"accept-version": "1.2", "receipt": "c-1"}), 0.0)
    assert [type(e) for e in events] == [Connected, ReceiptRequested]
    assert events[1] == ReceiptRequested("c-1")


def test_receipt_carried_by_every_event_kind() -> None:
    session = connected(allow_client_broker_send=True)
    (sub,) = session.receive_data(frame("SUBSCRIBE", {"id": "a", "destination": "/sub/x", "receipt": "r1",
                                                      "ack": "client"}), 0.0)
    assert isinstance(sub, Subscribed) and sub.receipt == "r1"
    (send,) = session.receive_data(frame("SEND", {"destination": "/pub/x", "receipt": "r2"}, "hi"), 0.0)
    assert isinstance(send, MessageSent) and send.receipt == "r2"
    message = deliver(session, "a")
    mid = message.get("ack") or ""
    for i, (command, headers) in enumerate([
        ("BEGIN", {"transaction": "t"}),
        ("ABORT", {"transaction": "t"}),
        ("BEGIN", {"transaction": "t2"}),
        ("COMMIT", {"transaction": "t2"}),
        ("NACK", {"id": mid}),
    ]):
        events = session.receive_data(frame(command, {**headers, "receipt": f"x{i}"}), 0.0)
        assert events == [ReceiptRequested(f"x{i}")], command
    message = deliver(session, "a")
    events = session.receive_data(frame("ACK", {"id": message.get("ack") or "", "receipt": "x9"}), 0.0)
    assert events == [ReceiptRequested("x9")]
    (unsub,) = session.receive_data(frame("UNSUBSCRIBE", {"id": "a", "receipt": "r3"}), 0.0)
    assert isinstance(unsub, Unsubscribed) and unsub.receipt == "r3"
    (disc,) = session.receive_data(frame("DISCONNECT", {"receipt": "r4"}), 0.0)
    assert disc == DisconnectRequested("r4")


def test_receipt_bytes_and_escaping() -> None:
    session = connected("1.2")
    session.send_receipt("r:1")
    assert out_bytes(session) == b"RECEIPT\nreceipt-id:r\\c1\n\n\x00"
    session = connected("1.0")
    session.send_receipt("r:1")
    assert out_bytes(session) == b"RECEIPT\nreceipt-id:r:1\n\n\x00"


def test_frames_without_receipt_get_no_receipt() -> None:
    session = connected()
    assert session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0) == []
    assert session.receive_data(frame("ABORT", {"transaction": "t"}), 0.0) == []
    (disc,) = session.receive_data(frame("DISCONNECT"), 0.0)
    assert disc == DisconnectRequested(None)
    assert out_bytes(session) == b""


def test_disconnect_closes_the_session_normally() -> None:
    session = connected()
    events = session.receive_data(frame("DISCONNECT", {"receipt": "bye"}) + frame("SEND", {"destination": "/pub/x"}),
                                  0.0)
    assert events == [DisconnectRequested("bye")]      # nothing after DISCONNECT is handled
    assert session.closed
    assert session.receive_data(frame("SEND", {"destination": "/pub/x"}), 0.0) == []


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["SEND", "SUBSCRIBE", "DISCONNECT", "ACK", "BEGIN"])
def test_frame_before_connect_is_an_error(command: str) -> None:
    session = new_session()
    events = session.receive_data(frame(command, {"destination": "/pub/x", "receipt": "early"}), 0.0)
    close = close_of(events)
    assert close == CloseRequested(close.reason) and len(events) == 1
    (error,) = out(session)
    assert error.command == "ERROR"
    assert error.get("message") == f"{command} frame received before CONNECT"
    assert error.get("receipt-id") == "early"
    assert session.closed


def test_error_bytes_exactly() -> None:
    session = new_session()
    session.receive_data(frame("SEND", {"destination": "/pub/x"}), 0.0)
    assert out_bytes(session) == b"ERROR\nmessage:SEND frame received before CONNECT\ncontent-length:0\n\n\x00"


def test_unknown_command_is_an_error_with_receipt_id() -> None:
    session = connected()
    events = session.receive_data(b"HELLO\nx:y\nreceipt:r\\c1\nreceipt:second\n\n\x00", 0.0)
    assert close_of(events)
    (error,) = out(session)
    assert error.command == "ERROR" and "Unknown STOMP command 'HELLO'" in (error.get("message") or "")
    assert error.get("receipt-id") == "r:1"          # the first receipt header, unescaped


def test_oversized_declared_body_is_an_error_with_receipt_id() -> None:
    session = connected(max_frame_bytes=1024)
    events = session.receive_data(b"SEND\ndestination:/pub/x\nreceipt:big\ncontent-length:5000\n\n", 0.0)
    assert close_of(events)              # refused before the body is buffered
    (error,) = out(session)
    assert "1024" in (error.get("message") or "") and error.get("receipt-id") == "big"


@pytest.mark.parametrize(("command", "headers", "missing"), [
    ("SEND", {}, "destination"),
    ("SEND", {"destination": ""}, "destination"),
    ("SUBSCRIBE", {"id": "1"}, "destination"),
    ("SUBSCRIBE", {"destination": "/sub/x"}, "id"),
    ("UNSUBSCRIBE", {}, "id"),
    ("BEGIN", {}, "transaction"),
    ("COMMIT", {}, "transaction"),
    ("ABORT", {}, "transaction"),
    ("ACK", {}, "id"),
    ("NACK", {}, "id"),
])
def test_missing_required_header_is_an_error_with_receipt_id(command: str, headers: dict[str, str],
                                                             missing: str) -> None:
    session = connected()
    events = session.receive_data(frame(command, {**headers, "receipt": "rr"}), 0.0)
    assert close_of(events) and len(events) == 1
    (error,) = out(session)
    assert error.command == "ERROR"
    assert error.get("message") == f"Missing required header '{missing}' on {command}"
    assert error.get("receipt-id") == "rr"


def test_broken_frame_size_limit_is_an_error() -> None:
    session = connected(max_frame_bytes=1024)
    events = session.receive_data(frame("SEND", {"destination": "/pub/x"}, b"x" * 2000), 0.0)
    assert close_of(events)
    (error,) = out(session)
    assert error.command == "ERROR" and "1024" in (error.get("message") or "")


def test_frame_size_limit_is_checked_while_buffering() -> None:
    session = connected(max_frame_bytes=1024)
    events = session.receive_data(b"SEND\ndestination:/pub/x\n\n" + b"x" * 600, 0.0)
    assert events == []
    events = session.receive_data(b"x" * 600, 0.0)    # no NUL yet, already past the limit
    assert close_of(events)
    assert out(session)[0].command == "ERROR"


def test_header_count_and_line_limits_are_errors() -> None:
    session = connected(max_headers=3)
    headers = [(f"h{i}", "v") for i in range(5)]
    events = session.receive_data(frame("SEND", [("destination", "/pub/x"), *headers]), 0.0)
    assert close_of(events)
    assert "3 headers" in (out(session)[0].get("message") or "")
    session = connected(max_header_line_bytes=100)
    events = session.receive_data(frame("SEND", {"destination": "/pub/x", "h": "v" * 200}), 0.0)
    assert close_of(events)
    assert "100 bytes" in (out(session)[0].get("message") or "")


def test_undefined_escape_is_an_error_in_1_2_but_literal_in_1_0() -> None:
    session = connected("1.2")
    events = session.receive_data(frame("SEND", {"destination": "/pub/x", "h": "a\\tb"}), 0.0)
    assert close_of(events)
    assert "escape" in (out(session)[0].get("message") or "")
    session = connected("1.0")
    (sent,) = session.receive_data(frame("SEND", {"destination": "/pub/x", "h": "a\\tb\\c"}), 0.0)
    assert isinstance(sent, MessageSent) and sent.get("h") == "a\\tb\\c"


def test_escaped_headers_are_unescaped_in_1_1_and_1_2() -> None:
    for version in ("1.1", "1.2"):
        session = connected(version)
        (sent,) = session.receive_data(frame("SEND", {"destination": "/pub/x", "h": "a\\cb\\nc\\\\"}), 0.0)
        assert isinstance(sent, MessageSent) and sent.get("h") == "a:b\nc\\"


def test_nothing_is_handled_after_an_error_in_the_same_data() -> None:
    session = connected()
    data = frame("SEND", {}) + frame("SEND", {"destination": "/pub/ok"})
    events = session.receive_data(data, 0.0)
    assert len(events) == 1 and isinstance(events[0], CloseRequested)
    assert session.receive_data(frame("SEND", {"destination": "/pub/ok"}), 0.0) == []
    assert [f.command for f in out(session)] == ["ERROR"]


def test_error_message_is_one_line_and_bounded() -> None:
    session = connected()
    close = session.send_error("line one\nline two " + "x" * 2000, "r")
    assert isinstance(close, CloseRequested) and session.closed
    (error,) = out(session)
    message = error.get("message") or ""
    assert "\n" not in message and len(message) <= 512
    assert error.get("receipt-id") == "r"


def test_errors_never_carry_stack_traces() -> None:
    bad_inputs = [b"\x00\x01\x02\n\n\x00", b"SEND\n\xff\xfe:x\n\n\x00", b"SUBSCRIBE\nid\n\n\x00",
                  frame("SEND", {"content-length": "-1"}), frame("SEND", {"content-length": "9" * 40})]
    for data in bad_inputs:
        session = connected()
        events = session.receive_data(data, 0.0)
        assert close_of(events), data
        out_data = out_bytes(session)
        assert out_data.startswith(b"ERROR\n"), data
        for needle in (b"Traceback", b"File \"", b"Error(", b".py"):
            assert needle not in out_data


# -- SEND and destinations ---------------------------------------------------------------------


def test_send_to_application_destination() -> None:
    session = connected()
    (sent,) = session.receive_data(frame("SEND", {"destination": "/pub/chat/message", "content-type": "text/plain",
                                                  "receipt": "s"}, "hello"), 0.0)
    assert isinstance(sent, MessageSent)
    assert sent.destination == "/pub/chat/message" and sent.body == b"hello" and not sent.to_broker
    assert sent.get("content-type") == "text/plain" and sent.receipt == "s"


def test_send_body_with_nul_by_content_length() -> None:
    session = connected()
    body = b"a\x00b\x00"
    (sent,) = session.receive_data(frame("SEND", {"destination": "/pub/x", "content-length": "4"}, body), 0.0)
    assert isinstance(sent, MessageSent) and sent.body == body


def test_send_to_broker_destination_is_rejected_by_default() -> None:
    session = connected()
    events = session.receive_data(frame("SEND", {"destination": "/sub/chat/room/1", "receipt": "b"}, "x"), 0.0)
    assert close_of(events) and len(events) == 1
    (error,) = out(session)
    assert error.command == "ERROR" and error.get("receipt-id") == "b"
    assert "/sub/chat/room/1" in (error.get("message") or "") and "not allowed" in (error.get("message") or "")


def test_send_to_broker_destination_when_allowed_drops_credentials_keeps_custom_headers() -> None:
    session = connected(allow_client_broker_send=True)
    headers = [("destination", "/sub/chat/room/1"), ("content-type", "application/json"), ("receipt", "r"),
               ("login", "alice"), ("passcode", "pw"), ("token", "jwt"), ("Authorization", "Bearer jwt"),
               ("authorization", "Bearer x"), ("TOKEN", "jwt2"), ("x-trace", "abc"), ("priority", "5"),
               ("transaction-ish", "t")]
    (sent,) = session.receive_data(frame("SEND", headers, "{}"), 0.0)
    assert isinstance(sent, MessageSent) and sent.to_broker
    assert sent.custom_headers == (("x-trace", "abc"), ("priority", "5"), ("transaction-ish", "t"))


@pytest.mark.parametrize("destination", ["/topic/x", "/pubx", "/subway/x", "chat/message", "/"])
def test_send_to_neither_prefix_is_an_error(destination: str) -> None:
    session = connected()
    events = session.receive_data(frame("SEND", {"destination": destination}), 0.0)
    assert close_of(events)
    message = out(session)[0].get("message") or ""
    assert destination in message and "/pub" in message


def test_prefixes_are_settings() -> None:
    session = connected(app_prefixes=("/app",), broker_prefixes=("/topic", "/queue"))
    (sent,) = session.receive_data(frame("SEND", {"destination": "/app/hello"}), 0.0)
    assert isinstance(sent, MessageSent) and not sent.to_broker
    assert isinstance(subscribe(session, "/queue/q", "1"), Subscribed)
    assert isinstance(subscribe(session, "/topic/t", "2"), Subscribed)
    events = session.receive_data(frame("SEND", {"destination": "/pub/x"}), 0.0)
    assert close_of(events)


# -- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------------------------


@pytest.mark.parametrize("ack", [None, "auto", "client", "client-individual"])
def test_subscribe_with_ack_modes(ack: str | None) -> None:
    session = connected()
    event = subscribe(session, "/sub/chat/room/1", "sub-0", ack)
    assert event.ack == (ack or "auto") and event.destination == "/sub/chat/room/1"
    assert event.subscription_id == "sub-0"
    assert session.subscriptions["sub-0"].ack == (ack or "auto")


def test_invalid_ack_mode_is_an_error() -> None:
    session = connected()
    events = session.receive_data(frame("SUBSCRIBE", {"id": "1", "destination": "/sub/x", "ack": "sometimes"}), 0.0)
    assert close_of(events)
    assert "ack mode" in (out(session)[0].get("message") or "")


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_subscribe_and_unsubscribe_need_ids_in_1_1_and_later(version: str) -> None:
    session = connected(version)
    events = session.receive_data(frame("SUBSCRIBE", {"destination": "/sub/x"}), 0.0)
    assert close_of(events)
    session = connected(version)
    subscribe(session, "/sub/x", "1")
    events = session.receive_data(frame("UNSUBSCRIBE", {"destination": "/sub/x"}), 0.0)
    assert close_of(events)
    assert out(session)[0].get("message") == "Missing required header 'id' on UNSUBSCRIBE"


def test_stomp_1_0_subscription_id_defaults_to_destination() -> None:
    session = connected("1.0")
    (event,) = session.receive_data(frame("SUBSCRIBE", {"destination": "/sub/x"}), 0.0)
    assert isinstance(event, Subscribed) and event.subscription_id == "/sub/x"
    (event2,) = session.receive_data(frame("UNSUBSCRIBE", {"destination": "/sub/x"}), 0.0)
    assert isinstance(event2, Unsubscribed) and event2.subscription_id == "/sub/x"


def test_duplicate_subscription_id_is_an_error() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1")
    events = session.receive_data(frame("SUBSCRIBE", {"id": "1", "destination": "/sub/b"}), 0.0)
    assert close_of(events)
    assert "already in use" in (out(session)[0].get("message") or "")


def test_unsubscribe_unknown_id_is_an_error() -> None:
    session = connected()
    events = session.receive_data(frame("UNSUBSCRIBE", {"id": "nope", "receipt": "u"}), 0.0)
    assert close_of(events)
    error = out(session)[0]
    assert "nope" in (error.get("message") or "") and error.get("receipt-id") == "u"


@pytest.mark.parametrize("destination", ["/pub/chat/message", "/topic/x", "/subx"])
def test_subscribe_outside_broker_prefixes_is_an_error(destination: str) -> None:
    session = connected()
    events = session.receive_data(frame("SUBSCRIBE", {"id": "1", "destination": destination}), 0.0)
    assert close_of(events)
    assert destination in (out(session)[0].get("message") or "")


def test_patterns_are_subscribable() -> None:
    session = connected()
    assert subscribe(session, "/sub/chat/room/*", "1").destination == "/sub/chat/room/*"
    assert subscribe(session, "/sub/**", "2").destination == "/sub/**"


def test_max_subscriptions_is_crossed_then_freed() -> None:
    session = connected(max_subscriptions=2)
    subscribe(session, "/sub/a", "1")
    subscribe(session, "/sub/b", "2")
    session.receive_data(frame("UNSUBSCRIBE", {"id": "1"}), 0.0)
    subscribe(session, "/sub/c", "3")                  # freed by the UNSUBSCRIBE
    events = session.receive_data(frame("SUBSCRIBE", {"id": "4", "destination": "/sub/d", "receipt": "r"}), 0.0)
    assert close_of(events)
    error = out(session)[0]
    assert error.get("message") == "Too many subscriptions (limit 2)" and error.get("receipt-id") == "r"


def test_subscribe_event_carries_the_frame_headers() -> None:
    session = connected()
    (event,) = session.receive_data(frame("SUBSCRIBE", {"id": "1", "destination": "/sub/a", "selector": "x"}), 0.0)
    assert isinstance(event, Subscribed) and ("selector", "x") in event.headers


# -- MESSAGE rendering ----------------------------------------------------------------------------


def test_message_bytes_in_spring_order() -> None:
    session = connected()
    subscribe(session, "/sub/chat/room/1", "sub-0")
    data = session.render_message(MessageTemplate("/sub/chat/room/1", b'{"a":1}'), "sub-0")
    assert data == (b"MESSAGE\ndestination:/sub/chat/room/1\ncontent-type:application/json\n"
                    b"subscription:sub-0\nmessage-id:s1-0\ncontent-length:7\n\n{\"a\":1}\x00")


def test_message_ids_are_unique_per_session() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1")
    ids = {deliver(session, "1").get("message-id") for _ in range(5)}
    assert ids == {f"s1-{i}" for i in range(5)}


def test_message_ack_header_only_in_1_2_client_modes() -> None:
    for version, ack, expected in [("1.2", "client", True), ("1.2", "client-individual", True),
                                   ("1.2", "auto", False), ("1.1", "client", False), ("1.0", "client", False)]:
        session = connected(version)
        subscribe(session, "/sub/a", "1", ack)
        message = deliver(session, "1")
        keys = [k for k, _ in message.headers]
        if expected:
            assert keys == ["destination", "content-type", "subscription", "message-id", "ack", "content-length"]
            assert message.get("ack") == message.get("message-id")
        else:
            assert keys == ["destination", "content-type", "subscription", "message-id", "content-length"], version


def test_message_extra_headers_and_content_type() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1")
    template = MessageTemplate("/sub/a", b"\xff\x00", content_type="application/octet-stream",
                               extra_headers=(("x-trace", "t:1"),))
    data = session.render_message(template, "1")
    assert data is not None
    (message,) = server_frames(data)
    assert [k for k, _ in message.headers] == ["destination", "content-type", "subscription", "message-id",
                                               "x-trace", "content-length"]
    assert message.get("x-trace") == "t:1" and message.body == b"\xff\x00"
    assert message.get("content-length") == "2"


def test_stomp_1_0_messages_are_not_escaped() -> None:
    session = connected("1.0")
    subscribe(session, "/sub/a:b", "x:y")
    data = session.render_message(MessageTemplate("/sub/a:b", b"{}"), "x:y")
    assert data is not None
    assert b"destination:/sub/a:b\n" in data and b"subscription:x:y\n" in data
    session = connected("1.2")
    subscribe(session, "/sub/a:b", "x:y")
    data = session.render_message(MessageTemplate("/sub/a:b", b"{}"), "x:y")
    assert data is not None
    assert b"destination:/sub/a\\cb\n" in data and b"subscription:x\\cy\n" in data


def test_no_message_for_unknown_subscription_or_closed_session() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1")
    assert session.render_message(MessageTemplate("/sub/a", b""), "2") is None
    session.receive_data(frame("UNSUBSCRIBE", {"id": "1"}), 0.0)
    assert session.render_message(MessageTemplate("/sub/a", b""), "1") is None
    session = connected()
    subscribe(session, "/sub/a", "1")
    session.close()
    assert session.render_message(MessageTemplate("/sub/a", b""), "1") is None
