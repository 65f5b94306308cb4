"""The core's group features on a real engine and database: /chatter's rate, gap and daily cap drawn from a
seeded generator on a test clock, the messages that prime an interjection, /quiet, /stats and /forget."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from bot.config import Config
from bot.core import groups
from bot.core.bounds import CHATTER_CONTEXT_MESSAGES, CHATTER_DAILY_CAP, CHATTER_MESSAGE_CHARS
from bot.core.groups import parse_chatter_rate, parse_quiet
from bot.core.speech import Speech
from bot.core.speechbot import ChatRef, SpeechBot
from bot.core.voices import Voices
from bot.inference.engine import GenerationEngine
from bot.services import build_services
from tests.support.bot_harness import Clock

GROUP = ChatRef(-70, "group")
PRIVATE = ChatRef(7, "private")
START = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
GAP = timedelta(minutes=5)


@pytest.fixture(scope="module")
def engine(tiny_onnx):
    """One tiny engine (the suite's default runs every test on two)."""
    with GenerationEngine(tiny_onnx, providers="cpu", threads=1, lanes=1) as engine:
        yield engine


@pytest.fixture
def make_bot(tmp_path, engine, database_url):
    """The core on SQLite and PostgreSQL, with a test clock and a seeded generator; closed after the test."""
    opened = []

    def make(clock: Clock, seed: int = 1, cooldown: float = 0.0):
        config = Config(database_url=database_url, default_length=40, cooldown_seconds=cooldown)
        opened.append(build_services(config, Voices.of(engine), clock=clock, rng=random.Random(seed)))
        return opened[-1].core

    yield make
    for services in opened:
        services.close()


async def refuse() -> bool:
    return False


def draws(seed: int, count: int) -> list[float]:
    """What the core's generator, seeded alike, draws: one number per message heard while chatter is on."""
    generator = random.Random(seed)
    return [generator.random() for _ in range(count)]


# ---- parsing ----


@pytest.mark.parametrize(
    ("text", "rate"),
    [("1/20", 0.05), ("1 / 4", 0.25), ("20", 0.05), ("0.05", 0.05), ("0,5", 0.5), ("5%", 0.05), ("OFF", None)],
)
def test_chatter_rates(text, rate):
    assert parse_chatter_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "reason"),
    [("1", "out of range"), ("1/1", "out of range"), ("0.9", "out of range"), ("5000", "out of range"),
     ("1/0", "out of range"), ("0", "out of range"), ("often", "is not a chatter rate"),
     ("nan", "is not a chatter rate"), ("x" * 500, "is not a chatter rate")],
)  # fmt: skip
def test_bad_chatter_rates_say_what_is_valid(text, reason):
    with pytest.raises(groups.ArgumentError, match=reason) as error:
        parse_chatter_rate(text)
    assert "/chatter 1/20" in str(error.value) and "/chatter off" in str(error.value)
    assert len(str(error.value)) < 250


@pytest.mark.parametrize(
    ("text", "duration"),
    [("", timedelta(hours=1)), ("30m", timedelta(minutes=30)), ("2h", timedelta(hours=2)),
     ("1d", timedelta(days=1)), ("1h 30m", timedelta(minutes=90)), ("7D", timedelta(days=7)), ("off", None)],
)  # fmt: skip
def test_quiet_durations(text, duration):
    assert parse_quiet(text) == duration


@pytest.mark.parametrize(
    ("text", "reason"),
    [("8d", "out of range"), ("0m", "out of range"), ("2", "is not a duration"), ("soon", "is not a duration"),
     ("-1h", "is not a duration"), ("9" * 50 + "h", "is not a duration")],
)  # fmt: skip
def test_bad_quiet_durations_say_what_is_valid(text, reason):
    with pytest.raises(groups.ArgumentError, match=reason) as error:
        parse_quiet(text)
    assert "/quiet 2h" in str(error.value) and "/quiet off" in str(error.value)


# ---- chatter ----


async def test_chatter_answers_the_messages_a_seeded_generator_picks_at_the_chats_rate(make_bot):
    clock = Clock(START)
    bot = make_bot(clock, seed=7)
    assert "Chatter is off" in await bot.handle_text(GROUP, "/chatter")
    assert (await bot.handle_text(GROUP, "/chatter 1/4")).startswith("Chatter is on: I answer on my own about 1")
    answered = []
    for number in range(40):
        clock.advance(minutes=6)  # beyond the gap every time
        answered.append(await bot.overheard(GROUP, f"Message number {number}."))
    assert [speech is not None for speech in answered] == [draw < 0.25 for draw in draws(7, 40)]
    speeches = [speech for speech in answered if speech is not None]
    assert 5 <= len(speeches) <= 15, "about one message in four"
    assert all(isinstance(speech, Speech) and 0 < len(speech) <= 250 for speech in speeches), "short speeches"
    assert not any(speech.startswith("Message number") for speech in speeches), "a reply, not the chat's words"


