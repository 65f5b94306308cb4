"""The bot over python-telegram-bot's real HTTP stack, talking to the Bot API emulator on 127.0.0.1."""

from __future__ import annotations

import hashlib
import re
import socket
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from bot.core.commands import COMMANDS
from bot.core.commands import help_text as commands_help_text
from bot.core.voices import Voices
from bot.services import build_application
from bot.telegram.app import serving
from tests.support.bot_harness import ALICE, BOB, TOKEN, Clock, bot_config, group_chat, private_chat, running_bot
from tests.support.telegram_emulator import ANONYMOUS_ADMIN, SPEC_PATH

ALICE_CHAT = private_chat(ALICE)


@pytest.fixture
async def bot(emulator, engine, tmp_path):
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), Clock()) as application:
        yield application


async def test_commands_are_registered_for_the_menu(bot, emulator):
    assert [command["command"] for command in emulator.commands] == list(COMMANDS)


async def test_the_emulator_checks_calls_against_the_bot_api_spec_kept_in_the_repository(emulator):
    # A plain clone has no ../shared: the spec and its MIT licence travel with the tests.
    root = Path(__file__).resolve().parents[1]
    assert SPEC_PATH.is_relative_to(root / "tests" / "data")
    assert "MIT License" in (SPEC_PATH.parent / "telegram-bot-api.LICENSE").read_text(encoding="utf-8")
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", (SPEC_PATH.parent / "README.md").read_text(encoding="utf-8"))
    assert hashlib.sha256(SPEC_PATH.read_bytes()).hexdigest() == recorded.group(1), "tests/data/README.md is current"
    url, form = f"{emulator.base_url}{TOKEN}/sendMessage", {"chat_id": "1", "txt": "hi"}
    async with aiohttp.ClientSession() as http, http.post(url, data=form) as reply:
        assert reply.status == 400 and "has no parameter 'txt'" in (await reply.json())["description"]


def test_help_and_the_readme_command_table_name_every_command():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Commands", 1)[1].split("\n\n", 2)[1]
    help_text = commands_help_text()
    for name in COMMANDS:
        assert f"`/{name}" in table or f"`/{name}`" in table, name
        assert f"/{name}" in help_text or name in ("start", "help"), name
    for feature in ("Another", "Calmer", "Wilder", "reply", "@"):
        assert feature in help_text and feature in table, feature


async def test_every_command_in_a_private_chat(bot, emulator):
    assert "parody" in await emulator.ask(ALICE_CHAT, ALICE, "/start")
    assert "/schedule 08:30" in await emulator.ask(ALICE_CHAT, ALICE, "/help")
    assert await emulator.ask(ALICE_CHAT, ALICE, "/temperature 1.1") == "Temperature set to 1.1."
    assert "Temperature is 1.1" in await emulator.ask(ALICE_CHAT, ALICE, "/temperature")
    assert await emulator.ask(ALICE_CHAT, ALICE, "/length 60") == "Speech length set to 60 characters."
    assert "60 characters" in await emulator.ask(ALICE_CHAT, ALICE, "/length")
    assert "Daily speech set for 09:15 Asia/Tokyo" in await emulator.ask(
        ALICE_CHAT, ALICE, "/schedule 09:15 Asia/Tokyo"
    )
    assert "09:15 Asia/Tokyo" in await emulator.ask(ALICE_CHAT, ALICE, "/settings")
    assert await emulator.ask(ALICE_CHAT, ALICE, "/unschedule") == "Daily speech removed."
    speech = await emulator.ask(ALICE_CHAT, ALICE, "/speech 0.7 We will build")
    assert speech.startswith("We will build") and len(speech) > len("We will build")
    assert "I don't know /dance" in await emulator.ask(ALICE_CHAT, ALICE, "/dance")


