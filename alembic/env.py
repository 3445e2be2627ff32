"""Alembic environment for chat-gateway: SQLite (aiosqlite) and PostgreSQL (asyncpg).

The database URL comes from ``gateway.chat.migrations`` (``Config.attributes``), else the
GATEWAY_DATABASE_URL environment variable, else ``sqlalchemy.url`` in alembic.ini, else the gateway's
default. Migrations run on the gateway's async engine in ONE transaction that first takes the
cross-node migration lock (PostgreSQL advisory lock / SQLite ``BEGIN EXCLUSIVE``); see
``gateway/chat/migrations.py``. On SQLite, foreign keys are off while migrating (the table-rebuild
recipe needs it) and ``PRAGMA foreign_key_check`` must come back empty before commit.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from gateway.chat.migrations import MIGRATION_BUSY_TIMEOUT_S, MIGRATION_LOCK_KEY, URL_ATTRIBUTE
from gateway.chat.models import metadata
from gateway.chat.repository import SQLITE_BEGIN_OPTION, is_sqlite_url, make_engine
from gateway.settings import Settings

config = context.config

if config.config_file_name is not None and URL_ATTRIBUTE not in config.attributes:
    fileConfig(config.config_file_name)


def _database_url() -> str:
    url = config.attributes.get(URL_ATTRIBUTE) or os.environ.get("GATEWAY_DATABASE_URL") \
        or config.get_main_option("sqlalchemy.url")
    return str(url or Settings().database_url)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata,
        render_as_batch=is_sqlite_url(_database_url()),
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _migrate_locked(connection: sa.Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    _configure(connection=connection)
    with context.begin_transaction():  # the transaction is ours (see below): this one does nothing
        context.run_migrations()
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left rows violating foreign keys: {broken[:5]}")


async def run_migrations_online() -> None:
    engine = make_engine(_database_url(), busy_timeout_s=MIGRATION_BUSY_TIMEOUT_S, sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(**{SQLITE_BEGIN_OPTION: "EXCLUSIVE"})
            async with connection.begin():
                await connection.run_sync(_migrate_locked)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
