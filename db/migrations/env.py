"""Alembic environment: runs migrations on the connection handed over by db.database.migrate."""

from alembic import context

from db.models import Base


def run_migrations(connection) -> None:
    # Batch mode lets later migrations alter columns on SQLite, which has no ALTER COLUMN.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    # The project has no alembic.ini: the schema is migrated by the bot itself.
    raise SystemExit("error: run migrations with `python -m bot migrate` (DATABASE_URL names the database)")
run_migrations(connection)