async def test_plain_text_in_private_is_a_prompt_answered_as_plain_text(bot, emulator):
    prompt = "<b>We</b> *will* _win_"
    # Long enough to hold a sentence end before the target: the engine streams only text sure to stay
    # (tests/test_bot_interactive.py, DRAFTED_LENGTH).
    assert "set to 600" in await emulator.ask(ALICE_CHAT, ALICE, "/length 600")
    reply_call_count = len(emulator.sent())
    assert (await emulator.ask(ALICE_CHAT, ALICE, prompt)).startswith(prompt)
    call = emulator.sent()[reply_call_count]
    assert "parse_mode" not in call.params, "no parse mode, so prompts cannot inject markup"
    assert call.params["reply_parameters"]["message_id"] > 0
    assert emulator.sent("sendMessageDraft", ALICE_CHAT["id"]), "the speech streams into view while generating"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/speech -1", "out of range"),
        ("/speech nan", "out of range"),
        ("/speech 1e309", "out of range"),
        ("/temperature 0", "out of range"),
        ("/temperature abc", "is not a temperature"),
        ("/length -1", "out of range"),
        ("/length " + "8" * 5000, "is not a length"),
        ("/schedule 25:61", "not a time of day"),
        ("/schedule 10:00 Atlantis/Capital", "not a time zone I know"),
    ],
)
async def test_bad_arguments_are_answered(bot, emulator, command, expected):
    assert expected in await emulator.ask(ALICE_CHAT, ALICE, command)


async def test_group_admins_change_settings_others_are_refused(bot, emulator):
    group = group_chat(-4001)
    emulator.admins[group["id"]] = [ALICE]
    assert await emulator.ask(group, ALICE, "/temperature@SpeechTestBot 0.4") == "Temperature set to 0.4."
    refusal = await emulator.ask(group, BOB, "/temperature 1.9")
    assert "only this group's administrators" in refusal
    assert "Temperature is 0.4" in await emulator.ask(group, BOB, "/temperature")
    assert "only this group's administrators" in await emulator.ask(group, BOB, "/unschedule")
    # Bob may still ask for speeches.
    assert len(await emulator.ask(group, BOB, "/speech@SpeechTestBot 0.5")) > 0


async def test_anonymous_admin_posting_as_the_group_is_an_admin(bot, emulator):
    group = group_chat(-1009990001, "supergroup")
    emulator.admins[group["id"]] = [BOB]  # the anonymous admin is not in the list by user id
    reply = await emulator.ask(group, ANONYMOUS_ADMIN, "/length 90", sender_chat=group)
    assert reply == "Speech length set to 90 characters."
    # A channel speaking in the group is not an admin of it.
    channel = {"id": -1007770001, "type": "channel", "title": "Some channel"}
    refusal = await emulator.ask(
        group, {"id": 136817688, "is_bot": True, "first_name": "Channel"}, "/length 50", sender_chat=channel
    )
    assert "only this group's administrators" in refusal


async def test_in_groups_only_replies_and_mentions_are_prompts(bot, emulator):
    group = group_chat(-4002)
    emulator.send_text(group, BOB, "just chatting about lunch")
    await emulator.settle()
    assert not emulator.sent(chat_id=group["id"])
    mention = await emulator.ask(group, BOB, "@SpeechTestBot We will win")
    assert mention.startswith("We will win")
    bot_message = emulator.sent(chat_id=group["id"])[-1].result
    reply = await emulator.ask(group, BOB, "Tell me more", reply_to_message=bot_message)
    assert reply.startswith("Tell me more")


@pytest.mark.parametrize(
    "update",
    [
        {"message": {"message_id": 1, "date": 0, "chat": ALICE_CHAT, "from": ALICE,
                     "sticker": {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 512,
                                 "height": 512, "is_animated": False, "is_video": False}}},
        {"message": {"message_id": 2, "date": 0, "chat": ALICE_CHAT, "from": ALICE,
                     "photo": [{"file_id": "p", "file_unique_id": "p", "width": 90, "height": 90}]}},
        {"edited_message": {"message_id": 3, "date": 0, "edit_date": 1, "chat": ALICE_CHAT, "from": ALICE,
                            "text": "/speech"}},
        {"channel_post": {"message_id": 4, "date": 0, "chat": {"id": -1005, "type": "channel", "title": "c"},
                          "text": "/speech"}},
        {"message": {"message_id": 5, "date": 0, "chat": group_chat(-4003), "from": ALICE,
                     "new_chat_members": [BOB]}},
        {"message": {"message_id": 6, "date": 0, "chat": group_chat(-4003), "from": ALICE,
                     "left_chat_member": BOB}},
        {"message": {"message_id": 7, "date": 0, "chat": group_chat(-4003), "from": ALICE,
                     "new_chat_title": "renamed"}},
    ],
    ids=["sticker", "photo", "edited", "channel_post", "joined", "left", "title"],
)  # fmt: skip
async def test_updates_not_handled_are_ignored_quietly(bot, emulator, update, caplog):
    emulator.push_update(update)
    await emulator.settle()
    assert not emulator.sent()
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    # The bot is still alive afterwards.
    assert "parody" in await emulator.ask(ALICE_CHAT, ALICE, "/start")


