"""Nothing a user sent is lost to kill -9: the real bot process, real signals, the emulator on 127.0.0.1.

The moment of the kill is made certain by holding the bot's reply in the emulator and killing while it
is held (Telegram never confirmed it), or, for a daily post being written, by killing while its inbox
entry is still `claimed` and checking afterwards that it was.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select

from bot.core.bounds import LENGTH_MAX
from bot.core.speech import CHOICE_PREFIX
from bot.metrics import PrometheusMetrics
from bot.telegram.answers import LATE_APOLOGY, REPLAY_WINDOW
from db.database import create_db_engine, migrate
from db.inbox import ANSWERED, CLAIMED, Inbox, daily_key, update_key
from db.models import InboxEntry
from db.store import ChatStore
from tests.support.bot_harness import ALICE, Clock, bot_config, private_chat, running_bot
from tests.support.bot_process import killable_bot

CHAT = private_chat(ALICE)
HOLD = 60.0  # seconds the emulator holds a request: far longer than any test waits for it
# A restarted bot process answers after loading its model and taking over the inbox: on a busy
# two-core machine that can take longer than the emulator's usual wait.
SLOW = 60.0


def pending(method: str, chat_id: int):
    return lambda call: call.method == method and int(call.params.get("chat_id", 0)) == chat_id


def answered(message: dict):
    return lambda call: (
        call.method == "sendMessage"
        and call.status == 200
        and call.params.get("reply_parameters", {}).get("message_id") == message["message_id"]
    )


def posts(emulator) -> list:
    """Daily posts to CHAT, delivered or not (a post carries no reply_parameters)."""
    return [
        call
        for call in emulator.calls
        if pending("sendMessage", CHAT["id"])(call) and "reply_parameters" not in call.params
    ]


async def test_a_speech_in_flight_at_kill_9_is_answered_after_the_restart(emulator, tmp_path, database_url):
    async with killable_bot(emulator, database_url, tmp_path, name="first") as first:
        assert await emulator.ask(CHAT, ALICE, "/temperature 1.5", timeout=SLOW) == "Temperature set to 1.5."
        assert await emulator.ask(CHAT, ALICE, "/length 77", timeout=SLOW) == "Speech length set to 77 characters."
        assert "Daily speech set" in await emulator.ask(CHAT, ALICE, "/schedule 23:59 Asia/Tokyo", timeout=SLOW)
        # Each answer is marked in the inbox just after it is sent; a kill before that would (rightly)
        # repeat it, which is not what this test is about.
        await until(lambda: open_entries(database_url) == [])
        emulator.inject("sendMessage", "timeout", delay=HOLD, chat_id=CHAT["id"])
        since = len(emulator.calls)
        request = emulator.message(CHAT, ALICE, "/speech We will")
        request_update = emulator.push_update({"message": request})
        await emulator.wait_for(pending("sendMessage", CHAT["id"]), since, timeout=SLOW)  # the reply is on the wire
        await first.kill()
    assert not [call for call in emulator.calls if answered(request)(call)], "killed before it answered"
    assert open_entries(database_url) == [update_key(request_update)], "only the speech was left unanswered"

    async with killable_bot(emulator, database_url, tmp_path, name="second"):
        speech = (await emulator.wait_for(answered(request), since, timeout=SLOW)).params["text"]
        assert speech.startswith("We will") and len(speech) > len("We will")
        settings = await emulator.ask(CHAT, ALICE, "/settings", timeout=SLOW)
        assert "temperature: 1.5" in settings and "length: 77 characters" in settings
        assert "23:59 Asia/Tokyo" in settings
    assert len([call for call in emulator.calls if answered(request)(call)]) == 1


async def schedule_a_missed_post(database_url: str, length: int = 40) -> date:
    """CHAT's daily speech (of `length` characters) was due two minutes ago and is not posted yet; returns the day
    it is for."""
    engine = create_db_engine(database_url)
    migrate(engine)
    store = ChatStore(engine, 0.8, 40)
    due = datetime.now(UTC) - timedelta(minutes=2)
    await store.get(CHAT["id"], "private")
    await store.update(
        CHAT["id"],
        daily_time=due.time().replace(second=0, microsecond=0),
        time_zone="UTC",
        schedule_enabled=True,
        length=length,
        last_daily_post=due.date() - timedelta(days=2),
    )
    store.close()
    return due.date()


async def until(condition, timeout: float = SLOW) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def open_entries(database_url: str) -> list[str]:
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        keys = connection.execute(select(InboxEntry.key).where(InboxEntry.answered_at.is_(None))).scalars().all()
    engine.dispose()
    return keys


def inbox_state(database_url: str, key: str) -> str | None:
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        state = connection.execute(select(InboxEntry.state).where(InboxEntry.key == key)).scalar_one_or_none()
    engine.dispose()
    return state


async def test_kill_9_while_a_daily_post_is_written_posts_it_once_after_the_restart(emulator, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'bot.db'}"
    # The longest post the bot writes, so that it is still being written when the claim is seen.
    day = await schedule_a_missed_post(database_url, length=LENGTH_MAX)
    key = daily_key(CHAT["id"], day)
    async with killable_bot(emulator, database_url, tmp_path, name="first") as first:
        await until(lambda: inbox_state(database_url, key) is not None, timeout=SLOW)
        await first.kill()
    assert posts(emulator) == [], "killed before the post was sent"
    assert inbox_state(database_url, key) == CLAIMED

    async with killable_bot(emulator, database_url, tmp_path, name="second"):
        post = await emulator.wait_for(lambda call: call in posts(emulator) and call.status == 200, timeout=SLOW)
        assert len(post.params["text"]) > 0
        assert "daily speech:" in await emulator.ask(CHAT, ALICE, "/settings", timeout=SLOW)
    assert inbox_state(database_url, daily_key(CHAT["id"], day)) == ANSWERED
    assert len(posts(emulator)) == 1


async def test_kill_9_while_a_daily_post_is_sent_never_posts_it_twice(emulator, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'bot.db'}"
    day = await schedule_a_missed_post(database_url)
    emulator.inject("sendMessage", "timeout", delay=HOLD, chat_id=CHAT["id"])
    async with killable_bot(emulator, database_url, tmp_path, name="first") as first:
        # Handed to Telegram, not yet confirmed.
        await emulator.wait_for(lambda call: call in posts(emulator), timeout=SLOW)
        await first.kill()

    async with killable_bot(emulator, database_url, tmp_path, name="second"):
        # The restart has taken over the inbox before it polls, so by this answer it has decided.
        assert "daily speech:" in await emulator.ask(CHAT, ALICE, "/settings", timeout=SLOW)
    assert inbox_state(database_url, daily_key(CHAT["id"], day)) == ANSWERED
    assert len(posts(emulator)) == 1, "the post Telegram may already have is not made again"


async def test_requests_left_by_a_crash_are_answered_if_recent_and_apologised_for_if_old(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock()
    store = ChatStore(create_db_engine(config.database_url), 0.8, 40)
    migrate(store.database.engine)
    crashed = Inbox(store.database, owner=12345)
    recent = {"update_id": 901, "message": emulator.message(CHAT, ALICE, "/temperature 1.2")}
    old = {"update_id": 902, "message": emulator.message(CHAT, ALICE, "/length 99")}
    assert await crashed.claim_update(901, CHAT["id"], recent, clock.now - REPLAY_WINDOW / 2)
    assert await crashed.claim_update(902, CHAT["id"], old, clock.now - REPLAY_WINDOW * 2)
    store.close()

    metrics = PrometheusMetrics()
    async with running_bot(emulator, engine, config, clock, metrics=metrics):
        done = await emulator.wait_for(answered(recent["message"]))
        assert done.params["text"] == "Temperature set to 1.2."
        apology = await emulator.wait_for(answered(old["message"]))
        assert apology.params["text"] == LATE_APOLOGY
        settings = await emulator.ask(CHAT, ALICE, "/settings", timeout=SLOW)
        assert "temperature: 1.2" in settings and "length: 40 characters" in settings, "the old one was not done"
    assert inbox_state(config.database_url, update_key(901)) == ANSWERED
    assert inbox_state(config.database_url, update_key(902)) == ANSWERED
    for kind in ("replayed", "apologised"):  # what operators see (docs/operations.md, "Metrics")
        assert metrics.registry.get_sample_value("speechbot_inbox_taken_over_total", {"kind": kind}) == 1


async def test_a_button_press_left_by_a_crash_gets_its_speech_after_the_restart(emulator, engine, tmp_path):
    """Another / Calmer / Wilder go through the inbox as commands do: a crash while the speech is made
    does not swallow the press."""
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock()
    store = ChatStore(create_db_engine(config.database_url), 0.8, 40)
    migrate(store.database.engine)
    under = emulator.message(CHAT, emulator.bot_user, "We will win so much.")
    press = {"id": "7", "from": ALICE, "message": under, "chat_instance": "i", "data": f"{CHOICE_PREFIX}1.3"}
    crashed = Inbox(store.database, owner=12345)
    assert await crashed.claim_update(903, CHAT["id"], {"update_id": 903, "callback_query": press}, clock.now)
    store.close()

    def speech_to_chat(call) -> bool:
        return pending("sendMessage", CHAT["id"])(call) and call.status == 200

    async with running_bot(emulator, engine, config, clock):
        speech = await emulator.wait_for(speech_to_chat, timeout=SLOW)
        assert len(speech.params["text"]) > 20, "a speech, not a notice"
        await until(lambda: inbox_state(config.database_url, update_key(903)) == ANSWERED)
    assert [call.params["text"] for call in emulator.calls if speech_to_chat(call)] == [speech.params["text"]]


async def test_a_speech_handled_again_after_a_crash_is_not_refused_for_its_own_cooldown(emulator, engine, tmp_path):
    config = replace(bot_config(emulator, tmp_path / "bot.db"), cooldown_seconds=30)
    clock = Clock()
    store = ChatStore(create_db_engine(config.database_url), 0.8, 40)
    migrate(store.database.engine)
    # What the crashed process did: it started the chat's cooldown for this /speech, then died.
    _, waiting = await store.start_speech(CHAT["id"], "private", clock.now, timedelta(seconds=30))
    assert waiting is None
    request = {"update_id": 904, "message": emulator.message(CHAT, ALICE, "/speech We will")}
    assert await Inbox(store.database, owner=12345).claim_update(904, CHAT["id"], request, clock.now)
    store.close()

    async with running_bot(emulator, engine, config, clock):
        reply = (await emulator.wait_for(answered(request["message"]), timeout=SLOW)).params["text"]
        assert reply.startswith("We will") and "One speech at a time" not in reply
        # The cooldown holds again from the speech that was made.
        assert "One speech at a time" in await emulator.ask(CHAT, ALICE, "/speech", timeout=SLOW)
