"""The connection never writes to a session that ended (the session would raise LocalProtocolError)."""

from __future__ import annotations

import logging

import pytest

from tests.support.polling import eventually
from tests.support.stomp_wire import frame
from tests.transport.test_connection import connect, make


async def test_frames_before_a_protocol_error_in_one_read_end_with_the_error(caplog: pytest.LogCaptureFixture) -> None:
    connection, sink, _hub = await make()
    await connect(connection, sink)
    caplog.set_level(logging.ERROR)
    # A BEGIN that asks for a receipt, then a SUBSCRIBE without an id, in one transport message: the
    # session's ERROR ends it while the BEGIN's receipt is still to be sent.
    await connection.receive(frame("BEGIN", {"transaction": "t", "receipt": "r1"})
                             + frame("SUBSCRIBE", {"destination": "/sub/x"}))
    await eventually(lambda: bool(sink.closes), "the close")
    assert [f.command for f in sink.frames()] == ["CONNECTED", "ERROR"]
    assert sink.closes == [(1002, sink.frames()[-1].get("message") or "")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_a_disconnect_still_gets_its_receipt_and_those_before_it() -> None:
    connection, sink, _hub = await make()
    await connect(connection, sink)
    await connection.receive(frame("BEGIN", {"transaction": "t", "receipt": "r1"})
                             + frame("DISCONNECT", {"receipt": "bye"}))
    await eventually(lambda: bool(sink.closes), "the close")
    assert [(f.command, f.get("receipt-id")) for f in sink.frames()[1:]] == [("RECEIPT", "r1"), ("RECEIPT", "bye")]
    assert sink.closes[0][0] == 1000
