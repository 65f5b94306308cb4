"""ChatStore: every read and write of chat settings, each write committed at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, time

from sqlalchemy import Engine, delete, or_, select, update
from sqlalchemy.orm import sessionmaker

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
        )


class ChatStore:
    """Chat rows keyed by Telegram chat id. New chats start with the given default settings."""

    def __init__(self, engine: Engine, default_temperature: float, default_length: int):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.default_temperature = default_temperature
        self.default_length = default_length

    def get(self, chat_id: int, chat_type: str) -> ChatSettings:
        """The chat's settings, creating its row with the defaults on first contact."""
        with self._sessions.begin() as session:
            row = session.get(Chat, chat_id)
            if row is None:
                row = Chat(
                    id=chat_id,
                    type=chat_type,
                    temperature=self.default_temperature,
                    length=self.default_length,
                )
                session.add(row)
            elif row.type != chat_type:
                row.type = chat_type
            session.flush()
            return ChatSettings.from_row(row)

    def find(self, chat_id: int) -> ChatSettings | None:
        with self._sessions() as session:
            row = session.get(Chat, chat_id)
            return None if row is None else ChatSettings.from_row(row)

    def update(self, chat_id: int, **values) -> ChatSettings:
        """Change columns of an existing chat; the commit happens before this returns."""
        with self._sessions.begin() as session:
            row = session.get(Chat, chat_id)
            if row is None:
                raise KeyError(f"chat {chat_id} is not stored")
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            return ChatSettings.from_row(row)

    def scheduled(self) -> list[ChatSettings]:
        with self._sessions() as session:
            rows = session.scalars(select(Chat).where(Chat.schedule_enabled.is_(True)).order_by(Chat.id))
            return [ChatSettings.from_row(row) for row in rows]

    def claim_daily_post(self, chat_id: int, day: date) -> bool:
        """Record that `day`'s post is being made; False if it already was, or the schedule is off.

        One conditional UPDATE, so two processes or two timers racing for the same day cannot
        both win: this is the at-most-once-per-day guard.
        """
        with self._sessions.begin() as session:
            result = session.execute(
                update(Chat)
                .where(
                    Chat.id == chat_id,
                    Chat.schedule_enabled.is_(True),
                    or_(Chat.last_daily_post.is_(None), Chat.last_daily_post < day),
                )
                .values(last_daily_post=day, updated_at=utc_now())
            )
            return result.rowcount == 1

    def migrate_chat(self, old_id: int, new_id: int) -> ChatSettings | None:
        """Move a group's row to its new supergroup id (Telegram's ChatMigrated)."""
        with self._sessions.begin() as session:
            old = session.get(Chat, old_id)
            if old is None:
                return None
            # A row for the new id may exist already if the supergroup spoke first; the group's
            # own settings are the ones its members chose, so they win.
            session.execute(delete(Chat).where(Chat.id == new_id))
            moved = {"id": new_id, "type": "supergroup", "updated_at": utc_now()}
            session.execute(update(Chat).where(Chat.id == old_id).values(**moved))
            return ChatSettings.from_row(session.get(Chat, new_id, populate_existing=True))
