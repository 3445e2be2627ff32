"""The contract between a transport (raw WebSocket, SockJS) and the STOMP connection it carries.

Owns: :class:`FrameSink` (what a transport offers a connection: send bytes, close) and
:class:`Connection` (what a connection offers a transport: feed received bytes, report loss).
A transport never interprets STOMP; a connection never touches sockets or HTTP.

Must not import Starlette or the chat domain.
"""

from __future__ import annotations

from typing import Protocol

# The close codes a FrameSink is closed with, defined once in gateway.close_codes (the chat layer,
# which must not import the transports, uses them too) and re-exported here for the transports.
from gateway.close_codes import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_INVALID_DATA,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
)

__all__ = [
    "CLOSE_GOING_AWAY", "CLOSE_INTERNAL", "CLOSE_INVALID_DATA", "CLOSE_NORMAL", "CLOSE_POLICY",
    "CLOSE_PROTOCOL_ERROR", "CLOSE_SERVICE_RESTART", "CLOSE_SLOW_CONSUMER", "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN_LATER", "Connection", "ConnectionFactory", "FrameSink",
]


class FrameSink(Protocol):
    """The transport side of one STOMP connection."""

    async def send(self, data: bytes) -> None:
        """Send one complete STOMP frame (or a heart-beat ``b"\\n"``) to the peer.

        May block for back-pressure; the connection bounds how long. Frames that are not valid
        UTF-8 (binary bodies) are sent as binary where the transport can, else replaced.
        """

    async def close(self, code: int, reason: str) -> None:
        """Close the transport with ``code``; idempotent."""


class Connection(Protocol):
    """The STOMP side of one transport connection."""

    async def start(self) -> None:
        """Begin timers (CONNECT timeout, heart-beats) and the writer; call once, before receive."""

    async def receive(self, data: bytes) -> None:
        """Feed bytes the peer sent (any split: a partial frame, one frame or several)."""

    async def connection_lost(self) -> None:
        """The transport is gone (closed by either side). Idempotent; runs disconnect handling once."""

    @property
    def closed(self) -> bool:
        """True once the connection has closed (the transport should stop reading)."""


class ConnectionFactory(Protocol):
    """Creates the STOMP connection for a new transport session."""

    def __call__(self, sink: FrameSink, *, transport: str, remote: str) -> Connection:
        """``transport`` names it for logs/metrics (e.g. ``websocket``, ``sockjs-xhr``)."""
