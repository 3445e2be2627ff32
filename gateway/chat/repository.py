"""Chat storage: the async engine set-up and :class:`ChatRepository` (rooms, messages, history).

Owns every SQL statement the gateway runs against ``rooms`` and ``messages`` and how a transaction is
opened on each backend:

* :func:`make_engine` builds an ``AsyncEngine`` for ``sqlite+aiosqlite://`` (WAL journal, a busy
  timeout so several processes can share the file, foreign keys on, and SQLAlchemy-controlled
  ``BEGIN`` statements) or ``postgresql+asyncpg://`` (pre-ping).
* :func:`write_transaction` opens a write transaction: on SQLite it starts with ``BEGIN IMMEDIATE``
  so the write lock is taken up front (no deadlock between two deferred readers upgrading), on
  PostgreSQL a plain transaction in which the room counter rows are locked ``FOR NO KEY UPDATE``.
* Sequence numbers come from ``rooms.last_seq``. A batch is saved set-based, in a fixed number of
  statements however many rooms it touches: one lookup of all its client message ids (keyed by
  room, sender and id: a client message id is scoped to its sender), one statement
  that locks every room getting new rows (on PostgreSQL in sorted ``room_id`` order, so two nodes
  writing overlapping rooms cannot deadlock; on SQLite the write lock already serialises writers),
  advances each counter by the room's number of new rows and returns the new values, and one INSERT
  of all new rows numbered up to those values. A rolled-back transaction rolls the counters back
  too, so numbers are gap-free. The lookup runs before the lock, so on PostgreSQL another node may
  commit one of the batch's client ids in between: the INSERT then violates the unique index and the
  batch is retried from the lookup, which sees that row.

It must not import the chat service, the broker, STOMP or transport code; the group commit lives in
``gateway.chat.group_commit`` and builds on :meth:`ChatRepository.save_batch`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.chat.models import (
    MessageType,
    NewMessage,
    Room,
    SaveResult,
    StoredMessage,
    messages,
    room_members,
    rooms,
)

#: Seconds a SQLite connection waits for another connection's (or process's) write lock.
DEFAULT_BUSY_TIMEOUT_S = 30.0

#: Execution option read by the SQLite ``begin`` hook: the ``BEGIN`` flavour of the next transaction.
SQLITE_BEGIN_OPTION = "gateway_sqlite_begin"

_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})

#: SQLite's default SQLITE_MAX_VARIABLE_NUMBER (since 3.32): bind parameters per statement.
SQLITE_MAX_BINDS = 32766

# The unique index that makes client message ids idempotent per sender (see gateway.chat.models).
_CLIENT_ID_INDEX = "uq_messages_room_sender_client_msg_id"
_HEADS_CHUNK = 500  # room ids per last_seqs query, well under every bind limit


class StorageError(Exception):
    """A message or room the storage layer refuses; carries no database details."""


class UnknownRoomError(StorageError):
    """The message names a room that does not exist."""

    def __init__(self, room_id: str) -> None:
        super().__init__(f"unknown room {room_id!r}")
        self.room_id = room_id


class InvalidMessageError(StorageError):
    """The message cannot be stored as given (bad type, naive timestamp, ...)."""


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time; nothing was stored, and sending
    the same message again is safe."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is down, unreachable, locked or too slow, as opposed to a
    statement it refused (an integrity or data error that one message can cause)."""
    if isinstance(exc, DatabaseUnavailable | TimeoutError | OSError | ConnectionError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = _sqlstate(exc)
        if state is not None:
            return state.startswith(_UNAVAILABLE_SQLSTATES)
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.InternalError)
    return False


# PostgreSQL error classes that mean "not now" rather than "not this statement": connection
# exceptions, transaction rollbacks (serialization, deadlock), insufficient resources, operator
# intervention (query cancelled by statement_timeout, shutdown), lock_not_available, and
# object_not_in_prerequisite_state (a database not accepting connections).
_UNAVAILABLE_SQLSTATES = ("08", "40", "53", "57", "55P03", "55000", "58")


