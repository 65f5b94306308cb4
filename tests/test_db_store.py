"""The chat store on real SQLite files: migrations, defaults, the daily guard, group migration."""

from __future__ import annotations

import sqlite3
from datetime import date, time

import pytest
from sqlalchemy import inspect

from db.database import DatabaseConfigError, create_db_engine, migrate
from db.store import ChatStore


def open_store(path) -> ChatStore:
    engine = create_db_engine(f"sqlite:///{path}")
    migrate(engine)
    return ChatStore(engine, default_temperature=0.8, default_length=300)


def test_migration_creates_folder_table_and_wal(tmp_path):
    path = tmp_path / "nested" / "bot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate(engine)
    migrate(engine)  # a second start finds nothing to do
    assert "chats" in inspect(engine).get_table_names()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"


def test_new_chat_gets_defaults_and_changes_survive_reopen(tmp_path):
    store = open_store(tmp_path / "bot.db")
    settings = store.get(42, "private")
    assert (settings.temperature, settings.length, settings.schedule_enabled) == (0.8, 300, False)
    store.update(42, temperature=1.3, length=120, daily_time=time(7, 30), time_zone="Europe/Berlin")

    reopened = open_store(tmp_path / "bot.db")
    settings = reopened.find(42)
    assert (settings.temperature, settings.length) == (1.3, 120)
    assert (settings.daily_time, settings.time_zone) == (time(7, 30), "Europe/Berlin")


def test_daily_claim_is_won_once_per_day_and_only_when_enabled(tmp_path):
    store = open_store(tmp_path / "bot.db")
    store.get(-5, "group")
    assert not store.claim_daily_post(-5, date(2026, 3, 1)), "no schedule yet"
    store.update(-5, daily_time=time(9, 0), schedule_enabled=True)
    assert store.claim_daily_post(-5, date(2026, 3, 1))
    assert not store.claim_daily_post(-5, date(2026, 3, 1))
    assert not open_store(tmp_path / "bot.db").claim_daily_post(-5, date(2026, 3, 1)), "across a restart"
    assert not store.claim_daily_post(-5, date(2026, 2, 28)), "a day already passed"
    assert store.claim_daily_post(-5, date(2026, 3, 2))
    assert [chat.id for chat in store.scheduled()] == [-5]


def test_migrate_chat_moves_settings_to_the_supergroup(tmp_path):
    store = open_store(tmp_path / "bot.db")
    store.get(-100, "group")
    store.update(-100, temperature=0.4, daily_time=time(8, 0), schedule_enabled=True)
    store.get(-1000000000100, "supergroup")  # the supergroup spoke before the migration arrived
    moved = store.migrate_chat(-100, -1000000000100)
    assert (moved.id, moved.type, moved.temperature, moved.schedule_enabled) == (
        -1000000000100,
        "supergroup",
        0.4,
        True,
    )
    assert store.find(-100) is None
    assert store.migrate_chat(-100, -1000000000100) is None, "a second notice is harmless"


@pytest.mark.parametrize(
    ("url", "expected"),
    [("not a url", "is not a database URL"), ("nosuchdb://x/y", "needs a driver")],
)
def test_bad_database_url_is_explained(url, expected):
    with pytest.raises(DatabaseConfigError, match=expected):
        create_db_engine(url)
