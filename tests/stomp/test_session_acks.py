"""Sans-I/O tests of ACK/NACK validation and transactions in gateway.stomp.session.

Must not import asyncio or any transport.
"""

from __future__ import annotations

import pytest

from gateway.stomp.frames import Frame
from gateway.stomp.session import MessageSent, ReceiptRequested, StompSession
from tests.stomp.session_helpers import close_of, connected, deliver, frame, out, subscribe


def ack_frame(session: StompSession, message: Frame, command: str = "ACK", **extra: str) -> bytes:
    """ACK/NACK for ``message`` the way the session's version spells it."""
    if session.version == "1.2":
        headers = {"id": message.get("ack") or ""}
    else:
        headers = {"message-id": message.get("message-id") or "", "subscription": message.get("subscription") or ""}
    return frame(command, {**headers, **extra})


def assert_error(session: StompSession, data: bytes, contains: str) -> Frame:
    events = session.receive_data(data, 0.0)
    assert close_of(events)
    (error,) = out(session)
    assert error.command == "ERROR" and contains in (error.get("message") or ""), error
    return error


# -- ACK / NACK ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("command", ["ACK", "NACK"])
def test_ack_of_a_delivered_message(version: str, command: str) -> None:
    session = connected(version)
    subscribe(session, "/sub/a", "1", "client-individual")
    message = deliver(session, "1")
    assert session.pending_acks == 1
    assert session.receive_data(ack_frame(session, message, command, receipt="k"), 0.0) == [ReceiptRequested("k")]
    assert session.pending_acks == 0


def test_1_2_acks_by_the_ack_header_not_message_id() -> None:
    session = connected("1.2")
    subscribe(session, "/sub/a", "1", "client")
    message = deliver(session, "1")
    # a 1.1-style ACK (message-id only) lacks the 1.2 'id' header
    assert_error(session, frame("ACK", {"message-id": message.get("message-id") or "", "subscription": "1"}),
                 "Missing required header 'id' on ACK")


def test_1_1_acks_by_message_id() -> None:
    session = connected("1.1")
    subscribe(session, "/sub/a", "1", "client")
    deliver(session, "1")
    assert_error(session, frame("ACK", {"id": "s1-0"}), "Missing required header 'message-id' on ACK")


@pytest.mark.parametrize("command", ["ACK", "NACK"])
def test_ack_of_an_unknown_message_is_an_error(command: str) -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client")
    deliver(session, "1")
    error = assert_error(session, frame(command, {"id": "s1-99", "receipt": "q"}), "unknown or already acknowledged")
    assert error.get("receipt-id") == "q"


def test_double_ack_is_an_error() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client-individual")
    message = deliver(session, "1")
    session.receive_data(ack_frame(session, message), 0.0)
    assert_error(session, ack_frame(session, message), "already acknowledged")


def test_ack_on_an_auto_subscription_is_an_error() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "auto")
    message = deliver(session, "1")
    assert session.pending_acks == 0
    assert_error(session, frame("ACK", {"id": message.get("message-id") or ""}), "unknown")


def test_client_mode_ack_is_cumulative() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client")
    subscribe(session, "/sub/b", "2", "client")
    m0, m1, other, m2 = deliver(session, "1"), deliver(session, "1"), deliver(session, "2"), deliver(session, "1")
    session.receive_data(ack_frame(session, m1), 0.0)
    # m0 and m1 acknowledged together; m2 and the other subscription's message still pending
    assert session.pending_acks == 2
    assert session.receive_data(ack_frame(session, m2), 0.0) == []
    assert session.receive_data(ack_frame(session, other), 0.0) == []
    assert session.pending_acks == 0
    assert_error(session, ack_frame(session, m0), "already acknowledged")


def test_client_individual_ack_is_single() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client-individual")
    m0, m1, m2 = deliver(session, "1"), deliver(session, "1"), deliver(session, "1")
    session.receive_data(ack_frame(session, m1), 0.0)
    assert session.pending_acks == 2
    assert session.receive_data(ack_frame(session, m0, "NACK"), 0.0) == []
    assert session.receive_data(ack_frame(session, m2), 0.0) == []
    assert session.pending_acks == 0


def test_unsubscribe_forgets_pending_acks() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client")
    message = deliver(session, "1")
    session.receive_data(frame("UNSUBSCRIBE", {"id": "1"}), 0.0)
    assert session.pending_acks == 0
    assert_error(session, ack_frame(session, message), "unknown")


def test_max_pending_acks_is_crossed_oldest_forgotten() -> None:
    session = connected(max_pending_acks=2)
    subscribe(session, "/sub/a", "1", "client-individual")
    m0, m1, m2 = deliver(session, "1"), deliver(session, "1"), deliver(session, "1")
    assert session.pending_acks == 2
    assert session.receive_data(ack_frame(session, m1), 0.0) == []
    assert session.receive_data(ack_frame(session, m2), 0.0) == []
    assert_error(session, ack_frame(session, m0), "unknown")


