"""Client-side STOMP helpers for tests: build client frames as bytes, parse what the server sent.

Owns: :func:`frame` (client frame bytes written by hand, independent of the gateway's serializer so
a serializer bug cannot hide a parser bug), :func:`server_frames` (parse server output with the
gateway's parser in client mode, heart-beat EOLs counted), and :class:`WsStompClient`, a raw
``websockets`` client speaking STOMP by hand (no STOMP library in between), used by the transport
and integration tests to observe bytes and close codes.

Must not import the gateway's transport, hub or chat modules.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.stomp.codec import FrameParser
from gateway.stomp.frames import SERVER_COMMANDS, Frame


def frame(command: str, headers: Iterable[tuple[str, str]] | dict[str, str] = (),
          body: bytes | str = b"") -> bytes:
    """Client frame bytes: headers written as given (no escaping), body as is, NUL-terminated."""
    items = headers.items() if isinstance(headers, dict) else headers
    head = command + "\n" + "".join(f"{k}:{v}\n" for k, v in items) + "\n"
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return head.encode("utf-8") + raw + b"\x00"


def server_parser(*, max_frame_bytes: int = 1 << 26) -> FrameParser:
    return FrameParser(max_frame_bytes=max_frame_bytes, max_headers=1000, max_header_line_bytes=1 << 20,
                       commands=SERVER_COMMANDS)


def server_frames(chunks: bytes | Sequence[bytes]) -> list[Frame]:
    """Every frame in server output (a bytes blob or a list of chunks); heart-beat EOLs are skipped."""
    parser = server_parser()
    if isinstance(chunks, bytes | bytearray):
        chunks = [bytes(chunks)]
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(parser.feed(chunk))
    assert parser.buffered == 0, "server output ended inside a frame"
    return frames


@dataclass
class WsStompClient:
    """A raw WebSocket client that speaks STOMP by hand and records every WebSocket message."""

    ws: ClientConnection
    messages: list[str | bytes] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    heartbeats: int = 0
    _parser: FrameParser = field(default_factory=server_parser)
    _consumed: int = 0

    @classmethod
    async def open(cls, url: str, *, subprotocols: Sequence[str] | None = ("v12.stomp", "v11.stomp",
                                                                           "v10.stomp"),
                   origin: str | None = None, max_size: int | None = 1 << 24, max_queue: int | None = 16,
                   receive_buffer: int | None = None) -> WsStompClient:
        """Connect (no proxy, no compression). ``receive_buffer`` sets the socket's SO_RCVBUF, so a
        client that stops reading fills the server's buffers quickly."""
        kwargs: dict[str, Any] = {"max_size": max_size, "max_queue": max_queue, "open_timeout": 10,
                                  "close_timeout": 5, "ping_interval": None, "compression": None,
                                  "proxy": None}
        if subprotocols:
            kwargs["subprotocols"] = list(subprotocols)
        if origin is not None:
            kwargs["origin"] = origin
        if receive_buffer is not None:
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            kwargs["sock"] = sock
        ws = await connect(url, **kwargs)
        return cls(ws)

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def send(self, data: bytes | str, *, binary: bool = False) -> None:
        if binary:
            await self.ws.send(data.encode("utf-8") if isinstance(data, str) else data)
        else:
            await self.ws.send(data.decode("utf-8") if isinstance(data, bytes) else data)

    async def send_frame(self, command: str, headers: Iterable[tuple[str, str]] | dict[str, str] = (),
                         body: bytes | str = b"", *, binary: bool = False) -> None:
        await self.send(frame(command, headers, body), binary=binary)

    async def _read_one(self, timeout: float) -> None:
        message = await asyncio.wait_for(self.ws.recv(), timeout)
        self.messages.append(message)
        data = message.encode("utf-8") if isinstance(message, str) else message
        before = self._parser.heartbeats
        self.frames.extend(self._parser.feed(data))
        self.heartbeats += self._parser.heartbeats - before

    async def next_frame(self, timeout: float = 10.0) -> Frame:
        """The next frame not yet returned by this method."""
        deadline = time.monotonic() + timeout
        while not self._unread():
            await self._read_one(max(deadline - time.monotonic(), 0.001))
        frame_ = self.frames[self._consumed]
        self._consumed += 1
        return frame_

    def _unread(self) -> bool:
        return self._consumed < len(self.frames)

    async def connect(self, headers: dict[str, str] | None = None, *, command: str = "CONNECT") -> Frame:
        hdrs = {"accept-version": "1.2,1.1,1.0", "host": "localhost", "heart-beat": "0,0"}
        hdrs.update(headers or {})
        await self.send_frame(command, hdrs)
        connected = await self.next_frame()
        assert connected.command == "CONNECTED", connected
        return connected

    async def subscribe(self, destination: str, sub_id: str, *, receipt: bool = True,
                        extra: dict[str, str] | None = None) -> None:
        headers = {"id": sub_id, "destination": destination, **(extra or {})}
        if receipt:
            headers["receipt"] = f"sub-{sub_id}"
        await self.send_frame("SUBSCRIBE", headers)
        if receipt:
            got = await self.next_frame()
            assert got.command == "RECEIPT" and got.get("receipt-id") == f"sub-{sub_id}", got

    async def wait_heartbeats(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.heartbeats < count:
            await self._read_one(max(deadline - time.monotonic(), 0.001))

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (close code, reason). Frames read meanwhile are kept."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                await self._read_one(max(deadline - time.monotonic(), 0.001))
        except ConnectionClosed as exc:
            received = exc.rcvd
            return (received.code, received.reason) if received is not None else (None, None)

    async def close(self) -> None:
        await self.ws.close()
