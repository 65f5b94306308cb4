"""Answered inbox entries keep no update: the payloads earlier versions kept for a day are dropped now.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # From now on db.inbox drops the update when it marks an entry answered; this does the same for the
    # entries answered before the upgrade, rather than keep their names and texts until the daily purge.
    op.execute("UPDATE inbox SET payload = NULL WHERE answered_at IS NOT NULL AND payload IS NOT NULL")


def downgrade() -> None:
    pass  # the payloads are gone; the schema is unchanged
