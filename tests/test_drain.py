"""Shutdown drain: sessions are asked to close, and the drain ends at drain_timeout_s at the latest."""

from __future__ import annotations

import asyncio

from gateway.app import build_gateway
from gateway.hub import SessionInfo
from gateway.settings import load_settings
from gateway.stomp.codec import MessageTemplate


class StuckSession:
    """A session whose close never completes (its peer stopped reading)."""

    def __init__(self) -> None:
        self.info = SessionInfo("stuck", "test", "127.0.0.1:1")
        self.close_requests: list[tuple[int, str, str | None]] = []

    def __hash__(self) -> int:
        return id(self)

    def deliver(self, template: MessageTemplate, subscription_id: str) -> None:
        return None

    def close_soon(self, code: int, reason: str, error: str | None = None) -> None:
        self.close_requests.append((code, reason, error))


async def test_drain_asks_every_session_to_close_then_gives_up_at_the_deadline() -> None:
    gateway = build_gateway(load_settings(environ={}, drain_timeout_s=0.2, node_id="n"))
    stuck = StuckSession()
    gateway.hub.register(stuck)
    gateway.ready = True
    await asyncio.wait_for(gateway.drain(), timeout=10)
    assert stuck.close_requests == [(1012, "Server shutting down", "Server shutting down, reconnect")]
    assert "stuck" in gateway.hub.sessions      # the deadline, not the session, ended the drain
    assert gateway.draining and not gateway.ready
    await asyncio.wait_for(gateway.drain(), timeout=1)   # idempotent
    assert len(stuck.close_requests) == 1
