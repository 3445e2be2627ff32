"""Schema migrations: run the Alembic scripts in the repository's ``alembic/`` programmatically.

Owns :func:`upgrade` (what ``chat-gateway migrate`` and ``make run`` call), :func:`downgrade`,
:func:`current_revision`, :func:`head_revision` and the cross-node migration lock:

* PostgreSQL: the migrating transaction first takes ``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``;
  a second node blocks there until the first commits, then finds the schema at head and does nothing.
* SQLite: the migrating transaction starts with ``BEGIN EXCLUSIVE`` (after ``busy_timeout``), which
  serialises migrating processes on the database file the same way.

All migrations of one run happen in that one locked transaction (DDL is transactional on both
backends), so a failed run leaves the schema as it was. The functions are synchronous (for the CLI);
the Alembic environment drives the async engine with its own event loop, so from async code call
them through ``asyncio.to_thread``.

It must not import the chat service, the broker, STOMP or transport code.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from gateway.chat.repository import make_engine

#: The ``alembic/`` directory at the repository root (the package is installed in editable mode).
ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"

#: The PostgreSQL advisory lock key every node's migration run takes (a fixed 31-bit number).
MIGRATION_LOCK_KEY = zlib.crc32(b"chat-gateway:alembic-migrations") & 0x7FFFFFFF

#: Seconds a SQLite migration waits for another node's migration (or writer) to let go of the file.
MIGRATION_BUSY_TIMEOUT_S = 600.0

#: ``Config.attributes`` key through which the database URL reaches ``alembic/env.py``.
URL_ATTRIBUTE = "gateway_database_url"


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that leaves the process's logging alone."""
    if not (ALEMBIC_DIR / "env.py").is_file():
        raise RuntimeError(f"Alembic scripts not found at {ALEMBIC_DIR}")
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes[URL_ATTRIBUTE] = database_url
    return config


def _ensure_no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"gateway.chat.migrations.{name}() is synchronous; from async code call it via "
                       "asyncio.to_thread")


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database at ``database_url`` up to ``revision`` (default: the newest)."""
    _ensure_no_running_loop("upgrade")
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate the database at ``database_url`` down to ``revision`` (default: no tables at all)."""
    _ensure_no_running_loop("downgrade")
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest revision in ``alembic/versions``."""
    head = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_current_head()
    if head is None:
        raise RuntimeError("no Alembic revisions found")
    return head


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    _ensure_no_running_loop("current_revision")

    async def read() -> str | None:
        engine = make_engine(database_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision())
        finally:
            await engine.dispose()

    return asyncio.run(read())
