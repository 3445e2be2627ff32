"""User names and error texts that could break frame syntax never reach the wire unescaped."""

from __future__ import annotations

from gateway.stomp.frames import ALL_COMMANDS, Frame
from gateway.stomp.session import CloseRequested, StompSession
from tests.stomp import new_parser
from tests.stomp.session_helpers import config

CONNECT = b"CONNECT\naccept-version:1.2\nhost:x\n\n\x00"


def frames(session: StompSession) -> list[Frame]:
    return new_parser(commands=ALL_COMMANDS).feed(b"".join(session.data_to_send()))


def test_user_name_with_a_newline_is_refused() -> None:
    session = StompSession("s", config(), authenticator=lambda frame: "eve\nmessage:forged")
    events = session.receive_data(CONNECT, 0.0)
    assert isinstance(events[-1], CloseRequested)
    [error] = frames(session)
    assert error.command == "ERROR" and error.get("message") == "Authentication failed: invalid user name"


def test_user_name_with_a_colon_is_fine() -> None:
    session = StompSession("s", config(), authenticator=lambda frame: "ns:alice")
    session.receive_data(CONNECT, 0.0)
    [connected] = frames(session)
    assert connected.get("user-name") == "ns:alice"


def test_error_messages_are_kept_on_one_line() -> None:
    session = StompSession("s", config())
    session.receive_data(CONNECT, 0.0)
    session.data_to_send()
    session.send_error("line one\r\nline two")
    [error] = frames(session)
    assert error.get("message") == "line one  line two"
