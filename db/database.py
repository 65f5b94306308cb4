"""Opening the database named by a URL, bringing its schema up to date with Alembic, and saying what is wrong.

Every way a database can be unusable at start (a bad URL, a missing driver, a folder that cannot be
made, a file that is not a database, a read-only file) becomes a DatabaseConfigError with one line
naming it; `describe` turns errors met later, mid-session, into the same kind of line.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_READONLY = 8  # sqlite3's primary result code; extended codes keep it in the low byte
POSTGRES_READ_ONLY_TRANSACTION = "25006"


class DatabaseConfigError(ValueError):
    """A DATABASE_URL that cannot be used, with a message saying what would work."""


def _enable_sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the scheduler read while a handler writes; NORMAL sync in WAL mode keeps every
    # committed transaction across a crash or kill -9 (only a power cut can lose the last ones).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """An engine for `url`; a SQLite file's folder is created first."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseConfigError(
            f"DATABASE_URL {url!r} is not a database URL; use e.g. sqlite:///data/bot.db "
            "or postgresql+psycopg://user:password@host/dbname"
        ) from None
    is_sqlite = parsed.get_backend_name() == "sqlite"
    # A `file:` URI (uri=true) names its path in SQLite's own syntax; it is the user's to get right.
    if is_sqlite and parsed.database and parsed.database != ":memory:" and "uri" not in parsed.query:
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatabaseConfigError(
                f"DATABASE_URL {url!r} names a SQLite file in {str(folder)!r}, a folder that cannot be created "
                f"({error.strerror}); use a path whose folder exists or can be made by the bot's user"
            ) from None
    try:
        engine = create_engine(parsed, pool_pre_ping=not is_sqlite)
    except (NoSuchModuleError, ImportError) as error:
        raise DatabaseConfigError(
            f"DATABASE_URL {parsed.render_as_string(hide_password=True)!r} needs a driver that is not "
            f"installed ({error}); for PostgreSQL install the extra: pip install 'speechbot[postgres]'"
        ) from None
    if is_sqlite:
        event.listen(engine, "connect", _enable_sqlite_pragmas)
    return engine


def is_read_only(error: SQLAlchemyError) -> bool:
    """Whether `error` is a write refused because the database (file, mount or server) is read-only."""
    orig = error.orig if isinstance(error, DBAPIError) else None
    code = getattr(orig, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == SQLITE_READONLY) or (
        getattr(orig, "sqlstate", None) == POSTGRES_READ_ONLY_TRANSACTION
    )


def describe(error: SQLAlchemyError) -> str:
    """The driver's own reason, on one line, without SQLAlchemy's statement and parameters."""
    reason = str(error.orig) if isinstance(error, DBAPIError) else str(error)
    return " ".join(reason.split())


def migrate(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (idempotent); a DatabaseConfigError if the database is unusable."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as error:
        where = engine.url.render_as_string(hide_password=True)
        if is_read_only(error):
            hint = "it is read-only and its schema needs an update: run `python -m bot migrate` once with write access"
        elif engine.dialect.name == "sqlite":
            hint = "restore the file from a backup, or point DATABASE_URL at a new file to start afresh"
        else:
            hint = "check that the server is up and DATABASE_URL's host, port, user, password and database name"
        raise DatabaseConfigError(f"the database at {where} cannot be used ({describe(error)}); {hint}") from None
