"""uvicorn's HTTP protocol with two guards uvicorn does not have: a request deadline and a connection cap.

What uvicorn (0.54) offers and why it is not enough (read in its source):

- ``timeout_keep_alive`` starts only after a response is complete: a connection that never finishes
  its first request's headers (or a later request's) has no timer at all and is held forever.
- ``limit_concurrency`` answers 503, but only in ``on_headers_complete``: a connection whose headers
  never finish is never counted out, and every accepted socket still holds a file descriptor. When the
  descriptors run out, asyncio's accept fails (EMFILE) and every new client fails, with nothing logged.
- h11's ``h11_max_incomplete_event_size`` bounds the bytes of unfinished headers, not their time
  (and applies to the h11 implementation only; uvicorn uses httptools when it is installed).

So :class:`GuardedHttpProtocol` (httptools, as uvicorn's ``auto`` picks) adds:

- **a request deadline**: from the moment a connection is accepted, and again from the first byte of
  each later request on a kept-alive connection, the whole request (headers and body) must arrive
  within ``http_request_timeout_s``, else the connection is closed. A WebSocket upgrade leaves this
  protocol, and with it the deadline.
- **a connection cap**: with ``max_http_connections`` open (HTTP and WebSocket alike; 0 = derived
  from the file-descriptor limit, see :func:`connection_cap`), a new connection is closed as soon as
  it is accepted, so its descriptor is returned at once. The first refusal logs one WARNING; when the
  node is back under 90 % of the cap, one INFO line says how many were refused meanwhile.

Must not import the rest of the gateway except :mod:`gateway.settings`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings, load_settings

log = logging.getLogger("gateway.http")

#: Descriptors kept free under the soft limit at least (database, Redis, log files, the listener).
FD_RESERVE_MIN = 128


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (best effort); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(settings: Settings, soft_limit: int | None = None) -> int:
    """``max_http_connections``, or when it is 0: the soft descriptor limit minus max(128, 10 %)."""
    if settings.max_http_connections > 0:
        return settings.max_http_connections
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, soft_limit - max(FD_RESERVE_MIN, soft_limit // 10))


@dataclass(slots=True)
class Gate:
    """The guards' settings and the refusal episode of one server process."""

    request_timeout_s: float
    max_connections: int
    refused: int = 0
    refusing: bool = False


_gate: Gate | None = None


def install_gate(gate: Gate) -> None:
    """Use ``gate`` in this process (``chat-gateway serve`` with one worker)."""
    global _gate
    _gate = gate


def current_gate() -> Gate:
    """This process's gate; a uvicorn worker process builds it from its ``GATEWAY_*`` environment."""
    global _gate
    if _gate is None:
        settings = load_settings()
        _gate = Gate(settings.http_request_timeout_s, connection_cap(settings, raise_fd_limit()))
    return _gate


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module docstring. Use with ``uvicorn.Config(http=GuardedHttpProtocol)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = current_gate()
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gate = self._gate
        open_now = len(self.connections)
        if open_now >= gate.max_connections:
            self._refused = True
            gate.refused += 1
            if not gate.refusing:
                gate.refusing = True
                peer = transport.get_extra_info("peername")
                log.warning("refusing connections: %d open, limit %d (max_http_connections); first refused "
                            "from %s", open_now, gate.max_connections, peer[0] if peer else "?")
            transport.abort()
            return
        if gate.refusing and open_now < gate.max_connections * 0.9:
            gate.refusing = False
            log.info("accepting connections again: %d open; %d refused meanwhile", open_now, gate.refused)
            gate.refused = 0
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    # --- the request deadline --------------------------------------------------------------------

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._gate.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        log.debug("closing %s: no complete HTTP request within %.1f s",
                  f"{self.client[0]}:{self.client[1]}" if self.client else "a connection",
                  self._gate.request_timeout_s)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()
