"""Alembic environment: runs migrations on the connection handed over by db.database.migrate."""

from alembic import context

from db.database import create_db_engine
from db.models import Base


def run_migrations(connection) -> None:
    # Batch mode lets later migrations alter columns on SQLite, which has no ALTER COLUMN.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    # Plain `alembic` command line use, e.g. `alembic revision --autogenerate`.
    with create_db_engine(context.config.get_main_option("sqlalchemy.url")).begin() as connection:
        run_migrations(connection)
