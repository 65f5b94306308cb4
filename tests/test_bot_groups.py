"""The bot in groups through python-telegram-bot's real HTTP stack and the Bot API emulator: chatter with
privacy mode off (interjections quoting what they answer, never to bots, never two at once), the privacy
mode note, /quiet (daily posts included), /stats and /forget, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from bot.inference.engine import GenerationEngine
from bot.telegram.daily import job_name
from tests.support.bot_harness import ALICE, BOB, TOKEN, Clock, bot_config, group_chat, running_bot
from tests.support.telegram_emulator import TelegramEmulator

GROUP = group_chat(-7001)
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
OTHER_BOT = {"id": 999, "is_bot": True, "first_name": "Another bot", "username": "OtherBot"}
# random.Random(1) draws 0.134 first, below every rate from 1/2 to 1/7: the first message heard is a hit.
HITS_FIRST = 1


@pytest.fixture(scope="module")
def engine(tiny_onnx):
    """One tiny engine (the suite's default runs every test on two)."""
    with GenerationEngine(tiny_onnx, providers="cpu", threads=1, lanes=1) as engine:
        yield engine


@pytest.fixture
async def reading_emulator():
    """Telegram with the bot's privacy mode off: it sees every message in groups."""
    async with TelegramEmulator(TOKEN, privacy_mode=False) as emulator:
        emulator.admins[GROUP["id"]] = [ALICE]
        yield emulator


def group_messages(emulator, since: int) -> list[dict]:
    return [
        call.params
        for call in emulator.calls[since:]
        if call.method == "sendMessage" and call.status == 200 and int(call.params["chat_id"]) == GROUP["id"]
    ]


async def nothing_else_said(emulator, since: int) -> None:
    """Whatever the group's earlier updates brought has been said once /stats, handled after them (each
    chat's updates run in order), is answered: that answer must be the only message since `since`."""
    await emulator.ask(GROUP, ALICE, "/stats")
    assert [params["text"].split("\n")[0] for params in group_messages(emulator, since)] == ["Stats for this chat:"]


async def test_with_privacy_mode_off_the_bot_chimes_in_replying_to_a_message_and_quoting_it(
    reading_emulator, engine, tmp_path
):
    emulator, config = reading_emulator, bot_config(reading_emulator, tmp_path / "bot.db")
    async with running_bot(emulator, engine, config, Clock(NOON), rng=random.Random(HITS_FIRST)):
        reply = await emulator.ask(GROUP, ALICE, "/chatter 1/2")
        assert reply.startswith("Chatter is on") and "privacy mode" not in reply
        since = len(emulator.calls)
        message = emulator.send_text(GROUP, BOB, "We had a great lunch today")
        interjection = await emulator.wait_for(
            lambda call: call.method == "sendMessage" and int(call.params["chat_id"]) == GROUP["id"], since
        )
        assert interjection.params["reply_parameters"] == {
            "message_id": message["message_id"],
            "quote": "We had a great lunch today",
            "allow_sending_without_reply": True,
        }
        assert not interjection.params["text"].startswith("We had"), "a reply of its own, not the message continued"
        keyboard = interjection.params["reply_markup"]["inline_keyboard"][0]
        assert [button["text"] for button in keyboard] == ["Another", "Calmer", "Wilder"]
        assert emulator.sent("sendChatAction", GROUP["id"]), "typing… while it is written"

        # Within the gap no second one, whatever the draws; a bot and a command never get one.
        since = len(emulator.calls)
        for text in ("And then?", "Anyone?", "Hello?"):
            emulator.send_text(GROUP, BOB, text)
        emulator.send_text(GROUP, OTHER_BOT, "Beep, I am a bot.")
        emulator.send_text(GROUP, BOB, "/dance@OtherBot")
        await nothing_else_said(emulator, since)
        assert "speeches today (UTC): 1\n" in group_messages(emulator, since)[-1]["text"]


async def test_bots_never_get_an_interjection(reading_emulator, engine, tmp_path):
    emulator, config = reading_emulator, bot_config(reading_emulator, tmp_path / "bot.db")
    async with running_bot(emulator, engine, config, Clock(NOON), rng=random.Random(HITS_FIRST)):
        await emulator.ask(GROUP, ALICE, "/chatter 1/2")
        since = len(emulator.calls)
        emulator.send_text(GROUP, OTHER_BOT, "Beep, I am a bot.")  # the first draw would have been a hit
        await nothing_else_said(emulator, since)


async def test_with_privacy_mode_on_chatter_says_how_to_turn_it_off(emulator, engine, tmp_path):
    emulator.admins[GROUP["id"]] = [ALICE]
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), Clock(NOON)):
        reply = await emulator.ask(GROUP, ALICE, "/chatter 1/2")
        assert reply.startswith("Chatter is on") and "Group Privacy" in reply and "add me again" in reply
        assert "Group Privacy" in await emulator.ask(GROUP, BOB, "/chatter"), "anyone may look"
        assert "only this group's administrators" in await emulator.ask(GROUP, BOB, "/chatter off")
        emulator.send_text(GROUP, BOB, "An ordinary message")
        assert emulator.withheld[-1]["text"] == "An ordinary message", "Telegram keeps it from the bot"


