"""Minimal STOMP 1.2 framing and a WebSocket STOMP client, written for load generation.

Owns: building the few client frames the benchmarks send (CONNECT, SUBSCRIBE, SEND, DISCONNECT),
splitting received WebSocket messages into frames (several frames per message and heart-beat EOLs
between them are accepted, as RabbitMQ sends ``\\x00\\n``), and :class:`StompClient`, a thin wrapper
over ``websockets``' asyncio client with compression and keep-alive pings off (neither server
negotiates compression with these clients; pings would only add noise).

Deliberately not the gateway's codec: the load generator must stay cheap per message and must not
share code paths with the system under test. Bodies in the benchmarks are ASCII without NUL, so a
frame ends at the first NUL. Imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

ALLOWED_HOSTS = ("127.0.0.1", "[::1]", "localhost")


class StompFailure(RuntimeError):
    """The server answered with ERROR, closed early, or did not answer in time."""


def check_local(url: str) -> None:
    """Refuse any URL whose host is not the loopback interface (benchmarks never leave the machine)."""
    rest = url.split("://", 1)[-1]
    host = rest.split("/", 1)[0].rsplit(":", 1)[0] if not rest.startswith("[") else rest.split("]", 1)[0] + "]"
    if host not in ALLOWED_HOSTS:
        raise ValueError(f"benchmarks only target the loopback interface, not {host!r}")


def frame(command: str, headers: dict[str, str] | None = None, body: str = "") -> str:
    """One client frame as text. ``content-length`` is added whenever there is a body."""
    lines = [command]
    for name, value in (headers or {}).items():
        lines.append(f"{name}:{value}")
    if body:
        lines.append(f"content-length:{len(body.encode('utf-8'))}")
    return "\n".join(lines) + "\n\n" + body + "\x00"


def connect_frame(login: str, passcode: str, host: str) -> str:
    return frame("CONNECT", {"accept-version": "1.2,1.1,1.0", "host": host, "login": login,
                             "passcode": passcode, "heart-beat": "0,0"})


def subscribe_frame(destination: str, sub_id: str, receipt: str | None = None) -> str:
    headers = {"id": sub_id, "destination": destination, "ack": "auto"}
    if receipt is not None:
        headers["receipt"] = receipt
    return frame("SUBSCRIBE", headers)


def send_prefix(destination: str, content_type: str | None = None) -> str:
    """The constant head of a SEND to ``destination``; :func:`send_with` completes it per message."""
    head = f"SEND\ndestination:{destination}\n"
    if content_type is not None:
        head += f"content-type:{content_type}\n"
    return head


def send_with(prefix: str, body: str) -> str:
    return f"{prefix}content-length:{len(body)}\n\n{body}\x00"  # ASCII bodies: chars == bytes


@dataclass(frozen=True, slots=True)
class Received:
    command: str
    headers: str  # the raw header block (rarely needed, so not split)
    body: str

    def header(self, name: str) -> str | None:
        for line in self.headers.split("\n"):
            key, _, value = line.partition(":")
            if key == name:
                return value
        return None


def split_frames(message: str) -> Iterator[Received]:
    """Every frame in one WebSocket message (heart-beat EOLs and a trailing newline are skipped)."""
    for chunk in message.split("\x00"):
        chunk = chunk.lstrip("\r\n")
        if not chunk:
            continue
        head_end = chunk.find("\n\n")
        if head_end < 0:
            head, body = chunk, ""
        else:
            head, body = chunk[:head_end], chunk[head_end + 2:]
        command, _, headers = head.partition("\n")
        yield Received(command, headers, body)


def message_bodies(message: str) -> Iterator[str]:
    """Fast path for the hot loop: the bodies of the MESSAGE frames in one WebSocket message."""
    for chunk in message.split("\x00"):
        if chunk.startswith("MESSAGE") or chunk.lstrip("\r\n").startswith("MESSAGE"):
            head_end = chunk.find("\n\n")
            if head_end >= 0:
                yield chunk[head_end + 2:]


class StompClient:
    """One STOMP session over a WebSocket; use as ``async with StompClient(...) as client``."""

    def __init__(self, url: str, *, login: str, passcode: str = "", host: str = "/",
                 subprotocols: tuple[str, ...] = ("v12.stomp", "v11.stomp", "v10.stomp"),
                 timeout_s: float = 10.0) -> None:
        check_local(url)
        self.url = url
        self.login = login
        self.passcode = passcode
        self.host = host
        self.subprotocols = subprotocols
        self.timeout_s = timeout_s
        self._ws: ClientConnection | None = None
        self.connected_headers = ""

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise StompFailure("not connected")
        return self._ws

    async def open(self) -> StompClient:
        """WebSocket handshake, CONNECT, wait for CONNECTED (ERROR raises :class:`StompFailure`)."""
        self._ws = await connect(self.url, subprotocols=[Subprotocol(p) for p in self.subprotocols],
                                 compression=None, ping_interval=None, max_size=1 << 22, max_queue=64,
                                 open_timeout=self.timeout_s, close_timeout=2.0)
        await self._ws.send(connect_frame(self.login, self.passcode, self.host))
        reply = await self.expect("CONNECTED")
        self.connected_headers = reply.headers
        return self

    async def expect(self, command: str) -> Received:
        """Wait for the next non-MESSAGE frame and require it to be ``command``."""
        async with asyncio.timeout(self.timeout_s):
            while True:
                try:
                    data = await self.ws.recv()
                except ConnectionClosed as exc:
                    raise StompFailure(f"closed while waiting for {command}: {exc}") from None
                text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                for received in split_frames(text):
                    if received.command == command:
                        return received
                    if received.command == "ERROR":
                        raise StompFailure(f"ERROR {received.header('message')!r}: {received.body[:200]!r}")

    async def subscribe(self, destination: str, sub_id: str = "0") -> None:
        """SUBSCRIBE and wait for its RECEIPT, so the subscription is live when this returns."""
        await self.ws.send(subscribe_frame(destination, sub_id, receipt=f"sub-{sub_id}"))
        await self.expect("RECEIPT")

    async def send(self, data: str) -> None:
        await self.ws.send(data)

    async def messages(self) -> AsyncIterator[str]:
        """The text of every WebSocket message until the connection closes."""
        ws = self.ws
        try:
            async for data in ws:
                yield data if isinstance(data, str) else data.decode("utf-8", "replace")
        except ConnectionClosed:
            return

    async def disconnect(self) -> None:
        """DISCONNECT (no receipt awaited: RabbitMQ closes without one) and close the socket."""
        ws = self._ws
        if ws is None:
            return
        self._ws = None
        try:
            await ws.send(frame("DISCONNECT"))
        except ConnectionClosed:
            pass
        await ws.close()

    async def __aenter__(self) -> StompClient:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.disconnect()
