"""Daily speeches: jobs rebuilt from the database, DST-correct times, at most one post a day, grace window.

The bot's clock is a test Clock; jobs are run through JobQueue's own Job.run at chosen instants,
so no test waits for a real minute, and the once-a-day guard is exercised in SQLite for real.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bot.core.speechbot import ChatRef
from bot.telegram.daily import job_name
from tests.support.bot_harness import ALICE, Clock, bot_config, group_chat, private_chat, running_bot

CHAT = private_chat(ALICE)
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def daily_job(application, chat_id: int):
    jobs = application.job_queue.get_jobs_by_name(job_name(chat_id))
    assert len(jobs) == 1
    return jobs[0]


def posts(emulator, chat_id: int = CHAT["id"]) -> int:
    """Messages to the chat that were not answers to a command (daily posts carry no reply)."""
    return sum("reply_parameters" not in call.params for call in emulator.sent(chat_id=chat_id))


def fire_times(job, since: datetime, count: int = 3) -> list[datetime]:
    """The next `count` instants APScheduler will run `job` at, as its scheduler asks the trigger."""
    times, previous = [], None
    for _ in range(count):
        previous = job.job.trigger.get_next_fire_time(previous, previous or since)
        times.append(previous.astimezone(UTC))
    return times


def minutes(instants: list[datetime]) -> list[str]:
    return [instant.replace(tzinfo=None).isoformat(timespec="minutes") for instant in instants]


async def test_job_uses_local_time_across_daylight_saving(emulator, engine, tmp_path):
    clock = Clock(datetime(2026, 3, 27, 12, 0, tzinfo=UTC))
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), clock) as app:
        await emulator.ask(CHAT, ALICE, "/schedule 08:30 Europe/Berlin")
        job = daily_job(app, CHAT["id"])
        # Berlin is UTC+1 until Sunday 29 March 2026, then UTC+2.
        assert minutes(fire_times(job, clock.now)) == ["2026-03-28T07:30", "2026-03-29T06:30", "2026-03-30T06:30"]
        assert job.job.misfire_grace_time == 3600, "set explicitly: APScheduler's default is 1 s"


@pytest.mark.parametrize(
    ("zone", "day_before", "expected"),
    [
        # Santiago goes from UTC-4 to UTC-3 as Saturday 5 September 2026 ends: Sunday starts at 01:00.
        ("America/Santiago", datetime(2026, 9, 5, 12, 0, tzinfo=UTC), ["2026-09-06T04:00", "2026-09-07T03:30"]),
        # Havana goes from UTC-5 to UTC-4 as Saturday 7 March 2026 ends.
        ("America/Havana", datetime(2026, 3, 7, 12, 0, tzinfo=UTC), ["2026-03-08T05:00", "2026-03-09T04:30"]),
    ],
)
async def test_a_daily_time_the_clocks_skip_at_midnight_is_posted_when_they_land(
    emulator, engine, tmp_path, zone, day_before, expected
):
    clock = Clock(day_before)
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), clock) as app:
        assert "next on Sun" in await emulator.ask(CHAT, ALICE, f"/schedule 00:30 {zone}")
        job = daily_job(app, CHAT["id"])
        due = fire_times(job, clock.now, count=2)
        assert minutes(due) == expected, "01:00 local on the day of the change, then 00:30 again"
        for day, instant in enumerate(due, 1):
            clock.now = instant
            await job.run(app)
            assert posts(emulator) == day, f"the once-a-day claim takes the post at {instant}"


async def test_daily_speech_fires_once_per_day_even_across_a_restart(emulator, engine, tmp_path, database_url):
    config = bot_config(emulator, tmp_path / "bot.db", database_url=database_url)
    clock = Clock(NOON)
    async with running_bot(emulator, engine, config, clock) as app:
        await emulator.ask(CHAT, ALICE, "/schedule 12:30")
        clock.advance(minutes=30)
        await daily_job(app, CHAT["id"]).run(app)
        assert posts(emulator) == 1
        keyboard = emulator.sent(chat_id=CHAT["id"])[-1].params["reply_markup"]["inline_keyboard"]
        assert [button["text"] for button in keyboard[0]] == ["Another", "Calmer", "Wilder"], "daily posts too"
        await daily_job(app, CHAT["id"]).run(app)  # a second timer for the same day
        assert posts(emulator) == 1

    clock.advance(minutes=5)
    async with running_bot(emulator, engine, config, clock) as app:
        await emulator.settle()
        await daily_job(app, CHAT["id"]).run(app)
        assert posts(emulator) == 1, "the guard lives in the database"
        clock.advance(days=1)
        await daily_job(app, CHAT["id"]).run(app)
        assert posts(emulator) == 2, "the next day posts again"


async def test_missed_post_is_made_late_within_the_grace_window_once(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock(NOON)
    async with running_bot(emulator, engine, config, clock):
        await emulator.ask(CHAT, ALICE, "/schedule 12:30")
    clock.advance(minutes=50)  # the bot was down at 12:30 and is back 20 minutes late
    async with running_bot(emulator, engine, config, clock):
        await emulator.wait_for(lambda call: call.method == "sendMessage" and "reply_parameters" not in call.params)
        assert posts(emulator) == 1
    async with running_bot(emulator, engine, config, clock):
        await emulator.settle(0.5)
    assert posts(emulator) == 1


async def test_missed_post_beyond_the_grace_window_is_skipped(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock(NOON)
    async with running_bot(emulator, engine, config, clock):
        await emulator.ask(CHAT, ALICE, "/schedule 12:30")
    clock.advance(hours=2)
    async with running_bot(emulator, engine, config, clock) as app:
        await emulator.settle(0.5)
        await daily_job(app, CHAT["id"]).run(app)
    assert posts(emulator) == 0


async def test_scheduling_a_time_already_past_starts_tomorrow(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock(NOON)
    async with running_bot(emulator, engine, config, clock):
        assert "next on Tue 02 Jun 2026" in await emulator.ask(CHAT, ALICE, "/schedule 11:50")
    async with running_bot(emulator, engine, config, clock):  # a restart inside the grace window
        await emulator.settle(0.5)
    assert posts(emulator) == 0


async def test_blocked_chat_has_its_schedule_disabled_without_retrying(emulator, engine, tmp_path):
    clock = Clock(NOON)
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), clock) as app:
        await emulator.ask(CHAT, ALICE, "/schedule 12:30")
        job = daily_job(app, CHAT["id"])
        emulator.blocked.add(CHAT["id"])
        clock.advance(minutes=30)
        await job.run(app)
        attempts = [call for call in emulator.calls if call.method == "sendMessage" and call.status == 403]
        assert len(attempts) == 1
        await emulator.settle(0.2)
        assert not app.job_queue.get_jobs_by_name(job_name(CHAT["id"]))
        emulator.blocked.clear()
        assert "daily speech: off" in await emulator.ask(CHAT, ALICE, "/settings")


async def test_bot_removed_from_a_group_stops_its_schedule(emulator, engine, tmp_path):
    group = group_chat(-5001)
    emulator.admins[group["id"]] = [ALICE]
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), Clock(NOON)) as app:
        await emulator.ask(group, ALICE, "/schedule 18:00")
        member = {"user": emulator.bot_user}
        emulator.push_update(
            {
                "my_chat_member": {
                    "chat": group,
                    "from": ALICE,
                    "date": 0,
                    "old_chat_member": member | {"status": "member"},
                    "new_chat_member": member | {"status": "kicked", "until_date": 0},
                }
            }
        )
        await emulator.settle(0.5)
        assert not app.job_queue.get_jobs_by_name(job_name(group["id"]))
        assert "daily speech: off" in await emulator.ask(group, ALICE, "/settings")


async def test_the_console_chat_is_never_scheduled_on_telegram(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    async with running_bot(emulator, engine, config, Clock(NOON)) as app:
        core = app.bot_data["core"]
        assert "Daily speech set" in await core.handle_text(ChatRef(0, "console"), "/schedule 12:10")
    async with running_bot(emulator, engine, config, Clock(NOON)) as app:
        assert not app.job_queue.get_jobs_by_name(job_name(0))
