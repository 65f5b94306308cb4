"""The durable inbox: what a user is owed survives a crash of the process that owed it.

Two kinds of entries, one table:
- `update:<update_id>`: an update that may get a reply, recorded as it is received (`received`, before
  Telegram is told it arrived; the process that recorded it needs nothing more to claim it), or claimed as
  a handler takes it if it was not recorded so (`handling`), marked `sending` just before the reply goes
  out and `answered` after. One that no handler takes is deleted once handled. A crash
  before the answer leaves it open; the next start (or a surviving replica) takes it over and handles it
  again: at least once across a crash, at most once otherwise. A crash after Telegram took the reply but
  before it was marked answered sends it twice. The update itself (names, user ids, message text) is
  kept only while it is open, to handle it again; once answered only the key stays, for a day, to
  refuse a repeat of its id (docs/operations.md, "What the bot stores").
- `daily:<chat>:<day>`: a daily post, written in the same transaction that claims the day. It is
  marked `sending` just before the post goes to Telegram. An open entry still `claimed` is made
  again after a crash; one already `sending` never is, since Telegram may have it: a chat never gets
  two posts, and a crash in that instant costs the day's post.

Each bot process has a random owner id. On PostgreSQL it holds an advisory lock on that id for its
whole life (OwnerLock), so another process can tell a crashed owner (lock free) from a live one (lock
held): the lock goes with the dead process's connection. A live process can lose it too, when the
server restarts or its connection drops, so OwnerLock checks it every LIVENESS_CHECK_SECONDS and takes
it again; meanwhile the others must not take its entries for a dead process's. Two rules keep them
from it: a process takes over only while it holds its own lock and has held it for TAKEOVER_GRACE since
it last had to take it again (every process loses its lock in a restart, so each waits for the others
to take theirs back), and before sending a reply, the owner checks in one conditional UPDATE that the
entry is still its own (hand_over), so what another process took over is answered there, not twice.
What remains is docs/operations.md's "What is guaranteed". SQLite serves one bot process (Telegram
allows one getUpdates poller per bot), so there every owner but oneself is gone.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, Engine, delete, exists, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db.database import Database, describe, insert_new
from db.models import Chat, InboxEntry

log = logging.getLogger(__name__)

# Any fixed 32-bit number: the first key of the two-key advisory locks, so ours cannot collide with
# other applications' locks on the same database.
ADVISORY_LOCK_CLASS = 0x5BEEC4

RECEIVED, HANDLING, QUEUED, CLAIMED, SENDING, ANSWERED = (
    "received",
    "handling",
    "queued",
    "claimed",
    "sending",
    "answered",
)
# An update's entry that no handler has claimed yet: received here, or taken over from a gone process.
UNCLAIMED = (RECEIVED, QUEUED)
# How often a process checks that it still holds its liveness lock, and takes it again if not.
LIVENESS_CHECK_SECONDS = 1.0
# How long a process that had to take its own lock again (a restart of the server, a dropped connection)
# waits before it takes over anyone's entries: the others lost theirs in the same restart and need a few
# checks to take them back. Many times LIVENESS_CHECK_SECONDS, for a loaded machine.
TAKEOVER_GRACE_SECONDS = 10.0
RELEASE_WAIT_SECONDS = 5.0  # how long a stopping process waits for a check in progress
# Whether the liveness lock on (class, owner) is held by the session whose pid is given.
LOCK_HELD_BY = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = CAST(:kind AS oid)"
    " AND objid = CAST(:owner AS oid) AND objsubid = 2 AND pid = :pid AND granted)"
)
# The tables themselves, for the statements run for every update: Core statements skip the ORM's
# bulk-update bookkeeping, which cost more than the statements (docs/speed.md).
ENTRIES, CHATS = InboxEntry.__table__, Chat.__table__
UPDATE_PREFIX = "update:"
# What an entry keeps once answered: its key (to refuse a repeat), chat, state and times. The update it
# held was needed only to handle it again after a crash; an answered one never is, so it goes at once.
ANSWERED_VALUES = {"state": ANSWERED, "payload": None}


def update_key(update_id: int) -> str:
    return f"{UPDATE_PREFIX}{update_id}"


def daily_key(chat_id: int, day: date) -> str:
    return f"daily:{chat_id}:{day.isoformat()}"


@dataclass(frozen=True)
class OpenEntry:
    """An entry taken over from a process that is gone."""

    key: str
    chat_id: int
    payload: dict | None
    state: str
    received_at: datetime

    @property
    def is_update(self) -> bool:
        return self.key.startswith(UPDATE_PREFIX)

    @property
    def day(self) -> date:
        return date.fromisoformat(self.key.rsplit(":", 1)[1])


def add_entry(session: Session, key: str, chat_id: int, owner: int, state: str, now: datetime, payload=None) -> bool:
    """Open an entry unless one with its key exists; True if this call opened it."""
    encoded = None if payload is None else json.dumps(payload, separators=(",", ":"))
    return insert_new(
        session, InboxEntry, key=key, chat_id=chat_id, owner=owner, state=state, received_at=now, payload=encoded
    )


def lock_key(owner: int) -> dict:
    return {"kind": ADVISORY_LOCK_CLASS, "owner": owner}


class OwnerLock:
    """The PostgreSQL advisory lock that says a process is alive, held on a connection of its own for the
    process's life and taken again whenever it is found lost (a server restart, a dropped connection).

    A thread of its own checks it, so neither a busy event loop nor database calls stuck on locks can
    delay it. The check asks pg_locks whether this connection's session holds the lock, not merely
    whether the connection answers: SQLAlchemy quietly opens a new session after a lost one.
    """

    def __init__(self, engine: Engine, owner: int, check_seconds: float = LIVENESS_CHECK_SECONDS):
        self.engine = engine
        self.owner = owner
        self.check_seconds = check_seconds
        self._connection: Connection | None = None
        self._state = threading.Lock()  # pid and retaken_at are read together by other threads
        self._pid: int | None = None  # the server process of the session that holds the lock; None: not held
        self._retaken_at: float | None = None  # time.monotonic() of the last take after a loss; None: never lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock (waiting for it if need be) and start checking it; raises if the database cannot be used."""
        self._connection = self.engine.connect()
        self._connection.execute(text("SELECT pg_advisory_lock(:kind, :owner)"), lock_key(self.owner))
        pid = self._connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        self._connection.commit()
        with self._state:
            self._pid = pid
        self._thread = threading.Thread(target=self._watch, name="liveness-lock", daemon=True)
        self._thread.start()

    def holder(self) -> tuple[int | None, float | None]:
        """The pid of the session holding the lock as last seen (None: lost), and when it was last taken again."""
        with self._state:
            return self._pid, self._retaken_at

    def _watch(self) -> None:
        while not self._stop.wait(self.check_seconds):
            self.check()

    def check(self) -> bool:
        """Whether the lock is held, taking it again if it was lost and can be had now."""
        try:
            if self._connection is None:
                self._connection = self.engine.connect()
            connection = self._connection
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            held = connection.execute(LOCK_HELD_BY, lock_key(self.owner) | {"pid": pid}).scalar_one()
            # try: a process checking whether this one is gone holds the lock for its transaction's moment.
            retake = text("SELECT pg_try_advisory_lock(:kind, :owner)")
            if not held and connection.execute(retake, lock_key(self.owner)).scalar_one():
                held = True
                with self._state:
                    self._pid, self._retaken_at = pid, time.monotonic()
                log.warning(
                    "Took the liveness lock again; taking over other processes' requests waits %g s for theirs",
                    TAKEOVER_GRACE_SECONDS,
                )
            connection.commit()
            return held
        except SQLAlchemyError as error:
            with self._state:
                lost, self._pid = self._pid is not None, None
            if lost:
                log.warning(
                    "Lost the database session that marks this process alive (%s); taking it again as soon as "
                    "the database answers",
                    describe(error),
                )
            self._drop_connection()
            return False

    def _drop_connection(self) -> None:
        # Closed for good, not returned to the pool: a pooled session would keep holding the lock.
        if self._connection is not None:
            with suppress(SQLAlchemyError):
                self._connection.invalidate()
            self._connection.close()
            self._connection = None

    def release(self) -> None:
        """Stop checking and let the lock go (as a dead process's goes)."""
        self._stop.set()
        if self._thread is not None:
            # A check waiting for a server out of reach is left to the process's end (the thread is a daemon).
            self._thread.join(timeout=RELEASE_WAIT_SECONDS)
            if self._thread.is_alive():
                return
        with self._state:
            self._pid = None
        if self._connection is not None:
            # Said, not left to the server to find out: a closed connection's session ends a moment later.
            with suppress(SQLAlchemyError):
                self._connection.execute(text("SELECT pg_advisory_unlock(:kind, :owner)"), lock_key(self.owner))
        self._drop_connection()


