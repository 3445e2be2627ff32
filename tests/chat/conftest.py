"""Fixtures for the chat storage tests: every database fixture runs once per backend.

``empty_database_url`` is a fresh database (a temp SQLite file, or a throw-away PostgreSQL database
created and dropped by tests.support.postgres); ``database_url`` is the same migrated to head with
the real Alembic migrations; ``engine`` and ``repo`` sit on top of it. ``make_server`` (real chat servers
on a migrated SQLite file) is in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.chat.migrations import upgrade
from gateway.chat.repository import ChatRepository, make_engine
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
