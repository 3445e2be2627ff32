"""HTTP plumbing shared by the SockJS endpoints: request headers, CORS, caching, cookies, replies.

Owns: the header sets SockJS responses carry (CORS echoing the request's Origin, "never cache" for
session traffic, "cache a year" for static pages and preflights, the ``JSESSIONID`` cookie that
cookie-based sticky load balancers look for) and :func:`respond` for a complete raw ASGI reply.

Must not import Starlette or the STOMP layer (raw ASGI messages only).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from email.utils import formatdate
from time import time
from typing import Any

Headers = list[tuple[bytes, bytes]]
Scope = MutableMapping[str, Any]

TEXT_PLAIN = b"text/plain;charset=UTF-8"
TEXT_HTML = b"text/html;charset=UTF-8"
APPLICATION_JSON = b"application/json;charset=UTF-8"
APPLICATION_JAVASCRIPT = b"application/javascript;charset=UTF-8"
EVENT_STREAM = b"text/event-stream;charset=UTF-8"

NO_CACHE: tuple[bytes, bytes] = (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0")
ONE_YEAR_S = 31536000
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9._\-]{1,128}")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower-case bytes), decoded as Latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def remote_of(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    return f"{client[0]}:{client[1]}"


def cors_headers(scope: Scope) -> Headers:
    """Echo the request's Origin with credentials allowed; ``*`` without credentials if none was sent."""
    origin = header(scope, b"origin")
    if origin:
        return [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin")]
    return [(b"access-control-allow-origin", b"*")]


def cache_forever_headers() -> Headers:
    return [(b"cache-control", f"public, max-age={ONE_YEAR_S}".encode()),
            (b"expires", formatdate(time() + ONE_YEAR_S, usegmt=True).encode())]


def preflight_headers(scope: Scope, methods: str) -> Headers:
    """A CORS preflight answer: cacheable for a year, ``methods`` allowed, request headers echoed."""
    headers = [*cors_headers(scope), *cache_forever_headers(),
               (b"access-control-max-age", str(ONE_YEAR_S).encode()),
               (b"access-control-allow-methods", methods.encode())]
    requested = header(scope, b"access-control-request-headers")
    if requested:
        headers.append((b"access-control-allow-headers", requested.encode("latin-1")))
    return headers


def jsessionid_cookie(scope: Scope) -> tuple[bytes, bytes]:
    """``Set-Cookie: JSESSIONID=<echoed or dummy>;path=/`` for load balancers that stick on it."""
    value = "dummy"
    for part in (header(scope, b"cookie") or "").split(";"):
        name, _, candidate = part.strip().partition("=")
        if name == "JSESSIONID" and _COOKIE_VALUE.fullmatch(candidate):
            value = candidate
            break
    return (b"set-cookie", f"JSESSIONID={value};path=/".encode())


async def respond(send: Any, status: int, headers: Headers | None = None, body: bytes = b"",
                  content_type: bytes | None = None) -> None:
    """Send one complete HTTP response over raw ASGI."""
    all_headers = list(headers or [])
    if content_type is not None:
        all_headers.append((b"content-type", content_type))
    if status not in (204, 304):
        all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body if status not in (204, 304) else b""})
