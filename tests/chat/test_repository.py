"""ChatRepository on real SQLite files and real PostgreSQL databases (every test runs on both).

Covers rooms, per-room sequence numbers (also with several OS processes and many tasks writing into
one room at once), client message id dedupe (also concurrent), history paging and the engine set-up
(WAL, busy timeout, foreign keys).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.chat.migrations import upgrade
from gateway.chat.models import MessageType, NewMessage, SaveResult, messages
from gateway.chat.repository import (
    ChatRepository,
    InvalidMessageError,
    UnknownRoomError,
    make_engine,
)
from gateway.settings import SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def talk(room_id: str, text: str, *, sender: str = "alice", client_msg_id: str | None = None) -> NewMessage:
    return NewMessage(room_id=room_id, type=MessageType.TALK, sender=sender, message=text,
                      client_msg_id=client_msg_id)


async def all_seqs(engine: AsyncEngine, room_id: str) -> list[int]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(messages.c.seq).where(messages.c.room_id == room_id).order_by(messages.c.seq))
        return [int(seq) for seq in result.scalars()]


# --- rooms ------------------------------------------------------------------------------------------


async def test_create_room_has_java_style_uuid_and_round_trips(repo: ChatRepository) -> None:
    before = datetime.now(UTC)
    room = await repo.create_room("일반 채팅")
    parsed = uuid.UUID(room.room_id)
    assert str(parsed) == room.room_id and len(room.room_id) == 36 and parsed.version == 4
    assert room.created_at.tzinfo is not None and room.created_at.utcoffset() == timedelta(0)
    assert before <= room.created_at <= datetime.now(UTC)
    assert await repo.get_room(room.room_id) == room
    assert await repo.get_room(str(uuid.uuid4())) is None
    assert await repo.last_seq(room.room_id) == 0
    assert await repo.last_seq("no-such-room") is None


async def test_list_rooms_returns_every_room_oldest_first(repo: ChatRepository) -> None:
    assert await repo.list_rooms() == []
    created = [await repo.create_room(f"room {i}") for i in range(3)]
    assert await repo.list_rooms() == created


async def test_duplicate_room_id_is_rejected(repo: ChatRepository) -> None:
    room = await repo.create_room("a")
    with pytest.raises(IntegrityError):
        await repo.create_room("b", room_id=room.room_id)
    assert await repo.list_rooms() == [room]


# --- saving and sequence numbers -------------------------------------------------------------------


async def test_seq_is_per_room_and_ids_are_global(repo: ChatRepository) -> None:
    a = await repo.create_room("a")
    b = await repo.create_room("b")
    results: list[SaveResult] = []
    for i in range(4):
        results += await repo.save_messages([talk(a.room_id, f"a{i}"), talk(b.room_id, f"b{i}")])
    by_room: dict[str, list[int]] = {a.room_id: [], b.room_id: []}
    for result in results:
        assert not result.duplicate
        by_room[result.message.room_id].append(result.message.seq)
    assert by_room == {a.room_id: [1, 2, 3, 4], b.room_id: [1, 2, 3, 4]}
    ids = [result.message.id for result in results]
    assert len(set(ids)) == 8
    batches = [sorted(ids[i:i + 2]) for i in range(0, 8, 2)]
    assert all(earlier[-1] < later[0] for earlier, later in pairwise(batches))
    assert await repo.last_seq(a.room_id) == 4


async def test_stored_message_round_trips_every_field(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    stamp = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    new = NewMessage(room_id=room.room_id, type=MessageType.ENTER, sender="[알림]",
                     message="happydaddy님이 방에 입장했습니다. 🎉 \"quoted\" 'single'",
                     client_msg_id="c-1", created_at=stamp)
    (result,) = await repo.save_messages([new])
    stored = result.message
    assert (stored.room_id, stored.seq, stored.type, stored.sender, stored.message, stored.created_at,
            stored.client_msg_id) == (room.room_id, 1, MessageType.ENTER, new.sender, new.message, stamp, "c-1")
    assert await repo.history(room.room_id) == [stored]


async def test_created_at_defaults_to_now_in_utc(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    before = datetime.now(UTC)
    (result,) = await repo.save_messages([talk(room.room_id, "hi")])
    (read_back,) = await repo.history(room.room_id)
    assert before <= result.message.created_at <= datetime.now(UTC)
    assert read_back.created_at == result.message.created_at
    assert read_back.created_at.utcoffset() == timedelta(0)


async def test_save_messages_is_atomic_and_raises_for_an_unknown_room(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    with pytest.raises(UnknownRoomError) as caught:
        await repo.save_messages([talk(room.room_id, "ok"), talk("missing-room", "bad")])
    assert caught.value.room_id == "missing-room"
    assert await repo.history(room.room_id) == []
    assert await repo.last_seq(room.room_id) == 0
    (result,) = await repo.save_messages([talk(room.room_id, "next")])
    assert result.message.seq == 1  # the rolled-back batch left no gap


async def test_save_batch_refuses_bad_messages_one_by_one(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    naive = NewMessage(room_id=room.room_id, type=MessageType.TALK, sender="a", message="x",
                       created_at=datetime(2024, 1, 1))
    bad_type = NewMessage(room_id=room.room_id, type="SHOUT", sender="a", message="x")  # type: ignore[arg-type]
    outcomes = await repo.save_batch([talk(room.room_id, "one"), talk("nope", "x"), naive, bad_type,
                                      talk(room.room_id, "two")])
    assert isinstance(outcomes[1], UnknownRoomError)
    assert isinstance(outcomes[2], InvalidMessageError)
    assert isinstance(outcomes[3], InvalidMessageError)
    good = [outcome for outcome in outcomes if isinstance(outcome, SaveResult)]
    assert [(r.message.message, r.message.seq) for r in good] == [("one", 1), ("two", 2)]
    assert [m.message for m in await repo.history(room.room_id)] == ["one", "two"]


async def test_batch_over_several_rooms_keeps_each_room_gap_free(repo: ChatRepository) -> None:
    rooms_ = [await repo.create_room(f"r{i}") for i in range(3)]
    batch = [talk(rooms_[i % 3].room_id, f"m{i}") for i in range(30)]
    results = await repo.save_messages(batch)
    assert [r.message.message for r in results] == [m.message for m in batch]
    for room in rooms_:
        assert [r.message.seq for r in results if r.message.room_id == room.room_id] == list(range(1, 11))


async def test_database_enforces_unique_room_seq_and_foreign_key(repo: ChatRepository, engine: AsyncEngine) -> None:
    room = await repo.create_room("r")
    (first,) = await repo.save_messages([talk(room.room_id, "x")])
    row = {"room_id": room.room_id, "seq": first.message.seq, "type": "TALK", "sender": "a", "message": "dup",
           "created_at": datetime.now(UTC)}
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(sa.insert(messages).values(**row))
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(sa.insert(messages).values(**{**row, "room_id": "no-room", "seq": 1}))
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(sa.insert(messages).values(**{**row, "seq": 2, "type": "SHOUT"}))


# --- client message id dedupe ----------------------------------------------------------------------


async def test_client_msg_id_returns_the_original_row(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    other = await repo.create_room("other")
    (first,) = await repo.save_messages([talk(room.room_id, "hello", client_msg_id="m-1")])
    (again,) = await repo.save_messages([talk(room.room_id, "hello, edited", client_msg_id="m-1")])
    assert not first.duplicate and again.duplicate
    assert again.message == first.message and again.message.message == "hello"
    (elsewhere,) = await repo.save_messages([talk(other.room_id, "hello", client_msg_id="m-1")])
    assert not elsewhere.duplicate and elsewhere.message.seq == 1  # unique per room only
    nones = await repo.save_messages([talk(room.room_id, "a"), talk(room.room_id, "a")])
    assert [r.duplicate for r in nones] == [False, False]  # no client id: never deduped
    assert await repo.last_seq(room.room_id) == 3
    assert [m.message for m in await repo.history(room.room_id)] == ["hello", "a", "a"]


async def test_client_msg_id_repeated_inside_one_batch(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    results = await repo.save_messages([talk(room.room_id, "x", client_msg_id="k"),
                                        talk(room.room_id, "y"),
                                        talk(room.room_id, "x again", client_msg_id="k")])
    assert [r.duplicate for r in results] == [False, False, True]
    assert results[2].message == results[0].message
    assert [(m.seq, m.message) for m in await repo.history(room.room_id)] == [(1, "x"), (2, "y")]


async def test_concurrent_saves_of_one_client_msg_id_store_it_once(repo: ChatRepository) -> None:
    room = await repo.create_room("r")

    async def send(i: int) -> SaveResult:
        (result,) = await repo.save_messages([talk(room.room_id, f"try {i}", client_msg_id="same")])
        return result

    results = await asyncio.gather(*(send(i) for i in range(20)))
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.message for r in results}) == 1
    assert await all_seqs(repo.engine, room.room_id) == [1]


# --- history ---------------------------------------------------------------------------------------


async def test_history_pages_by_after_seq_and_limit(repo: ChatRepository) -> None:
    room = await repo.create_room("r")
    other = await repo.create_room("o")
    await repo.save_messages([talk(room.room_id, f"m{i}") for i in range(1, 26)])
    await repo.save_messages([talk(other.room_id, "not mine")])
    pages: list[list[int]] = []
    after = 0
    while page := await repo.history(room.room_id, after_seq=after, limit=10):
        pages.append([m.seq for m in page])
        after = page[-1].seq
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert [m.message for m in await repo.history(room.room_id, after_seq=24)] == ["m25"]
    assert await repo.history(room.room_id, after_seq=25) == []
    assert await repo.history("unknown") == []
    assert [m.seq for m in await repo.recent(room.room_id, limit=3)] == [23, 24, 25]
    assert [m.seq for m in await repo.recent(room.room_id, limit=100)] == list(range(1, 26))
    with pytest.raises(ValueError):
        await repo.history(room.room_id, limit=0)
    with pytest.raises(ValueError):
        await repo.recent(room.room_id, limit=0)


# --- concurrency: several processes and many tasks --------------------------------------------------

# A writer process: waits for "go" on stdin, then saves into one room from `tasks` tasks through
# save_messages (one transaction each) and `tasks` tasks through a GroupCommitWriter, plus one task
# that saves the client ids shared-0..shared-{n-1} which every process also sends.
WRITER_SCRIPT = r"""
import asyncio, sys
from gateway.chat.group_commit import GroupCommitWriter
from gateway.chat.migrations import upgrade
from gateway.chat.models import MessageType, NewMessage
from gateway.chat.repository import ChatRepository, make_engine