# -- transactions ----------------------------------------------------------------------------


def test_sends_inside_a_transaction_are_applied_at_commit_in_order() -> None:
    session = connected()
    assert session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0) == []
    for i in range(3):
        events = session.receive_data(frame("SEND", {"destination": "/pub/x", "transaction": "t",
                                                     "receipt": f"s{i}"}, f"m{i}"), 0.0)
        assert events == [ReceiptRequested(f"s{i}")]   # receipt now: the frame was received
    events = session.receive_data(frame("COMMIT", {"transaction": "t", "receipt": "c"}), 0.0)
    sent = [e for e in events if isinstance(e, MessageSent)]
    assert [e.body for e in sent] == [b"m0", b"m1", b"m2"]
    assert all(e.receipt is None for e in sent)          # their receipts were already given
    assert events[-1] == ReceiptRequested("c")


def test_abort_drops_buffered_sends_and_acks() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client-individual")
    message = deliver(session, "1")
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    assert session.receive_data(frame("SEND", {"destination": "/pub/x", "transaction": "t"}, "x"), 0.0) == []
    assert session.receive_data(ack_frame(session, message, transaction="t"), 0.0) == []
    assert session.pending_acks == 1                     # not applied yet
    assert session.receive_data(frame("ABORT", {"transaction": "t"}), 0.0) == []
    assert session.pending_acks == 1                     # dropped
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)   # the name is free again
    assert session.receive_data(frame("COMMIT", {"transaction": "t"}), 0.0) == []


def test_ack_inside_a_transaction_is_applied_at_commit() -> None:
    session = connected()
    subscribe(session, "/sub/a", "1", "client")
    m0, m1 = deliver(session, "1"), deliver(session, "1")
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    session.receive_data(ack_frame(session, m1, transaction="t"), 0.0)
    assert session.pending_acks == 2
    session.receive_data(frame("COMMIT", {"transaction": "t"}), 0.0)
    assert session.pending_acks == 0
    assert_error(session, ack_frame(session, m0), "already acknowledged")


def test_ack_inside_a_transaction_is_validated_immediately() -> None:
    session = connected()
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    assert_error(session, frame("ACK", {"id": "nope", "transaction": "t"}), "unknown")


@pytest.mark.parametrize("data", [
    frame("SEND", {"destination": "/pub/x", "transaction": "ghost"}),
    frame("COMMIT", {"transaction": "ghost"}),
    frame("ABORT", {"transaction": "ghost", "receipt": "rid"}),
])
def test_unknown_transaction_is_an_error(data: bytes) -> None:
    session = connected()
    error = assert_error(session, data, "Unknown transaction 'ghost'")
    if b"receipt" in data:
        assert error.get("receipt-id") == "rid"


def test_begin_twice_is_an_error() -> None:
    session = connected()
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    assert_error(session, frame("BEGIN", {"transaction": "t"}), "already started")


def test_committed_transaction_is_gone() -> None:
    session = connected()
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    session.receive_data(frame("COMMIT", {"transaction": "t"}), 0.0)
    assert_error(session, frame("COMMIT", {"transaction": "t"}), "Unknown transaction")


def test_max_transactions_is_crossed() -> None:
    session = connected(max_transactions=2)
    session.receive_data(frame("BEGIN", {"transaction": "a"}) + frame("BEGIN", {"transaction": "b"}), 0.0)
    session.receive_data(frame("COMMIT", {"transaction": "a"}), 0.0)
    session.receive_data(frame("BEGIN", {"transaction": "c"}), 0.0)
    assert_error(session, frame("BEGIN", {"transaction": "d"}), "Too many open transactions (limit 2)")


def test_max_transaction_frames_is_crossed() -> None:
    session = connected(max_transaction_frames=3)
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    send = frame("SEND", {"destination": "/pub/x", "transaction": "t"}, "x")
    assert session.receive_data(send * 3, 0.0) == []
    assert_error(session, send, "exceeds the limit of 3 frames")


def test_send_in_a_transaction_is_checked_for_its_destination_at_once() -> None:
    session = connected()
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    assert_error(session, frame("SEND", {"destination": "/sub/x", "transaction": "t"}), "not allowed")


def test_transactions_are_per_session_and_die_with_it() -> None:
    session = connected()
    session.receive_data(frame("BEGIN", {"transaction": "t"}), 0.0)
    session.receive_data(frame("SEND", {"destination": "/pub/x", "transaction": "t"}, "x"), 0.0)
    events = session.receive_data(frame("DISCONNECT"), 0.0)
    assert not any(isinstance(e, MessageSent) for e in events)
    other = connected()
    assert_error(other, frame("COMMIT", {"transaction": "t"}), "Unknown transaction")
