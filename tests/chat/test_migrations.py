"""The Alembic migrations on real SQLite files and real PostgreSQL databases (each test on both).

upgrade -> downgrade -> upgrade, the migrated schema equals gateway.chat.models (Alembic's own
autogenerate comparison finds nothing to do), several processes migrating one fresh database at the
same moment, and a migration waiting for the cross-node lock held by someone else.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.chat.migrations import MIGRATION_LOCK_KEY, current_revision, downgrade, head_revision, upgrade
from gateway.chat.models import MessageType, NewMessage, metadata
from gateway.chat.repository import ChatRepository, make_engine
from tests.support.postgres import ADMIN_URL

REPO_ROOT = Path(__file__).resolve().parents[2]


def _describe(sync_conn: sa.Connection) -> dict[str, Any]:
    inspector = sa.inspect(sync_conn)
    tables = set(inspector.get_table_names())
    described: dict[str, Any] = {"tables": tables}
    if "messages" in tables:
        described["message_indexes"] = {ix["name"]: (ix["column_names"], bool(ix["unique"]))
                                        for ix in inspector.get_indexes("messages")}
        described["message_uniques"] = {uc["name"]: uc["column_names"]
                                        for uc in inspector.get_unique_constraints("messages")}
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True,
                                                              "compare_server_default": True})
        described["diff"] = compare_metadata(context, metadata)
    if "alembic_version" in tables:
        described["versions"] = [row[0] for row in sync_conn.execute(sa.text("SELECT version_num FROM alembic_version"))]
    return described


async def describe(url: str) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_describe)
    finally:
        await engine.dispose()


def assert_at_head(described: dict[str, Any]) -> None:
    assert described["tables"] == {"alembic_version", "rooms", "messages", "room_members", "gateway_nodes"}
    assert described["versions"] == [head_revision()]
    assert described["diff"] == []  # the migrated schema is exactly gateway.chat.models
    assert described["message_indexes"]["uq_messages_room_sender_client_msg_id"] == (
        ["room_id", "sender", "client_msg_id"], True)
    assert described["message_uniques"]["uq_messages_room_seq"] == ["room_id", "seq"]


async def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    url = empty_database_url
    assert await asyncio.to_thread(current_revision, url) is None
    await asyncio.to_thread(upgrade, url)
    assert await asyncio.to_thread(current_revision, url) == head_revision()
    assert_at_head(await describe(url))

    engine = make_engine(url)
    try:
        room = await ChatRepository(engine).create_room("before downgrade")
        await ChatRepository(engine).save_messages([NewMessage(room.room_id, MessageType.TALK, "a", "x")])
    finally:
        await engine.dispose()

    await asyncio.to_thread(downgrade, url)
    assert await asyncio.to_thread(current_revision, url) is None
    described = await describe(url)
    assert described["tables"] <= {"alembic_version"} and described.get("versions", []) == []

    await asyncio.to_thread(upgrade, url)
    assert_at_head(await describe(url))
    engine = make_engine(url)
    try:
        repo = ChatRepository(engine)
        assert await repo.list_rooms() == []
        room = await repo.create_room("after")
        (result,) = await repo.save_messages([NewMessage(room.room_id, MessageType.TALK, "a", "y")])
        assert result.message.seq == 1
    finally:
        await engine.dispose()


async def test_gateway_nodes_down_to_0002_and_up_again(database_url: str) -> None:
    """Migration 0003 adds only gateway_nodes; its downgrade drops only that (rooms survive)."""
    engine = make_engine(database_url)
    try:
        room = await ChatRepository(engine).create_room("kept")
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO gateway_nodes (node_id, incarnation, redis, channel_mode, channel_prefix, "
                "single_channel, sharded_pubsub, payload, started_at, last_seen) VALUES "
                "('n', 'i', NULL, 'room', '', 'chatroom', false, 'spring', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    finally:
        await engine.dispose()
    await asyncio.to_thread(downgrade, database_url, "0002")
    described = await describe(database_url)
    assert described["tables"] == {"alembic_version", "rooms", "messages", "room_members"}
    assert described["versions"] == ["0002"]
    await asyncio.to_thread(upgrade, database_url)
    assert_at_head(await describe(database_url))
    engine = make_engine(database_url)
    try:
        assert [r.room_id for r in await ChatRepository(engine).list_rooms()] == [room.room_id]
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT count(*) FROM gateway_nodes"))).scalar_one() == 0
    finally:
        await engine.dispose()


async def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)
    assert_at_head(await describe(database_url))


# Waits for "go" on stdin (so the processes start migrating together), then migrates.
MIGRATE_SCRIPT = r"""
import sys
from gateway.chat.migrations import upgrade
print("ready", flush=True)
sys.stdin.readline()
upgrade(sys.argv[1])
print("migrated", flush=True)
"""


async def test_concurrent_upgrades_from_several_processes(empty_database_url: str) -> None:
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", MIGRATE_SCRIPT, empty_database_url, cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        for proc in procs:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
            assert out == b"migrated\n"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert_at_head(await describe(empty_database_url))


async def test_upgrade_waits_for_the_migration_lock(empty_database_url: str) -> None:
    url = empty_database_url
    release: Any
    if url.startswith("sqlite"):
        holder = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None, check_same_thread=False)
        holder.execute("PRAGMA journal_mode = WAL")
        holder.execute("BEGIN EXCLUSIVE")  # what another node's migration holds

        async def release() -> None:
            holder.rollback()
            holder.close()
    else:
        database = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + database)
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)

        async def release() -> None:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            await conn.close()

    migrating = asyncio.create_task(asyncio.to_thread(upgrade, url))
    try:
        await asyncio.sleep(0.5)
        assert not migrating.done()  # blocked on the lock, not failed and not finished
    finally:
        await release()
    await asyncio.wait_for(migrating, 60)
    assert_at_head(await describe(url))


def test_alembic_command_line_reads_gateway_database_url(tmp_path: Path) -> None:
    import subprocess

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "GATEWAY_DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert current_revision(url) == head_revision()


async def test_sync_functions_refuse_to_run_inside_an_event_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="to_thread"):
        upgrade(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert not (tmp_path / "x.db").exists()
