"""Application assembly: ``create_app(settings)`` builds a :class:`gateway.node.Gateway` and its routes.

Owns: building the broker, hub, router, fan-out and authenticator from settings; adding the
components (the chat domain, the pages) to the node; mounting the transports (raw WebSocket at
``/ws-stomp/websocket``, SockJS under ``/ws-stomp``), the components' routes, the health endpoints
(``/healthz``, ``/readyz``) and ``/metrics`` (:mod:`gateway.metrics_route`); and tying the node's start and stop (drain first) to the Starlette lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.auth import create_authenticator
from gateway.close_codes import CLOSE_SERVICE_RESTART
from gateway.hub import Hub, MessageRouter
from gateway.limits import create_limits
from gateway.logs import configure_logging
from gateway.metrics_route import metrics_routes
from gateway.node import Gateway
from gateway.receive import LocalFanout
from gateway.settings import Settings, load_settings
from gateway.startup import ReportStartupRefusal
from gateway.transport.connection import session_config
from gateway.transport.sockjs import create_sockjs_routes
from gateway.transport.sockjs import greeting as sockjs_greeting
from gateway.transport.websocket import serve_websocket

log = logging.getLogger("gateway")

Component = Callable[[Gateway], Sequence[BaseRoute]]
"""A test's or embedder's extra component: registers on the Gateway (a :class:`gateway.host.Host`)
and returns its routes."""


def build_gateway(settings: Settings) -> Gateway:
    from gateway.broker.factory import create_broker
    from gateway.chat.payload import peek_seq

    broker = create_broker(settings, room_reader=peek_seq)
    router = MessageRouter(settings.app_prefixes)
    hub = Hub(broker, router, node_id=settings.node_id)
    hub.limits = create_limits(settings)
    return Gateway(settings=settings, broker=broker, hub=hub, router=router,
                   authenticator=create_authenticator(settings), config=session_config(settings),
                   fanout=LocalFanout(hub.registry))


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
               configure: Sequence[Component] | None = None) -> Starlette:
    """Build the ASGI app with the chat domain and the pages, or, when ``configure`` is given, with
    those components instead (tests: an echo handler)."""
    settings = settings or load_settings()
    # `chat-gateway serve` (and each worker) configured logging already; an embedder or a test that
    # configured its own keeps it.
    configure_logging(settings, replace=False)
    gateway = build_gateway(settings)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        if gateway.draining:
            await websocket.close(code=CLOSE_SERVICE_RESTART)
            return
        await serve_websocket(websocket, gateway.new_connection, settings.allowed_origins)

    sockjs = create_sockjs_routes(settings, gateway.new_connection)
    gateway.sockjs = sockjs.registry
    # The raw WebSocket route comes before the SockJS mount that shares its prefix.
    routes: list[BaseRoute] = [WebSocketRoute("/ws-stomp/websocket", websocket_endpoint),
                               Route("/ws-stomp", sockjs_greeting), Mount("/ws-stomp", routes=sockjs)]
    routes += _health_routes()
    routes += metrics_routes()
    if configure is None:
        from gateway.chat.component import chat_component
        from gateway.pages import pages_component

        gateway.chat = chat_component(gateway)
        routes += gateway.chat.routes
        routes += pages_component(gateway)
    else:
        for component in configure:
            routes += component(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    # A StartupRefused (schema not migrated, a split fleet) is reported as its one line, not a traceback.
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(ReportStartupRefusal)])
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


def app_from_env() -> Starlette:
    """uvicorn factory (``gateway.app:app_from_env``): settings from GATEWAY_* variables."""
    settings = load_settings()
    app = create_app(settings)
    tune_gc(settings.gc_gen0_threshold)
    return app
