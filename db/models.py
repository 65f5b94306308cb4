"""The ORM schema: one row per chat (settings, voice, daily schedule, cooldown, chatter, quiet, speech
counts) and the durable inbox."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Float, Integer, String, Text, Time, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """An aware UTC datetime on every backend: SQLite keeps no zone, so values are stored in UTC and read as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, _dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Chat(Base):
    __tablename__ = "chats"

    # Telegram chat ids exceed 32 bits (supergroups are -100xxxxxxxxxx).
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(16))
    temperature: Mapped[float] = mapped_column(Float)
    length: Mapped[int] = mapped_column(Integer)
    # Local wall-clock time of the daily speech in `time_zone`; kept when the schedule is disabled
    # so /settings can still show what it was.
    daily_time: Mapped[time | None] = mapped_column(Time, default=None)
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC")
    schedule_enabled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # The local date of the last daily post: the at-most-once-per-day guard.
    last_daily_post: Mapped[date | None] = mapped_column(Date, default=None)
    # When the chat may have its next speech: the cooldown lives here, not in a process, so every
    # replica sharing the database enforces the same one.
    speech_ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # /chatter: the chance that an ordinary group message gets an unprompted reply (an interjection); None: off.
    chatter_rate: Mapped[float | None] = mapped_column(Float, default=None)
    # When the last interjection started (the minimum gap runs from it), and how many the chat had on
    # chatter_day (a UTC date), for the daily cap. In the row, so replicas share both.
    chatter_last_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    chatter_day: Mapped[date | None] = mapped_column(Date, default=None)
    chatter_today: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # /quiet: no interjections and no daily posts before this.
    quiet_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # /stats: the speeches the chat was sent, in all and on speeches_day (a UTC date).
    speeches_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    speeches_day: Mapped[date | None] = mapped_column(Date, default=None)
    speeches_today: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # /voice: the name of the chat's voice (one of the served model files); None: the bot's default voice.
    voice: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class InboxEntry(Base):
    """Work a user is owed: an update that will get a reply, or a claimed daily post. See db/inbox.py."""

    __tablename__ = "inbox"

    # "update:<update_id>" or "daily:<chat id>:<local date>".
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    # The update as Telegram sent it (JSON), so it can be handled again after a crash; None once answered
    # (only the key is owed then) and for daily posts.
    payload: Mapped[str | None] = mapped_column(Text, default=None)
    # The bot process handling it (a random id per process); see Inbox.is_alive.
    owner: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None, index=True)
