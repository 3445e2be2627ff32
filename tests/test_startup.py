"""gateway.startup: a lifespan that refuses to start is reported as its one line, not a traceback.

A real Starlette app driven through the ASGI lifespan protocol (the server's side of it played by
the test, as uvicorn would), and a real ``chat-gateway serve`` on a database that was never migrated.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.startup import ReportStartupRefusal, StartupRefused
from tests.support.gateway_process import GatewayProcess


async def startup_failure(error: BaseException) -> MutableMapping[str, Any]:
    """Run a Starlette app (with the middleware) whose lifespan raises ``error``; return what it
    told the server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise error
        yield

    app = Starlette(lifespan=lifespan, middleware=[Middleware(ReportStartupRefusal)])
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    with contextlib.suppress(BaseException):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    (message,) = sent
    assert message["type"] == "lifespan.startup.failed"
    return message


async def test_a_refusal_is_its_one_line() -> None:
    message = await startup_failure(StartupRefused("refusing to start: node b uses\nanother Redis"))
    assert message["message"] == "refusing to start: node b uses another Redis"


async def test_any_other_failure_keeps_its_traceback() -> None:
    message = await startup_failure(RuntimeError("a bug"))
    assert message["message"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: a bug" in message["message"]


def test_an_unmigrated_database_is_one_line_and_exit_status_3(tmp_path: Path) -> None:
    process = GatewayProcess({"database_url": f"sqlite+aiosqlite:///{tmp_path / 'never-migrated.db'}"},
                             workdir=tmp_path, migrate=False)
    try:
        process.start(wait=False)
        assert process.process is not None
        assert process.process.wait(120) == 3
        log = process.log_text()
        assert "Traceback" not in log, log
        assert "the database was never migrated" in log and "run `chat-gateway migrate`" in log
    finally:
        process.cleanup()