class Inbox:
    def __init__(self, database: Database, owner: int | None = None):
        self.database = database
        self.owner = random.getrandbits(31) if owner is None else owner
        # Whether other processes share the entries: only PostgreSQL serves several (db.database,
        # one_process_per_sqlite_file).
        self.shared = database.dialect == "postgresql"
        self._lock: OwnerLock | None = None

    async def open(self) -> None:
        """Mark this process alive for as long as it runs (PostgreSQL: hold the owner's advisory lock)."""
        if self.shared and self._lock is None:
            lock = OwnerLock(self.database.engine, self.owner)
            await self.database.call(lock.acquire)
            self._lock = lock

    def liveness(self) -> tuple[int | None, float | None]:
        """OwnerLock.holder(): who holds this process's liveness lock, and when it was last taken back."""
        return (None, None) if self._lock is None else self._lock.holder()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _is_gone(self, session: Session, owner: int) -> bool:
        if owner == self.owner:
            return False
        if not self.shared:
            return True
        # Free means no live session holds it. The transaction-level lock ends with this transaction.
        return session.execute(text("SELECT pg_try_advisory_xact_lock(:kind, :owner)"), lock_key(owner)).scalar_one()

    def _may_take_over(self, session: Session) -> bool:
        """Whether this process may judge others gone: it holds its own lock, and has for TAKEOVER_GRACE_SECONDS
        if it had to take it again. A process that lost its lock (as every one does when the server restarts)
        cannot tell a gone process from one that has not yet taken its lock back."""
        if not self.shared:
            return True
        pid, retaken_at = self.liveness()
        if pid is None or (retaken_at is not None and time.monotonic() - retaken_at < TAKEOVER_GRACE_SECONDS):
            return False
        # Asked in this transaction, not taken from the checking thread's last look: the lock may be gone by now.
        return session.execute(LOCK_HELD_BY, lock_key(self.owner) | {"pid": pid}).scalar_one()

    async def record_received(self, update_id: int, chat_id: int, payload: dict, now: datetime) -> bool:
        """Record an update as it arrives, before Telegram is told it did; True: it is new, and this process's
        to answer without claim_update; False: it is known already (a copy sent again, or a taken-over one)."""
        return await self.database.run(
            lambda session: add_entry(session, update_key(update_id), chat_id, self.owner, RECEIVED, now, payload)
        )

    async def claim_update(self, update_id: int, chat_id: int, payload: dict, now: datetime) -> bool:
        """Record an update before its reply; False if it is not ours to answer (answered, or someone else's)."""
        key = update_key(update_id)

        def work(session: Session) -> bool:
            if add_entry(session, key, chat_id, self.owner, HANDLING, now, payload):
                return True
            # Taken over by take_over(): the first copy to get here handles it; a copy Telegram sent again
            # finds it handling already, or `received` by a copy that this process is handling (whose
            # record_received said so).
            taken = session.execute(
                update(ENTRIES)
                .where(ENTRIES.c.key == key, ENTRIES.c.owner == self.owner, ENTRIES.c.state == QUEUED)
                .values(state=HANDLING)
            )
            return taken.rowcount == 1

        return await self.database.run(work)

    async def drop_unclaimed(self, update_id: int) -> None:
        """Delete our entry of an update that was handled without a claim: nothing was owed for it."""
        key = update_key(update_id)
        await self.database.run(
            lambda session: session.execute(
                delete(ENTRIES).where(
                    ENTRIES.c.key == key, ENTRIES.c.owner == self.owner, ENTRIES.c.state.in_(UNCLAIMED)
                )
            )
        )

    async def hand_over(self, key: str) -> bool:
        """Whether the reply for `key` may be sent here: the entry is still ours (now marked `sending`), or there
        is none (it could not be recorded). False: another process took it over, or it was answered.

        On SQLite no other process takes entries over, so nothing is asked. On PostgreSQL the conditional
        UPDATE waits for a take-over of the same row that is under way, and wins or loses against it.
        """
        if not self.shared:
            return True

        def work(session: Session) -> bool:
            ours = session.execute(
                update(ENTRIES)
                .where(ENTRIES.c.key == key, ENTRIES.c.owner == self.owner, ENTRIES.c.answered_at.is_(None))
                .values(state=SENDING)
            )
            return ours.rowcount == 1 or not session.execute(select(exists().where(ENTRIES.c.key == key))).scalar()

        return await self.database.run(work)

    async def mark(self, key: str, state: str, now: datetime) -> bool:
        """Move our entry to `state`; ANSWERED also stamps it and drops the update it held. False if the entry is
        not ours (any more)."""
        values = {"state": state} | (ANSWERED_VALUES | {"answered_at": now} if state == ANSWERED else {})
        return await self.database.run(
            lambda session: (
                session.execute(
                    update(ENTRIES).where(ENTRIES.c.key == key, ENTRIES.c.owner == self.owner).values(**values)
                ).rowcount
                == 1
            )
        )

    async def take_over(self, now: datetime) -> list[OpenEntry]:
        """Claim the open entries of processes that are gone; daily posts already `sending` are closed instead.
        Nothing while this process cannot tell (_may_take_over)."""

        def work(session: Session) -> list[OpenEntry]:
            if not self._may_take_over(session):
                log.info(
                    "Not taking over other processes' requests now: this process's liveness lock is not held, or "
                    "was taken back less than %g s ago",
                    TAKEOVER_GRACE_SECONDS,
                )
                return []
            rows = session.scalars(
                select(InboxEntry).where(InboxEntry.answered_at.is_(None), InboxEntry.owner != self.owner)
            ).all()
            gone = {owner for owner in {row.owner for row in rows} if self._is_gone(session, owner)}
            taken = []
            for row in rows:
                if row.owner not in gone:
                    continue
                is_update = row.key.startswith(UPDATE_PREFIX)
                # A daily post handed to Telegram is never made again (a day's post at most once); a reply is
                # (each request answered at least once), which repeats it if Telegram had taken it.
                never_again = row.state == SENDING and not is_update
                values = {"owner": self.owner}
                if never_again:
                    values |= ANSWERED_VALUES | {"answered_at": now}
                elif is_update:
                    values["state"] = QUEUED
                    if row.state == SENDING:
                        log.warning("%s was being answered when its process died; answering it again", row.key)
                won = session.execute(
                    update(InboxEntry)
                    .where(InboxEntry.key == row.key, InboxEntry.owner == row.owner, InboxEntry.answered_at.is_(None))
                    .values(**values)
                )
                if won.rowcount == 1 and not never_again:
                    if is_update:
                        # The cooldown the cut-short request started is its own: without this, a speech
                        # handled again soon after the crash would be told to wait for itself.
                        session.execute(update(CHATS).where(CHATS.c.id == row.chat_id).values(speech_ready_at=None))
                    payload = None if row.payload is None else json.loads(row.payload)
                    state = values.get("state", row.state)
                    taken.append(OpenEntry(row.key, row.chat_id, payload, state, row.received_at))
            return taken

        return await self.database.run(work)

    async def forget_answered(self, before: datetime) -> int:
        """Delete entries answered before `before`; they are kept a while only to refuse repeats."""
        return await self.database.run(
            lambda session: session.execute(delete(InboxEntry).where(InboxEntry.answered_at < before)).rowcount
        )
