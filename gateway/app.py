"""Application assembly: ``create_app(settings)`` wires the layers in a Starlette lifespan.

Owns: building the broker, hub, router and authenticator from settings; mounting the transports
(raw WebSocket at ``/ws-stomp/websocket``, SockJS under ``/ws-stomp``), the chat domain's routes and
handlers, the health endpoints, and draining on shutdown (readiness false, sessions closed with an
ERROR the client will retry elsewhere, queues flushed with a deadline, then broker and DB closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.auth import create_authenticator
from gateway.broker.base import Broker
from gateway.hub import Hub, MessageRouter
from gateway.limits import create_limits
from gateway.settings import Settings, load_settings
from gateway.stomp.session import Authenticator, SessionConfig
from gateway.transport.base import CLOSE_SERVICE_RESTART, Connection, FrameSink
from gateway.transport.connection import StompConnection, session_config
from gateway.transport.sockjs import SessionRegistry, create_sockjs_routes
from gateway.transport.sockjs import greeting as sockjs_greeting
from gateway.transport.websocket import serve_websocket

log = logging.getLogger("gateway")

Component = Callable[["Gateway"], Awaitable[None]]


@dataclass(eq=False)
class Gateway:
    """Everything one node runs; available to routes as ``request.app.state.gateway``."""

    settings: Settings
    broker: Broker
    hub: Hub
    router: MessageRouter
    authenticator: Authenticator
    config: SessionConfig
    ready: bool = False
    draining: bool = False
    startup: list[Component] = field(default_factory=list)
    shutdown: list[Component] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    health_checks: dict[str, Callable[[], Awaitable[bool]]] = field(default_factory=dict)
    """Dependencies /readyz reports besides the bus (e.g. "database"); each answers within its own
    timeout and never raises."""

    def new_connection(self, sink: FrameSink, *, transport: str, remote: str) -> Connection:
        connection = StompConnection(self.hub, self.settings, self.config, sink, transport=transport,
                                     remote=remote, authenticator=self.authenticator)
        return connection

    async def drain(self) -> None:
        """Stop taking sessions and close the open ones, giving writers ``drain_timeout_s`` to flush."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        self.hub.close_all(CLOSE_SERVICE_RESTART, "Server shutting down",
                           error="Server shutting down, reconnect")
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        while self.hub.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        sockjs = self.extras.get("sockjs")
        if isinstance(sockjs, SessionRegistry):
            # Whatever SockJS sessions are left (no STOMP CONNECT yet, polls in flight) get c[3000].
            await sockjs.close_all()


def build_gateway(settings: Settings) -> Gateway:
    from gateway.broker.factory import create_broker
    from gateway.chat.payload import peek_seq

    broker = create_broker(settings, room_reader=peek_seq)
    router = MessageRouter(settings.app_prefixes)
    hub = Hub(broker, router, node_id=settings.node_id)
    hub.limits = create_limits(settings)
    return Gateway(settings=settings, broker=broker, hub=hub, router=router,
                   authenticator=create_authenticator(settings), config=session_config(settings))


def _health_routes() -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        """200 when the node serves and every dependency answers, else 503; the body says which."""
        gateway: Gateway = request.app.state.gateway
        names = list(gateway.health_checks)
        results = await asyncio.gather(gateway.broker.ping(), *(gateway.health_checks[n]() for n in names))
        checks: dict[str, str] = {}
        if gateway.settings.redis_url is not None:
            checks["redis"] = "up" if results[0] else "down"
            checks["listener"] = "up" if gateway.broker.healthy else "down"
        else:
            checks["broker"] = "up" if results[0] and gateway.broker.healthy else "down"
        checks.update((name, "up" if ok else "down") for name, ok in zip(names, results[1:], strict=True))
        ready = gateway.ready and not gateway.draining and all(v == "up" for v in checks.values())
        body = {"ready": ready, "node": gateway.settings.node_id, "draining": gateway.draining,
                "sessions": len(gateway.hub.sessions), "checks": checks,
                "broker": gateway.broker.healthy}
        return JSONResponse(body, status_code=200 if ready else 503)

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


def create_app(settings: Settings | None = None, *,
               configure: Sequence[Callable[[Gateway], Sequence[BaseRoute]]] | None = None) -> Starlette:
    """Build the ASGI app. ``configure`` callables (default: the chat domain) get the Gateway, may
    register handlers/hooks/startup work on it, and return extra routes."""
    settings = settings or load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = build_gateway(settings)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        if gateway.draining:
            await websocket.close(code=CLOSE_SERVICE_RESTART)
            return
        await serve_websocket(websocket, gateway.new_connection, settings.allowed_origins)

    sockjs = create_sockjs_routes(settings, gateway.new_connection)
    gateway.extras["sockjs"] = sockjs.registry
    # The raw WebSocket route comes before the SockJS mount that shares its prefix.
    routes: list[BaseRoute] = [WebSocketRoute("/ws-stomp/websocket", websocket_endpoint),
                               Route("/ws-stomp", sockjs_greeting), Mount("/ws-stomp", routes=sockjs)]
    routes += _health_routes()
    if configure is None:
        configure = default_components()
    for component in configure:
        routes += component(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.hub.start()
        for step in gateway.startup:
            await step(gateway)
        gateway.ready = True
        log.info("node %s ready (broker: %s, database: %s)", settings.node_id,
                 type(gateway.broker).__name__, settings.database_url.split("@")[-1])
        try:
            yield
        finally:
            await gateway.drain()
            for step in reversed(gateway.shutdown):
                try:
                    await step(gateway)
                except Exception:
                    log.exception("shutdown step failed")
            await gateway.hub.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app


def tune_gc(gen0_threshold: int) -> None:
    """Fewer, cheaper cyclic collections for a server holding many long-lived objects.

    Called by ``chat-gateway serve`` (not by :func:`create_app`, so tests and embedders keep their own
    GC settings). Everything built at start (modules, routes, the app) is moved out of the collector's
    sight (``gc.freeze``), and young collections run every ``gen0_threshold`` allocations instead of 700;
    the chat path allocates a few objects per frame, and with Python's defaults the collector took
    about 27 % of a node's CPU under load (py-spy, docs/benchmarks.md). Cycles are still collected.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def default_components() -> list[Callable[[Gateway], Sequence[BaseRoute]]]:
    """The layers the default app wires, in order: the chat domain, then the pages."""
    from gateway.chat.component import chat_component
    from gateway.pages import pages_component

    return [chat_component, pages_component]


def app_from_env() -> Starlette:
    """uvicorn factory (``gateway.app:app_from_env``): settings from GATEWAY_* variables."""
    settings = load_settings()
    app = create_app(settings)
    tune_gc(settings.gc_gen0_threshold)
    return app
