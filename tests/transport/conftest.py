"""Fixtures for the transport tests: ``gateway_server(**settings)`` starts an inline gateway app
(tests.support.live_server.echo_component) under a real uvicorn on a free port; ``server_log`` captures
what a real server logs (the gateway's transport loggers and uvicorn's own error log)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.live_server import ServerFactory

REFUSED_HANDSHAKE = "refused WebSocket handshake"


@pytest.fixture
async def gateway_server() -> AsyncIterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    await asyncio.to_thread(factory.stop_all)


class ServerLog:
    """Records of ``gateway.transport.*`` (DEBUG and up) and of ``uvicorn.error`` (what uvicorn logs at
    its configured level, ERROR included), which does not propagate to the root logger caplog sees."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog
        caplog.set_level(logging.DEBUG, logger="gateway.transport")
        self.attach()

    def attach(self) -> None:
        """Attach to uvicorn's log; call again after starting a server (uvicorn's logging setup, run when
        its Config is created, removes the handlers of its loggers)."""
        logger = logging.getLogger("uvicorn.error")
        if self._caplog.handler not in logger.handlers:
            logger.addHandler(self._caplog.handler)

    def detach(self) -> None:
        logging.getLogger("uvicorn.error").removeHandler(self._caplog.handler)

    def records(self) -> list[logging.LogRecord]:
        """Each record once (pytest may also have put its capture handler on a logger on the way)."""
        return list({id(record): record for record in self._caplog.records}.values())

    def errors(self) -> list[logging.LogRecord]:
        return [r for r in self.records() if r.levelno >= logging.ERROR]

    def refusals(self) -> list[logging.LogRecord]:
        return [r for r in self.records() if r.getMessage().startswith(REFUSED_HANDSHAKE)]


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[ServerLog]:
    log = ServerLog(caplog)
    try:
        yield log
    finally:
        log.detach()
