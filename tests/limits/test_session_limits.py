"""The sans-I/O parts of the limits: a credential's expiry reaching the Connected event, a CONNECTED
taken back for an ERROR, buffered transaction bytes (freed on COMMIT and ABORT), and the derived
connection cap."""

from __future__ import annotations

from gateway.http_guard import connection_cap
from gateway.settings import Settings, load_settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import CloseRequested, Connected, Principal, SessionConfig, StompSession
from tests.support.stomp_wire import frame, server_frames

CONNECT = frame("CONNECT", {"accept-version": "1.2", "host": "x"})
CONFIG = SessionConfig.of(Settings())


def test_a_principal_carries_its_expiry_into_the_connected_event() -> None:
    session = StompSession("s1", CONFIG, authenticator=lambda _frame: Principal("alice", 1234.5))
    (connected,) = session.receive_data(CONNECT, 0.0)
    assert isinstance(connected, Connected)
    assert (connected.user, connected.expires_at) == ("alice", 1234.5)
    assert type(session.user) is str and session.expires_at == 1234.5
    plain = StompSession("s2", CONFIG, authenticator=lambda _frame: "bob")
    (event,) = plain.receive_data(CONNECT, 0.0)
    assert isinstance(event, Connected) and event.expires_at is None


def test_refuse_connected_replaces_the_connected_frame_with_an_error() -> None:
    session = StompSession("s1", CONFIG, authenticator=lambda _frame: "alice")
    session.receive_data(CONNECT, 0.0)
    close = session.refuse_connected("Too many sessions for user 'alice' (limit 1)")
    assert isinstance(close, CloseRequested)
    (error,) = server_frames(b"".join(session.data_to_send()))
    assert error.command == "ERROR" and error.get("message") == "Too many sessions for user 'alice' (limit 1)"
    assert session.closed


def _tx_session(limit: int) -> StompSession:
    session = StompSession("s1", SessionConfig.of(Settings(), max_transaction_bytes=limit))
    session.receive_data(CONNECT, 0.0)
    session.data_to_send()
    return session


def _send_in(tx: str, body: str) -> bytes:
    return frame("SEND", {"destination": "/pub/x", "transaction": tx}, body)


def test_transaction_bytes_count_every_open_transaction_and_are_freed_by_commit_and_abort() -> None:
    session = _tx_session(1000)
    session.receive_data(frame("BEGIN", {"transaction": "a"}) + frame("BEGIN", {"transaction": "b"}), 0.0)
    session.receive_data(_send_in("a", "x" * 400) + _send_in("b", "y" * 400), 0.0)
    assert not session.closed
    session.receive_data(frame("ABORT", {"transaction": "a"}), 0.0)     # frees a's bytes
    session.receive_data(_send_in("b", "z" * 400), 0.0)
    events = session.receive_data(frame("COMMIT", {"transaction": "b"}), 0.0)
    assert len(events) == 2 and not session.closed                      # b's two SENDs, committed
    session.receive_data(frame("BEGIN", {"transaction": "c"}) + _send_in("c", "w" * 450)
                         + _send_in("c", "w" * 450), 0.0)
    assert not session.closed
    events = session.receive_data(_send_in("c", "w" * 450), 0.0)
    assert session.closed and isinstance(events[-1], CloseRequested)
    (error,) = [f for f in server_frames(b"".join(session.data_to_send())) if f.command == "ERROR"]
    assert error.get("message") == "Transactions exceed the limit of 1000 buffered bytes per session"


def test_buffered_size_counts_headers_and_body() -> None:
    from gateway.stomp.session import _buffered_size
    assert _buffered_size(Frame("SEND", (("a", "bc"),), b"12345")) == 5 + 5 + 5


def test_the_connection_cap_is_derived_from_the_descriptor_limit() -> None:
    assert connection_cap(load_settings(environ={}), 1024) == 1024 - 128
    assert connection_cap(load_settings(environ={}), 65536) == 65536 - 6553
    assert connection_cap(load_settings(environ={}, max_http_connections=500), 65536) == 500
