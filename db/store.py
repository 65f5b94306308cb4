"""ChatStore: every read and write of chat settings, each write committed at once, none on the event loop.

Besides settings, each chat's row keeps the state that replicas must share: the cooldown, the daily post's
day, the chatter's last interjection and daily count, the quiet time and the speech counts of /stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import ColumnElement, Engine, case, delete, or_, select, update
from sqlalchemy.orm import Session

from db.database import Database, OnCall, insert_new
from db.inbox import CHATS, CLAIMED, ENTRIES, add_entry, daily_key
from db.models import Chat, utc_now


@dataclass(frozen=True)
class ChatSettings:
    """A snapshot of one chat's row, detached from any session."""

    id: int
    type: str
    temperature: float
    length: int
    daily_time: time | None
    time_zone: str
    schedule_enabled: bool
    last_daily_post: date | None
    chatter_rate: float | None  # None: no interjections
    chatter_last_at: datetime | None
    chatter_day: date | None  # UTC
    chatter_today: int  # interjections on chatter_day
    quiet_until: datetime | None
    speeches_total: int
    speeches_day: date | None  # UTC
    speeches_today: int  # speeches on speeches_day
    voice: str | None  # None: the default voice

    @classmethod
    def from_row(cls, row: Chat) -> ChatSettings:
        return cls(
            id=row.id,
            type=row.type,
            temperature=row.temperature,
            length=row.length,
            daily_time=row.daily_time,
            time_zone=row.time_zone,
            schedule_enabled=row.schedule_enabled,
            last_daily_post=row.last_daily_post,
            chatter_rate=row.chatter_rate,
            chatter_last_at=row.chatter_last_at,
            chatter_day=row.chatter_day,
            chatter_today=row.chatter_today,
            quiet_until=row.quiet_until,
            speeches_total=row.speeches_total,
            speeches_day=row.speeches_day,
            speeches_today=row.speeches_today,
            voice=row.voice,
        )

    def speeches_on(self, day: date) -> int:
        """The speeches counted on `day` (a UTC date)."""
        return self.speeches_today if self.speeches_day == day else 0


@dataclass(frozen=True)
class Forgotten:
    """What ChatStore.forget deleted: the chat's row as it was (None if there was none) and its inbox entries."""

    settings: ChatSettings | None
    inbox_entries: int

    def __bool__(self) -> bool:
        return self.settings is not None or self.inbox_entries > 0


def utc_day(moment: datetime) -> date:
    """The UTC date of `moment`: the day the speech counts and the daily cap of interjections go by."""
    return moment.astimezone(UTC).date()


def _one_more_speech(day: date) -> dict[str, ColumnElement | date]:
    """The values that count one more speech on `day`, for an UPDATE of the chat's row (a new day starts at 1)."""
    columns = CHATS.c
    return {
        "speeches_total": columns.speeches_total + 1,
        "speeches_today": case((columns.speeches_day == day, columns.speeches_today + 1), else_=1),
        "speeches_day": day,
    }


