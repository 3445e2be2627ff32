"""The chat storage model: the SQLAlchemy tables and the plain values the repository hands out.

Owns the schema of ``rooms``, ``messages``, ``room_members`` and ``gateway_nodes`` (the Alembic
migrations in ``alembic/versions`` must produce exactly this metadata; a test compares them) and the
immutable value types ``Room``, ``NewMessage``, ``StoredMessage`` and ``SaveResult``.

Schema notes:

* ``rooms.last_seq`` is the per-room sequence counter. A writer bumps it in the same transaction that
  inserts the messages, holding the row lock (PostgreSQL) or the database write lock (SQLite) until
  commit, so sequence numbers are gap-free and strictly increasing per room across all nodes.
* ``messages`` has a unique ``(room_id, seq)`` (the safety net for the counter) and a partial unique
  index on ``(room_id, sender, client_msg_id)`` where ``client_msg_id`` is not null: a retried SEND
  dedupes, and a client message id is scoped to its sender, so nobody can suppress another person's
  message by reusing its id (migration 0002; 0001 had ``(room_id, client_msg_id)``).
* ``room_members`` lists who belongs to a room (the ``members`` authorization policy, gateway.authz):
  one row per (room, user name), deleted with the room.
* ``gateway_nodes`` records the live gateway nodes on this database and how each delivers (its
  Redis and channel settings): one row per node, refreshed every ``node_heartbeat_s``, deleted at a
  clean stop (gateway.chat.fleet owns its SQL; migration 0003).
* Timestamps are stored in UTC and always come back timezone-aware (UTC), on SQLite too.

This module imports only SQLAlchemy and the standard library; nothing from the rest of the gateway.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

#: Length of a room id: ``UUID.randomUUID().toString()`` is 36 characters.
ROOM_ID_LENGTH = 36


class MessageType(enum.StrEnum):
    """The ChatMessage ``type`` values of the Spring reference."""

    ENTER = "ENTER"
    QUIT = "QUIT"
    TALK = "TALK"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that must be timezone-aware going in and is always UTC-aware coming out.

    PostgreSQL stores it as ``timestamptz``; SQLite has no timezone support, so the value is stored
    as UTC wall-clock text and the UTC zone is put back on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData()

# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a ``bigint`` identity column.
_BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("room_id", sa.String(ROOM_ID_LENGTH), primary_key=True),
    sa.Column("name", sa.String(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_seq", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _BigIntId, primary_key=True, autoincrement=True),
    sa.Column("room_id", sa.String(ROOM_ID_LENGTH),
              sa.ForeignKey("rooms.room_id", name="fk_messages_room_id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("sender", sa.String(), nullable=False),
    sa.Column("message", sa.String(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("client_msg_id", sa.String(), nullable=True),
    sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_seq"),
    sa.CheckConstraint("type IN ('ENTER', 'QUIT', 'TALK')", name="ck_messages_type"),
    sa.CheckConstraint("seq > 0", name="ck_messages_seq_positive"),
    # AUTOINCREMENT: SQLite never reuses a global message id, even the highest one after a delete.
    sqlite_autoincrement=True,
)

sa.Index(
    "uq_messages_room_sender_client_msg_id",
    messages.c.room_id,
    messages.c.sender,
    messages.c.client_msg_id,
    unique=True,
    sqlite_where=messages.c.client_msg_id.isnot(None),
    postgresql_where=messages.c.client_msg_id.isnot(None),
)

room_members = sa.Table(
    "room_members",
    metadata,
    sa.Column("room_id", sa.String(ROOM_ID_LENGTH),
              sa.ForeignKey("rooms.room_id", name="fk_room_members_room_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("user_name", sa.String(), primary_key=True),
    sa.Column("added_at", UTCDateTime(), nullable=False),
)

# "Which rooms is this user in" (GET /chat/rooms under the members policy).
sa.Index("ix_room_members_user_name", room_members.c.user_name)

gateway_nodes = sa.Table(
    "gateway_nodes",
    metadata,
    sa.Column("node_id", sa.String(), primary_key=True),
    # A random token per process start: a restarted node with the same node_id replaces the row,
    # and the old process (if it still runs) then no longer refreshes or deletes it.
    sa.Column("incarnation", sa.String(32), nullable=False),
    # The delivery fingerprint: where Redis is (without credentials; NULL = no Redis, the in-memory
    # broker) and the channel settings, which must agree between nodes that share the database.
    sa.Column("redis", sa.String(), nullable=True),
    sa.Column("channel_mode", sa.String(16), nullable=False),
    sa.Column("channel_prefix", sa.String(), nullable=False),
    sa.Column("single_channel", sa.String(), nullable=False),
    sa.Column("sharded_pubsub", sa.Boolean(), nullable=False),
    sa.Column("payload", sa.String(16), nullable=False),
    # Both from the database's clock (gateway.chat.fleet), never the node's.
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("last_seen", UTCDateTime(), nullable=False),
)


@dataclass(frozen=True, slots=True)
class Room:
    """A chat room as stored (the live user count is not storage's business)."""

    room_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to persist. ``seq``, ``id`` and (unless given) ``created_at`` are assigned on insert.

    ``client_msg_id``, when set, makes the save idempotent per (room, sender): saving the same id for
    the same sender again returns the first stored row instead of inserting a new one; another
    sender's message with the same id is a different message.
    """

    room_id: str
    type: MessageType
    sender: str
    message: str
    client_msg_id: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message row: ``id`` is global, ``seq`` is gap-free and strictly increasing within the room."""

    id: int
    room_id: str
    seq: int
    type: MessageType
    sender: str
    message: str
    created_at: datetime
    client_msg_id: str | None

    @classmethod
    def from_row(cls, row: Any) -> StoredMessage:
        """Build from a result row holding the ``messages`` columns."""
        return cls(
            id=int(row.id),
            room_id=row.room_id,
            seq=int(row.seq),
            type=MessageType(row.type),
            sender=row.sender,
            message=row.message,
            created_at=row.created_at,
            client_msg_id=row.client_msg_id,
        )


@dataclass(frozen=True, slots=True)
class SaveResult:
    """The outcome of saving one :class:`NewMessage`.

    ``duplicate`` is true when the message's ``client_msg_id`` was already stored in its room for its
    sender: then ``message`` is the ORIGINAL row and nothing new was inserted.
    """

    message: StoredMessage
    duplicate: bool
