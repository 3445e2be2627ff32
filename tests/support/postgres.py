"""Throw-away PostgreSQL databases on the test server (127.0.0.1:5432, user postgres, trust auth).

``temporary_database()`` CREATEs a uniquely named database through the ``postgres`` maintenance
database (asyncpg) and DROPs it afterwards (``WITH (FORCE)``, so a leaked connection cannot keep it
alive). The server address can be changed with GATEWAY_TEST_POSTGRES_URL (a plain ``postgresql://``
URL of the maintenance database; only loopback servers are used by the suite).

:func:`require_postgres` decides what a test does when the server is unreachable: skip with the
reason on a developer machine, fail when the CI environment variable is set (CI must run them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from tests.support.ci import skip_or_fail

ADMIN_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_PREFIX = "chatgw_test_"

_unreachable: str | None = None
_checked = False


def _admin_url_for(database: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def plain_url(database: str) -> str:
    """The plain ``postgresql://`` URL of ``database`` on the test server (for asyncpg)."""
    return _admin_url_for(database)


def async_url(database: str) -> str:
    """The SQLAlchemy asyncpg URL of ``database`` on the test server."""
    return _admin_url_for(database).replace("postgresql://", "postgresql+asyncpg://", 1)


async def _admin_connection() -> asyncpg.Connection:
    return await asyncpg.connect(ADMIN_URL, timeout=10)


async def require_postgres() -> None:
    """Skip (no CI) or fail (CI set) the calling test if the server cannot be reached."""
    global _unreachable, _checked
    if not _checked:
        _checked = True
        try:
            conn = await _admin_connection()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            _unreachable = f"{type(exc).__name__}: {exc}"
        else:
            await conn.close()
    if _unreachable is not None:
        skip_or_fail(f"PostgreSQL at {ADMIN_URL} is unreachable ({_unreachable})", tests="the PostgreSQL tests")


async def create_database() -> str:
    """Create a uniquely named empty database; returns its name."""
    name = DATABASE_PREFIX + uuid.uuid4().hex[:16]
    conn = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    if not name.startswith(DATABASE_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = await _admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def temporary_database() -> AsyncIterator[str]:
    """A fresh database for one test; yields its ``postgresql+asyncpg://`` URL and drops it after."""
    await require_postgres()
    name = await create_database()
    try:
        yield async_url(name)
    finally:
        await drop_database(name)
