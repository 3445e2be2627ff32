"""The SockJS HTTP transports: receivers (xhr, xhr_streaming, eventsource, htmlfile) and xhr_send.

Owns: the I/O of one receiving request (headers, prelude, pulling frames from the session and
writing them in the transport's format, ending a polling response after one frame and a streaming
response after ``sockjs_streaming_limit_bytes``, noticing the client hang up mid-response) and of
one ``xhr_send`` (body limit, ``Payload expected.``, ``Broken JSON encoding.``, 404 for unknown
sessions, 204 on success).

Must not import Starlette (raw ASGI) or the STOMP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.transport.sockjs import protocol
from gateway.transport.sockjs.headers import (
    APPLICATION_JAVASCRIPT,
    EVENT_STREAM,
    NO_CACHE,
    TEXT_HTML,
    TEXT_PLAIN,
    Scope,
    cors_headers,
    jsessionid_cookie,
    remote_of,
    respond,
)
from gateway.transport.sockjs.registry import (
    CLOSE_TOO_MANY_SESSIONS,
    RegistryClosing,
    RegistryFull,
    SessionRegistry,
)
from gateway.transport.sockjs.session import Receiver, SockJSSession


@dataclass(frozen=True, slots=True)
class ReceivingTransport:
    """How one HTTP transport carries frames to the client."""

    name: str
    method: str
    content_type: bytes
    streaming: bool
    fmt: Callable[[str], str]


XHR = ReceivingTransport("xhr", "POST", APPLICATION_JAVASCRIPT, False, protocol.format_xhr)
XHR_STREAMING = ReceivingTransport("xhr_streaming", "POST", APPLICATION_JAVASCRIPT, True, protocol.format_xhr)
EVENTSOURCE = ReceivingTransport("eventsource", "GET", EVENT_STREAM, True, protocol.format_eventsource)
HTMLFILE = ReceivingTransport("htmlfile", "GET", TEXT_HTML, True, protocol.format_htmlfile)
RECEIVING_TRANSPORTS = {t.name: t for t in (XHR, XHR_STREAMING, EVENTSOURCE, HTMLFILE)}


def _session_headers(scope: Scope, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), NO_CACHE, *cors_headers(scope), jsessionid_cookie(scope)]


async def _body_chunk(send: Any, text: str, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": more})


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _write_frames(session: SockJSSession, receiver: Receiver, transport: ReceivingTransport,
                        send: Any, heartbeat_s: float, limit: int) -> None:
    sent = 0
    while True:
        frame = await session.next_frame(receiver, heartbeat_s)
        chunk = transport.fmt(frame).encode("utf-8")
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        sent += len(chunk)
        if frame.startswith("c") or not transport.streaming or sent >= limit:
            return


async def _prelude(send: Any, scope: Scope, transport: ReceivingTransport, callback: str | None) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": _session_headers(scope, transport.content_type)})
    if transport is XHR_STREAMING:
        await _body_chunk(send, protocol.XHR_STREAMING_PRELUDE)
    elif transport is EVENTSOURCE:
        await _body_chunk(send, protocol.EVENTSOURCE_PRELUDE)
    elif transport is HTMLFILE:
        await _body_chunk(send, protocol.htmlfile_prelude(callback or ""))


async def serve_receiver(registry: SessionRegistry, transport: ReceivingTransport, session_id: str,
                         scope: Scope, receive: Any, send: Any, *, callback: str | None = None) -> None:
    """Answer one receiving request, creating the session if ``session_id`` is new.

    ``callback`` is the already-validated htmlfile callback name.
    """
    try:
        session = await registry.get_or_create(session_id, transport=transport.name, remote=remote_of(scope))
    except RegistryClosing:
        await respond(send, 503, [NO_CACHE, *cors_headers(scope)], b"Server is shutting down.", TEXT_PLAIN)
        return
    except RegistryFull:
        # The node is full: the client's SockJS session closes with 1013 (try again later).
        await _prelude(send, scope, transport, callback)
        await _body_chunk(send, transport.fmt(protocol.close_frame(*CLOSE_TOO_MANY_SESSIONS)), more=False)
        return
    await _prelude(send, scope, transport, callback)
    attached = await session.attach_when_free()
    if isinstance(attached, str):
        await _body_chunk(send, transport.fmt(attached), more=False)
        return
    receiver = attached
    settings = registry.settings
    disconnected = asyncio.ensure_future(_wait_disconnect(receive))
    writer = asyncio.ensure_future(_write_frames(session, receiver, transport, send,
                                                 settings.sockjs_heartbeat_s,
                                                 settings.sockjs_streaming_limit_bytes))
    try:
        done, _ = await asyncio.wait({disconnected, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done and writer.exception() is None:
            session.detach(receiver)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            # The client hung up (or the write failed) while this request was the receiver.
            await session.receiver_lost(receiver)
    finally:
        for task in (disconnected, writer):
            task.cancel()
        for task in (disconnected, writer):
            with contextlib.suppress(BaseException):
                await task
        session.detach(receiver)


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None once it exceeds ``limit`` bytes (or the client left)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def serve_xhr_send(registry: SessionRegistry, session_id: str, scope: Scope, receive: Any,
                         send: Any) -> None:
    """Deliver one ``xhr_send`` body (a JSON array of strings) to the session's connection."""
    base = [NO_CACHE, *cors_headers(scope), jsessionid_cookie(scope)]
    session = registry.get(session_id)
    if session is None:
        await respond(send, 404, base, b"Session not found.", TEXT_PLAIN)
        return
    limit = registry.settings.sockjs_max_send_bytes
    body = await _read_body(receive, limit)
    if body is None:
        await respond(send, 413, base, f"Payload larger than {limit} bytes.".encode(), TEXT_PLAIN)
        return
    if not body:
        await respond(send, 500, base, b"Payload expected.", TEXT_PLAIN)
        return
    try:
        messages = protocol.parse_messages(body.decode("utf-8"))
    except (UnicodeDecodeError, protocol.BrokenJSON):
        await respond(send, 500, base, b"Broken JSON encoding.", TEXT_PLAIN)
        return
    await session.deliver(messages)
    await respond(send, 204, base, content_type=TEXT_PLAIN)