async def test_chatter_keeps_the_minimum_gap(make_bot):
    clock = Clock(START)
    bot = make_bot(clock, seed=3)
    await bot.handle_text(GROUP, "/chatter 1/2")
    answered_at = []
    for _ in range(30):
        clock.advance(minutes=1)
        if await bot.overheard(GROUP, "We are talking."):
            answered_at.append(clock.now)
    expected, last = [], None
    for minute, draw in enumerate(draws(3, 30), 1):
        moment = START + timedelta(minutes=minute)
        if draw < 0.5 and (last is None or moment - last >= GAP):
            expected.append(last := moment)
    assert answered_at == expected and len(expected) >= 3
    assert all(later - earlier >= GAP for earlier, later in itertools.pairwise(answered_at))


async def test_chatter_stops_at_the_daily_cap_until_the_next_utc_day(make_bot):
    clock = Clock(START)
    bot = make_bot(clock, seed=5)
    await bot.handle_text(GROUP, "/chatter 1/2")
    answered = 0
    for _ in range(4 * CHATTER_DAILY_CAP):  # 5 minutes apart: 6 h 40 min, one UTC day
        clock.advance(minutes=5)
        answered += await bot.overheard(GROUP, "More talk.") is not None
    assert answered == CHATTER_DAILY_CAP
    assert f"{CHATTER_DAILY_CAP} of at most {CHATTER_DAILY_CAP} today" in await bot.handle_text(GROUP, "/stats")
    clock.now = START + timedelta(days=1)
    answered_next_day = 0
    while not answered_next_day:
        clock.advance(minutes=5)
        answered_next_day += await bot.overheard(GROUP, "A new day.") is not None
    assert clock.now.date() == (START + timedelta(days=1)).date()


async def test_an_interjection_counts_toward_the_cooldown_and_waits_for_it(make_bot):
    clock = Clock(START)
    bot = make_bot(clock, seed=1, cooldown=60)  # Random(1) draws 0.13 first: a hit at 1/2
    await bot.handle_text(GROUP, "/chatter 1/2")
    await bot.handle_text(GROUP, "/speech")
    assert draws(1, 1)[0] < 0.5
    assert await bot.overheard(GROUP, "Right after a speech.") is None, "the speech's cooldown runs"
    clock.advance(minutes=10)
    interjected = None
    while interjected is None:
        clock.advance(minutes=5)
        interjected = await bot.overheard(GROUP, "Talk.")
    assert "One speech at a time" in await bot.handle_text(GROUP, "/speech")


async def test_an_interjection_is_primed_with_the_last_few_messages(make_bot, monkeypatch):
    clock = Clock(START)
    bot = make_bot(clock)
    await bot.handle_text(PRIVATE, "/chatter 1/1000")
    assert await bot.overheard(GROUP, "A group without chatter.") is None
    assert bot.chatter.recent.prompt(GROUP.id) == "", "a chat without chatter keeps nothing"
    assert await bot.store.find(GROUP.id) is None, "nor gets a row for merely being read"
    for number in range(CHATTER_CONTEXT_MESSAGES + 2):
        await bot.overheard(PRIVATE, f"Line {number}  with   spaces.")
    await bot.overheard(PRIVATE, "x" * 1000)
    lines = bot.chatter.recent.prompt(PRIVATE.id).splitlines()
    assert len(lines) == CHATTER_CONTEXT_MESSAGES, "bounded per chat"
    assert lines[-2] == f"Line {CHATTER_CONTEXT_MESSAGES + 1} with spaces." and lines[-1] == "x" * CHATTER_MESSAGE_CHARS
    monkeypatch.setattr(groups, "CHATTER_CHATS_TRACKED", 3)
    for chat_id in range(100, 104):
        bot.chatter.recent.add(chat_id, "hello")
    assert bot.chatter.recent.prompt(100) == "" and bot.chatter.recent.prompt(103) == "hello\n", "bounded in all"
    assert "Chatter is off" in await bot.handle_text(PRIVATE, "/chatter off")
    assert bot.chatter.recent.prompt(PRIVATE.id) == "", "dropped with chatter"


async def test_changing_group_commands_need_an_admin_and_showing_ones_do_not(make_bot):
    bot = make_bot(Clock(START))
    for command in ("/chatter 1/20", "/chatter off", "/quiet", "/quiet 2h", "/quiet off", "/forget", "/forget yes"):
        assert "only this group's administrators" in await bot.handle_text(GROUP, command, check_admin=refuse), command
    assert "Chatter is off" in await bot.handle_text(GROUP, "/chatter", check_admin=refuse)
    assert "Stats for this chat" in await bot.handle_text(GROUP, "/stats", check_admin=refuse)


