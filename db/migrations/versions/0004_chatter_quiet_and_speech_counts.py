"""Groups: each chat's chatter rate and the state of its interjections, quiet time, and speech counts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable or with a server default, so the rows already there get chatter off, no quiet and zero counts.
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("chatter_rate", sa.Float(), nullable=True))
        batch.add_column(sa.Column("chatter_last_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("chatter_day", sa.Date(), nullable=True))
        batch.add_column(sa.Column("chatter_today", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("quiet_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("speeches_total", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("speeches_day", sa.Date(), nullable=True))
        batch.add_column(sa.Column("speeches_today", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("chats") as batch:
        for column in (
            "speeches_today",
            "speeches_day",
            "speeches_total",
            "quiet_until",
            "chatter_today",
            "chatter_day",
            "chatter_last_at",
            "chatter_rate",
        ):
            batch.drop_column(column)
