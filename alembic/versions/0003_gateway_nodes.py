"""The record of live gateway nodes on this database (refusing to start a split fleet).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

- ``gateway_nodes``: one row per running gateway node — its id, a random per-start incarnation token,
  its delivery fingerprint (where its Redis is, without credentials, or NULL for none; channel mode,
  prefix, single channel, sharded Pub/Sub, payload form), when it started and when it last refreshed
  the row (both from the database's clock). ``gateway.chat.fleet`` writes it; a node refuses to start
  when a live row's fingerprint means the two nodes would not see each other's messages.

Runs on SQLite and PostgreSQL (a plain new table). The rows only describe running processes, so the
downgrade drops the table without losing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_nodes",
        sa.Column("node_id", sa.String(), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("redis", sa.String(), nullable=True),
        sa.Column("channel_mode", sa.String(16), nullable=False),
        sa.Column("channel_prefix", sa.String(), nullable=False),
        sa.Column("single_channel", sa.String(), nullable=False),
        sa.Column("sharded_pubsub", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateway_nodes")
