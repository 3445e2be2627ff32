"""Fixtures for the SockJS transport tests: fake connections, an inline app, a real uvicorn server.

The fakes stand in for the STOMP layer only (the layer under test is the SockJS transport): an echo
connection (every message comes back; ``!close CODE REASON``, ``!burst N``, ``!bytes`` and
``!raise`` drive the sink or fail), and the same connection in "close" mode, which closes with
``c[3000,"Go away!"]`` as soon as it starts (sockjs-protocol's ``/close`` service), or in "fail" mode,
whose start() raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest_asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route

from gateway.settings import Settings, load_settings
from gateway.transport.base import FrameSink
from gateway.transport.sockjs import SockJSRoutes, create_sockjs_routes, greeting

TEST_DEFAULTS: dict[str, Any] = {
    "allowed_origins": ("*",),
    "sockjs_streaming_limit_bytes": 4096,
    "sockjs_heartbeat_s": 25.0,
    "sockjs_disconnect_delay_s": 5.0,
}


def make_settings(**overrides: Any) -> Settings:
    return load_settings(environ={}, **{**TEST_DEFAULTS, **overrides})


class FakeConnection:
    """A fake of gateway.transport.base.Connection that records every call."""

    def __init__(self, sink: FrameSink, transport: str, remote: str, mode: str) -> None:
        self.sink = sink
        self.transport = transport
        self.remote = remote
        self.mode = mode
        self.started = 0
        self.received: list[bytes] = []
        self.lost_calls = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        self.started += 1
        if self.mode == "fail":
            raise RuntimeError("fake start failure")
        if self.mode == "close":
            self._closed = True
            await self.sink.close(3000, "Go away!")

    async def receive(self, data: bytes) -> None:
        self.received.append(data)
        text = data.decode("utf-8")
        if text.startswith("!close "):
            code, reason = text[len("!close "):].split(" ", 1)
            self._closed = True
            await self.sink.close(int(code), reason)
        elif text.startswith("!burst "):
            for i in range(int(text.split()[1])):
                await self.sink.send(f"m{i}".encode())
        elif text == "!bytes":
            await self.sink.send(b"ok \xff\xfe end")
        elif text == "!raise":
            raise RuntimeError("fake connection failure")
        else:
            await self.sink.send(data)

    async def connection_lost(self) -> None:
        self.lost_calls += 1
        self._closed = True


@dataclass
class FakeFactory:
    mode: str = "echo"
    connections: list[FakeConnection] = field(default_factory=list)

    def __call__(self, sink: FrameSink, *, transport: str, remote: str) -> FakeConnection:
        connection = FakeConnection(sink, transport, remote, self.mode)
        self.connections.append(connection)
        return connection

    def only(self) -> FakeConnection:
        assert len(self.connections) == 1, self.connections
        return self.connections[0]


@dataclass
class Service:
    """One mounted SockJS service (prefix, its routes/registry, its fake connections)."""

    prefix: str
    settings: Settings
    factory: FakeFactory
    routes: SockJSRoutes

    @property
    def registry(self) -> Any:
        return self.routes.registry


@dataclass
class Services:
    echo: Service
    close: Service
    wsoff: Service
    app: Starlette


def build_services(**overrides: Any) -> Services:
    """A Starlette app with /echo, /close and /disabled_websocket_echo SockJS services."""
    made: dict[str, Service] = {}
    routes: list[BaseRoute] = []
    for key, prefix, mode, extra in (("echo", "/echo", "echo", {}),
                                     ("close", "/close", "close", {}),
                                     ("wsoff", "/disabled_websocket_echo", "echo",
                                      {"sockjs_websocket_enabled": False})):
        settings = make_settings(**{**overrides, **extra})
        factory = FakeFactory(mode)
        sockjs = create_sockjs_routes(settings, factory)
        made[key] = Service(prefix, settings, factory, sockjs)
        routes += [Route(prefix, greeting), Mount(prefix, routes=sockjs)]
    return Services(made["echo"], made["close"], made["wsoff"], Starlette(routes=routes))


@dataclass
class Live:
    """A real uvicorn server on 127.0.0.1 running :func:`build_services`' app."""

    url: str
    services: Services
    client: httpx.AsyncClient

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]

    @property
    def echo(self) -> Service:
        return self.services.echo

    @property
    def close(self) -> Service:
        return self.services.close

    @property
    def wsoff(self) -> Service:
        return self.services.wsoff