async def test_quiet_holds_chatter_and_the_daily_speech(reading_emulator, engine, tmp_path):
    emulator, config, clock = reading_emulator, bot_config(reading_emulator, tmp_path / "bot.db"), Clock(NOON)
    async with running_bot(emulator, engine, config, clock, rng=random.Random(HITS_FIRST)) as app:
        await emulator.ask(GROUP, ALICE, "/schedule 12:30")
        await emulator.ask(GROUP, ALICE, "/chatter 1/2")
        assert "only this group's administrators" in await emulator.ask(GROUP, BOB, "/quiet")
        reply = await emulator.ask(GROUP, ALICE, "/quiet 1h")
        assert reply.startswith("Quiet until 13:00 UTC, Mon 01 Jun 2026: no chatter and no daily speech")
        assert "is not a duration" in await emulator.ask(GROUP, ALICE, "/quiet forever")
        since = len(emulator.calls)
        emulator.send_text(GROUP, BOB, "Are you there?")  # a hit, were it not quiet
        await nothing_else_said(emulator, since)

        clock.advance(minutes=30)
        daily = app.job_queue.get_jobs_by_name(job_name(GROUP["id"]))[0]
        since = len(emulator.calls)
        await daily.run(app)
        assert not group_messages(emulator, since), "no daily post while quiet"
        assert "next on Tue 02 Jun 2026" in await emulator.ask(GROUP, BOB, "/settings")

        assert "are back" in await emulator.ask(GROUP, ALICE, "/quiet off")
        clock.advance(days=1)
        since = len(emulator.calls)
        await daily.run(app)
        assert [("reply_parameters" in params) for params in group_messages(emulator, since)] == [False], "posted"


async def test_stats_in_a_group(reading_emulator, engine, tmp_path):
    emulator, config = reading_emulator, bot_config(reading_emulator, tmp_path / "bot.db")
    async with running_bot(emulator, engine, config, Clock(NOON)):
        await emulator.ask(GROUP, BOB, "/speech")
        await emulator.ask(GROUP, BOB, "@SpeechTestBot We will")
        stats = await emulator.ask(GROUP, BOB, "/stats")
        assert stats.startswith("Stats for this chat:\nspeeches today (UTC): 2\nspeeches in all: 2\nvoice: ")
        assert "chatter: off" in stats and "quiet: no" in stats and "daily speech: off" in stats


async def test_forget_deletes_the_groups_data_after_an_admin_confirms(reading_emulator, engine, tmp_path, database_url):
    emulator = reading_emulator
    config = bot_config(emulator, tmp_path / "bot.db", database_url=database_url)
    async with running_bot(emulator, engine, config, Clock(NOON)) as app:
        await emulator.ask(GROUP, ALICE, "/temperature 1.4")
        await emulator.ask(GROUP, ALICE, "/schedule 18:00")
        await emulator.ask(GROUP, ALICE, "/chatter 1/1000")
        emulator.send_text(GROUP, BOB, "Something the bot keeps in memory")
        assert "only this group's administrators" in await emulator.ask(GROUP, BOB, "/forget")
        assert "only this group's administrators" in await emulator.ask(GROUP, BOB, "/forget yes")
        assert "Send /forget yes" in await emulator.ask(GROUP, ALICE, "/forget")
        reply = await emulator.ask(GROUP, ALICE, "/forget yes")
        assert reply.startswith("Deleted what I stored about this chat: its settings (temperature 1.4,")
        assert "daily speech on" in reply and "1 recent message I held in memory" in reply
        assert "records of requests (this one included)" in reply
        assert not app.job_queue.get_jobs_by_name(job_name(GROUP["id"])), "its daily job is gone too"
        settings = await emulator.ask(GROUP, BOB, "/settings")
        assert "temperature: 0.8" in settings and "daily speech: off" in settings
