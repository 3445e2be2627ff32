"""Refusing to start with one readable line: :class:`StartupRefused` and the ASGI wrapper that reports it.

A startup step (run in the app's lifespan) that finds the node must not serve — the database is not
migrated, another node on the same database delivers through another Redis — raises
:class:`StartupRefused` with one line saying what is wrong and what to do. Starlette reports any
lifespan failure to the server as the full traceback, which uvicorn logs before "Application startup
failed. Exiting." (exit status 3); :class:`ReportStartupRefusal` replaces that traceback with the
exception's line when the failure is a :class:`StartupRefused`. Every other failure keeps its
traceback.

This module imports nothing from the rest of the gateway (standard library only).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class StartupRefused(RuntimeError):
    """This node must not serve; ``str(exc)`` is one line for the operator (no traceback is shown)."""


class ReportStartupRefusal:
    """ASGI middleware: a lifespan startup that failed with :class:`StartupRefused` is reported to the
    server as the exception's one line instead of a traceback. Everything else passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_readable(message: Message) -> None:
            if message.get("type") == "lifespan.startup.failed":
                # Starlette sends this from inside its ``except`` block: the failure is being handled.
                refused = sys.exc_info()[1]
                if isinstance(refused, StartupRefused):
                    message = {**message, "message": " ".join(str(refused).split())}
            await send(message)

        await self.app(scope, receive, send_readable)
