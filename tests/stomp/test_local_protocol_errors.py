"""Our own misuse of the sans-I/O session raises LocalProtocolError (as wsproto does); the peer's never does."""

from __future__ import annotations

import pytest

from gateway.stomp.frames import LocalProtocolError
from gateway.stomp.session import CloseRequested, DisconnectRequested
from tests.stomp.session_helpers import close_of, connected, frame, new_session, out, out_bytes


def test_a_receipt_before_connected_is_refused() -> None:
    session = new_session()
    assert not session.writable
    with pytest.raises(LocalProtocolError, match="before CONNECTED"):
        session.send_receipt("r")
    assert out_bytes(session) == b""


def test_a_receipt_after_the_error_that_ended_the_session_is_refused() -> None:
    session = connected()
    close_of(session.receive_data(frame("SUBSCRIBE", {"destination": "/sub/x"}), 0.0))   # no id: 1002
    assert out_bytes(session).startswith(b"ERROR\n")
    with pytest.raises(LocalProtocolError, match="after the session was closed"):
        session.send_receipt("late")
    assert out_bytes(session) == b""        # nothing queued behind the ERROR


def test_a_receipt_after_close_is_refused() -> None:
    session = connected()
    session.close()
    assert not session.writable
    with pytest.raises(LocalProtocolError):
        session.send_receipt("r")
    assert session.data_to_send() == []


def test_after_disconnect_the_receipts_up_to_it_are_still_sent_until_close() -> None:
    session = connected()
    events = session.receive_data(frame("BEGIN", {"transaction": "t", "receipt": "r1"})
                                  + frame("DISCONNECT", {"receipt": "bye"}), 0.0)
    assert events[-1] == DisconnectRequested("bye") and session.closed and session.writable
    session.send_receipt("r1")
    session.send_receipt("bye")
    assert out_bytes(session) == b"RECEIPT\nreceipt-id:r1\n\n\x00RECEIPT\nreceipt-id:bye\n\n\x00"
    session.close()
    with pytest.raises(LocalProtocolError):
        session.send_receipt("bye")


def test_refuse_connected_only_for_a_connected_session() -> None:
    with pytest.raises(LocalProtocolError):
        new_session().refuse_connected("no")
    session = connected()
    assert isinstance(session.refuse_connected("Too many sessions"), CloseRequested)
    with pytest.raises(LocalProtocolError):
        session.refuse_connected("again")
    (error,) = out(session)
    assert error.command == "ERROR" and error.get("message") == "Too many sessions"


def test_send_error_on_an_ended_session_queues_nothing_and_does_not_raise() -> None:
    session = connected()
    session.close()
    assert isinstance(session.send_error("late"), CloseRequested)   # the I/O layer's races are fine here
    session.send_error_keep_open("late too")
    assert out_bytes(session) == b""
