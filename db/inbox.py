"""The durable inbox: what a user is owed survives a crash of the process that owed it.

Two kinds of entries, one table:
- `update:<update_id>`: an update that will get a reply, recorded as it is handled and marked
  answered after the reply was sent. A crash in between leaves it open; the next start (or a
  surviving replica) takes it over and handles it again: at least once across a crash, at most once
  otherwise. A crash after Telegram took the reply but before it was marked answered sends it twice.
  The update itself (names, user ids, message text) is kept only while it is open, to handle it
  again; once answered only the key stays, for a day, to refuse a repeat of its id
  (docs/operations.md, "What the bot stores").
- `daily:<chat>:<day>`: a daily post, written in the same transaction that claims the day. It is
  marked `sending` just before the post goes to Telegram. An open entry still `claimed` is made
  again after a crash; one already `sending` never is, since Telegram may have it: a chat never gets
  two posts, and a crash in that instant costs the day's post.

Each bot process has a random owner id. On PostgreSQL it holds an advisory lock on that id for its
whole life, so another process can tell a crashed owner (lock free) from a live one (lock held):
the lock goes with the dead process's connection. SQLite serves one bot process (Telegram allows one
getUpdates poller per bot), so there every owner but oneself is gone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, delete, select, text, update
from sqlalchemy.orm import Session

from db.database import Database, insert_new
from db.models import Chat, InboxEntry

# Any fixed 32-bit number: the first key of the two-key advisory locks, so ours cannot collide with
# other applications' locks on the same database.
ADVISORY_LOCK_CLASS = 0x5BEEC4

HANDLING, QUEUED, CLAIMED, SENDING, ANSWERED = "handling", "queued", "claimed", "sending", "answered"
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


class Inbox:
    def __init__(self, database: Database, owner: int | None = None):
        self.database = database
        self.owner = random.getrandbits(31) if owner is None else owner
        self._life: Connection | None = None

    async def open(self) -> None:
        """Mark this process alive for as long as it runs (PostgreSQL: hold the owner's advisory lock)."""
        if self.database.dialect == "postgresql" and self._life is None:
            self._life = await self.database.call(self._hold_owner_lock)

    def _hold_owner_lock(self) -> Connection:
        connection = self.database.engine.connect()
        connection.execute(text("SELECT pg_advisory_lock(:kind, :owner)"), self._lock_key(self.owner))
        connection.commit()
        return connection

    def close(self) -> None:
        if self._life is not None:
            self._life.close()
            self._life = None

    @staticmethod
    def _lock_key(owner: int) -> dict:
        return {"kind": ADVISORY_LOCK_CLASS, "owner": owner}

    def _is_gone(self, session: Session, owner: int) -> bool:
        if owner == self.owner:
            return False
        if self.database.dialect != "postgresql":
            return True
        # Free means no live session holds it. The transaction-level lock ends with this transaction.
        return session.execute(
            text("SELECT pg_try_advisory_xact_lock(:kind, :owner)"), self._lock_key(owner)
        ).scalar_one()

    async def claim_update(self, update_id: int, chat_id: int, payload: dict, now: datetime) -> bool:
        """Record an update before its reply; False if it is not ours to answer (answered, or someone else's)."""
        key = update_key(update_id)

        def work(session: Session) -> bool:
            if add_entry(session, key, chat_id, self.owner, HANDLING, now, payload):
                return True
            # Taken over by take_over(): the first copy to get here handles it; a copy Telegram sent
            # again finds it handling already.
            taken = session.execute(
                update(ENTRIES)
                .where(ENTRIES.c.key == key, ENTRIES.c.owner == self.owner, ENTRIES.c.state == QUEUED)
                .values(state=HANDLING)
            )
            return taken.rowcount == 1

        return await self.database.run(work)

    async def mark(self, key: str, state: str, now: datetime) -> None:
        """Move our entry to `state`; ANSWERED also stamps it and drops the update it held."""
        values = {"state": state} | (ANSWERED_VALUES | {"answered_at": now} if state == ANSWERED else {})
        await self.database.run(
            lambda session: session.execute(
                update(ENTRIES).where(ENTRIES.c.key == key, ENTRIES.c.owner == self.owner).values(**values)
            )
        )

    async def take_over(self, now: datetime) -> list[OpenEntry]:
        """Claim the open entries of processes that are gone; daily posts already `sending` are closed instead."""

        def work(session: Session) -> list[OpenEntry]:
            rows = session.scalars(
                select(InboxEntry).where(InboxEntry.answered_at.is_(None), InboxEntry.owner != self.owner)
            ).all()
            gone = {owner for owner in {row.owner for row in rows} if self._is_gone(session, owner)}
            taken = []
            for row in rows:
                if row.owner not in gone:
                    continue
                never_again = row.state == SENDING
                values = {"owner": self.owner}
                if never_again:
                    values |= ANSWERED_VALUES | {"answered_at": now}
                elif row.state == HANDLING:
                    values["state"] = QUEUED
                won = session.execute(
                    update(InboxEntry)
                    .where(InboxEntry.key == row.key, InboxEntry.owner == row.owner, InboxEntry.answered_at.is_(None))
                    .values(**values)
                )
                if won.rowcount == 1 and not never_again:
                    if row.key.startswith(UPDATE_PREFIX):
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
