"""Helpers for the sans-I/O session tests: build a session, connect it, read what it queued.

Owns nothing but test plumbing. Must not import asyncio or any transport.
"""

from __future__ import annotations

from typing import Any

from gateway.settings import Settings
from gateway.stomp.codec import MessageTemplate
from gateway.stomp.frames import Frame
from gateway.stomp.session import (
    Authenticator,
    CloseRequested,
    Event,
    SessionConfig,
    StompSession,
    Subscribed,
)
from tests.support.stomp_wire import frame, server_frames

__all__ = ["close_of", "config", "connected", "deliver", "frame", "new_session", "out", "out_bytes", "subscribe"]


def config(**overrides: Any) -> SessionConfig:
    """A node's default session config (from the default settings), with ``overrides``."""
    return SessionConfig.of(Settings(), **overrides)


def new_session(*, authenticator: Authenticator | None = None, now: float = 0.0, **overrides: Any) -> StompSession:
    return StompSession("s1", config(**overrides), authenticator, now=now)


def out_bytes(session: StompSession) -> bytes:
    return b"".join(session.data_to_send())


def out(session: StompSession) -> list[Frame]:
    return server_frames(session.data_to_send())


def connected(version: str = "1.2", *, now: float = 0.0, authenticator: Authenticator | None = None,
              heart_beat: str = "0,0", **config: Any) -> StompSession:
    """A session past CONNECT at ``version``, with its CONNECTED already read."""
    session = new_session(authenticator=authenticator, now=now, **config)
    headers = {"accept-version": version, "host": "h", "heart-beat": heart_beat}
    if version == "1.0":
        del headers["accept-version"]
    events = session.receive_data(frame("CONNECT", headers), now)
    assert [type(e).__name__ for e in events] == ["Connected"], events
    (got,) = out(session)
    assert got.command == "CONNECTED" and got.get("version") == version
    return session


def subscribe(session: StompSession, destination: str = "/sub/room", sub_id: str = "0",
              ack: str | None = None) -> Subscribed:
    headers = {"id": sub_id, "destination": destination}
    if ack is not None:
        headers["ack"] = ack
    (event,) = session.receive_data(frame("SUBSCRIBE", headers), 0.0)
    assert isinstance(event, Subscribed), event
    return event


def deliver(session: StompSession, sub_id: str = "0", body: bytes = b"{}",
            destination: str = "/sub/room") -> Frame:
    """Render one MESSAGE for ``sub_id`` and parse it back."""
    data = session.render_message(MessageTemplate(destination, body), sub_id)
    assert data is not None
    (message,) = server_frames(data)
    return message


def close_of(events: list[Event]) -> CloseRequested:
    """The events end with a CloseRequested; return it."""
    assert events and isinstance(events[-1], CloseRequested), events
    return events[-1]
