"""Rooms and messages: per-room sequence counter, unique (room_id, seq), client message id dedupe.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("room_id", sa.String(36),
                  sa.ForeignKey("rooms.room_id", name="fk_messages_room_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("sender", sa.String(), nullable=False),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_msg_id", sa.String(), nullable=True),
        sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_seq"),
        sa.CheckConstraint("type IN ('ENTER', 'QUIT', 'TALK')", name="ck_messages_type"),
        sa.CheckConstraint("seq > 0", name="ck_messages_seq_positive"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "uq_messages_room_client_msg_id",
        "messages",
        ["room_id", "client_msg_id"],
        unique=True,
        sqlite_where=sa.text("client_msg_id IS NOT NULL"),
        postgresql_where=sa.text("client_msg_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_messages_room_client_msg_id", table_name="messages")
    op.drop_table("messages")
    op.drop_table("rooms")
