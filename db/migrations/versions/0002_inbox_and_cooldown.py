"""The durable inbox, and each chat's cooldown in the database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("speech_ready_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "inbox",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("owner", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    # Every start looks for the entries not yet answered.
    op.create_index("ix_inbox_answered_at", "inbox", ["answered_at"])


def downgrade() -> None:
    op.drop_index("ix_inbox_answered_at", table_name="inbox")
    op.drop_table("inbox")
    with op.batch_alter_table("chats") as batch:
        batch.drop_column("speech_ready_at")