async def main(url, room_id, tag, tasks, per_task, shared):
    engine = make_engine(url)
    repo = ChatRepository(engine)
    writer = GroupCommitWriter(repo, batch_max=8)
    await writer.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    def msg(text, cid=None, sender=tag):
        return NewMessage(room_id=room_id, type=MessageType.TALK, sender=sender, message=text, client_msg_id=cid)

    async def direct(t):
        for i in range(per_task):
            await repo.save_messages([msg(f"{tag}/d{t}/{i:04d}")])

    async def grouped(t):
        for i in range(per_task):
            await writer.save(msg(f"{tag}/g{t}/{i:04d}"))

    async def shared_ids():
        for i in range(shared):
            # One sender for the shared ids: client ids are unique per (room, sender, id).
            await writer.save(msg(f"shared-{i} from {tag}", f"shared-{i}", sender="shared"))

    await asyncio.gather(*(direct(t) for t in range(tasks)), *(grouped(t) for t in range(tasks)), shared_ids())
    await writer.stop()
    await engine.dispose()
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])))
"""


async def test_processes_and_tasks_writing_one_room_get_gap_free_unique_seqs(
        repo: ChatRepository, database_url: str) -> None:
    room = await repo.create_room("busy")
    processes, tasks, per_task, shared = 3, 4, 8, 6
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER_SCRIPT, database_url, room.room_id, f"p{n}",
        str(tasks), str(per_task), str(shared),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
        for n in range(processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()

        async def local(t: int) -> None:  # this process writes too, at the same time
            for i in range(per_task):
                await repo.save_messages([talk(room.room_id, f"local/d{t}/{i:04d}"),
                                          talk(room.room_id, f"local/d{t}/{i:04d}b")])

        await asyncio.gather(*(local(t) for t in range(tasks)))
        for proc in procs:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0 and out == b"done\n"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    expected = processes * (2 * tasks * per_task) + tasks * per_task * 2 + shared
    stored = await repo.history(room.room_id, limit=10 * expected)
    assert [m.seq for m in stored] == list(range(1, expected + 1))  # gap-free, unique, ordered
    assert await repo.last_seq(room.room_id) == expected
    assert sorted(m.client_msg_id for m in stored if m.client_msg_id) == sorted(
        f"shared-{i}" for i in range(shared))  # each shared id stored once although sent 3 times
    # Each task saved one message after another, so its messages' seqs must increase in send order.
    by_task: dict[str, list[tuple[str, int]]] = {}
    for m in stored:
        if m.client_msg_id is None:
            prefix, _, index = m.message.rpartition("/")
            by_task.setdefault(prefix, []).append((index, m.seq))
    assert len(by_task) == processes * 2 * tasks + tasks
    for entries in by_task.values():
        assert [seq for _, seq in sorted(entries)] == sorted(seq for _, seq in entries)


# --- engine set-up ---------------------------------------------------------------------------------


async def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", busy_timeout_s=7.5)
    try:
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 7500
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await engine.dispose()


def test_busy_timeout_setting_must_be_positive() -> None:
    assert load_settings(environ={"GATEWAY_DB_BUSY_TIMEOUT_S": "2.5"}).db_busy_timeout_s == 2.5
    with pytest.raises(SettingsError, match="db_busy_timeout_s"):
        load_settings(environ={"GATEWAY_DB_BUSY_TIMEOUT_S": "0"})


def test_make_engine_refuses_other_drivers() -> None:
    for url in ("sqlite:///x.db", "postgresql+psycopg2://u@127.0.0.1/db", "mysql+aiomysql://u@127.0.0.1/db"):
        with pytest.raises(ValueError):
            make_engine(url)


async def test_sqlite_writer_waits_for_another_process_lock_up_to_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    database_url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, database_url)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # as another process's writer would
    impatient = make_engine(database_url, busy_timeout_s=0.05)
    patient = make_engine(database_url, busy_timeout_s=60)
    try:
        with pytest.raises(OperationalError, match="locked"):
            await ChatRepository(impatient).create_room("blocked")
        waiting = asyncio.create_task(ChatRepository(patient).create_room("waits"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        holder.rollback()
        room = await asyncio.wait_for(waiting, 60)
        assert [r.name for r in await ChatRepository(patient).list_rooms()] == [room.name]
    finally:
        holder.close()
        await impatient.dispose()
        await patient.dispose()
