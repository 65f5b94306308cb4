"""Opening the database named by a URL, bringing its schema up to date with Alembic, saying what is
wrong, and running its blocking calls on threads of their own.

Every way a database can be unusable at start (a bad URL, SQLite in memory, a missing driver, a folder
that cannot be made, a file that is not a database, a read-only file, a full disk, a SQLite file another
bot process runs on, a SQLite file that the bot created and that is now missing) becomes a
DatabaseConfigError with one line naming it; `describe` turns errors met later, mid-session, into the
same kind of line. A SQLite file deleted or replaced while the bot runs is noticed at the next
transaction (SqliteFileWatch), said at ERROR, and every transaction after it fails, so no save is
confirmed that would be lost.

Database work never runs on the event loop: a SQLite file locked by another process (or a slow
PostgreSQL server) must hold up only the chat that needs it, not every chat. SQLAlchemy's asyncio
extension would do the same through a thread per connection for SQLite (aiosqlite) and a second
PostgreSQL driver (asyncpg); a small executor around the one synchronous store keeps one code
path for the bot, the console and `migrate`, and the drivers the project already has.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Beside a SQLite file the bot created: says it did, so a start that finds the file missing refuses to make
# an empty one in its place (which would silently lose every chat's settings).
CREATED_MARKER_SUFFIX = ".created"
SQLITE_READONLY = 8  # sqlite3's primary result codes; extended codes keep them in the low byte
SQLITE_FULL = 13  # "database or disk is full": the disk, or the file's max_page_count
POSTGRES_READ_ONLY_TRANSACTION = "25006"
POSTGRES_DISK_FULL = "53100"
# Threads for database calls. Fewer than SQLAlchemy's default pool (5 + 10 overflow), so a call never
# waits for a connection, and separate from asyncio's default executor, so calls stuck on a lock
# cannot starve anything else that runs in threads.
DATABASE_THREADS = 8

# The first key of PostgreSQL advisory locks taken here; any fixed 32-bit number that other
# applications sharing the database are unlikely to use.
MIGRATION_LOCK_CLASS = 0x5BEEC5
WAL_SWITCH_ATTEMPTS = 100  # 50 ms apart: as long as the busy timeout

T = TypeVar("T")


class DatabaseConfigError(ValueError):
    """A DATABASE_URL that cannot be used, with a message saying what would work."""


class DatabaseFileGone(SQLAlchemyError):
    """The SQLite file the bot runs on was deleted or replaced while it ran."""


def _enable_sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    # WAL lets the scheduler read while a handler writes; NORMAL sync in WAL mode keeps every
    # committed transaction across a crash or kill -9 (only a power cut can lose the last ones).
    # Switching a new file to WAL needs it alone, and SQLite answers "database is locked" at once,
    # without its busy wait, to a connection opened at the same moment as another: so try again.
    for attempt in range(WAL_SWITCH_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _parse(url: str) -> URL:
    """`url` parsed, or a DatabaseConfigError for one that is no database URL or is SQLite in memory."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseConfigError(
            f"DATABASE_URL {url!r} is not a database URL; use e.g. sqlite:///data/bot.db "
            "or postgresql+psycopg://user:password@host/dbname"
        ) from None
    if parsed.get_backend_name() == "sqlite" and is_in_memory(parsed):
        # `migrate` would pass and every later command fail: each connection gets its own empty database,
        # and all of them vanish with the process.
        raise DatabaseConfigError(
            f"DATABASE_URL {url!r} is a SQLite database in memory, which each connection sees empty and which "
            "is gone when the process ends; name a file, e.g. sqlite:///data/bot.db"
        )
    return parsed


def sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL names (a `file:` URI's path too), or None for another database."""
    if url.get_backend_name() != "sqlite":
        return None
    if "uri" in url.query and url.database.startswith("file:"):
        return Path(unquote(urlsplit(url.database).path))
    return Path(url.database)


def _make_sqlite_folder(parsed: URL, url: str) -> None:
    # A `file:` URI (uri=true) names its path in SQLite's own syntax; it is the user's to get right.
    if parsed.get_backend_name() != "sqlite" or "uri" in parsed.query:
        return
    folder = sqlite_file(parsed).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatabaseConfigError(
            f"DATABASE_URL {url!r} names a SQLite file in {str(folder)!r}, a folder that cannot be created "
            f"({error.strerror}); use a path whose folder exists or can be made by the bot's user"
        ) from None


def create_db_engine(url: str) -> Engine:
    """An engine for `url`; a SQLite file's folder is created first."""
    parsed = _parse(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    _make_sqlite_folder(parsed, url)
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


@contextmanager
def one_process_per_sqlite_file(url: str) -> Iterator[Path | None]:
    """Hold `<file>.lock` beside the SQLite file `url` names for the block, so a second bot process on the
    same file is refused with a DatabaseConfigError; yields the lock's path (None: nothing to lock).

    Two bot processes on one SQLite file would each take the other's open inbox entries for a crashed
    process's (db/inbox.py: on SQLite every other owner is gone) and answer them again. PostgreSQL tells
    live owners from gone ones, so replicas are allowed there and nothing is locked. The lock is an
    flock on a file of its own, never on the database (whose POSIX locks SQLite manages): the kernel
    drops it when the process ends, however it ends, so a crash leaves no stale lock behind.
    """
    parsed = _parse(url)
    database = sqlite_file(parsed)
    if database is None:
        yield None
        return
    path = database.with_name(database.name + ".lock")
    _make_sqlite_folder(parsed, url)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise DatabaseConfigError(
                f"the lock file {str(path)!r} beside the SQLite database cannot be made ({error.strerror}); "
                "the SQLite file's folder must exist and be writable by the bot's user"
            ) from None
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # made earlier; flock needs no write access
        except OSError:
            # A folder nobody may write (a read-only mount used with `mode=ro`) holds a database this process
            # cannot write either, so it cannot take over another process's entries: nothing to guard.
            yield None
            return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            raise DatabaseConfigError(
                f"another bot process{f' (pid {holder})' if holder.isdigit() else ''} is running on the SQLite "
                f"database {str(database)!r} (it holds {str(path)!r}); stop it first: one SQLite file serves one "
                "`python -m bot run`, and several need PostgreSQL"
            ) from None
        with suppress(OSError):  # only for the message above; a read-only lock file stays as it is
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock; the file stays, so no process ever locks a file being deleted


def is_in_memory(url: URL) -> bool:
    """Whether a SQLite URL names a database in memory: no path, `:memory:`, or a URI saying so."""
    database = url.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:") or url.query.get("mode") == "memory"


def _is(error: SQLAlchemyError, sqlite_code: int, postgres_state: str) -> bool:
    """Whether the driver's error under `error` has SQLite's primary result code or PostgreSQL's SQLSTATE."""
    orig = error.orig if isinstance(error, DBAPIError) else None
    code = getattr(orig, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite_code) or getattr(orig, "sqlstate", None) == postgres_state


def is_read_only(error: SQLAlchemyError) -> bool:
    """Whether `error` is a write refused because the database (file, mount or server) is read-only."""
    return _is(error, SQLITE_READONLY, POSTGRES_READ_ONLY_TRANSACTION)


def is_disk_full(error: SQLAlchemyError) -> bool:
    """Whether `error` is a write that found no space left for the database (SQLite's file, the server's disk)."""
    return _is(error, SQLITE_FULL, POSTGRES_DISK_FULL)


def is_transient(error: SQLAlchemyError) -> bool:
    """Whether `error` is the database server out of reach (restarting, a dropped connection), which trying
    again may cure, rather than something wrong with the request or a SQLite file."""
    if not isinstance(error, DBAPIError):
        return False
    return error.connection_invalidated or (
        isinstance(error, OperationalError) and not isinstance(error.orig, sqlite3.Error)
    )


def describe(error: SQLAlchemyError) -> str:
    """The driver's own reason, on one line, without SQLAlchemy's statement and parameters."""
    reason = str(error.orig) if isinstance(error, DBAPIError) else str(error)
    return " ".join(reason.split())


def created_marker(database: Path) -> Path:
    return database.with_name(database.name + CREATED_MARKER_SUFFIX)


def _refuse_a_lost_file(engine: Engine, create: bool) -> Path | None:
    """The SQLite file `engine` is on (None: another database); a DatabaseConfigError if it is missing although
    the bot created it before, unless `create`."""
    database = sqlite_file(engine.url) if not is_in_memory(engine.url) else None
    if database is None:
        return None
    marker = created_marker(database)
    if not create and not database.exists() and marker.exists():
        raise DatabaseConfigError(
            f"the SQLite database {str(database)!r} is missing, but the bot created it before ({str(marker)!r} "
            "says when): it was deleted or moved. Put it back or restore a backup; to start afresh with an empty "
            "database (every chat's settings and schedules gone), run `python -m bot migrate --create`"
        )
    return database


def _mark_created(database: Path, create: bool) -> None:
    marker = created_marker(database)
    if marker.exists() and not create:
        return
    note = (
        f"The bot created {database.name} in this folder on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. While this file is "
        f"here, a start that finds {database.name} missing refuses to make an empty one in its place; "
        "`python -m bot migrate --create` does.\n"
    )
    # A folder the bot may not write (a read-only mount with mode=ro) holds a file it cannot lose either.
    with suppress(OSError):
        marker.write_text(note, encoding="utf-8")


def migrate(engine: Engine, revision: str = "head", create: bool = False) -> None:
    """Apply every Alembic migration up to `revision` not yet applied (idempotent); a DatabaseConfigError if the
    database is unusable. A SQLite file that the bot created before (a marker beside it says so) and that is now
    missing is refused, unless `create`: then an empty one is made."""
    sqlite_database = _refuse_a_lost_file(engine, create)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as connection:
            # Processes starting together would otherwise race to create the same tables; the lock
            # makes the later ones wait and then find nothing left to do.
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:kind, 0)"), {"kind": MIGRATION_LOCK_CLASS})
            elif engine.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, before the schema is read
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as error:
        where = engine.url.render_as_string(hide_password=True)
        if is_read_only(error):
            hint = "it is read-only and its schema needs an update: run `python -m bot migrate` once with write access"
        elif is_disk_full(error):
            # Not a damaged file: a backup would not help, space would.
            hint = "the disk it is on is full; free some space there and start again"
        elif engine.dialect.name == "sqlite":
            hint = "restore the file from a backup, or point DATABASE_URL at a new file to start afresh"
        else:
            hint = "check that the server is up and DATABASE_URL's host, port, user, password and database name"
        raise DatabaseConfigError(f"the database at {where} cannot be used ({describe(error)}); {hint}") from None
    if sqlite_database is not None:
        _mark_created(sqlite_database, create)


def insert_new(session: Session, model: type, **values) -> bool:
    """Insert a row unless its key exists; True if it was inserted. One statement, so racing inserts are safe."""
    insert = postgresql_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    # RETURNING rather than rowcount, which psycopg leaves at -1 for ON CONFLICT DO NOTHING. On the table,
    # not the mapped class: a Core statement skips the ORM's bulk-insert bookkeeping (docs/speed.md).
    table = model.__table__
    statement = insert(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key)
    return session.execute(statement).first() is not None


# Told how long each database call took (waiting for a thread included) and the error it failed with, if any.
OnCall = Callable[[float, BaseException | None], None]


class SqliteFileWatch:
    """Notices a SQLite file deleted or replaced under the running bot, which SQLite itself does not: its open
    connections go on reading and writing the deleted file, every save is confirmed, and all of it vanishes
    when the process ends (and the next start would make an empty database).

    The file's identity (device and inode) is taken when it is first seen; the bot's open connections keep
    that inode in use, so no new file can get it while the bot runs.
    """

    def __init__(self, path: Path):
        self.path = path.absolute()
        self._identity: tuple[int, int] | None = None
        self._gone: str | None = None

    def check(self) -> None:
        """Raise DatabaseFileGone (said at ERROR the first time) if the file is no longer the one first seen."""
        if self._gone is None and (happened := self._what_happened()) is not None:
            self._gone = (
                f"the SQLite database {self.path} {happened} while the bot ran; nothing saved since is kept. "
                "Stop the bot, put the file back or restore a backup, then start it again"
            )
            log.error("%s", self._gone[0].upper() + self._gone[1:])
        if self._gone is not None:
            raise DatabaseFileGone(self._gone)

    def _what_happened(self) -> str | None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            # Not there yet is not gone: the first transaction on a new database creates it.
            return None if self._identity is None else "was deleted"
        identity = (status.st_dev, status.st_ino)
        if self._identity is None:
            self._identity = identity
        return None if identity == self._identity else "was replaced by another file"


class Database:
    """An engine plus the threads its calls run on; `await database.run(work)` is one transaction."""

    def __init__(self, engine: Engine, threads: int = DATABASE_THREADS, on_call: OnCall | None = None):
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="database")
        self._on_call = on_call
        database = sqlite_file(engine.url) if not is_in_memory(engine.url) else None
        self._file_watch = None if database is None else SqliteFileWatch(database)

    def run_here(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in one transaction, committed before this returns, on the calling thread."""
        if self._file_watch is not None:
            self._file_watch.check()
        with self._sessions.begin() as session:
            return work(session)

    async def run(self, work: Callable[[Session], T]) -> T:
        """run_here on a database thread, so the event loop goes on while the database waits."""
        return await self.call(self.run_here, work)

    async def call(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on a database thread."""
        loop = asyncio.get_running_loop()
        if self._on_call is None:
            return await loop.run_in_executor(self._executor, function, *args)
        start = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._executor, function, *args)
        except Exception as error:  # not a cancellation: that is no database failure
            self._on_call(time.perf_counter() - start, error)
            raise
        self._on_call(time.perf_counter() - start, None)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()