@contextlib.asynccontextmanager
async def run_server(app: Any) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before starting")
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread with its own event loop.

    Unlike :func:`run_server` (same loop as the test), blocking clients in other threads race this
    server for real: their requests and disconnects reach its loop in whatever order the kernel and
    the scheduler produce.
    """

    def __init__(self, app: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self, timeout: float = 10.0) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn failed to start: {self._error!r}")
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def call(self, factory: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


@contextlib.contextmanager
def threaded_services(**overrides: Any) -> Iterator[tuple[ThreadedServer, Services]]:
    """:func:`build_services` served by a :class:`ThreadedServer`; sessions drained and server stopped after."""
    services = build_services(**overrides)
    server = ThreadedServer(services.app).start()
    try:
        yield server, services
    finally:
        async def drain() -> None:
            for service in (services.echo, services.close, services.wsoff):
                await service.registry.close_all(flush_timeout_s=0.5)
        try:
            server.call(drain)
        finally:
            server.stop()


class SwitchApp:
    """An ASGI app forwarding to whichever app the current test installed (one server per module)."""

    def __init__(self) -> None:
        self.current: Starlette | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        assert self.current is not None, "no app installed"
        await self.current(scope, receive, send)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[tuple[str, SwitchApp]]:
    switch = SwitchApp()
    async with run_server(switch) as url:  # type: ignore[arg-type]
        yield url, switch


@pytest_asyncio.fixture(loop_scope="module")
async def start_live(server: tuple[str, SwitchApp]) -> AsyncIterator[Callable[..., Awaitable[Live]]]:
    """``await start_live(**settings)``: fresh services on the module's live server; drained at teardown.

    Tests using it run in the module's event loop: ``pytestmark = pytest.mark.asyncio(loop_scope="module")``.
    """
    url, switch = server
    lives: list[Live] = []

    async def start(**overrides: Any) -> Live:
        assert not lives, "one live app per test"
        services = build_services(**overrides)
        switch.current = services.app
        client = httpx.AsyncClient(base_url=url, timeout=10, trust_env=False)
        live = Live(url, services, client)
        lives.append(live)
        return live

    try:
        yield start
    finally:
        for live in lives:
            for service in (live.echo, live.close, live.wsoff):
                await service.registry.close_all(flush_timeout_s=0.5)
            await live.client.aclose()
        switch.current = None


@pytest_asyncio.fixture(loop_scope="module")
async def live(start_live: Callable[..., Awaitable[Live]]) -> Live:
    return await start_live()


# --- helpers ----------------------------------------------------------------------------------------


class StreamReader:
    """Reads a streaming httpx response by delimiters, with a deadline per read."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks = response.aiter_raw()
        self._buffer = b""
        self.eof = False

    async def _more(self, timeout: float) -> None:
        try:
            chunk = await asyncio.wait_for(self._chunks.__anext__(), timeout)
        except StopAsyncIteration:
            self.eof = True
            return
        self._buffer += chunk

    async def read_until(self, delimiter: bytes, timeout: float = 5.0) -> bytes:
        """The bytes up to and including the next ``delimiter``."""
        while delimiter not in self._buffer:
            if self.eof:
                raise AssertionError(f"stream ended before {delimiter!r}; left {self._buffer[-200:]!r}")
            await self._more(timeout)
        index = self._buffer.index(delimiter) + len(delimiter)
        data, self._buffer = self._buffer[:index], self._buffer[index:]
        return data

    async def read_exactly(self, size: int, timeout: float = 5.0) -> bytes:
        while len(self._buffer) < size:
            if self.eof:
                raise AssertionError(f"stream ended after {len(self._buffer)} of {size} bytes")
            await self._more(timeout)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def rest(self, timeout: float = 5.0) -> bytes:
        """Everything until the server ends the response."""
        while not self.eof:
            await self._more(timeout)
        data, self._buffer = self._buffer, b""
        return data


@contextlib.asynccontextmanager
async def streaming(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> AsyncIterator[StreamReader]:
    async with client.stream(method, url, **kwargs) as response:
        yield StreamReader(response)


async def background_request(client: httpx.AsyncClient, method: str, url: str,
                             **kwargs: Any) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(client.request(method, url, **kwargs))
