"""Schema migrations: run the Alembic scripts (the repository's ``alembic/``) programmatically.

Owns :func:`upgrade` (what ``chat-gateway migrate`` and ``make run`` call), :func:`downgrade`,
:func:`current_revision`, :func:`head_revision`, :func:`schema_problem` (is a database at head?) and
the cross-node migration lock:

* PostgreSQL: the migrating transaction first takes ``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``;
  a second node blocks there until the first commits, then finds the schema at head and does nothing.
* SQLite: the migrating transaction starts with ``BEGIN EXCLUSIVE`` (after ``busy_timeout``), which
  serialises migrating processes on the database file the same way.

All migrations of one run happen in that one locked transaction (DDL is transactional on both
backends), so a failed run leaves the schema as it was. The functions are synchronous (for the CLI);
the Alembic environment drives the async engine with its own event loop, so from async code call
them through ``asyncio.to_thread``. :func:`schema_problem` is the async exception: it reads the
revision on a caller's engine (``chat-gateway check``, the chat layer's start-up).

The scripts are found by :func:`gateway.resource_dir`: package data in an installed wheel, the
repository's top-level ``alembic/`` in a checkout.

It must not import the chat service, the broker, STOMP or transport code.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import resource_dir
from gateway.chat.repository import make_engine

#: The table in which Alembic records a database's revision.
VERSION_TABLE = "alembic_version"

#: The PostgreSQL advisory lock key every node's migration run takes (a fixed 31-bit number).
MIGRATION_LOCK_KEY = zlib.crc32(b"chat-gateway:alembic-migrations") & 0x7FFFFFFF

#: Seconds a SQLite migration waits for another node's migration (or writer) to let go of the file.
MIGRATION_BUSY_TIMEOUT_S = 600.0

#: ``Config.attributes`` key through which the database URL reaches ``alembic/env.py``.
URL_ATTRIBUTE = "gateway_database_url"


def alembic_dir() -> Path:
    """The Alembic scripts: ``gateway/_data/alembic`` in a wheel, the repository's ``alembic/`` in a checkout."""
    try:
        directory = resource_dir("alembic")
    except FileNotFoundError as exc:
        raise RuntimeError(str(exc)) from None
    if not (directory / "env.py").is_file():
        raise RuntimeError(f"Alembic scripts not found at {directory}")
    return directory


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that leaves the process's logging alone."""
    config = Config()
    config.set_main_option("script_location", str(alembic_dir()))
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


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://"))


def head_revision() -> str:
    """The newest revision in ``alembic/versions``."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError("no Alembic revisions found")
    return head


def _database_revisions(sync_conn: sa.Connection) -> tuple[bool, tuple[str, ...]]:
    """(whether the version table exists, the revisions recorded in it)."""
    if not sa.inspect(sync_conn).has_table(VERSION_TABLE):
        return False, ()
    return True, tuple(MigrationContext.configure(sync_conn).get_current_heads())


async def schema_problem(engine: AsyncEngine) -> str | None:
    """What keeps the database behind ``engine`` from being at this gateway's head revision, or None.

    Compares the Alembic revision recorded in the database with the newest script shipped with this
    gateway; the answer is one line naming the fix, e.g. ``revision 0001 is not head 0002: run
    `chat-gateway migrate```. Does not migrate anything. Connection failures (unreachable server,
    bad credentials) propagate as the driver's / SQLAlchemy's exceptions; bound them with a timeout.
    """
    async with engine.connect() as conn:
        has_table, current = await conn.run_sync(_database_revisions)
    scripts = _scripts()
    heads = tuple(scripts.get_heads())
    head = ", ".join(heads) or "(none)"
    if not has_table:
        return (f"no {VERSION_TABLE} table: the database was never migrated (head is {head}): "
                "run `chat-gateway migrate`")
    if not current:
        return f"no revision recorded in {VERSION_TABLE} (head is {head}): run `chat-gateway migrate`"
    if set(current) == set(heads):
        return None
    recorded = ", ".join(current)
    for revision in current:
        try:
            known = scripts.get_revision(revision) is not None
        except CommandError:
            known = False
        if not known:
            return (f"revision {recorded} is unknown to this chat-gateway (head is {head}): a newer release "
                    "migrated the database; run that release, or downgrade the database with it")
    return f"revision {recorded} is not head {head}: run `chat-gateway migrate`"


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
