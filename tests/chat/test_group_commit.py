"""GroupCommitWriter on real SQLite files and real PostgreSQL databases.

Shows that concurrent saves share transactions (counted by the writer), that batches never exceed
``batch_max`` (the commit_batch_max setting), that a refused message or one the database rejects
fails only its own caller, that results arrive after the commit, and that stop() drains the queue.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.chat.group_commit import GroupCommitWriter, WriterClosedError
from gateway.chat.migrations import upgrade
from gateway.chat.models import MessageType, NewMessage, SaveResult
from gateway.chat.repository import ChatRepository, UnknownRoomError, make_engine


def talk(room_id: str, text: str, client_msg_id: str | None = None) -> NewMessage:
    return NewMessage(room_id=room_id, type=MessageType.TALK, sender="bob", message=text,
                      client_msg_id=client_msg_id)


async def test_concurrent_saves_share_transactions_and_each_caller_gets_its_row(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    writer = GroupCommitWriter(repo, batch_max=256)
    await writer.start()

    async def send(i: int) -> SaveResult:
        result = await writer.save(talk(room.room_id, f"msg {i}"))
        # The future resolves after COMMIT: another connection already sees the row.
        assert await repo.history(room.room_id, after_seq=result.message.seq - 1, limit=1) == [result.message]
        return result

    try:
        results = await asyncio.gather(*(send(i) for i in range(100)))
    finally:
        await writer.stop()
    assert [r.message.message for r in results] == [f"msg {i}" for i in range(100)]
    assert sorted(r.message.seq for r in results) == list(range(1, 101))
    stats = writer.stats
    assert stats.messages == 100
    assert stats.batches < 100 and stats.transactions == stats.batches
    assert stats.largest_batch > 1


async def test_batches_never_exceed_batch_max(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    writer = GroupCommitWriter(repo, batch_max=7)
    await writer.start()
    try:
        results = await asyncio.gather(*(writer.save(talk(room.room_id, str(i))) for i in range(50)))
    finally:
        await writer.stop()
    assert sorted(r.message.seq for r in results) == list(range(1, 51))
    assert writer.stats.largest_batch == 7  # all 50 were queued at once, so the limit was reached
    assert writer.stats.batches >= 8  # ceil(50 / 7)


async def test_unknown_room_fails_only_its_own_caller(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    writer = GroupCommitWriter(repo, batch_max=64)
    await writer.start()
    batch = [talk(room.room_id, f"ok {i}") for i in range(9)]
    batch.insert(4, talk("no-such-room", "lost"))
    try:
        outcomes = await asyncio.gather(*(writer.save(m) for m in batch), return_exceptions=True)
    finally:
        await writer.stop()
    assert isinstance(outcomes[4], UnknownRoomError)
    good = [o for o in outcomes if isinstance(o, SaveResult)]
    assert sorted(o.message.seq for o in good) == list(range(1, 10))
    assert writer.stats.batches == 1 and writer.stats.isolated_batches == 0


async def _install_boom_trigger(engine: AsyncEngine) -> None:
    """Make the database itself reject any message whose text is 'boom' (a real DB error)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER reject_boom BEFORE INSERT ON messages WHEN NEW.message = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'boom refused'); END")
        else:
            await conn.exec_driver_sql(
                "CREATE FUNCTION reject_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.message = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; RETURN NEW; END $$")
            await conn.exec_driver_sql(
                "CREATE TRIGGER reject_boom BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION reject_boom()")


async def test_a_message_the_database_rejects_fails_alone(repo: ChatRepository, engine: AsyncEngine) -> None:
    room = await repo.create_room("r")
    await _install_boom_trigger(engine)
    writer = GroupCommitWriter(repo, batch_max=64)
    await writer.start()
    batch = [talk(room.room_id, f"fine {i}") for i in range(6)]
    batch.insert(2, talk(room.room_id, "boom"))
    try:
        outcomes = await asyncio.gather(*(writer.save(m) for m in batch), return_exceptions=True)
    finally:
        await writer.stop()
    assert isinstance(outcomes[2], DBAPIError) and "boom refused" in str(outcomes[2])
    good = [o for o in outcomes if isinstance(o, SaveResult)]
    assert len(good) == 6
    assert [m.message for m in await repo.history(room.room_id)] == [f"fine {i}" for i in range(6)]
    assert sorted(o.message.seq for o in good) == list(range(1, 7))  # the failed batch left no gap
    stats = writer.stats
    assert stats.isolated_batches == 1 and stats.batches == 1 and stats.transactions == 1 + 7


async def test_duplicate_client_ids_in_one_group_commit(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    writer = GroupCommitWriter(repo, batch_max=64)
    await writer.start()
    try:
        results = await asyncio.gather(*(writer.save(talk(room.room_id, f"try {i}", "cid-1")) for i in range(5)))
        (later,) = await asyncio.gather(writer.save(talk(room.room_id, "again", "cid-1")))
    finally:
        await writer.stop()
    assert [r.duplicate for r in results] == [False, True, True, True, True]
    assert {r.message for r in results} == {results[0].message} and later.message == results[0].message
    assert later.duplicate
    assert [m.message for m in await repo.history(room.room_id)] == ["try 0"]


async def test_stop_drains_queued_saves_then_refuses_new_ones(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    writer = GroupCommitWriter(repo, batch_max=4)
    await writer.start()
    tasks = [asyncio.create_task(writer.save(talk(room.room_id, str(i)))) for i in range(30)]
    await asyncio.sleep(0)  # every task runs up to its await: all 30 are queued now
    await writer.stop()
    assert writer.stats.messages == 30  # every queued message was committed before stop returned
    results = await asyncio.gather(*tasks)
    assert sorted(r.message.seq for r in results) == list(range(1, 31))
    assert not writer.running
    with pytest.raises(WriterClosedError):
        await writer.save(talk(room.room_id, "late"))
    await writer.stop()  # idempotent
    assert await repo.last_seq(room.room_id) == 30


async def test_writer_lifecycle_errors(repo: ChatRepository) -> None:
    with pytest.raises(ValueError):
        GroupCommitWriter(repo, batch_max=0)
    writer = GroupCommitWriter(repo, batch_max=1)
    with pytest.raises(WriterClosedError):
        await writer.save(talk("r", "not started"))
    await writer.start()
    try:
        with pytest.raises(RuntimeError):
            await writer.start()
    finally:
        await writer.stop()


async def test_stop_with_timeout_fails_what_cannot_be_committed(tmp_path: Path) -> None:
    """A writer stuck behind another process's lock gives up at the stop timeout; callers learn it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'stuck.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url, busy_timeout_s=1)
    repo = ChatRepository(engine)
    room = await repo.create_room("r")
    holder = sqlite3.connect(tmp_path / "stuck.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    writer = GroupCommitWriter(repo, batch_max=2)
    await writer.start()
    try:
        tasks = [asyncio.create_task(writer.save(talk(room.room_id, str(i)))) for i in range(5)]
        await asyncio.sleep(0)
        await writer.stop(timeout=0.2)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, WriterClosedError) for o in outcomes)
    finally:
        holder.rollback()
        holder.close()
        await engine.dispose()
    check = make_engine(url)
    try:
        assert await ChatRepository(check).history(room.room_id) == []
    finally:
        await check.dispose()
