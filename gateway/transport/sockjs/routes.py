"""Starlette routes of the SockJS endpoint (mounted by the app under ``/ws-stomp``).

Owns: URL dispatch under the mount (``/``, ``/info``, ``/iframe*.html``, the sockjs-client script,
``/{server}/{session}/{transport}``), which methods each URL takes (405 with ``Allow``), 404 for
anything else (including JSONP, removed in Spring 5.1, and ids that are empty or hold a ``.``),
the origin policy (403), CORS preflights, refused WebSocket handshakes (HTTP 403 and one log line,
see :func:`~gateway.transport.sockjs.websocket.deny`), and the public entry point
:func:`create_sockjs_routes`.

Must not import the STOMP layer or the chat domain: connections come from the ConnectionFactory.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any
from urllib.parse import parse_qs

from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Send
from starlette.types import Scope as StarletteScope

from gateway.settings import Settings
from gateway.transport.base import ConnectionFactory
from gateway.transport.origin import origin_allowed
from gateway.transport.sockjs import assets, protocol
from gateway.transport.sockjs.headers import (
    APPLICATION_JAVASCRIPT,
    APPLICATION_JSON,
    NO_CACHE,
    TEXT_HTML,
    TEXT_PLAIN,
    Headers,
    Scope,
    cache_forever_headers,
    cors_headers,
    header,
    preflight_headers,
    respond,
)
from gateway.transport.sockjs.http_transports import (
    HTMLFILE,
    RECEIVING_TRANSPORTS,
    serve_receiver,
    serve_xhr_send,
)
from gateway.transport.sockjs.registry import SessionRegistry
from gateway.transport.sockjs.websocket import deny, serve_websocket

GREETING = b"Welcome to SockJS!\n"
_IFRAME = re.compile(r"/iframe[0-9a-z._\-]*\.html")
_CORS_TRANSPORTS = frozenset({"xhr", "xhr_send", "xhr_streaming"})


class SockJSRoutes(list[BaseRoute]):
    """The route list for the app's ``Mount("/ws-stomp", routes=...)``, carrying its :attr:`registry`."""

    registry: SessionRegistry


def create_sockjs_routes(settings: Settings, connection_factory: ConnectionFactory, *,
                         registry: SessionRegistry | None = None) -> SockJSRoutes:
    """Routes serving SockJS 0.3.3 with each session's bytes carried to a ``connection_factory`` connection.

    Mount them: ``Mount("/ws-stomp", routes=create_sockjs_routes(settings, factory))``. The returned
    list's ``.registry`` (or the ``registry`` passed in) holds the sessions; call
    ``await routes.registry.close_all()`` while draining. ``GET /ws-stomp`` without the slash is not
    reached through a Mount (Starlette redirects it to ``/ws-stomp/``); add
    ``Route("/ws-stomp", greeting)`` in front to answer it directly as Spring does.
    """
    registry = registry if registry is not None else SessionRegistry(settings, connection_factory)
    routes = SockJSRoutes([SockJSRoute(SockJSService(settings, registry))])
    routes.registry = registry
    return routes


class _Greeting:
    """``Welcome to SockJS!`` as an ASGI app (an object, so ``Route(path, greeting)`` treats it as one)."""

    async def __call__(self, scope: StarletteScope, receive: Receive, send: Send) -> None:
        await respond(send, 200, [], GREETING, TEXT_PLAIN)


greeting = _Greeting()


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):]
    return path


