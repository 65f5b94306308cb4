"""Voices: each chat's voice (the name of a served model file; NULL: the default voice).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, so the rows already there keep the default voice they have been hearing.
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("voice", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chats") as batch:
        batch.drop_column("voice")
