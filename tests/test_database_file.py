"""A SQLite file deleted under the running bot is said at ERROR and confirms no more saves, and the next start
refuses to make an empty database in its place unless `python -m bot migrate --create` says so; a first start
on a fresh machine makes both the database and the marker that remembers it (real processes)."""

from __future__ import annotations

import re

from db.database import CREATED_MARKER_SUFFIX, create_db_engine, migrate
from tests.support.bot_harness import ALICE, TOKEN, bot_environment, private_chat, run_bot
from tests.support.bot_process import killable_bot
from tests.test_crash_recovery import SLOW

CHAT = private_chat(ALICE)
DEFAULT_URL = "sqlite:///data/bot.db"  # the README's quick start: data/bot.db where the bot is started


async def test_a_sqlite_file_deleted_under_the_running_bot_is_noticed_and_not_made_again_silently(
    emulator, tmp_path, model_path
):
    database = tmp_path / "data" / "bot.db"
    marker = database.with_name(database.name + CREATED_MARKER_SUFFIX)
    async with killable_bot(emulator, DEFAULT_URL, tmp_path, name="first") as bot:
        assert database.exists() and marker.exists(), "a first start makes the database and the marker"
        assert await emulator.ask(CHAT, ALICE, "/temperature 1.5", timeout=SLOW) == "Temperature set to 1.5."
        database.unlink()
        refused = await emulator.ask(CHAT, ALICE, "/temperature 1.2", timeout=SLOW)
        assert refused != "Temperature set to 1.2.", "a save into the deleted file is not confirmed"
        assert "was deleted while the bot ran" in refused
    said = r" ERROR db\.database: The SQLite database .*bot\.db was deleted while the bot ran"
    assert re.search(said, bot.log.read_text())

    environment = bot_environment(
        model_path, TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_BASE_URL=emulator.base_url, DATABASE_URL=DEFAULT_URL
    )
    start = run_bot(tmp_path, environment, "run")
    assert start.returncode == 2 and start.stderr.count("\n") == 1, start.stderr
    assert start.stderr.startswith("error: the SQLite database") and "is missing" in start.stderr
    assert "python -m bot migrate --create" in start.stderr
    assert not database.exists(), "no empty database was made in its place"

    created = run_bot(tmp_path, environment, "migrate", "--create")
    assert created.returncode == 0, created.stderr
    async with killable_bot(emulator, DEFAULT_URL, tmp_path, name="second"):
        assert "temperature: 0.8" in await emulator.ask(CHAT, ALICE, "/settings", timeout=SLOW), "a new, empty one"


def test_a_database_made_before_markers_existed_gets_one_and_keeps_working(tmp_path):
    database = tmp_path / "bot.db"
    engine = create_db_engine(f"sqlite:///{database}")
    migrate(engine)
    marker = database.with_name(database.name + CREATED_MARKER_SUFFIX)
    marker.unlink()  # as an earlier version left it
    migrate(engine)
    assert marker.exists() and "python -m bot migrate --create" in marker.read_text()
    engine.dispose()