async def test_429_is_waited_out_and_the_reply_delivered(bot, emulator):
    emulator.inject("sendMessage", "429", retry_after=1)
    assert "Temperature is" in await emulator.ask(ALICE_CHAT, ALICE, "/temperature")
    assert [call.failure for call in emulator.calls if call.method == "sendMessage"] == ["429", None]


async def test_5xx_and_timeouts_are_retried(bot, emulator):
    emulator.inject("sendMessage", "5xx", status=502)
    emulator.inject("sendMessage", "5xx", status=500)
    assert "Temperature is" in await emulator.ask(ALICE_CHAT, ALICE, "/temperature")
    emulator.inject("sendMessage", "timeout", delay=3.0)
    assert "Speeches are" in await emulator.ask(ALICE_CHAT, ALICE, "/length")
    failures = [call.failure for call in emulator.calls if call.method == "sendMessage"]
    assert failures == ["5xx", "5xx", None, "timeout", None]


async def test_getupdates_errors_do_not_stop_polling(bot, emulator):
    emulator.inject("getUpdates", "5xx", times=2, status=503)
    assert "parody" in await emulator.ask(ALICE_CHAT, ALICE, "/start")
    assert [call.status for call in emulator.calls if call.method == "getUpdates"][:2] == [503, 503]


async def test_settings_survive_a_restart(emulator, engine, tmp_path, database_url):
    config = bot_config(emulator, tmp_path / "bot.db", database_url=database_url)
    group = group_chat(-4004)
    emulator.admins[group["id"]] = [ALICE]
    async with running_bot(emulator, engine, config, Clock()):
        await emulator.ask(ALICE_CHAT, ALICE, "/temperature 1.7")
        await emulator.ask(group, ALICE, "/length 33")
    async with running_bot(emulator, engine, config, Clock()):
        assert "temperature: 1.7" in await emulator.ask(ALICE_CHAT, ALICE, "/settings")
        assert "length: 33 characters" in await emulator.ask(group, BOB, "/settings")


@pytest.fixture
async def bot_on_both(emulator, engine, tmp_path, database_url):
    """The bot on SQLite and on PostgreSQL."""
    config = bot_config(emulator, tmp_path / "bot.db", database_url=database_url)
    async with running_bot(emulator, engine, config, Clock()) as application:
        yield application


async def test_group_upgraded_to_supergroup_keeps_its_settings(bot_on_both, emulator):
    group, supergroup = group_chat(-4005), group_chat(-1004005, "supergroup")
    emulator.admins[group["id"]] = [ALICE]
    emulator.admins[supergroup["id"]] = [ALICE]
    await emulator.ask(group, ALICE, "/temperature 0.3")
    # Sending to the old id now fails with migrate_to_chat_id; the reply goes to the new id.
    emulator.migrated[group["id"]] = supergroup["id"]
    since = len(emulator.calls)
    emulator.send_text(group, ALICE, "/settings")
    moved = await emulator.wait_for(
        lambda call: (
            call.method == "sendMessage" and call.status == 200 and int(call.params["chat_id"]) == supergroup["id"]
        ),
        since,
    )
    assert "temperature: 0.3" in moved.params["text"]
    assert "temperature: 0.3" in await emulator.ask(supergroup, ALICE, "/settings")


async def test_migration_service_message_moves_the_row(bot_on_both, emulator):
    group, supergroup = group_chat(-4006), group_chat(-1004006, "supergroup")
    emulator.admins[group["id"]] = [ALICE]
    await emulator.ask(group, ALICE, "/length 77")
    emulator.push_update(
        {
            "message": {
                "message_id": 9,
                "date": 0,
                "chat": supergroup,
                "from": ALICE,
                "migrate_from_chat_id": group["id"],
            }
        }
    )
    await emulator.settle()
    assert "length: 77 characters" in await emulator.ask(supergroup, BOB, "/settings")


