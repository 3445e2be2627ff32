"""An in-process uvicorn server on a free port, serving an inline gateway app, for integration tests.

Owns: :class:`LiveServer` (uvicorn in a background thread with its own event loop, so blocking clients
such as stomp-py or ``subprocess.run`` of a Node script can drive it from the test thread), and
:func:`echo_component`, an application-destination component for apps built before the chat domain:

- ``/pub/echo``: publishes the body to the destination named by the ``x-to`` header (default
  ``/sub/echo``), keeping the content type and the ``x-*`` headers;
- ``/pub/chat/message``: publishes the body to ``/sub/chat/room/{roomId}`` (``roomId`` from the JSON
  body), like Spring's ``@MessageMapping("/chat/message")``;
- ``/pub/reject``: raises :class:`~gateway.hub.MessageRejected` (the client gets an ERROR).

The server binds a socket on port 0 itself and hands it to uvicorn (no port race). Must not import the
chat domain.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from gateway.app import Gateway, create_app
from gateway.broker.base import Publication
from gateway.hub import InboundMessage, MessageRejected
from gateway.settings import Settings, load_settings

T = TypeVar("T")

WS_PATH = "/ws-stomp/websocket"


def echo_component(gateway: Gateway) -> Sequence[BaseRoute]:
    async def echo(message: InboundMessage) -> None:
        destination = message.header("x-to") or "/sub/echo"
        extra = tuple((k, v) for k, v in message.headers if k.startswith("x-") and k != "x-to")
        await gateway.hub.publish(Publication(destination, message.body, content_type=message.header("content-type"),
                                              headers=extra, origin=gateway.settings.node_id))

    async def chat_message(message: InboundMessage) -> None:
        payload = json.loads(message.body)
        room = payload["roomId"]
        await gateway.hub.publish(Publication(f"/sub/chat/room/{room}", message.body,
                                              origin=gateway.settings.node_id))

    async def reject(message: InboundMessage) -> None:
        raise MessageRejected("rejected by the handler")

    gateway.router.add("/echo", echo)
    gateway.router.add("/chat/message", chat_message)
    gateway.router.add("/reject", reject)
    return []


def make_settings(**values: Any) -> Settings:
    """Settings for an inline app, independent of the developer's GATEWAY_* environment."""
    values.setdefault("node_id", "test-node")
    values.setdefault("log_level", "warning")
    return load_settings(environ={}, **values)


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Starlette, *, ws_max_size: int | None = None) -> None:
        self.app = app
        settings: Settings = app.state.gateway.settings
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                ws_max_size=ws_max_size or max(settings.max_frame_bytes * 2, 1 << 20),
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WS_PATH}"

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc

    def start(self, timeout: float = 10.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop (e.g. ``gateway.hub.publish``) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    @property
    def session_count(self) -> int:
        return len(self.gateway.hub.sessions)


@contextmanager
def live_server(settings: Settings | None = None,
                configure: Sequence[Callable[[Gateway], Sequence[BaseRoute]]] | None = None,
                **values: Any) -> Iterator[LiveServer]:
    """Serve ``create_app(settings or make_settings(**values), configure=[echo_component])``."""
    app = create_app(settings or make_settings(**values),
                     configure=list(configure) if configure is not None else [echo_component])
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


class ServerFactory:
    """Starts live servers for one test and stops them all at the end (see the ``gateway_server``
    fixtures in tests/transport and tests/integration)."""

    def __init__(self) -> None:
        self.servers: list[LiveServer] = []

    def __call__(self, settings: Settings | None = None,
                 configure: Sequence[Callable[[Gateway], Sequence[BaseRoute]]] | None = None,
                 **values: Any) -> LiveServer:
        app = create_app(settings or make_settings(**values),
                         configure=list(configure) if configure is not None else [echo_component])
        server = LiveServer(app).start()
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
