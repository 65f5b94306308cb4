"""Inline mode, the buttons under speeches, drafts and /speech in reply, over python-telegram-bot's real HTTP
stack against the Bot API emulator (every call and the objects inside it checked against the spec)."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import select

from bot.core.bounds import INLINE_LENGTH, INLINE_STYLES
from bot.core.speech import STALE_CHOICE
from bot.core.speechbot import NO_TEXT_TO_CONTINUE
from bot.inference.ending import ELLIPSIS, SENTENCE_END
from bot.telegram.interactive import INLINE_CACHE_SECONDS, INLINE_PREVIEW_CHARS
from db.database import create_db_engine
from db.inbox import ANSWERED
from db.models import InboxEntry
from tests.support.bot_harness import ALICE, BOB, Clock, bot_config, group_chat, private_chat, running_bot
from tests.test_bot_concurrency import HoldingEmulator
from tests.test_crash_recovery import until

ALICE_CHAT = private_chat(ALICE)
SPEECH_END = re.compile(rf"({SENTENCE_END}|{ELLIPSIS})$")  # a sentence end, else a word and "…"


@pytest.fixture
async def bot(emulator, engine, tmp_path):
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), Clock()) as application:
        yield application


async def answer_of(emulator, method: str, query_id: str):
    key = "inline_query_id" if method == "answerInlineQuery" else "callback_query_id"
    return await emulator.wait_for(
        lambda call: call.method == method and call.status == 200 and str(call.params[key]) == query_id,
        timeout=60,  # three 300-character speeches on a shared, busy CPU
    )


async def speech_message(emulator, chat: dict, sender: dict, text: str) -> dict:
    """Ask for a speech; the Message Telegram stored for the answer (with its keyboard)."""
    since = len(emulator.calls)
    emulator.send_text(chat, sender, text)
    call = await emulator.wait_for(
        lambda c: c.method == "sendMessage" and c.status == 200 and int(c.params["chat_id"]) == chat["id"], since
    )
    return call.result


def buttons(message: dict) -> list[tuple[str, str]]:
    return [(button["text"], button["callback_data"]) for button in message["reply_markup"]["inline_keyboard"][0]]


async def press(emulator, message: dict, sender: dict, data: str) -> tuple[str | None, dict | None]:
    """Press a button; the toast it answered with and the new speech it sent, if any."""
    since = len(emulator.calls)
    query_id = emulator.press(message, sender, data)
    answer = await answer_of(emulator, "answerCallbackQuery", query_id)
    sent = [
        call
        for call in emulator.calls[since:]
        if call.method == "sendMessage" and int(call.params["chat_id"]) == message["chat"]["id"]
    ]
    return answer.params.get("text"), (sent[-1].result if sent else None)


# ---- inline mode ----


@pytest.mark.parametrize("query", ["We will", ""])
async def test_inline_query_offers_calm_classic_and_wild_speeches_ending_as_speeches_end(bot, emulator, query):
    answer = await answer_of(emulator, "answerInlineQuery", emulator.inline_query(ALICE, query))
    results = answer.params["results"]
    assert [result["title"] for result in results] == [f"{s} speech ({t:g})" for s, t in INLINE_STYLES]
    assert answer.params["is_personal"] is True and answer.params["cache_time"] == INLINE_CACHE_SECONDS
    for result in results:
        text = result["input_message_content"]["message_text"]
        assert result["type"] == "article" and text.startswith(query)
        assert SPEECH_END.search(text), text
        assert len(query) < len(text) <= len(query) + INLINE_LENGTH
        preview = result["description"]
        assert len(preview) <= INLINE_PREVIEW_CHARS and " ".join(text.split()).startswith(preview.removesuffix("…"))


async def test_a_superseded_inline_query_is_cancelled_and_never_answered(bot, emulator):
    first = emulator.inline_query(ALICE, "We")
    latest = emulator.inline_query(ALICE, "We will")
    other_user = emulator.inline_query(BOB, "We")  # another user's query is not superseded by Alice's
    answered = await answer_of(emulator, "answerInlineQuery", latest)
    assert answered.params["results"][0]["input_message_content"]["message_text"].startswith("We will")
    await answer_of(emulator, "answerInlineQuery", other_user)
    await emulator.settle()
    assert emulator.answer_to("answerInlineQuery", first) is None


async def test_a_chosen_inline_result_is_taken_quietly(bot, emulator, caplog):
    caplog.set_level(logging.INFO, "bot.telegram.interactive")
    emulator.choose_inline_result(ALICE, "wild-0123456789abcdef", "We will")
    await emulator.settle()
    assert "Inline speech chosen: wild" in caplog.text


# ---- buttons ----


async def test_each_button_sends_a_new_speech_at_its_temperature(bot, emulator):
    message = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech 0.8")
    assert buttons(message) == [("Another", "speech:0.8"), ("Calmer", "speech:0.6"), ("Wilder", "speech:1")]
    for label, data in buttons(message):
        toast, speech = await press(emulator, message, ALICE, data)
        assert toast is None, label
        # The new speech carries buttons too, stepping from the temperature it was written at.
        assert speech is not None and buttons(speech)[0] == ("Another", data), label
    assert "Temperature is 0.8" in await emulator.ask(ALICE_CHAT, ALICE, "/temperature"), "settings unchanged"


async def test_buttons_step_by_one_step_and_one_that_would_change_nothing_is_not_shown(bot, emulator):
    wildest = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech 2")
    assert buttons(wildest) == [("Another", "speech:2"), ("Calmer", "speech:1.8")]
    _, calmer = await press(emulator, wildest, ALICE, "speech:1.8")
    assert buttons(calmer) == [("Another", "speech:1.8"), ("Calmer", "speech:1.6"), ("Wilder", "speech:2")]
    calm = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech 0.3")
    assert buttons(calm) == [("Another", "speech:0.3"), ("Calmer", "speech:0.1"), ("Wilder", "speech:0.5")]
    calmest = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech 0.001")
    assert buttons(calmest) == [("Another", "speech:0.001"), ("Wilder", "speech:0.201")]


async def test_in_groups_anyone_may_press_and_settings_stay(bot, emulator):
    group = group_chat(-5001)
    emulator.admins[group["id"]] = [ALICE]
    await emulator.ask(group, ALICE, "/temperature 1.1")
    message = await speech_message(emulator, group, ALICE, "/speech")
    toast, speech = await press(emulator, message, BOB, "speech:1.3")
    assert toast is None and buttons(speech)[0] == ("Another", "speech:1.3")
    assert emulator.sent("sendChatAction", group["id"]) and not emulator.sent("sendMessageDraft", group["id"])
    assert "Temperature is 1.1" in await emulator.ask(group, BOB, "/temperature")


async def test_a_button_during_the_cooldown_answers_with_the_wait_and_sends_nothing(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db", cooldown_seconds=60)
    async with running_bot(emulator, engine, config, Clock()):
        message = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech")
        toast, speech = await press(emulator, message, ALICE, buttons(message)[0][1])
        assert speech is None
        assert toast == "One speech at a time, please. Try again in 60 seconds."


@pytest.mark.parametrize("data", ["speech:9", "speech:nan", "speech:", "temperature:0.5", "x" * 64, ""])
async def test_forged_or_stale_button_data_gets_a_polite_toast(bot, emulator, data):
    message = await speech_message(emulator, ALICE_CHAT, ALICE, "/speech")
    toast, speech = await press(emulator, message, ALICE, data)
    assert toast == STALE_CHOICE and speech is None


# ---- drafts ----

# Drafts show only text sure to stay (up to a sentence end before the target), so a speech with no such
# end comes in one piece and has no draft: 5 of 300 speeches of 200 characters did, none of 600.
DRAFTED_LENGTH = 600


async def test_private_speeches_stream_as_drafts_then_arrive_whole(bot, emulator):
    await emulator.ask(ALICE_CHAT, ALICE, f"/length {DRAFTED_LENGTH}")
    since = len(emulator.calls)
    final = await emulator.ask(ALICE_CHAT, ALICE, "/speech We will")
    drafts = [call for call in emulator.calls[since:] if call.method == "sendMessageDraft"]
    assert drafts and all(call.status == 200 for call in drafts)
    assert len({call.params["draft_id"] for call in drafts}) == 1, "one draft per speech, animated"
    for call in drafts:
        assert final.startswith(call.params["text"]) and call.params["text"].startswith("We will")
    assert not emulator.sent("sendChatAction", ALICE_CHAT["id"])


async def test_a_draft_still_on_the_wire_never_holds_up_the_speech(engine, tmp_path):
    async with HoldingEmulator("sendMessageDraft", ALICE_CHAT["id"]) as emulator:
        config = bot_config(emulator, tmp_path / "bot.db", default_length=DRAFTED_LENGTH)
        async with running_bot(emulator, engine, config, Clock(), read_timeout=30.0):
            assert (await emulator.ask(ALICE_CHAT, ALICE, "/speech We will")).startswith("We will")
            drafts = [call for call in emulator.calls if call.method == "sendMessageDraft"]
            assert [call.status for call in drafts] == [None], "one draft held, no queue of others behind it"
            emulator.release.set()


async def test_refused_drafts_fall_back_silently(bot, emulator, caplog):
    emulator.inject("sendMessageDraft", "refused", times=100)
    await emulator.ask(ALICE_CHAT, ALICE, f"/length {DRAFTED_LENGTH}")
    since = len(emulator.calls)
    final = await emulator.ask(ALICE_CHAT, ALICE, "/speech")
    await emulator.settle(0.5)
    attempts = [call for call in emulator.calls[since:] if call.method == "sendMessageDraft"]
    assert [call.status for call in attempts] == [400], "one refusal ends the drafts of that speech"
    assert len(final) > DRAFTED_LENGTH // 2
    assert not [record for record in caplog.records if record.levelname in ("WARNING", "ERROR")]


# ---- /speech in reply ----


def inbox_states(database_url: str) -> list[str]:
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        states = connection.execute(select(InboxEntry.state)).scalars().all()
    engine.dispose()
    return list(states)


async def test_speech_in_reply_continues_and_quotes_that_message(bot, emulator, tmp_path):
    group = group_chat(-5002)
    original = emulator.send_text(group, BOB, "Our jobs are leaving")
    since = len(emulator.calls)
    emulator.send_text(group, ALICE, "/speech@SpeechTestBot 0.7", reply_to_message=original)
    call = await emulator.wait_for(lambda c: c.method == "sendMessage" and c.status == 200, since)
    assert call.params["text"].startswith("Our jobs are leaving") and len(call.params["text"]) > 25
    assert call.params["reply_parameters"]["message_id"] == original["message_id"]
    assert call.params["reply_parameters"]["quote"] == "Our jobs are leaving"
    assert buttons(call.result)[0] == ("Another", "speech:0.7")
    # Answered through the inbox like every reply: the one update that got an answer is marked answered.
    database_url = f"sqlite:///{tmp_path / 'bot.db'}"
    await until(lambda: inbox_states(database_url) == [ANSWERED])


async def test_speech_in_reply_takes_captions_and_explains_when_there_is_no_text(bot, emulator):
    photo = emulator.message(ALICE_CHAT, ALICE, "") | {
        "photo": [{"file_id": "p", "file_unique_id": "p", "width": 90, "height": 90}],
        "caption": "We will build a wall",
    }
    del photo["text"]
    assert (await emulator.ask(ALICE_CHAT, ALICE, "/speech", reply_to_message=photo)).startswith("We will build")
    sticker = {key: value for key, value in photo.items() if key not in ("photo", "caption")} | {
        "sticker": {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 512, "height": 512,
                    "is_animated": False, "is_video": False},
    }  # fmt: skip
    assert await emulator.ask(ALICE_CHAT, ALICE, "/speech 1.2", reply_to_message=sticker) == NO_TEXT_TO_CONTINUE
