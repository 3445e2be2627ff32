"""Serve an ASGI app with a real uvicorn server inside the test's event loop, on a free port.

Usage::

    async with running_server(app) as server:
        server.base_url   # http://127.0.0.1:<port>
        server.ws_url     # ws://127.0.0.1:<port>/ws-stomp/websocket

The lifespan runs (startup before the block, shutdown after). Imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass(frozen=True)
class RunningServer:
    port: int
    server: uvicorn.Server

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws-stomp/websocket"


@contextlib.asynccontextmanager
async def running_server(app: Any, **config: Any) -> AsyncIterator[RunningServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "on"}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped during start-up")
        yield RunningServer(port, server)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        sock.close()
