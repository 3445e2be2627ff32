"""Chat storage: the async engine set-up and :class:`ChatRepository` (rooms, messages, history).

Owns every SQL statement the gateway runs against ``rooms`` and ``messages`` and how a transaction is
opened on each backend:

* :func:`make_engine` builds an ``AsyncEngine`` for ``sqlite+aiosqlite://`` (WAL journal, a busy
  timeout so several processes can share the file, foreign keys on, and SQLAlchemy-controlled
  ``BEGIN`` statements) or ``postgresql+asyncpg://`` (pre-ping).
* :func:`write_transaction` opens a write transaction: on SQLite it starts with ``BEGIN IMMEDIATE``
  so the write lock is taken up front (no deadlock between two deferred readers upgrading), on
  PostgreSQL a plain transaction in which the room counter rows are locked ``FOR UPDATE``.
* Sequence numbers come from ``rooms.last_seq``: the inserting transaction locks the room row, reads
  the counter, inserts the messages with the next numbers and writes the counter back, all before
  commit. A rolled-back transaction rolls the counter back too, so numbers are gap-free; rooms are
  locked in sorted order so two multi-room batches cannot deadlock.

It must not import the chat service, the broker, STOMP or transport code; the group commit lives in
``gateway.chat.group_commit`` and builds on :meth:`ChatRepository.save_batch`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.chat.models import (
    MessageType,
    NewMessage,
    Room,
    SaveResult,
    StoredMessage,
    messages,
    rooms,
)

#: Seconds a SQLite connection waits for another connection's (or process's) write lock.
DEFAULT_BUSY_TIMEOUT_S = 30.0

#: Execution option read by the SQLite ``begin`` hook: the ``BEGIN`` flavour of the next transaction.
SQLITE_BEGIN_OPTION = "gateway_sqlite_begin"

_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})

# Client message ids looked up per statement; well under SQLite's and PostgreSQL's bind limits.
_LOOKUP_CHUNK = 500


class StorageError(Exception):
    """A message or room the storage layer refuses; carries no database details."""


class UnknownRoomError(StorageError):
    """The message names a room that does not exist."""

    def __init__(self, room_id: str) -> None:
        super().__init__(f"unknown room {room_id!r}")
        self.room_id = room_id


class InvalidMessageError(StorageError):
    """The message cannot be stored as given (bad type, naive timestamp, ...)."""


def is_sqlite_url(database_url: str) -> bool:
    return make_url(database_url).get_backend_name() == "sqlite"


def make_engine(database_url: str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
                sqlite_foreign_keys: bool = True, echo: bool = False) -> AsyncEngine:
    """Create the async engine for ``database_url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    SQLite connections get ``PRAGMA busy_timeout``, ``journal_mode=WAL`` and ``foreign_keys`` (turned
    off only by the migration runner, as SQLite's table-rebuild recipe requires), and the driver's
    own transaction handling is replaced by explicit ``BEGIN`` statements chosen per connection with
    the :data:`SQLITE_BEGIN_OPTION` execution option (default ``DEFERRED``; writers use
    :func:`write_transaction`, which asks for ``IMMEDIATE``).
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.get_driver_name() != "aiosqlite":
            raise ValueError(f"SQLite URLs must use the aiosqlite driver (sqlite+aiosqlite://), got {url.drivername}")
        if busy_timeout_s < 0:
            raise ValueError("busy_timeout_s must not be negative")
        engine = create_async_engine(url, echo=echo)
        _install_sqlite_hooks(engine, busy_timeout_ms=int(busy_timeout_s * 1000),
                              foreign_keys=sqlite_foreign_keys)
        return engine
    if backend == "postgresql":
        if url.get_driver_name() != "asyncpg":
            raise ValueError(
                f"PostgreSQL URLs must use the asyncpg driver (postgresql+asyncpg://), got {url.drivername}")
        return create_async_engine(url, echo=echo, pool_pre_ping=True)
    raise ValueError(f"unsupported database URL backend {backend!r} (sqlite+aiosqlite or postgresql+asyncpg)")


def _install_sqlite_hooks(engine: AsyncEngine, *, busy_timeout_ms: int, foreign_keys: bool) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (below) instead of the driver's implicit deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            # FULL: a committed group of messages survives power loss before it is published.
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        mode = str(connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")).upper()
        if mode not in _SQLITE_BEGIN_MODES:
            raise ValueError(f"{SQLITE_BEGIN_OPTION} must be one of {sorted(_SQLITE_BEGIN_MODES)}")
        connection.exec_driver_sql(f"BEGIN {mode}")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine, *, sqlite_begin: str = "IMMEDIATE") -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that will write; commits on success, rolls back on error."""
    async with engine.connect() as conn:
        await conn.execution_options(**{SQLITE_BEGIN_OPTION: sqlite_begin})
        async with conn.begin():
            yield conn


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _chunks(values: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _check(message: NewMessage) -> StorageError | None:
    """Per-message checks that must reject one message without failing its batch."""
    try:
        MessageType(message.type)
    except ValueError:
        return InvalidMessageError(f"unknown message type {message.type!r}")
    if not isinstance(message.room_id, str) or not message.room_id:
        return InvalidMessageError("room_id must be a non-empty string")
    if not isinstance(message.sender, str) or not isinstance(message.message, str):
        return InvalidMessageError("sender and message must be strings")
    if message.client_msg_id is not None and (not isinstance(message.client_msg_id, str)
                                              or not message.client_msg_id):
        return InvalidMessageError("client_msg_id must be a non-empty string or None")
    if message.created_at is not None and message.created_at.tzinfo is None:
        return InvalidMessageError("created_at must be timezone-aware")
    return None


class ChatRepository:
    """Rooms and messages on one engine. Safe to share between tasks; every call is its own transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    # --- rooms ----------------------------------------------------------------------------------

    async def create_room(self, name: str, *, room_id: str | None = None) -> Room:
        """Insert a room; its id is a random UUID string (Java's ``UUID.randomUUID().toString()``)."""
        room = Room(room_id=room_id or str(uuid.uuid4()), name=name, created_at=_utcnow())
        async with write_transaction(self._engine) as conn:
            await conn.execute(sa.insert(rooms).values(
                room_id=room.room_id, name=room.name, created_at=room.created_at, last_seq=0))
        return room

    async def list_rooms(self) -> list[Room]:
        """Every room, oldest first."""
        query = sa.select(rooms.c.room_id, rooms.c.name, rooms.c.created_at).order_by(
            rooms.c.created_at, rooms.c.room_id)
        async with self._engine.connect() as conn:
            result = await conn.execute(query)
            return [Room(room_id=row.room_id, name=row.name, created_at=row.created_at) for row in result]

    async def get_room(self, room_id: str) -> Room | None:
        query = sa.select(rooms.c.room_id, rooms.c.name, rooms.c.created_at).where(rooms.c.room_id == room_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Room(room_id=row.room_id, name=row.name, created_at=row.created_at)

    async def last_seq(self, room_id: str) -> int | None:
        """The room's highest assigned sequence number (0 before its first message); None if unknown."""
        async with self._engine.connect() as conn:
            value = (await conn.execute(
                sa.select(rooms.c.last_seq).where(rooms.c.room_id == room_id))).scalar_one_or_none()
        return None if value is None else int(value)

    # --- messages -------------------------------------------------------------------------------

    async def save_messages(self, batch: Sequence[NewMessage]) -> list[SaveResult]:
        """Store ``batch`` atomically in one transaction; results are in ``batch`` order.

        Raises the first :class:`StorageError` (unknown room, invalid message) and stores nothing if
        any message is refused. A message whose ``client_msg_id`` is already stored in its room (or
        appears earlier in the same batch) is not inserted: its result is the original row with
        ``duplicate=True``.
        """
        if not batch:
            return []
        async with write_transaction(self._engine) as conn:
            outcomes = await self._save_in(conn, batch)
            for outcome in outcomes:
                if isinstance(outcome, StorageError):
                    raise outcome
        return [outcome for outcome in outcomes if isinstance(outcome, SaveResult)]

    async def save_batch(self, batch: Sequence[NewMessage]) -> list[SaveResult | StorageError]:
        """Store what can be stored of ``batch`` in one transaction; one outcome per message, in order.

        A refused message (unknown room, invalid) gets its :class:`StorageError` as outcome and does
        not stop the others. Database failures (connection lost, ...) still raise for the whole batch.
        """
        if not batch:
            return []
        async with write_transaction(self._engine) as conn:
            return await self._save_in(conn, batch)

    async def _save_in(self, conn: AsyncConnection, batch: Sequence[NewMessage]) -> list[SaveResult | StorageError]:
        now = _utcnow()
        outcomes: list[SaveResult | StorageError | None] = [None] * len(batch)
        by_room: dict[str, list[int]] = {}
        for index, message in enumerate(batch):
            problem = _check(message)
            if problem is not None:
                outcomes[index] = problem
            else:
                by_room.setdefault(message.room_id, []).append(index)

        # Lock rooms in a fixed order so that two transactions touching the same rooms cannot deadlock.
        for room_id in sorted(by_room):
            indexes = by_room[room_id]
            counter = (await conn.execute(
                sa.select(rooms.c.last_seq).where(rooms.c.room_id == room_id).with_for_update())).first()
            if counter is None:
                for index in indexes:
                    outcomes[index] = UnknownRoomError(room_id)
                continue
            seq = int(counter.last_seq)

            # Holding the room lock, nobody else can insert a given client id into this room now.
            wanted = sorted({cid for i in indexes if (cid := batch[i].client_msg_id) is not None})
            stored: dict[str, StoredMessage] = {}
            for chunk in _chunks(wanted, _LOOKUP_CHUNK):
                rows = await conn.execute(sa.select(messages).where(
                    messages.c.room_id == room_id, messages.c.client_msg_id.in_(chunk)))
                for row in rows:
                    stored[row.client_msg_id] = StoredMessage.from_row(row)

            params: list[dict[str, Any]] = []
            index_by_seq: dict[int, int] = {}
            first_new: dict[str, int] = {}
            repeats: list[tuple[int, int]] = []
            for index in indexes:
                message = batch[index]
                cid = message.client_msg_id
                if cid is not None and cid in stored:
                    outcomes[index] = SaveResult(message=stored[cid], duplicate=True)
                    continue
                if cid is not None and cid in first_new:
                    repeats.append((index, first_new[cid]))
                    continue
                if cid is not None:
                    first_new[cid] = index
                seq += 1
                index_by_seq[seq] = index
                params.append({
                    "room_id": room_id, "seq": seq, "type": MessageType(message.type).value,
                    "sender": message.sender, "message": message.message,
                    "created_at": message.created_at or now, "client_msg_id": cid,
                })
            if params:
                await conn.execute(sa.update(rooms).where(rooms.c.room_id == room_id).values(last_seq=seq))
                inserted = await conn.execute(sa.insert(messages).returning(*messages.c), params)
                for row in inserted:
                    saved = StoredMessage.from_row(row)
                    outcomes[index_by_seq[saved.seq]] = SaveResult(message=saved, duplicate=False)
            for index, original in repeats:
                first = outcomes[original]
                assert isinstance(first, SaveResult)
                outcomes[index] = SaveResult(message=first.message, duplicate=True)

        result: list[SaveResult | StorageError] = []
        for outcome in outcomes:
            assert outcome is not None
            result.append(outcome)
        return result

    async def history(self, room_id: str, after_seq: int = 0, limit: int = 100) -> list[StoredMessage]:
        """Messages of ``room_id`` with ``seq > after_seq``, in sequence order, at most ``limit``."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = (sa.select(messages)
                 .where(messages.c.room_id == room_id, messages.c.seq > after_seq)
                 .order_by(messages.c.seq)
                 .limit(limit))
        async with self._engine.connect() as conn:
            return [StoredMessage.from_row(row) for row in await conn.execute(query)]

    async def recent(self, room_id: str, limit: int = 100) -> list[StoredMessage]:
        """The last ``limit`` messages of ``room_id``, in sequence order (for a page opening a room)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = (sa.select(messages)
                 .where(messages.c.room_id == room_id)
                 .order_by(messages.c.seq.desc())
                 .limit(limit))
        async with self._engine.connect() as conn:
            rows = [StoredMessage.from_row(row) for row in await conn.execute(query)]
        rows.reverse()
        return rows