async def test_the_privacy_mode_note_comes_where_the_bot_cannot_read_the_group(engine, tmp_path):
    config = Config(database_url=f"sqlite:///{tmp_path / 'bot.db'}")
    services = build_services(config, Voices.of(engine))
    try:
        assert "privacy mode" not in await services.core.handle_text(GROUP, "/chatter 1/20"), "the console reads all"
        core = SpeechBot(services.store, Voices.of(engine), reads_all_group_messages=lambda: False)
        for command in ("/chatter 1/20", "/chatter"):
            assert "Group Privacy" in await core.handle_text(GROUP, command)
        private = await core.handle_text(PRIVATE, "/chatter 1/20")
        assert "privacy mode" not in private and "chatter shows in groups" in private, (
            "every private message is a prompt"
        )
    finally:
        services.close()


# ---- quiet, stats, forget ----


async def test_quiet_stops_chatter_until_it_ends_or_is_ended(make_bot):
    clock = Clock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    bot = make_bot(clock, seed=2)
    await bot.handle_text(GROUP, "/chatter 1/2")
    await bot.handle_text(GROUP, "/schedule 08:30 Europe/Berlin")
    assert "I'm not being quiet" in await bot.handle_text(GROUP, "/quiet off")
    reply = await bot.handle_text(GROUP, "/quiet 1d")
    assert reply.startswith("Quiet until 14:00 Europe/Berlin, Tue 02 Jun 2026: no chatter and no daily speech")
    assert "quiet: until 14:00 Europe/Berlin, Tue 02 Jun 2026" in await bot.handle_text(GROUP, "/stats")
    assert "next on Wed 03 Jun 2026" in await bot.handle_text(GROUP, "/settings"), "tomorrow's post is skipped"
    for _ in range(20):
        clock.advance(minutes=30)
        assert await bot.overheard(GROUP, "Quiet, please.") is None
    assert "chatter and daily speeches are back" in await bot.handle_text(GROUP, "/quiet off")
    while await bot.overheard(GROUP, "Loud again.") is None:
        clock.advance(minutes=5)
    assert (await bot.handle_text(GROUP, "/quiet")).startswith("Quiet until"), "an hour by default"
    clock.advance(hours=1)
    while await bot.overheard(GROUP, "The hour is over.") is None:
        clock.advance(minutes=5)


async def test_stats_count_the_chats_speeches_today_and_in_all(make_bot):
    clock = Clock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    bot = make_bot(clock, seed=1)
    await bot.handle_text(GROUP, "/speech")
    await bot.handle_text(GROUP, "We will")
    await bot.handle_text(GROUP, "/chatter 1/2")
    assert await bot.overheard(GROUP, "Chatting.") is not None  # Random(1)'s first draw is a hit
    stats = await bot.handle_text(GROUP, "/stats")
    assert "speeches today (UTC): 3\nspeeches in all: 3\n" in stats
    assert "voice: default\n" in stats
    assert "chatter: about 1 message in 2 (50%); 1 of at most 20 today" in stats
    assert "quiet: no" in stats and "daily speech: off" in stats
    clock.advance(days=1)
    assert "speeches today (UTC): 0\nspeeches in all: 3\n" in await bot.handle_text(GROUP, "/stats")


async def test_forget_asks_first_then_deletes_the_row_and_what_memory_holds(make_bot):
    bot = make_bot(Clock(START), seed=1)
    await bot.handle_text(GROUP, "/temperature 1.3")
    await bot.handle_text(GROUP, "/chatter 1/1000")
    await bot.overheard(GROUP, "Something to remember.")
    await bot.overheard(GROUP, "And more.")
    assert "Send /forget yes" in await bot.handle_text(GROUP, "/forget")
    assert "takes nothing or yes" in await bot.handle_text(GROUP, "/forget please")
    assert (await bot.store.find(GROUP.id)).temperature == 1.3, "nothing deleted yet"
    reply = await bot.handle_text(GROUP, "/forget yes")
    assert reply.startswith("Deleted what I stored about this chat: its settings (temperature 1.3,")
    assert "chatter 1 in 1000, quiet time)" in reply and "2 recent messages I held in memory" in reply
    assert await bot.store.find(GROUP.id) is None and bot.chatter.recent.prompt(GROUP.id) == ""
    assert await bot.overheard(GROUP, "Still there?") is None and bot.chatter.recent.prompt(GROUP.id) == ""
    assert await bot.handle_text(GROUP, "/forget yes") == "I had nothing stored about this chat."
    assert "temperature: 0.8" in await bot.handle_text(GROUP, "/settings"), "a chat that comes back starts afresh"
