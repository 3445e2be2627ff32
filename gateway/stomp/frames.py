"""STOMP frames as values, and the protocol's error tree.

Owns: the :class:`Frame` dataclass, the command sets, and the exceptions every sans-I/O STOMP
module raises. Must not import asyncio, Starlette or anything outside ``gateway.stomp``.

Error tree::

    StompError                    base of everything raised by gateway.stomp
    ├── ProtocolError             the peer broke the protocol -> ERROR frame, then close 1002
    │   ├── FrameTooLarge         a frame grew past max_frame_bytes while buffering
    │   ├── TooManyHeaders        more headers than max_headers
    │   ├── HeaderLineTooLong     a command or header line past max_header_line_bytes
    │   └── InvalidEscape         an undefined backslash escape in a header (1.1+)
    └── LocalProtocolError        our own code asked for something the protocol forbids (a bug)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CLIENT_COMMANDS = frozenset({
    "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT",
    "DISCONNECT",
})
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
ALL_COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS

# Frames whose headers are never escaped (STOMP 1.2, "Value Encoding"; STOMP is CONNECT's other name).
UNESCAPED_COMMANDS = frozenset({"CONNECT", "STOMP", "CONNECTED"})


class StompError(Exception):
    """Base class of every exception raised by ``gateway.stomp``."""


class ProtocolError(StompError):
    """The peer violated the protocol. ``str(exc)`` is safe to put in an ERROR frame's ``message``."""

    def __init__(self, message: str, *, receipt_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.receipt_id = receipt_id


class FrameTooLarge(ProtocolError):
    """A frame grew past the configured size limit while it was being buffered."""


class TooManyHeaders(ProtocolError):
    """A frame carried more headers than allowed."""


class HeaderLineTooLong(ProtocolError):
    """A command or header line was longer than allowed."""


class InvalidEscape(ProtocolError):
    """A header used a backslash escape STOMP does not define."""


class LocalProtocolError(StompError):
    """Our own code tried to do something the protocol forbids; always a bug in the caller."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One STOMP frame. ``headers`` keeps wire order and repeats; lookups return the first (spec rule)."""

    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def build(cls, command: str, headers: Iterable[tuple[str, str]] | dict[str, str] = (),
              body: bytes | str = b"") -> Frame:
        items = tuple(headers.items()) if isinstance(headers, dict) else tuple(headers)
        return cls(command, items, body.encode("utf-8") if isinstance(body, str) else body)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (STOMP 1.2: the first occurrence wins)."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_dict(self) -> dict[str, str]:
        """Headers as a dict where the first occurrence of each name wins."""
        result: dict[str, str] = {}
        for key, value in self.headers:
            result.setdefault(key, value)
        return result

    def __contains__(self, name: object) -> bool:
        return any(key == name for key, _ in self.headers)
