"""The transport-free core: parsing, validation replies, settings, cooldown, speeches from the real engine."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from bot.config import Config
from bot.core.bounds import LENGTH_MAX, MESSAGE_MAX
from bot.core.commands import ArgumentError, parse_length, parse_temperature, split_command
from bot.core.dailytime import latest_due, local_date, next_due, parse_daily_time, resolve_time_zone
from bot.core.speech import compose_speech
from bot.core.speechbot import ChatRef, SpeechBot
from bot.core.voices import Voices
from bot.services import build_services
from tests.support.bot_harness import Clock

PRIVATE = ChatRef(7, "private")
GROUP = ChatRef(-70, "group")


def make_bot(tmp_path, engine, clock=None, cooldown=0.0) -> SpeechBot:
    config = Config(database_url=f"sqlite:///{tmp_path / 'bot.db'}", default_length=40, cooldown_seconds=cooldown)
    return build_services(config, Voices.of(engine), clock=clock or Clock()).core


async def refuse() -> bool:
    return False


# ---- pure parsing ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/speech", ("speech", "")),
        ("/speech@SpeechTestBot 0.5", ("speech", "0.5")),
        ("/Speech 0.9 We will\nbuild", ("speech", "0.9 We will\nbuild")),
        ("hello /speech", None),
        ("/", None),
    ],
)
def test_split_command(text, expected):
    assert split_command(text) == expected


@pytest.mark.parametrize(("text", "value"), [("0.5", 0.5), ("2", 2.0), ("1e-3", 0.001), ("0,7", 0.7), (".9", 0.9)])
def test_valid_temperatures(text, value):
    assert parse_temperature(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("abc", "is not a temperature"),
        ("-1", "out of range"),
        ("0", "out of range"),
        ("1e-320", "out of range"),
        ("0.0009", "out of range"),
        ("nan", "out of range"),
        ("1e309", "out of range"),
        ("2.01", "out of range"),
        ("9" * 5000, "out of range"),
        ("x" * 5000, "is not a temperature"),
    ],
)
def test_bad_temperatures_explain_the_valid_range(text, reason):
    with pytest.raises(ArgumentError, match=reason) as error:
        parse_temperature(text)
    assert "from 0.001 to 2" in str(error.value)
    assert len(str(error.value)) < 200, "a 5,000-character argument is not echoed back in full"


@pytest.mark.parametrize(
    ("text", "reason"),
    [("abc", "not a length"), ("-1", "out of range"), ("0", "out of range"), ("1e309", "not a length"),
     ("nan", "not a length"), ("5000", "out of range"), ("7" * 5000, "not a length"), ("2.5", "not a length")],
)  # fmt: skip
def test_bad_lengths_explain_the_valid_range(text, reason):
    with pytest.raises(ArgumentError, match=reason) as error:
        parse_length(text)
    assert f"from 20 to {LENGTH_MAX}" in str(error.value)


def test_daily_time_and_zone_parsing():
    assert parse_daily_time("08:30") == time(8, 30)
    assert parse_daily_time("7:05") == time(7, 5)
    for bad in ("25:61", "24:00", "12:60", "8", "08:30:00", "noon", ""):
        assert parse_daily_time(bad) is None, bad
    assert resolve_time_zone("europe/berlin") == "Europe/Berlin"
    assert resolve_time_zone("utc") == "UTC"
    for bad in ("Mars/Olympus", "../../etc/passwd", "Europe/" + "x" * 5000, ""):
        assert resolve_time_zone(bad) is None


def test_due_times_follow_daylight_saving():
    # Berlin moves from UTC+1 to UTC+2 on 2026-03-29: 08:30 local is 07:30 UTC before, 06:30 after.
    saturday = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert latest_due(saturday, time(8, 30), "Europe/Berlin") == datetime(2026, 3, 28, 7, 30, tzinfo=UTC)
    assert next_due(saturday, time(8, 30), "Europe/Berlin") == datetime(2026, 3, 29, 6, 30, tzinfo=UTC)
    # 02:30 does not exist that night: it is due when the clocks land, at 03:00 local.
    assert next_due(saturday, time(2, 30), "Europe/Berlin") == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    # In Santiago the change is at midnight: Sunday 6 September 2026 starts at 01:00 (UTC-3).
    sunday = datetime(2026, 9, 6, 4, 10, tzinfo=UTC)
    assert latest_due(sunday, time(0, 30), "America/Santiago") == datetime(2026, 9, 6, 4, 0, tzinfo=UTC)
    assert local_date(latest_due(sunday, time(0, 30), "America/Santiago"), "America/Santiago") == date(2026, 9, 6)


def test_compose_speech_keeps_the_prompt_as_sent():
    assert compose_speech("We will", " build a wall.") == "We will build a wall."
    assert compose_speech("  We will", "\n\nbuild.") == "  We will\n\nbuild."
    assert compose_speech("", "\n Thank you. ") == "Thank you."
    assert compose_speech("", "   ") == "…"


# ---- the core with a real engine and database ----


async def test_speech_continues_the_prompt_at_the_given_temperature(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    reply = await bot.handle_text(PRIVATE, "/speech 0.5 We will build")
    assert reply.startswith("We will build")
    assert len(reply) > len("We will build")
    plain = await bot.handle_text(PRIVATE, "Make America")
    assert plain.startswith("Make America")
    free = await bot.handle_text(PRIVATE, "/speech")
    assert 1 <= len(free) <= MESSAGE_MAX
    # The chat's length is 40: each continuation ends a sentence (or stops between words with "…") near it.
    for speech, prompt in ((reply, "We will build"), (plain, "Make America"), (free, "")):
        assert 30 - (not prompt) * 2 <= len(speech) - len(prompt) <= 50
        assert speech[-1] in ".!?\"”’'…"


async def test_a_prompt_ending_in_an_emoji_is_followed_by_a_space(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    for prompt in ("Tremendous 😀", "Tremendous привет"):
        reply = await bot.handle_text(PRIVATE, prompt)
        # The space is forced; the model may then begin a new line, as after any space of the training text.
        assert reply.startswith(prompt + " ") and reply[len(prompt) :].strip(), reply


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/speech -1", "out of range"),
        ("/speech 0", "out of range"),
        ("/speech nan", "out of range"),
        ("/speech 1e309", "out of range"),
        ("/speech " + "w" * 5000, "the most I take is 1000"),
        ("/temperature abc", "is not a temperature"),
        ("/temperature 0.5 0.6", "takes one number"),
        ("/length abc", "is not a length"),
        ("/length 5000", "out of range"),
        ("/schedule 25:61", "not a time of day"),
        ("/schedule 08:00 Mars/Olympus", "not a time zone I know"),
        ("/schedule 08:00 UTC extra", "takes a time and an optional time zone"),
        ("/schedule " + "9" * 5000, "not a time of day"),
    ],
)
async def test_bad_arguments_get_a_clear_reply(tmp_path, engine, command, expected):
    bot = make_bot(tmp_path, engine)
    reply = await bot.handle_text(PRIVATE, command)
    assert expected in reply
    assert len(reply) < 400
    assert (await bot.store.get(PRIVATE.id, "private")).temperature == 0.8, "nothing changed"


async def test_settings_commands_change_and_show(tmp_path, engine):
    clock = Clock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    bot = make_bot(tmp_path, engine, clock)
    assert "Temperature is 0.8" in await bot.handle_text(PRIVATE, "/temperature")
    assert await bot.handle_text(PRIVATE, "/temperature 1.25") == "Temperature set to 1.25."
    assert await bot.handle_text(PRIVATE, "/length 120") == "Speech length set to 120 characters."
    assert "120 characters" in await bot.handle_text(PRIVATE, "/length")
    scheduled = await bot.handle_text(PRIVATE, "/schedule 7:05 america/new_york")
    assert scheduled == "Daily speech set for 07:05 America/New_York, next on Tue 02 Jun 2026."
    settings = await bot.handle_text(PRIVATE, "/settings")
    assert "temperature: 1.25" in settings and "length: 120" in settings
    assert "07:05 America/New_York" in settings
    assert await bot.handle_text(PRIVATE, "/unschedule") == "Daily speech removed."
    assert "There is no daily speech" in await bot.handle_text(PRIVATE, "/unschedule")
    assert "daily speech: off" in await bot.handle_text(PRIVATE, "/settings")


async def test_schedule_later_today_is_due_today(tmp_path, engine):
    bot = make_bot(tmp_path, engine, Clock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC)))
    reply = await bot.handle_text(PRIVATE, "/schedule 18:00")
    assert reply == "Daily speech set for 18:00 UTC, next on Mon 01 Jun 2026."
    assert "Only Telegram chats get daily posts" not in reply


async def test_the_console_is_told_that_only_telegram_chats_get_daily_posts(tmp_path, engine):
    bot = make_bot(tmp_path, engine, Clock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC)))
    reply = await bot.handle_text(ChatRef(0, "console"), "/schedule 18:00")
    assert reply.startswith("Daily speech set for 18:00 UTC") and "Only Telegram chats get daily posts" in reply


async def test_help_start_and_unknown_commands(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    help_text = await bot.handle_text(PRIVATE, "/help")
    for command in ("/speech", "/temperature", "/length", "/schedule", "/unschedule", "/settings"):
        assert command in help_text
    assert "parody" in await bot.handle_text(PRIVATE, "/start")
    assert "I don't know /dance" in await bot.handle_text(PRIVATE, "/dance")
    assert await bot.handle_text(GROUP, "/dance") is None, "other bots' commands in groups are not ours"


async def test_changing_commands_need_an_admin(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    for command in ("/temperature 0.5", "/length 100", "/schedule 08:00", "/unschedule"):
        reply = await bot.handle_text(GROUP, command, check_admin=refuse)
        assert "only this group's administrators" in reply
    assert "Temperature is 0.8" in await bot.handle_text(GROUP, "/temperature", check_admin=refuse)
    assert "daily speech: off" in await bot.handle_text(GROUP, "/settings", check_admin=refuse)


async def test_cooldown_says_when_to_try_again(tmp_path, engine):
    clock = Clock()
    bot = make_bot(tmp_path, engine, clock, cooldown=10)
    await bot.handle_text(PRIVATE, "/speech")
    clock.advance(seconds=3)
    assert await bot.handle_text(PRIVATE, "/speech") == "One speech at a time, please. Try again in 7 seconds."
    assert "Try again in 7 seconds" in await bot.handle_text(PRIVATE, "We will")
    other = await bot.handle_text(ChatRef(8, "private"), "/speech")
    assert "One speech at a time" not in other, "the cooldown is per chat"
    clock.advance(seconds=7)
    assert "One speech at a time" not in await bot.handle_text(PRIVATE, "/speech")


async def test_speech_temperature_may_be_followed_by_a_new_line(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    assert (await bot.handle_text(PRIVATE, "/speech 0.6\nWe will")).startswith("We will")
    assert "out of range" in await bot.handle_text(PRIVATE, "/speech 7\nWe will")
