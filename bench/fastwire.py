"""A cheap WebSocket STOMP client on a bare asyncio Protocol, for the stepped chat-path curve.

Why not :mod:`bench.wire` (``websockets``): the curve's shapes deliver every message to its own
connection (500 rooms x 2 subscribers: one WebSocket message per delivery) or to 100 connections at
once (10 x 100), tens of thousands of WebSocket messages per second into one Python process that
shares 2 cores with the servers. ``websockets`` costs a coroutine wake-up and a sans-I/O parser
round per message; this client does the framing inside ``data_received`` with ``bytes.find``,
hands every received WebSocket message to a plain callback, and never wakes a task per delivery.

Owns: the HTTP/1.1 upgrade handshake (``Sec-WebSocket-Accept`` checked), RFC 6455 framing (client
frames are masked with the all-zero key, which RFC 6455 allows and which makes masking free;
fragmented server messages are reassembled; PING is answered; CLOSE ends the session), STOMP CONNECT /
SUBSCRIBE / SEND / DISCONNECT frames, and write flow control: :attr:`WsStomp.writable` is cleared
while the transport's write buffer is above its high-water mark (the server is not reading), so a
paced publisher can see and report TCP backpressure instead of hiding it in a buffer.

Only 127.0.0.1 is contacted. Imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter_ns as _perf_ns

from bench.wire import check_local, connect_frame, frame, subscribe_frame

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\x00\x00\x00\x00"

MessageHandler = Callable[[bytes, int], None]
"""Called with (one WebSocket message's payload, perf_counter_ns when its bytes arrived)."""


class WireError(RuntimeError):
    """Handshake refused, ERROR frame, closed connection or a timeout."""


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final client frame masked with the zero key (so the payload goes out unchanged)."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", length)
    return head + _ZERO_MASK + payload


@dataclass(slots=True)
class Control:
    """A non-MESSAGE STOMP frame (CONNECTED, RECEIPT, ERROR) split into command, headers and body."""

    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def parse_control(chunk: bytes) -> Control:
    head_end = chunk.find(b"\n\n")
    head, body = (chunk, b"") if head_end < 0 else (chunk[:head_end], chunk[head_end + 2:])
    lines = head.decode("utf-8", "replace").split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key, value)
    return Control(lines[0].strip("\r"), headers, body)


