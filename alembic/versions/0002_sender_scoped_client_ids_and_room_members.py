"""Client message ids scoped to the sender; room members.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

- The partial unique index ``(room_id, client_msg_id)`` becomes ``(room_id, sender, client_msg_id)``:
  another sender's message with the same id is stored (issue 10: a guessed id must not suppress
  someone else's message); a repeat by the same sender is still a duplicate.
- ``room_members``: who belongs to which room (the ``members`` authorization policy).

Runs on SQLite and PostgreSQL (index changes need no table rebuild on either). The downgrade
restores the per-room index, which fails if two senders have meanwhile stored the same id in one
room: remove (or renumber) those rows first.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOT_NULL = "client_msg_id IS NOT NULL"


def upgrade() -> None:
    # The new index first: no moment without a unique index on client ids.
    op.create_index(
        "uq_messages_room_sender_client_msg_id",
        "messages",
        ["room_id", "sender", "client_msg_id"],
        unique=True,
        sqlite_where=sa.text(_NOT_NULL),
        postgresql_where=sa.text(_NOT_NULL),
    )
    op.drop_index("uq_messages_room_client_msg_id", table_name="messages")
    op.create_table(
        "room_members",
        sa.Column("room_id", sa.String(36),
                  sa.ForeignKey("rooms.room_id", name="fk_room_members_room_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("user_name", sa.String(), primary_key=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_room_members_user_name", "room_members", ["user_name"])


def downgrade() -> None:
    op.drop_index("ix_room_members_user_name", table_name="room_members")
    op.drop_table("room_members")
    op.create_index(
        "uq_messages_room_client_msg_id",
        "messages",
        ["room_id", "client_msg_id"],
        unique=True,
        sqlite_where=sa.text(_NOT_NULL),
        postgresql_where=sa.text(_NOT_NULL),
    )
    op.drop_index("uq_messages_room_sender_client_msg_id", table_name="messages")