class ChatStore:
    """Chat rows keyed by Telegram chat id. New chats start with the given default settings.

    Every method is a coroutine whose transaction runs on a database thread (db.database.Database).
    """

    def __init__(
        self, engine: Engine, default_temperature: float, default_length: int, on_database_call: OnCall | None = None
    ):
        self.database = Database(engine, on_call=on_database_call)
        self.default_temperature = default_temperature
        self.default_length = default_length

    def close(self) -> None:
        self.database.close()

    def _insert_defaults(self, session: Session, chat_id: int, chat_type: str) -> bool:
        """A row with the default settings for a chat met for the first time; True if it was new.

        Two replicas may meet a new chat at the same moment: the insert lets the first one win."""
        values = {"temperature": self.default_temperature, "length": self.default_length}
        return insert_new(session, Chat, id=chat_id, type=chat_type, **values)

    def _get_row(self, session: Session, chat_id: int, chat_type: str) -> Chat:
        row = session.get(Chat, chat_id)
        if row is None:
            self._insert_defaults(session, chat_id, chat_type)
            row = session.get(Chat, chat_id)
        if row.type != chat_type:
            row.type = chat_type
            session.flush()
        return row

    async def get(self, chat_id: int, chat_type: str) -> ChatSettings:
        """The chat's settings, creating its row with the defaults on first contact."""
        return await self.database.run(
            lambda session: ChatSettings.from_row(self._get_row(session, chat_id, chat_type))
        )

    async def find(self, chat_id: int) -> ChatSettings | None:
        def work(session: Session) -> ChatSettings | None:
            row = session.get(Chat, chat_id)
            return None if row is None else ChatSettings.from_row(row)

        return await self.database.run(work)

    async def update(self, chat_id: int, **values) -> ChatSettings:
        """Change columns of an existing chat; the commit happens before this returns."""

        def work(session: Session) -> ChatSettings:
            row = session.get(Chat, chat_id)
            if row is None:
                raise KeyError(f"chat {chat_id} is not stored")
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            return ChatSettings.from_row(row)

        return await self.database.run(work)

    async def scheduled(self) -> list[ChatSettings]:
        def work(session: Session) -> list[ChatSettings]:
            rows = session.scalars(select(Chat).where(Chat.schedule_enabled.is_(True)).order_by(Chat.id))
            return [ChatSettings.from_row(row) for row in rows]

        return await self.database.run(work)

    async def start_speech(
        self, chat_id: int, chat_type: str, now: datetime, cooldown: timedelta
    ) -> tuple[ChatSettings, datetime | None]:
        """Start the chat's cooldown and return its settings, or, if a cooldown runs, when it ends.

        One conditional UPDATE, so two replicas asked at the same moment cannot both start a speech.
        """

        # Core statements on the table, two for every speech: this runs once per speech, and the ORM's
        # identity map and bulk-update bookkeeping cost more than the statements (docs/speed.md).
        chats = Chat.__table__
        ready = chats.c.speech_ready_at

        def work(session: Session) -> tuple[ChatSettings, datetime | None]:
            self._insert_defaults(session, chat_id, chat_type)
            row = session.execute(
                update(chats)
                .where(chats.c.id == chat_id, or_(ready.is_(None), ready <= now))
                .values(speech_ready_at=now + cooldown, type=chat_type, **_one_more_speech(utc_day(now)))
                .returning(*chats.c)
            ).first()
            if row is not None:
                return ChatSettings.from_row(row), None
            row = session.execute(
                update(chats).where(chats.c.id == chat_id).values(type=chat_type).returning(*chats.c)
            ).one()
            return ChatSettings.from_row(row), row.speech_ready_at

        return await self.database.run(work)

    async def cancel_cooldown(self, chat_id: int, ready_at: datetime) -> None:
        """Undo start_speech's (or claim_interjection's) cooldown and speech count, since nothing was made,
        unless a later speech has set its own cooldown."""
        columns = CHATS.c
        uncounted = {
            name: case((columns[name] > 0, columns[name] - 1), else_=0) for name in ("speeches_total", "speeches_today")
        }
        await self.database.run(
            lambda session: session.execute(
                update(CHATS)
                .where(columns.id == chat_id, columns.speech_ready_at == ready_at)
                .values(speech_ready_at=None, **uncounted)
            )
        )

    async def claim_interjection(
        self, chat_id: int, now: datetime, gap: timedelta, daily_cap: int, cooldown: timedelta
    ) -> ChatSettings | None:
        """Start an unprompted speech (an interjection) in the chat if everything allows one now: chatter on,
        not quiet, no interjection within `gap`, fewer than `daily_cap` today (UTC), no cooldown running.
        Starts the cooldown and counts the interjection and the speech; None if anything forbids it.

        One conditional UPDATE, so two replicas (or two messages) cannot both start one: the gap that the
        first one opens refuses the second.
        """
        columns, today = CHATS.c, utc_day(now)
        statement = (
            update(CHATS)
            .where(
                columns.id == chat_id,
                columns.chatter_rate.is_not(None),
                or_(columns.quiet_until.is_(None), columns.quiet_until <= now),
                or_(columns.chatter_last_at.is_(None), columns.chatter_last_at <= now - gap),
                or_(columns.speech_ready_at.is_(None), columns.speech_ready_at <= now),
                or_(columns.chatter_day.is_(None), columns.chatter_day != today, columns.chatter_today < daily_cap),
            )
            .values(
                chatter_last_at=now,
                chatter_today=case((columns.chatter_day == today, columns.chatter_today + 1), else_=1),
                chatter_day=today,
                speech_ready_at=now + cooldown,
                **_one_more_speech(today),
            )
            .returning(*CHATS.c)
        )

        def work(session: Session) -> ChatSettings | None:
            row = session.execute(statement).first()
            return None if row is None else ChatSettings.from_row(row)

        return await self.database.run(work)

    async def claim_daily_post(self, chat_id: int, day: date, owner: int, now: datetime | None = None) -> bool:
        """Record that `day`'s post is being made; False if it already was, or the schedule is off.

        One conditional UPDATE, so two processes or two timers racing for the same day cannot both
        win: the at-most-once-per-day guard. The same transaction opens the post's inbox entry, so a
        crash while it is written leaves it to be made again (db/inbox.py).
        """
        now = now or utc_now()

        def work(session: Session) -> bool:
            claimed = session.execute(
                update(Chat)
                .where(
                    Chat.id == chat_id,
                    Chat.schedule_enabled.is_(True),
                    or_(Chat.last_daily_post.is_(None), Chat.last_daily_post < day),
                )
                .values(last_daily_post=day, updated_at=utc_now(), **_one_more_speech(utc_day(now)))
            )
            if claimed.rowcount != 1:
                return False
            add_entry(session, daily_key(chat_id, day), chat_id, owner, CLAIMED, now)
            return True

        return await self.database.run(work)

    async def migrate_chat(self, old_id: int, new_id: int) -> ChatSettings | None:
        """Move a group's row to its new supergroup id (Telegram's ChatMigrated)."""

        def work(session: Session) -> ChatSettings | None:
            old = session.get(Chat, old_id)
            if old is None:
                return None
            # A row for the new id may exist already if the supergroup spoke first; the group's
            # own settings are the ones its members chose, so they win.
            session.execute(delete(Chat).where(Chat.id == new_id))
            moved = {"id": new_id, "type": "supergroup", "updated_at": utc_now()}
            session.execute(update(Chat).where(Chat.id == old_id).values(**moved))
            return ChatSettings.from_row(session.get(Chat, new_id, populate_existing=True))

        return await self.database.run(work)

    async def forget(self, chat_id: int) -> Forgotten:
        """Delete everything stored about a chat: its row (settings, schedule, cooldown, chatter, quiet time
        and speech counts with it) and its inbox entries, open or answered; what was deleted comes back, true
        if there was anything. A chat that speaks again starts afresh.

        The caller's own entry goes too (a /forget being answered): a repeat of that update is then
        handled again, which repeats a deletion. Open entries are the chat's messages, so they go even
        if another process is answering them; that reply is still sent, and its mark finds no entry.
        """

        def work(session: Session) -> Forgotten:
            # Core statements: no row is loaded just to be deleted. The inbox has no index on chat_id; a
            # forget is rare and the table holds a day of entries at most.
            row = session.execute(delete(CHATS).where(CHATS.c.id == chat_id).returning(*CHATS.c)).first()
            entries = session.execute(delete(ENTRIES).where(ENTRIES.c.chat_id == chat_id)).rowcount
            return Forgotten(None if row is None else ChatSettings.from_row(row), entries)

        return await self.database.run(work)
