"""The raw WebSocket STOMP endpoint (``/ws-stomp/websocket``, what ``@stomp/stompjs`` brokerURL uses).

Owns: the handshake (origin policy: a refused origin is one INFO line and an HTTP 403; choosing the
*highest* STOMP subprotocol the client offers, accepting clients that offer none), reading text and
binary messages into the connection, and the :class:`WebSocketSink` that sends frames as text (binary when a frame is not valid UTF-8).

Must not import the chat domain.
"""

from __future__ import annotations

import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.transport.base import CLOSE_POLICY, ConnectionFactory
from gateway.transport.origin import origin_allowed

log = logging.getLogger(__name__)

STOMP_SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")  # best first


def choose_subprotocol(offered: list[str]) -> str | None:
    """The highest STOMP subprotocol among ``offered`` (whatever order the client lists them in)."""
    for candidate in STOMP_SUBPROTOCOLS:
        if candidate in offered:
            return candidate
    return None


class WebSocketSink:
    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._closed = False

    async def send(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            await self.websocket.send_bytes(data)
        else:
            await self.websocket.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.websocket.close(code, reason[:120])


def _remote(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "?"


async def serve_websocket(websocket: WebSocket, factory: ConnectionFactory, allowed_origins: tuple[str, ...],
                          transport: str = "websocket") -> None:
    """Run one raw WebSocket STOMP connection to completion."""
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), allowed_origins):
        # One INFO line, then websocket.close before accept: the ASGI server answers HTTP 403 and
        # counts the handshake as completed (no "returned without completing handshake" ERROR).
        log.info("refused WebSocket handshake %r from %s: origin %r not allowed", websocket.url.path[:200],
                 _remote(websocket), (origin or "")[:200])
        await websocket.close(code=CLOSE_POLICY)
        return
    subprotocol = choose_subprotocol(list(websocket.scope.get("subprotocols") or []))
    await websocket.accept(subprotocol=subprotocol)
    sink = WebSocketSink(websocket)
    connection = factory(sink, transport=transport, remote=_remote(websocket))
    await connection.start()
    try:
        # Keep reading after the connection starts closing: its writer flushes the last frames
        # (ERROR, RECEIPT) and closes the socket, which ends this loop with a disconnect.
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                text = message.get("text")
                if text is None:
                    continue
                data = text.encode("utf-8")
            await connection.receive(data)
    except WebSocketDisconnect:
        pass
    except RuntimeError:
        pass  # receive after close
    finally:
        await connection.connection_lost()