class SockJSService:
    """Dispatches every HTTP request and WebSocket handshake under the SockJS prefix."""

    def __init__(self, settings: Settings, registry: SessionRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._script: assets.Asset | None = None

    # --- entry ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = _route_path(scope)
        if scope["type"] == "websocket":
            await self._websocket(path, scope, receive, send)
            return
        method: str = scope["method"]
        if path in ("", "/", assets.SCRIPT_PATH) or _IFRAME.fullmatch(path):
            if method != "GET":
                await _method_not_allowed(send, "GET")
            elif path == assets.SCRIPT_PATH:
                await self._script_file(scope, send)
            elif path in ("", "/"):
                await greeting(scope, receive, send)
            else:
                await self._iframe(scope, send)
        elif path == "/info":
            await self._info(method, scope, send)
        else:
            parts = path.split("/")
            if len(parts) == 4 and parts[0] == "" and _valid_id(parts[1]) and _valid_id(parts[2]):
                await self._transport(method, parts[2], parts[3], scope, receive, send)
            else:
                await _not_found(send)

    # --- helpers ----------------------------------------------------------------------------------

    def _origin_ok(self, scope: Scope) -> bool:
        return origin_allowed(header(scope, b"origin"), header(scope, b"host"), self.settings.allowed_origins)

    def _iframe_enabled(self) -> bool:
        # As Spring: with an explicit origin list (no "*") a framed page would bypass the origin
        # check (its requests come from our own origin), so the iframe page is not served at all.
        allowed = self.settings.allowed_origins
        return not allowed or "*" in allowed

    # --- static endpoints -------------------------------------------------------------------------

    async def _info(self, method: str, scope: Scope, send: Any) -> None:
        if method not in ("GET", "OPTIONS"):
            await _method_not_allowed(send, "GET, OPTIONS")
            return
        if not self._origin_ok(scope):
            await _forbidden(send)
            return
        if method == "OPTIONS":
            await respond(send, 204, preflight_headers(scope, "OPTIONS, GET"))
            return
        body = json.dumps({"entropy": secrets.randbits(32), "origins": ["*:*"], "cookie_needed": True,
                           "websocket": self.settings.sockjs_websocket_enabled},
                          separators=(",", ":")).encode()
        await respond(send, 200, [NO_CACHE, *cors_headers(scope)], body, APPLICATION_JSON)

    async def _iframe(self, scope: Scope, send: Any) -> None:
        if not self._iframe_enabled():
            await _not_found(send)
            return
        page = assets.iframe_page(scope.get("root_path", "") + assets.SCRIPT_PATH)
        extra: Headers = [] if "*" in self.settings.allowed_origins else [(b"x-frame-options", b"SAMEORIGIN")]
        await _cacheable(scope, send, page, TEXT_HTML, extra)

    async def _script_file(self, scope: Scope, send: Any) -> None:
        if self._script is None:
            self._script = assets.load_sockjs_script(self.settings)
        if self._script is None:
            await _not_found(send)
            return
        await _cacheable(scope, send, self._script, APPLICATION_JAVASCRIPT, [])

    # --- session transports -----------------------------------------------------------------------

    async def _transport(self, method: str, session_id: str, name: str, scope: Scope, receive: Any,
                         send: Any) -> None:
        if name == "websocket":
            if not self.settings.sockjs_websocket_enabled:
                await _not_found(send)
            elif method != "GET":
                await _method_not_allowed(send, "GET")
            else:
                await respond(send, 400, [], b'Can "Upgrade" only to "WebSocket".', TEXT_PLAIN)
            return
        if name == "xhr_send":
            expected = "POST"
        elif name in RECEIVING_TRANSPORTS:
            expected = RECEIVING_TRANSPORTS[name].method
        else:
            await _not_found(send)
            return
        cors = name in _CORS_TRANSPORTS
        if method != expected and not (method == "OPTIONS" and cors):
            await _method_not_allowed(send, f"{expected}, OPTIONS" if cors else expected)
            return
        if not self._origin_ok(scope):
            await _forbidden(send)
            return
        if method == "OPTIONS":
            await respond(send, 204, preflight_headers(scope, f"OPTIONS, {expected}"))
            return
        if name == "xhr_send":
            await serve_xhr_send(self.registry, session_id, scope, receive, send)
            return
        transport = RECEIVING_TRANSPORTS[name]
        callback: str | None = None
        if transport is HTMLFILE:
            callback = _query_param(scope, "c")
            if not callback:
                await respond(send, 500, [NO_CACHE], b'"callback" parameter required', TEXT_PLAIN)
                return
            if not protocol.callback_valid(callback):
                await respond(send, 500, [NO_CACHE], b'invalid "callback" parameter', TEXT_PLAIN)
                return
        await serve_receiver(self.registry, transport, session_id, scope, receive, send, callback=callback)

    async def _websocket(self, path: str, scope: Scope, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        parts = path.split("/")
        if not (len(parts) == 4 and parts[0] == "" and _valid_id(parts[1]) and _valid_id(parts[2])
                and parts[3] == "websocket"):
            # URL probing is noise: DEBUG (uvicorn logs the 403 itself at INFO).
            await deny(scope, send, "no SockJS websocket at this URL", level=logging.DEBUG)
            return
        if not self.settings.sockjs_websocket_enabled:
            await deny(scope, send, "the SockJS websocket transport is disabled", level=logging.DEBUG)
            return
        if not self._origin_ok(scope):
            await deny(scope, send, f"origin {(header(scope, b'origin') or '')[:200]!r} not allowed")
            return
        await serve_websocket(self.registry, parts[2], scope, receive, send)


class SockJSRoute(BaseRoute):
    """One route taking every HTTP request and WebSocket under the mount; :class:`SockJSService` dispatches."""

    def __init__(self, service: SockJSService) -> None:
        self.service = service

    def matches(self, scope: StarletteScope) -> tuple[Match, StarletteScope]:
        if scope["type"] in ("http", "websocket"):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: StarletteScope, receive: Receive, send: Send) -> None:
        await self.service(scope, receive, send)


# --- small replies ------------------------------------------------------------------------------------


def _valid_id(segment: str) -> bool:
    return bool(segment) and "." not in segment


def _query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1")).get(name)
    return values[0] if values else None


async def _not_found(send: Any) -> None:
    await respond(send, 404, [], b"Not Found", TEXT_PLAIN)


async def _forbidden(send: Any) -> None:
    await respond(send, 403, [], b"Forbidden", TEXT_PLAIN)


async def _method_not_allowed(send: Any, allow: str) -> None:
    await respond(send, 405, [(b"allow", allow.encode())])


async def _cacheable(scope: Scope, send: Any, asset: assets.Asset, content_type: bytes, extra: Headers) -> None:
    etag = asset.etag.encode()
    candidates = [tag.strip() for tag in (header(scope, b"if-none-match") or "").split(",")]
    if asset.etag in candidates or "*" in candidates:
        await respond(send, 304, [(b"etag", etag), *cache_forever_headers(), *extra])
        return
    await respond(send, 200, [(b"etag", etag), *cache_forever_headers(), *extra], asset.body, content_type)