async def test_webhook_mode_checks_the_secret_and_answers(emulator, engine, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = bot_config(
        emulator,
        tmp_path / "bot.db",
        webhook_url="https://bot.example.org/telegram/hook",
        webhook_port=port,
        webhook_secret="s3cret-Value",
    )
    application = build_application(config, Voices.of(engine), clock=Clock())
    async with serving(application, config):
        registered = emulator.sent("setWebhook")[-1].params
        assert registered["url"] == "https://bot.example.org/telegram/hook"
        assert registered["secret_token"] == "s3cret-Value"
        message = emulator.message(ALICE_CHAT, ALICE, "/temperature")
        url = f"http://127.0.0.1:{port}/telegram/hook"
        async with aiohttp.ClientSession() as session:
            forged = {"X-Telegram-Bot-Api-Secret-Token": "wrong"}
            async with session.post(url, json={"update_id": 1, "message": message}, headers=forged) as response:
                assert response.status == 403
            genuine = {"X-Telegram-Bot-Api-Secret-Token": "s3cret-Value"}
            async with session.post(url, json={"update_id": 2, "message": message}, headers=genuine) as response:
                assert response.status == 200
        answer = await emulator.wait_for(lambda call: call.method == "sendMessage" and call.status == 200)
        assert "Temperature is 0.8" in answer.params["text"]
        assert len(emulator.sent()) == 1, "the forged update was not handled"


async def test_a_failing_database_is_reported_and_the_bot_keeps_running(bot, emulator, tmp_path, caplog):
    with sqlite3.connect(tmp_path / "bot.db") as db:
        db.execute("ALTER TABLE chats RENAME TO chats_elsewhere")
    reply = await emulator.ask(ALICE_CHAT, ALICE, "/settings")
    assert reply.startswith("My settings database cannot be used right now (no such table: chats)")
    assert any(record.levelname == "ERROR" and "no such table" in record.getMessage() for record in caplog.records)
    with sqlite3.connect(tmp_path / "bot.db") as db:
        db.execute("ALTER TABLE chats_elsewhere RENAME TO chats")
    assert "Settings for this chat" in await emulator.ask(ALICE_CHAT, ALICE, "/settings")


async def test_a_user_who_blocked_the_bot_is_not_an_error(bot, emulator, caplog):
    emulator.blocked.add(ALICE_CHAT["id"])
    emulator.send_text(ALICE_CHAT, ALICE, "/start")
    await emulator.wait_for(lambda call: call.method == "sendMessage" and call.status == 403)
    await emulator.settle(0.2)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    emulator.blocked.clear()
    assert "parody" in await emulator.ask(ALICE_CHAT, ALICE, "/start")


async def test_a_locked_database_holds_up_only_the_chat_that_needs_it(bot, emulator, tmp_path):
    """Another process's write lock on the SQLite file: chat A's write waits out the busy timeout
    and is told the database cannot be used, while chat B's /help, which needs no database, is answered meanwhile."""
    chat_a, chat_b = ALICE_CHAT, private_chat(BOB)
    locker = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the write lock, held until ROLLBACK below
    try:
        since = len(emulator.calls)
        emulator.send_text(chat_a, ALICE, "/temperature 0.5")
        emulator.send_text(chat_b, BOB, "/help")
        help_reply = await emulator.wait_for(
            lambda call: call.method == "sendMessage" and int(call.params["chat_id"]) == chat_b["id"], since
        )
        assert "/schedule 08:30" in help_reply.params["text"]
        assert not emulator.sent(chat_id=chat_a["id"]), "chat A is still waiting for the database"
        sorry = await emulator.wait_for(
            lambda call: call.method == "sendMessage" and int(call.params["chat_id"]) == chat_a["id"], since
        )
        assert sorry.params["text"].startswith("My settings database cannot be used right now (database is locked)"), (
            "the lock outlasted the busy timeout"
        )
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert await emulator.ask(chat_a, ALICE, "/temperature 0.5") == "Temperature set to 0.5."
