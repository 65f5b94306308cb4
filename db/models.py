"""The ORM schema: one row per chat holding its settings and its daily schedule."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Float, Integer, String, Time
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(UTC)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)