def _sqlstate(exc: sa_exc.DBAPIError) -> str | None:
    """The SQLSTATE the driver reported, if it reports one (asyncpg does; SQLite does not)."""
    seen: BaseException | None = exc.orig
    for _ in range(3):
        if seen is None:
            return None
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str) and state:
            return state
        seen = seen.__cause__
    return None


def is_sqlite_url(database_url: str) -> bool:
    return make_url(database_url).get_backend_name() == "sqlite"


def make_engine(database_url: str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
                sqlite_foreign_keys: bool = True, echo: bool = False,
                connect_timeout_s: float | None = None, statement_timeout_s: float | None = None) -> AsyncEngine:
    """Create the async engine for ``database_url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    SQLite connections get ``PRAGMA busy_timeout``, ``journal_mode=WAL`` and ``foreign_keys`` (turned
    off only by the migration runner, as SQLite's table-rebuild recipe requires), and the driver's
    own transaction handling is replaced by explicit ``BEGIN`` statements chosen per connection with
    the :data:`SQLITE_BEGIN_OPTION` execution option (default ``DEFERRED``; writers use
    :func:`write_transaction`, which asks for ``IMMEDIATE``).

    On PostgreSQL, ``connect_timeout_s`` bounds a new connection and the wait for a pooled one, and
    ``statement_timeout_s`` every statement (asyncpg's ``command_timeout``, which cancels it on the
    server) and every lock wait (``lock_timeout``). On SQLite the lock wait is ``busy_timeout_s``.
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
        # Pre-ping costs one round trip per transaction (not per message: a group commit is one
        # transaction) and replaces a pooled connection whose backend died (a PostgreSQL restart) at
        # checkout; without it the first batch after a restart fails, and a batch of one message
        # cannot be retried by the group commit.
        connect_args: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if connect_timeout_s is not None:
            connect_args["timeout"] = connect_timeout_s
            options["pool_timeout"] = connect_timeout_s
        if statement_timeout_s is not None:
            connect_args["command_timeout"] = statement_timeout_s
            connect_args["server_settings"] = {"lock_timeout": str(int(statement_timeout_s * 1000))}
        return create_async_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args, **options)
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


# --- the batch statements ---------------------------------------------------------------------------
#
# PostgreSQL gets each list of values as one array parameter, so its three statements have a fixed text
# (asyncpg prepares each once per connection) and no bind limit. SQLite has no arrays: its statements
# carry one VALUES row per room or message and are split only past SQLITE_MAX_BINDS.

_T = TypeVar("_T")
_COLUMNS = ", ".join(f"m.{column.name}" for column in messages.c)
_TEXTS = postgresql.ARRAY(sa.String())

_PG_LOOKUP = sa.text(
    f"SELECT {_COLUMNS} FROM unnest(:room_ids, :senders, :client_msg_ids) "
    "AS wanted(room_id, sender, client_msg_id) "
    "JOIN messages AS m ON m.room_id = wanted.room_id AND m.sender = wanted.sender "
    "AND m.client_msg_id = wanted.client_msg_id "
    "WHERE m.client_msg_id IS NOT NULL"
).bindparams(sa.bindparam("room_ids", type_=_TEXTS), sa.bindparam("senders", type_=_TEXTS),
             sa.bindparam("client_msg_ids", type_=_TEXTS)).columns(*messages.c)

# The CTE takes the row locks in room_id order (LockRows locks each row as it comes out of the Sort or
# of the primary-key index scan, which walks an ``= ANY`` array in index order), so two transactions
# with overlapping rooms queue up on their first common room instead of deadlocking; the UPDATE then
# only touches rows the CTE locked and, under READ COMMITTED, adds to the newest committed last_seq.
_PG_ADVANCE = sa.text(
    "WITH locked AS MATERIALIZED ("
    " SELECT room_id FROM rooms WHERE room_id = ANY(:room_ids) ORDER BY room_id FOR NO KEY UPDATE) "
    "UPDATE rooms SET last_seq = rooms.last_seq + wanted.n "
    "FROM unnest(:room_ids, :counts) AS wanted(room_id, n) "
    "WHERE rooms.room_id = wanted.room_id AND rooms.room_id IN (SELECT room_id FROM locked) "
    "RETURNING rooms.room_id, rooms.last_seq"
).bindparams(sa.bindparam("room_ids", type_=_TEXTS),
             sa.bindparam("counts", type_=postgresql.ARRAY(sa.BigInteger())))

_PG_INSERT = sa.text(
    f"INSERT INTO messages AS m ({', '.join(c.name for c in messages.c if c.name != 'id')}) "
    "SELECT * FROM unnest(:room_id, :seq, :type, :sender, :message, :created_at, :client_msg_id) "
    f"RETURNING {_COLUMNS}"
).bindparams(*(sa.bindparam(column.name, type_=postgresql.ARRAY(column.type))
               for column in messages.c if column.name != "id")).columns(*messages.c)


def _chunks(values: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


async def _lookup_postgres(conn: AsyncConnection, keys: Sequence[tuple[str, str, str]]) -> Sequence[Any]:
    result = await conn.execute(_PG_LOOKUP, {"room_ids": [room for room, _, _ in keys],
                                             "senders": [sender for _, sender, _ in keys],
                                             "client_msg_ids": [cid for _, _, cid in keys]})
    return result.all()


async def _advance_postgres(conn: AsyncConnection, counts: Sequence[tuple[str, int]]) -> Sequence[Any]:
    result = await conn.execute(_PG_ADVANCE, {"room_ids": [room for room, _ in counts],
                                              "counts": [n for _, n in counts]})
    return result.all()


async def _insert_postgres(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> Sequence[Any]:
    columns = [column.name for column in messages.c if column.name != "id"]
    result = await conn.execute(_PG_INSERT, {name: [row[name] for row in rows] for name in columns})
    return result.all()


@lru_cache(maxsize=64)
def _sqlite_lookup(size: int) -> sa.TextualSelect:
    wanted = ", ".join(f"(:r{i}, :s{i}, :c{i})" for i in range(size))
    # CROSS JOIN keeps the VALUES list as the outer loop: one index search per key, no table scan
    # (a row-value IN over VALUES scans the whole index on SQLite 3.40).
    return sa.text(
        f"SELECT {_COLUMNS} FROM (VALUES {wanted}) AS wanted "
        "CROSS JOIN messages AS m ON m.room_id = wanted.column1 AND m.sender = wanted.column2 "
        "AND m.client_msg_id = wanted.column3 "
        "WHERE m.client_msg_id IS NOT NULL").columns(*messages.c)


@lru_cache(maxsize=64)
def _sqlite_advance(size: int) -> sa.TextClause:
    wanted = ", ".join(f"(:r{i}, :n{i})" for i in range(size))
    # BEGIN IMMEDIATE already holds the database write lock, so there is no row lock order to keep.
    return sa.text(
        f"WITH wanted(room_id, n) AS (VALUES {wanted}) "
        "UPDATE rooms SET last_seq = rooms.last_seq + wanted.n FROM wanted WHERE rooms.room_id = wanted.room_id "
        "RETURNING rooms.room_id, rooms.last_seq")


async def _lookup_sqlite(conn: AsyncConnection, keys: Sequence[tuple[str, str, str]]) -> list[Any]:
    found: list[Any] = []
    for chunk in _chunks(keys, SQLITE_MAX_BINDS // 3):
        params = {f"{key}{i}": value for i, (room, sender, cid) in enumerate(chunk)
                  for key, value in (("r", room), ("s", sender), ("c", cid))}
        found += (await conn.execute(_sqlite_lookup(len(chunk)), params)).all()
    return found


async def _advance_sqlite(conn: AsyncConnection, counts: Sequence[tuple[str, int]]) -> list[Any]:
    advanced: list[Any] = []
    for chunk in _chunks(counts, SQLITE_MAX_BINDS // 2):
        params: dict[str, Any] = {}
        for i, (room, n) in enumerate(chunk):
            params[f"r{i}"] = room
            params[f"n{i}"] = n
        advanced += (await conn.execute(_sqlite_advance(len(chunk)), params)).all()
    return advanced


# Executed with a list of rows, SQLAlchemy's "insertmanyvalues" sends this as multi-row INSERTs of up
# to this many rows (and at most insertmanyvalues_max_parameters binds): one statement for any batch
# the group commit makes. The compiled form is cached, unlike an ``insert().values([...])``.
_SQLITE_INSERT = sa.insert(messages).returning(*messages.c).execution_options(
    insertmanyvalues_page_size=SQLITE_MAX_BINDS // len(messages.c))


async def _insert_sqlite(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> Sequence[Any]:
    return (await conn.execute(_SQLITE_INSERT, list(rows))).all()


def _client_id_keys(batch: Iterable[NewMessage]) -> set[tuple[str, str, str]]:
    """The distinct (room_id, sender, client_msg_id) keys of the messages that carry a client id."""
    return {(message.room_id, message.sender, message.client_msg_id) for message in batch
            if isinstance(message.client_msg_id, str) and message.client_msg_id
            and isinstance(message.room_id, str) and isinstance(message.sender, str)}


def _is_client_id_conflict(exc: sa.exc.IntegrityError) -> bool:
    """Whether ``exc`` is a violation of the client-id unique index (named on PostgreSQL, by its
    columns on SQLite), as opposed to any other constraint or a trigger."""
    detail = str(exc.orig)
    return _CLIENT_ID_INDEX in detail or "messages.room_id, messages.sender, messages.client_msg_id" in detail


class ChatRepository:
    """Rooms and messages on one engine. Safe to share between tasks; every call is its own transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    # --- rooms ----------------------------------------------------------------------------------

    async def create_room(self, name: str, *, room_id: str | None = None, creator: str | None = None) -> Room:
        """Insert a room; its id is a random UUID string (Java's ``UUID.randomUUID().toString()``).

        ``creator``, when given, becomes the room's first member in the same transaction.
        """
        room = Room(room_id=room_id or str(uuid.uuid4()), name=name, created_at=_utcnow())
        async with write_transaction(self._engine) as conn:
            await conn.execute(sa.insert(rooms).values(
                room_id=room.room_id, name=room.name, created_at=room.created_at, last_seq=0))
            if creator is not None:
                await conn.execute(sa.insert(room_members).values(
                    room_id=room.room_id, user_name=creator, added_at=room.created_at))
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

    async def rooms_of(self, user: str) -> list[Room]:
        """The rooms ``user`` is a member of, oldest first."""
        query = (sa.select(rooms.c.room_id, rooms.c.name, rooms.c.created_at)
                 .join(room_members, room_members.c.room_id == rooms.c.room_id)
                 .where(room_members.c.user_name == user)
                 .order_by(rooms.c.created_at, rooms.c.room_id))
        async with self._engine.connect() as conn:
            result = await conn.execute(query)
            return [Room(room_id=row.room_id, name=row.name, created_at=row.created_at) for row in result]

    # --- members --------------------------------------------------------------------------------

    async def add_member(self, room_id: str, user: str) -> bool:
        """Make ``user`` a member of the room; False when they already were. Raises
        :class:`UnknownRoomError` when the room does not exist."""
        async with write_transaction(self._engine) as conn:
            found = (await conn.execute(sa.select(rooms.c.room_id).where(rooms.c.room_id == room_id))).first()
            if found is None:
                raise UnknownRoomError(room_id)
            values = {"room_id": room_id, "user_name": user, "added_at": _utcnow()}
            dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            result = await conn.execute(dialect_insert(room_members).values(**values).on_conflict_do_nothing())
            return bool(result.rowcount)

    async def remove_member(self, room_id: str, user: str) -> bool:
        """Remove ``user`` from the room's members; False when they were not one."""
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(sa.delete(room_members).where(
                room_members.c.room_id == room_id, room_members.c.user_name == user))
            return bool(result.rowcount)

    async def members(self, room_id: str) -> list[str]:
        """The room's members, in the order they were added."""
        query = (sa.select(room_members.c.user_name).where(room_members.c.room_id == room_id)
                 .order_by(room_members.c.added_at, room_members.c.user_name))
        async with self._engine.connect() as conn:
            return [str(row[0]) for row in await conn.execute(query)]

    async def is_member(self, room_id: str, user: str) -> bool:
        query = sa.select(room_members.c.room_id).where(room_members.c.room_id == room_id,
                                                       room_members.c.user_name == user)
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def memberships(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of the (room_id, user) ``pairs`` are memberships, in one query per 500 rooms."""
        wanted = set(pairs)
        found: set[tuple[str, str]] = set()
        if not wanted:
            return found
        users = sorted({user for _, user in wanted})
        async with self._engine.connect() as conn:
            for chunk in _chunks(sorted({room for room, _ in wanted}), _HEADS_CHUNK):
                for user_chunk in _chunks(users, _HEADS_CHUNK):
                    rows = await conn.execute(
                        sa.select(room_members.c.room_id, room_members.c.user_name).where(
                            room_members.c.room_id.in_(chunk), room_members.c.user_name.in_(user_chunk)))
                    found.update((str(row.room_id), str(row.user_name)) for row in rows)
        return found & wanted

    async def last_seq(self, room_id: str) -> int | None:
        """The room's highest assigned sequence number (0 before its first message); None if unknown."""
        async with self._engine.connect() as conn:
            value = (await conn.execute(
                sa.select(rooms.c.last_seq).where(rooms.c.room_id == room_id))).scalar_one_or_none()
        return None if value is None else int(value)

    async def last_seqs(self, room_ids: Sequence[str]) -> dict[str, int]:
        """Every known room's ``last_seq`` among ``room_ids``, in one query per 500 rooms."""
        out: dict[str, int] = {}
        async with self._engine.connect() as conn:
            for chunk in _chunks(sorted(set(room_ids)), _HEADS_CHUNK):
                rows = await conn.execute(
                    sa.select(rooms.c.room_id, rooms.c.last_seq).where(rooms.c.room_id.in_(chunk)))
                out.update((row.room_id, int(row.last_seq)) for row in rows)
        return out

    # --- messages -------------------------------------------------------------------------------

    async def save_messages(self, batch: Sequence[NewMessage]) -> list[SaveResult]:
        """Store ``batch`` atomically in one transaction; results are in ``batch`` order.

        Raises the first :class:`StorageError` (unknown room, invalid message) and stores nothing if
        any message is refused. A message whose ``client_msg_id`` is already stored in its room for
        its sender (or appears earlier in the same batch for the same sender) is not inserted: its result is the original row with
        ``duplicate=True``.
        """
        if not batch:
            return []
        outcomes = await self._save(batch, all_or_nothing=True)
        return [outcome for outcome in outcomes if isinstance(outcome, SaveResult)]

    async def save_batch(self, batch: Sequence[NewMessage]) -> list[SaveResult | StorageError]:
        """Store what can be stored of ``batch`` in one transaction; one outcome per message, in order.

        A refused message (unknown room, invalid) gets its :class:`StorageError` as outcome and does
        not stop the others. Database failures (connection lost, ...) still raise for the whole batch.
        The transaction runs a fixed number of statements however many rooms the batch touches (see
        :meth:`_save_in`).
        """
        if not batch:
            return []
        return await self._save(batch, all_or_nothing=False)

    async def _save(self, batch: Sequence[NewMessage], *, all_or_nothing: bool) -> list[SaveResult | StorageError]:
        # The client-id lookup runs before the room rows are locked, so on PostgreSQL another node can
        # commit one of the batch's client ids in between; the INSERT then violates the unique index and
        # the whole transaction (counters included) rolls back. The next attempt's lookup sees that row.
        # Every such retry is caused by a different client id becoming visible, so retrying at most once
        # per client id of the batch always ends.
        attempts = 1 + len(_client_id_keys(batch))
        for attempt in range(1, attempts + 1):
            try:
                async with write_transaction(self._engine) as conn:
                    outcomes = await self._save_in(conn, batch)
                    if all_or_nothing:
                        for outcome in outcomes:
                            if isinstance(outcome, StorageError):
                                raise outcome
                    return outcomes
            except sa.exc.IntegrityError as exc:
                if attempt == attempts or not _is_client_id_conflict(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _save_in(self, conn: AsyncConnection, batch: Sequence[NewMessage]) -> list[SaveResult | StorageError]:
        """Save ``batch`` inside ``conn``'s write transaction in at most three statements:

        1. one lookup of every (room, sender, client id) key of the batch (skipped when there is none);
        2. one statement that locks the rooms that get new rows, in sorted order, advances each room's
           ``last_seq`` by its number of new rows and returns the new values (a room missing from the
           answer does not exist);
        3. one multi-row INSERT ... RETURNING of every new row.

        On SQLite a statement is split only if it would pass the bind-parameter limit (thousands of
        rows); on PostgreSQL the values travel as arrays, so the statement text never changes.
        """
        now = _utcnow()
        postgres = conn.dialect.name == "postgresql"
        outcomes: list[SaveResult | StorageError | None] = [None] * len(batch)
        by_room: dict[str, list[int]] = {}
        for index, message in enumerate(batch):
            problem = _check(message)
            if problem is not None:
                outcomes[index] = problem
            else:
                by_room.setdefault(message.room_id, []).append(index)

        # 1. Which client ids are stored already for their sender (the original rows answer their duplicates).
        keys = sorted(_client_id_keys(batch[i] for indexes in by_room.values() for i in indexes))
        stored: dict[tuple[str, str, str], StoredMessage] = {}
        if keys:
            for row in await (_lookup_postgres(conn, keys) if postgres else _lookup_sqlite(conn, keys)):
                found = StoredMessage.from_row(row)
                assert found.client_msg_id is not None
                stored[(found.room_id, found.sender, found.client_msg_id)] = found

        # Which messages need a new row; which repeat a stored row or an earlier message of the batch.
        new_by_room: dict[str, list[int]] = {}
        repeats: list[tuple[int, int]] = []
        for room_id, indexes in by_room.items():
            first_new: dict[tuple[str, str], int] = {}
            for index in indexes:
                cid = batch[index].client_msg_id
                if cid is not None:
                    key = (batch[index].sender, cid)
                    original = stored.get((room_id, *key))
                    if original is not None:
                        outcomes[index] = SaveResult(message=original, duplicate=True)
                        continue
                    if key in first_new:
                        repeats.append((index, first_new[key]))
                        continue
                    first_new[key] = index
                new_by_room.setdefault(room_id, []).append(index)

        # 2. Lock and advance the counters of the rooms that get rows, all at once.
        counts = sorted((room_id, len(indexes)) for room_id, indexes in new_by_room.items())
        last_seqs: dict[str, int] = {}
        if counts:
            advanced = await (_advance_postgres(conn, counts) if postgres else _advance_sqlite(conn, counts))
            last_seqs = {str(row[0]): int(row[1]) for row in advanced}

        # 3. Insert the new rows: room R advanced to L with n new messages gets L-n+1..L in batch order.
        index_by_key: dict[tuple[str, int], int] = {}
        rows: list[dict[str, Any]] = []
        for room_id, indexes in new_by_room.items():
            last = last_seqs.get(room_id)
            if last is None:
                for index in by_room[room_id]:
                    outcomes[index] = UnknownRoomError(room_id)
                continue
            for seq, index in enumerate(indexes, start=last - len(indexes) + 1):
                message = batch[index]
                index_by_key[(room_id, seq)] = index
                rows.append({
                    "room_id": room_id, "seq": seq, "type": MessageType(message.type).value,
                    "sender": message.sender, "message": message.message,
                    "created_at": message.created_at or now, "client_msg_id": message.client_msg_id,
                })
        rows.sort(key=lambda row: index_by_key[(row["room_id"], row["seq"])])  # ids follow batch order
        if rows:
            for row in await (_insert_postgres(conn, rows) if postgres else _insert_sqlite(conn, rows)):
                saved = StoredMessage.from_row(row)
                outcomes[index_by_key[(saved.room_id, saved.seq)]] = SaveResult(message=saved, duplicate=False)

        for index, first_index in repeats:
            first = outcomes[first_index]
            if isinstance(first, SaveResult):  # else the room is unknown and the repeat says so already
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