class WsStomp(asyncio.Protocol):
    """One STOMP session over one WebSocket connection (see the module docstring).

    ``on_message`` gets every WebSocket message that contains a STOMP MESSAGE frame (the raw payload;
    a gateway payload may hold several frames). Other frames go to ``on_control`` if set, else to an
    internal queue read by :meth:`expect`. ``on_receipt`` (receipt-id) is a fast path for RECEIPTs.
    """

    def __init__(self, url: str, *, subprotocols: tuple[str, ...] = ("v12.stomp", "v11.stomp", "v10.stomp"),
                 on_message: MessageHandler | None = None) -> None:
        check_local(url)
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        self.host, _, port = hostport.rpartition(":")
        self.port = int(port)
        self.path = "/" + path
        self.subprotocols = subprotocols
        self.on_message = on_message
        self.name = ""
        self.pauses = 0            # times the transport asked us to stop writing (server not reading)
        self.paused_ns = 0         # total time spent paused
        self._paused_at = 0
        self.on_receipt: Callable[[str], None] | None = None
        self.on_close: Callable[[WsStomp, str], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.closed_reason: str | None = None
        self.error: Control | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._handshaken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._controls: asyncio.Queue[Control] = asyncio.Queue()
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._closing = False

    # --- connection ---------------------------------------------------------------------------------

    async def open(self, login: str, passcode: str = "", vhost: str = "/", timeout_s: float = 20.0,
                   sndbuf: int | None = None, write_high: int | None = None) -> WsStomp:
        """Connect, upgrade, CONNECT. ``sndbuf`` sets the kernel send buffer; ``write_high`` the
        transport's high-water mark (0: pause as soon as the kernel does not take a whole write)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (self.host, self.port))
            await loop.create_connection(lambda: self, sock=sock)
            if write_high is not None and self.transport is not None:
                self.transport.set_write_buffer_limits(high=write_high)
            await self._handshaken
            self.send_raw(connect_frame(login, passcode, vhost).encode())
            await self.expect("CONNECTED")
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        protocols = ", ".join(self.subprotocols)
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
                   f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n")
        transport.write(request.encode())
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.closed_reason or f"connection lost ({exc or 'EOF'})"
        self._closed(reason)

    def _closed(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        if not self._handshaken.done():
            self._handshaken.set_exception(WireError(reason))
        self._controls.put_nowait(Control("__CLOSED__", {"reason": reason}))
        self.writable.set()  # wake writers so they see the close
        if self.on_close is not None and not self._closing:
            self.on_close(self, reason)

    def pause_writing(self) -> None:
        self.writable.clear()
        self.pauses += 1
        self._paused_at = _perf_ns()

    def resume_writing(self) -> None:
        self.writable.set()
        if self._paused_at:
            self.paused_ns += _perf_ns() - self._paused_at
            self._paused_at = 0

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None and self.transport is not None and not self.transport.is_closing()

    # --- receiving --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = _perf_ns()
        buf = self._buf
        buf += data
        if not self._handshaken.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[:end + 4]
            self._check_handshake(head)
            if self._handshaken.done() and self._handshaken.exception() is not None:
                return
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if b1 & 0x80:  # servers never mask; tolerate it anyway
                head += 4
            if size - pos < head + length:
                break
            start = pos + head
            payload = bytes(buf[start:start + length])
            if b1 & 0x80:
                mask = buf[start - 4:start]
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            pos = start + length
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2, 0x0):
                if not b0 & 0x80:
                    self._fragments.append(payload)
                    continue
                if self._fragments:
                    self._fragments.append(payload)
                    payload = b"".join(self._fragments)
                    self._fragments = []
                self._stomp(payload, now)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                text = payload[2:].decode("utf-8", "replace")
                self.closed_reason = f"closed by server (close {code} {text!r})"
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(ws_frame(payload[:2], 0x8))
                    self.transport.close()
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(ws_frame(payload, 0xA))
        if pos:
            del buf[:pos]

    def _check_handshake(self, head: str) -> None:
        lines = head.split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            self._handshaken.set_exception(WireError(f"WebSocket handshake refused: {lines[0]!r}"))
            return
        accept = base64.b64encode(hashlib.sha1(self._key + _WS_GUID).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("sec-websocket-accept") != accept:
            self._handshaken.set_exception(WireError("bad Sec-WebSocket-Accept"))
            return
        self._handshaken.set_result(None)

    def _stomp(self, payload: bytes, now: int) -> None:
        on_message = self.on_message
        if payload.startswith(b"MESSAGE") and b"RECEIPT\n" not in payload and b"ERROR\n" not in payload:
            # The hot path: one MESSAGE frame, or a gateway batch of MESSAGE frames.
            if on_message is not None:
                on_message(payload, now)
            return
        for chunk in payload.split(b"\x00"):
            chunk = chunk.lstrip(b"\r\n")
            if not chunk:
                continue
            if chunk.startswith(b"MESSAGE"):
                if on_message is not None:
                    on_message(chunk, now)
                continue
            control = parse_control(chunk)
            if control.command == "RECEIPT" and self.on_receipt is not None:
                self.on_receipt(control.headers.get("receipt-id", ""))
                continue
            if control.command == "ERROR" and self.error is None:
                self.error = control
                if self.on_close is not None and not self._closing:
                    self.on_close(self, f"ERROR {control.headers.get('message')!r}")
            self._controls.put_nowait(control)

    async def expect(self, command: str, timeout_s: float = 20.0) -> Control:
        async with asyncio.timeout(timeout_s):
            while True:
                control = await self._controls.get()
                if control.command == command:
                    return control
                if control.command == "ERROR":
                    raise WireError(f"ERROR {control.headers.get('message')!r}: {control.body[:200]!r}")
                if control.command == "__CLOSED__":
                    raise WireError(f"closed while waiting for {command}: {control.headers['reason']}")

    # --- sending ----------------------------------------------------------------------------------

    def send_raw(self, stomp_frame: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise WireError(self.closed_reason or "not connected")
        self.transport.write(ws_frame(stomp_frame))

    async def subscribe(self, destination: str, sub_id: str) -> None:
        self.send_raw(subscribe_frame(destination, sub_id, receipt=f"sub-{sub_id}").encode())
        await self.expect("RECEIPT")

    async def close(self) -> None:
        """DISCONNECT and close (no receipt awaited: RabbitMQ closes without one)."""
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.write(ws_frame(frame("DISCONNECT").encode()))
            transport.write(ws_frame(b"\x03\xe8", 0x8))
        except Exception:  # already gone
            pass
        transport.close()
