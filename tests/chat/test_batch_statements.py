"""The set-based batch save on real SQLite files and real PostgreSQL databases.

ChatRepository.save_batch costs a fixed number of SQL statements however many rooms a batch touches
(counted with a ``before_cursor_execute`` listener), keeps every room's seqs gap-free when three OS
processes hammer the same rooms, leaves nothing behind when the database fails the INSERT after the
counters were advanced, retries a batch that lost a client-id race to another node, (PostgreSQL)
locks the room rows in sorted order, and stores the next batch after PostgreSQL killed the pooled
connection (pool_pre_ping).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.chat.migrations import upgrade
from gateway.chat.models import MessageType, NewMessage, SaveResult, messages, rooms
from gateway.chat.repository import ChatRepository, UnknownRoomError, make_engine
from tests.support.polling import eventually
from tests.support.postgres import temporary_database

REPO_ROOT = Path(__file__).resolve().parents[2]

_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")


def talk(room_id: str, text: str, *, sender: str = "alice", client_msg_id: str | None = None) -> NewMessage:
    return NewMessage(room_id=room_id, type=MessageType.TALK, sender=sender, message=text,
                      client_msg_id=client_msg_id)


@contextmanager
def recorded_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement ``engine`` sends to the database meanwhile, BEGIN/COMMIT/ROLLBACK aside."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool) -> None:
        if not statement.lstrip().upper().startswith(_TRANSACTION_CONTROL):
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def room_state(engine: AsyncEngine) -> dict[str, tuple[int, list[int]]]:
    """room_id -> (rooms.last_seq, the room's stored seqs in order)."""
    async with engine.connect() as conn:
        counters = {row.room_id: int(row.last_seq)
                    for row in await conn.execute(sa.select(rooms.c.room_id, rooms.c.last_seq))}
        seqs: dict[str, list[int]] = {room_id: [] for room_id in counters}
        for row in await conn.execute(
                sa.select(messages.c.room_id, messages.c.seq).order_by(messages.c.room_id, messages.c.seq)):
            seqs[row.room_id].append(int(row.seq))
    return {room_id: (counters[room_id], seqs[room_id]) for room_id in counters}




@asynccontextmanager
async def migrated_postgres() -> AsyncIterator[str]:
    async with temporary_database() as url:
        await asyncio.to_thread(upgrade, url)
        yield url


# --- a constant number of statements per batch -----------------------------------------------------


async def test_a_batch_costs_the_same_statements_for_one_room_and_for_200_rooms(
        repo: ChatRepository, engine: AsyncEngine) -> None:
    many = [await repo.create_room(f"r{i}") for i in range(200)]
    one = many[0]
    (stored,) = await repo.save_messages([talk(one.room_id, "earlier", client_msg_id="old")])

    def batch(room_ids: list[str], tag: str, *, client_ids: bool) -> list[NewMessage]:
        out = [talk(room_ids[i % len(room_ids)], f"{tag}{i}",
                    client_msg_id=f"{tag}-{i}" if client_ids and i % 3 == 0 else None) for i in range(200)]
        if client_ids:  # a stored id, a repeat inside the batch and an unknown room cost nothing extra
            out += [talk(one.room_id, "again", client_msg_id="old"),
                    talk(room_ids[0], "repeat", client_msg_id=f"{tag}-0"), talk("no-such-room", "x")]
        return out

    counts: dict[str, int] = {}
    for name, room_ids, client_ids in [("one room", [one.room_id], True),
                                       ("200 rooms", [room.room_id for room in many], True),
                                       ("one room, no client ids", [one.room_id], False),
                                       ("200 rooms, no client ids", [room.room_id for room in many], False)]:
        tag = name.replace(" ", "").replace(",", "")
        with recorded_statements(engine) as statements:
            outcomes = await repo.save_batch(batch(room_ids, tag, client_ids=client_ids))
        counts[name] = len(statements)
        saved = [o for o in outcomes if isinstance(o, SaveResult)]
        assert len(saved) == (202 if client_ids else 200)
        if client_ids:
            assert outcomes[200] == SaveResult(message=stored.message, duplicate=True)
            assert outcomes[201] == SaveResult(message=saved[0].message, duplicate=True)
            assert isinstance(outcomes[202], UnknownRoomError)

    # client-id lookup + lock-and-advance + insert; without client ids the lookup is skipped.
    assert counts == {"one room": 3, "200 rooms": 3, "one room, no client ids": 2, "200 rooms, no client ids": 2}
    for last_seq, seqs in (await room_state(engine)).values():
        assert seqs == list(range(1, last_seq + 1))
    assert (await room_state(engine))[one.room_id][0] == 1 + 200 + 1 + 200 + 1


async def test_a_batch_past_sqlite_bind_limits_is_split_and_stored_whole(
        repo: ChatRepository, engine: AsyncEngine) -> None:
    """17,000 client ids need 34,000 lookup binds and 119,000 insert binds: SQLite splits the
    statements, PostgreSQL passes arrays and still runs three."""
    room_ids = [(await repo.create_room(f"r{i}")).room_id for i in range(200)]
    batch = [talk(room_ids[i % 200], f"m{i}", client_msg_id=f"c{i}") for i in range(17_000)]
    with recorded_statements(engine) as statements:
        outcomes = await repo.save_batch(batch)
    if engine.dialect.name == "postgresql":
        assert len(statements) == 3
    else:
        assert len(statements) > 3
    assert all(isinstance(o, SaveResult) and not o.duplicate for o in outcomes)
    assert [o.message.message for o in outcomes if isinstance(o, SaveResult)] == [m.message for m in batch]
    state = await room_state(engine)
    assert all(state[room_id] == (85, list(range(1, 86))) for room_id in room_ids)
    again = await repo.save_batch(batch[:100])  # every one found again by the split lookup
    assert all(isinstance(o, SaveResult) and o.duplicate for o in again)


# --- a real failure after the counters were advanced -----------------------------------------------


async def _install_boom_trigger(engine: AsyncEngine) -> None:
    """The database itself refuses any message sent by 'boom' (after the counter UPDATE ran)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages WHEN NEW.sender = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'boom refused'); END")
        else:
            await conn.exec_driver_sql(
                "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.sender = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; RETURN NEW; END $$")
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse_boom()")


async def test_a_failure_in_the_middle_of_a_batch_leaves_nothing_half_written(
        repo: ChatRepository, engine: AsyncEngine) -> None:
    room_ids = [(await repo.create_room(f"r{i}")).room_id for i in range(5)]
    await repo.save_batch([talk(room_id, "before") for room_id in room_ids])
    await _install_boom_trigger(engine)
    before = await room_state(engine)
    batch = [talk(room_ids[i % 5], f"m{i}", client_msg_id=f"c{i}" if i % 2 else None) for i in range(20)]
    batch.insert(11, talk(room_ids[2], "bad", sender="boom"))

    with recorded_statements(engine) as statements, pytest.raises(DBAPIError, match="boom refused"):
        await repo.save_batch(batch)
    # lookup, counters advanced, then the INSERT failed; a trigger's error is not retried.
    assert len(statements) == 3 and statements[2].lstrip().upper().startswith("INSERT")
    assert await room_state(engine) == before
    assert all(state == (1, [1]) for state in before.values())

    good = [message for message in batch if message.sender != "boom"]
    outcomes = await repo.save_batch(good)
    assert all(isinstance(o, SaveResult) and not o.duplicate for o in outcomes)
    for room_id, (last_seq, seqs) in (await room_state(engine)).items():
        assert last_seq == 5 and seqs == [1, 2, 3, 4, 5], room_id
    for message, outcome in zip(good, outcomes, strict=True):
        assert isinstance(outcome, SaveResult) and outcome.message.message == message.message


# --- three processes hammering the same 50 rooms ---------------------------------------------------

# A writer "node": its own engine; waits for "go" on stdin, then `tasks` tasks each save `batches`
# batches of random room subsets (1-3 messages per room, some with a client id shared by every node,
# some with its own client id, sometimes a message for a room that does not exist). Prints every
# outcome as JSON: [id, room_id, seq, duplicate, client_msg_id] or ["error", class name, room_id].
HAMMER_SCRIPT = r"""
import asyncio, json, random, sys
from gateway.chat.models import MessageType, NewMessage, SaveResult
from gateway.chat.repository import ChatRepository, make_engine

async def main(url, tag, tasks, batches, room_ids):
    engine = make_engine(url)
    repo = ChatRepository(engine)
    rng = random.Random(tag)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    report = []

    async def worker(t):
        for b in range(batches):
            batch = []
            for room_id in rng.sample(room_ids, rng.randint(1, len(room_ids))):
                for _ in range(rng.randint(1, 3)):
                    draw = rng.random()
                    cid = (f"shared-{rng.randrange(30)}" if draw < 0.2
                           else f"{tag}-{t}-{b}-{len(batch)}" if draw < 0.3 else None)
                    batch.append(NewMessage(room_id=room_id, type=MessageType.TALK, sender=tag,
                                            message=f"{tag}/{t}/{b}/{len(batch)}", client_msg_id=cid))
            if rng.random() < 0.2:
                batch.insert(rng.randrange(len(batch)), NewMessage(
                    room_id="no-such-room", type=MessageType.TALK, sender=tag, message="lost"))
            for message, outcome in zip(batch, await repo.save_batch(batch), strict=True):
                if isinstance(outcome, SaveResult):
                    m = outcome.message
                    assert (m.room_id, m.client_msg_id) == (message.room_id, message.client_msg_id)
                    report.append([m.id, m.room_id, m.seq, outcome.duplicate, m.client_msg_id])
                else:
                    report.append(["error", type(outcome).__name__, message.room_id])

    await asyncio.gather(*(worker(t) for t in range(tasks)))
    await engine.dispose()
    print(json.dumps(report), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")))
"""


@pytest.mark.timeout(900)
async def test_three_processes_hammering_50_rooms_keep_every_room_gap_free(
        repo: ChatRepository, engine: AsyncEngine, database_url: str) -> None:
    room_ids = [(await repo.create_room(f"r{i}")).room_id for i in range(50)]
    processes, tasks, batches = 3, 4, 12
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", HAMMER_SCRIPT, database_url, f"node{n}", str(tasks), str(batches), ",".join(room_ids),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT, limit=2**26)
        for n in range(processes)]
    reports: list[list[list[Any]]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 120) == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        for proc in procs:  # generous bound (loaded machines); PostgreSQL fails a deadlocked writer
            out, _ = await asyncio.wait_for(proc.communicate(), 600)
            assert proc.returncode == 0
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    outcomes = [entry for report in reports for entry in report]
    errors = [entry for entry in outcomes if entry[0] == "error"]
    assert errors and all(entry == ["error", "UnknownRoomError", "no-such-room"] for entry in errors)
    saved = [entry for entry in outcomes if entry[0] != "error"]
    new = [entry for entry in saved if not entry[3]]
    assert any(entry[3] for entry in saved)  # the shared client ids did produce duplicates

    state = await room_state(engine)
    assert set(state) == set(room_ids)
    for room_id, (last_seq, seqs) in state.items():
        assert seqs == list(range(1, last_seq + 1)), room_id  # gap-free, no duplicate seq
    assert sum(last_seq for last_seq, _ in state.values()) == len(new)  # rows == messages stored
    async with engine.connect() as conn:
        rows = {int(row.id): (row.room_id, int(row.seq), row.client_msg_id, row.sender)
                for row in await conn.execute(sa.select(messages))}
    assert {entry[0] for entry in new} == set(rows) and len(new) == len(rows)
    for row_id, room_id, seq, _duplicate, client_msg_id in saved:  # duplicates name the original row
        assert rows[row_id][:3] == (room_id, seq, client_msg_id)
    # Client ids are unique per (room, sender): each process (one sender) stored a shared id once per
    # room, and the processes' equal ids did not suppress each other.
    shared = [(room_id, sender, cid) for room_id, _, cid, sender in rows.values()
              if cid and cid.startswith("shared-")]
    assert len(shared) == len(set(shared))
    assert len({sender for _, sender, _ in shared}) == processes


# --- PostgreSQL: the client-id race between lookup and lock; the lock order -------------------------


async def _lock_waiters(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'")).scalar_one())


@pytest.mark.postgres
async def test_two_nodes_racing_on_one_client_id_store_it_once_after_a_retry() -> None:
    """Both nodes look the client id up (not there), then queue on the room's row lock; the second to
    get it hits the unique index, rolls back (its counters too) and retries: its lookup sees the row."""
    async with migrated_postgres() as url:
        node_a, node_b, admin = make_engine(url), make_engine(url), make_engine(url)
        try:
            repo_a, repo_b = ChatRepository(node_a), ChatRepository(node_b)
            room = await repo_a.create_room("contested")
            other = await repo_a.create_room("quiet")
            with recorded_statements(node_a) as seen_a, recorded_statements(node_b) as seen_b:
                async with admin.connect() as holder:
                    await holder.begin()
                    await holder.execute(sa.select(rooms.c.room_id).where(
                        rooms.c.room_id == room.room_id).with_for_update())
                    save_a = asyncio.create_task(repo_a.save_batch([
                        talk(other.room_id, "a elsewhere"), talk(room.room_id, "from a", client_msg_id="same")]))
                    save_b = asyncio.create_task(repo_b.save_batch([
                        talk(room.room_id, "from b", client_msg_id="same")]))
                    await eventually(lambda: _waiting(admin, 2), "both nodes wait for the room lock", timeout_s=60)
                    await holder.rollback()
                (quiet, a), (b,) = await asyncio.wait_for(asyncio.gather(save_a, save_b), 120)
            assert isinstance(quiet, SaveResult) and isinstance(a, SaveResult) and isinstance(b, SaveResult)
            assert sorted([a.duplicate, b.duplicate]) == [False, True]
            assert a.message == b.message and a.message.seq == 1
            assert not quiet.duplicate and quiet.message.seq == 1
            lookups = [s for s in seen_a + seen_b if s.lstrip().upper().startswith("SELECT")]
            assert len(lookups) == 3  # the loser looked up twice
            assert await repo_a.history(room.room_id) == [a.message]
            assert await repo_a.last_seq(room.room_id) == 1  # the loser's advance was rolled back
            assert await repo_a.history(other.room_id) == [quiet.message]
            assert await repo_a.last_seq(other.room_id) == 1
        finally:
            for engine in (node_a, node_b, admin):
                await engine.dispose()


async def _waiting(engine: AsyncEngine, count: int) -> bool:
    return await _lock_waiters(engine) >= count


@pytest.mark.postgres
async def test_postgres_locks_the_rooms_of_a_batch_in_sorted_order() -> None:
    """With the middle room of 200 held by another transaction, the batch holds exactly the rooms that
    sort before it and none after it (checked with SKIP LOCKED), whatever order the batch names them."""
    async with migrated_postgres() as url:
        engine, admin = make_engine(url), make_engine(url)
        try:
            repo = ChatRepository(engine)
            room_ids = [(await repo.create_room(f"r{i}")).room_id for i in range(200)]
            async with admin.connect() as conn:  # the database's collation decides the order
                ordered = list((await conn.execute(
                    sa.select(rooms.c.room_id).order_by(rooms.c.room_id))).scalars())
            held = ordered[100]
            async with admin.connect() as holder, admin.connect() as probe:
                await holder.begin()
                await holder.execute(sa.select(rooms.c.room_id).where(rooms.c.room_id == held).with_for_update())
                save = asyncio.create_task(repo.save_batch([talk(room_id, "x") for room_id in reversed(room_ids)]))
                await eventually(lambda: _waiting(admin, 1), "the batch waits for the held room", timeout_s=60)
                await probe.begin()
                free = (await probe.execute(
                    sa.select(rooms.c.room_id).where(rooms.c.room_id != held)
                    .with_for_update(skip_locked=True))).scalars().all()
                await probe.rollback()
                assert set(free) == set(ordered[101:])  # locked: ordered[:100]; not yet: everything after
                await holder.rollback()
                outcomes = await asyncio.wait_for(save, 120)
            assert all(isinstance(o, SaveResult) and o.message.seq == 1 for o in outcomes)
        finally:
            await engine.dispose()
            await admin.dispose()


@pytest.mark.postgres
async def test_a_batch_after_postgres_killed_the_pooled_connections_is_stored() -> None:
    """pool_pre_ping (kept on purpose): a pooled connection whose backend is gone (a PostgreSQL restart,
    an idle-session kill) is replaced at checkout, so the next batch, even a batch of one message,
    which the group commit cannot retry alone, is stored instead of failing."""
    async with migrated_postgres() as url:
        engine, admin = make_engine(url), make_engine(url)
        try:
            repo = ChatRepository(engine)
            room = await repo.create_room("r")
            await repo.save_batch([talk(room.room_id, "before")])
            async with engine.connect() as conn:  # the pooled connection the next batch would reuse
                pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
            async with admin.connect() as conn:
                assert (await conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")).scalar_one()

            async def gone() -> bool:
                async with admin.connect() as conn:
                    return not (await conn.exec_driver_sql(
                        f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(pid)}")).scalar_one()

            await eventually(gone, "the backend is gone", timeout_s=60)
            (outcome,) = await repo.save_batch([talk(room.room_id, "after", client_msg_id="a")])
            assert isinstance(outcome, SaveResult) and outcome.message.seq == 2
            assert [m.message for m in await repo.history(room.room_id)] == ["before", "after"]
        finally:
            await engine.dispose()
            await admin.dispose()
