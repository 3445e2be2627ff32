"""The SockJS ``websocket`` transport: one session per WebSocket, SockJS framing inside it.

Owns: the WebSocket I/O of a SockJS session: refusing a handshake (unknown URL, transport disabled,
foreign origin, draining) with one log line and an HTTP 403, ``o`` on accept, a reader feeding the
connection (JSON array of strings or a single string; empty messages ignored; broken JSON closes
1007; a payload over ``sockjs_max_send_bytes`` closes 1009), a writer pulling frames (``h`` when
idle), and ending the session (``connection_lost()`` once) when either side closes.

Must not import Starlette (raw ASGI) or the STOMP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gateway.transport.base import CLOSE_INVALID_DATA, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG
from gateway.transport.sockjs import protocol
from gateway.transport.sockjs.headers import Scope, remote_of
from gateway.transport.sockjs.registry import (
    CLOSE_TOO_MANY_SESSIONS,
    RegistryClosing,
    RegistryFull,
    SessionRegistry,
)
from gateway.transport.sockjs.session import Receiver, SockJSSession

logger = logging.getLogger(__name__)


async def deny(scope: Scope, send: Any, reason: str, *, level: int = logging.INFO) -> None:
    """Refuse a WebSocket handshake: one log line at ``level`` (URL, remote address, ``reason``), then
    ``websocket.close`` before ``websocket.accept``, which an ASGI server must answer with HTTP 403.

    Not the ``websocket.http.response`` extension (which could send 404/503): uvicorn's default
    websocket implementation never counts a response sent through it as a completed handshake and
    logs ``ASGI callable returned without completing handshake.`` at ERROR for every refusal, so
    anyone probing URLs could fill the error log.
    """
    logger.log(level, "refused WebSocket handshake %r from %s: %s", str(scope.get("path", ""))[:200],
               remote_of(scope), reason)
    await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": ""})


class _Channel:
    """Sends on one accepted WebSocket; nothing is sent after our close."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.closed = False

    async def send_text(self, text: str) -> None:
        if not self.closed:
            await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


def _close_reason(reason: str) -> str:
    """A WebSocket close reason must fit 123 bytes of UTF-8."""
    return reason.encode("utf-8")[:123].decode("utf-8", errors="ignore")


async def _write(session: SockJSSession, receiver: Receiver, channel: _Channel, heartbeat_s: float) -> None:
    while True:
        frame = await session.next_frame(receiver, heartbeat_s)
        await channel.send_text(frame)
        if frame.startswith("c"):
            code, reason = session.close_status or protocol.CLOSE_GO_AWAY
            await channel.close(protocol.websocket_close_code(code), _close_reason(reason))
            return


async def _read(session: SockJSSession, receive: Any, channel: _Channel, max_bytes: int) -> tuple[int, str]:
    """Feed the connection until the client leaves; returns why the session ends."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return CLOSE_NORMAL, "Closed by client"
        if message["type"] != "websocket.receive":
            continue
        text = message.get("text")
        if text is None:
            try:
                text = bytes(message.get("bytes") or b"").decode("utf-8")
            except UnicodeDecodeError:
                await channel.close(CLOSE_INVALID_DATA, "Broken JSON encoding.")
                return CLOSE_INVALID_DATA, "Broken JSON encoding."
        if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            await channel.close(CLOSE_TOO_BIG, "Message too big")
            return CLOSE_TOO_BIG, "Message too big"
        if not text:
            continue
        try:
            messages = protocol.parse_messages(text)
        except protocol.BrokenJSON:
            await channel.close(CLOSE_INVALID_DATA, "Broken JSON encoding.")
            return CLOSE_INVALID_DATA, "Broken JSON encoding."
        await session.deliver(messages)


async def serve_websocket(registry: SessionRegistry, session_id: str, scope: Scope, receive: Any,
                          send: Any) -> None:
    """Run one SockJS websocket session; the handshake's ``websocket.connect`` was already received."""
    if registry.closing:
        await deny(scope, send, "server is draining")
        return
    await send({"type": "websocket.accept"})
    channel = _Channel(send)
    try:
        session = await registry.open_websocket(session_id, remote=remote_of(scope))
    except RegistryClosing:
        await channel.close(1012, "Server is shutting down")
        return
    except RegistryFull:
        await channel.send_text(protocol.close_frame(*CLOSE_TOO_MANY_SESSIONS))
        await channel.close(*CLOSE_TOO_MANY_SESSIONS)
        return
    attached = session.attach()
    assert isinstance(attached, Receiver)
    receiver = attached
    settings = registry.settings
    reader = asyncio.ensure_future(_read(session, receive, channel, settings.sockjs_max_send_bytes))
    writer = asyncio.ensure_future(_write(session, receiver, channel, settings.sockjs_heartbeat_s))
    status: tuple[int, str] = (CLOSE_NORMAL, "Closed by client")
    try:
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and reader.exception() is None:
            status = reader.result()
        elif writer in done and writer.exception() is not None:
            logger.debug("SockJS websocket %s: write failed: %r", session_id, writer.exception())
    finally:
        for task in (reader, writer):
            task.cancel()
        for task in (reader, writer):
            with contextlib.suppress(BaseException):
                await task
        session.detach(receiver)
        await session.terminate(*status)
        registry.forget(session)
        with contextlib.suppress(Exception):
            await channel.close(CLOSE_NORMAL)
