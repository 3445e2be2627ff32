"""Fixtures for the chat storage tests: every database fixture runs once per backend.

``empty_database_url`` is a fresh database (a temp SQLite file, or a throw-away PostgreSQL database
created and dropped by tests.support.postgres); ``database_url`` is the same migrated to head with
the real Alembic migrations; ``engine`` and ``repo`` sit on top of it. ``make_server`` starts real
chat servers (memory broker) on a migrated SQLite file, with settings overrides.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.chat.migrations import upgrade
from gateway.chat.repository import ChatRepository, make_engine
from gateway.settings import load_settings
from tests.support.live_server import LiveServer
from tests.support.postgres import temporary_database

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    else:
        async with temporary_database() as url:
            yield url


@pytest.fixture
async def database_url(empty_database_url: str) -> str:
    await asyncio.to_thread(upgrade, empty_database_url)
    return empty_database_url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def repo(engine: AsyncEngine) -> ChatRepository:
    return ChatRepository(engine)


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Any]:
    servers: list[LiveServer] = []

    async def make(**overrides: Any) -> LiveServer:
        # These tests push thousands of SENDs from one session to exercise pipelining, storage and
        # resume; the SEND rate limit (50/s, burst 500 by default) is tested in tests/limits.
        overrides.setdefault("send_rate_per_s", 0)
        url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
        await asyncio.to_thread(upgrade, url)
        settings = load_settings(environ={}, database_url=url, heartbeat_receive_ms=0, node_id="test-node",
                                 db_busy_timeout_s=120, **overrides)
        server = LiveServer(create_app(settings)).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
