"""Daily speeches: one JobQueue job per scheduled chat, rebuilt from the database at every start.

The database is the source of truth (python-telegram-bot does not persist jobs). Each post first
claims its day with one conditional UPDATE (ChatStore.claim_daily_post), so a chat gets at most
one daily speech per local calendar day, even across restarts or overlapping timers.

Missed posts: if the bot was down at a chat's due time and starts again within the grace window
(MISSED_POST_GRACE_MINUTES, default 60), it posts that day's speech once, late. Later than that,
the day is skipped. The same window is the scheduler's misfire_grace_time, so a job delayed by a
busy event loop still runs.

Quiet chats (/quiet): a post due before the chat's quiet time ends is skipped, not posted late when
it ends (bot.core.groups.quiet_at).

A crash while a post is written (kill -9, a power cut) is not the end of it: the claim opened an
inbox entry (db/inbox.py), and the next start, or another replica, writes and sends the post then,
within the same grace window. Once the post is handed to Telegram it is never made again, so a
crash in that instant can cost the day's post but never doubles it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime, time, timedelta

from apscheduler.triggers.base import BaseTrigger
from telegram.error import BadRequest, Forbidden
from telegram.ext import ContextTypes, JobQueue

from bot.core.dailytime import latest_due, local_date, next_due
from bot.core.groups import quiet_at
from bot.metrics import NO_METRICS, Metrics
from bot.telegram.replies import send_text
from db.inbox import ANSWERED, SENDING, Inbox, OpenEntry, daily_key
from db.store import ChatSettings, ChatStore

log = logging.getLogger(__name__)

# Writes a chat's daily speech (bot.core.speech.daily_speech with the engine).
WriteSpeech = Callable[[ChatSettings], Awaitable[str]]
ShowTyping = Callable[[object, int], contextlib.AbstractAsyncContextManager]  # (bot, chat id)


def job_name(chat_id: int) -> str:
    return f"daily:{chat_id}"


class DailyTrigger(BaseTrigger):
    """APScheduler's trigger for a daily time in a zone, due when bot.core.dailytime says it is.

    JobQueue.run_daily's cron trigger skips a day whose time the clocks jump over at midnight (00:30 in
    Santiago or Havana on the spring-forward day); this one fires when the clocks land, the same instant
    the once-a-day claim (DailySpeeches.due_day) counts as that day's.
    """

    __slots__ = ("daily_time", "zone_name")

    def __init__(self, daily_time: time, zone_name: str):
        self.daily_time = daily_time
        self.zone_name = zone_name

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        return next_due(previous_fire_time or now, self.daily_time, self.zone_name)

    def __str__(self) -> str:
        return f"daily at {self.daily_time:%H:%M} {self.zone_name}"


class DailySpeeches:
    def __init__(
        self,
        job_queue: JobQueue,
        bot,
        store: ChatStore,
        inbox: Inbox,
        write: WriteSpeech,
        show_typing: ShowTyping,
        grace: timedelta,
        clock: Callable[[], datetime],
        metrics: Metrics = NO_METRICS,
    ):
        self.job_queue = job_queue
        self.bot = bot
        self.store = store
        self.inbox = inbox
        self.write = write
        self.show_typing = show_typing
        self.grace = grace
        self.clock = clock
        self.metrics = metrics

    @property
    def _job_kwargs(self) -> dict:
        # APScheduler's own misfire_grace_time defaults to 1 s and silently drops later runs.
        return {"misfire_grace_time": max(1, int(self.grace.total_seconds())), "coalesce": True}

    async def rebuild(self) -> int:
        """Create the jobs for every enabled schedule and post missed speeches; returns the count."""
        # The terminal's chat (python -m bot console) shares the database but is no Telegram chat.
        scheduled = [settings for settings in await self.store.scheduled() if settings.type != "console"]
        now = self.clock()
        for settings in scheduled:
            self.sync(settings)
            if self.due_day(settings, now) is not None:
                self.job_queue.run_once(
                    self._run, when=0, chat_id=settings.id, name=f"late:{settings.id}", job_kwargs=self._job_kwargs
                )
            elif self.missed(settings, now):
                self.metrics.daily_post("missed")
        log.info("Rebuilt %d daily speech jobs", len(scheduled))
        return len(scheduled)

    def sync(self, settings: ChatSettings) -> None:
        """Make the chat's job match its row: replaced when scheduled, removed when not."""
        self.remove(settings.id)
        if settings.schedule_enabled and settings.daily_time is not None:
            self.job_queue.run_custom(
                self._run,
                chat_id=settings.id,
                name=job_name(settings.id),
                job_kwargs={"trigger": DailyTrigger(settings.daily_time, settings.time_zone), **self._job_kwargs},
            )

    async def chat_moved(self, old_id: int, new_id: int) -> None:
        """A group became supergroup `new_id`: its row and its daily speech move along."""
        settings = await self.store.migrate_chat(old_id, new_id)
        log.info("Chat %s became supergroup %s", old_id, new_id)
        if settings is not None:
            self.remove(old_id)
            self.sync(settings)

    def remove(self, chat_id: int) -> None:
        for job in self.job_queue.get_jobs_by_name(job_name(chat_id)):
            job.schedule_removal()

    def due_day(self, settings: ChatSettings, now: datetime) -> date | None:
        """The local day whose speech is due now and not yet posted, if any; none while the chat is quiet."""
        if not settings.schedule_enabled or settings.daily_time is None:
            return None
        due = latest_due(now, settings.daily_time, settings.time_zone)
        day = local_date(due, settings.time_zone)
        if now - due > self.grace or (settings.last_daily_post is not None and settings.last_daily_post >= day):
            return None
        if quiet_at(settings, due):
            return None
        return day

    def missed(self, settings: ChatSettings, now: datetime) -> bool:
        """Whether the chat's latest due day has no post and is past the grace window (the bot was down)."""
        if not settings.schedule_enabled or settings.daily_time is None or settings.last_daily_post is None:
            return False
        due = latest_due(now, settings.daily_time, settings.time_zone)
        return now - due > self.grace and settings.last_daily_post < local_date(due, settings.time_zone)

    async def _run(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.post_if_due(context.job.chat_id)

    async def post_if_due(self, chat_id: int) -> bool:
        """Post the chat's daily speech if it is due and this call wins the day's claim."""
        settings = await self.store.find(chat_id)
        day = None if settings is None else self.due_day(settings, self.clock())
        if day is None or not await self.store.claim_daily_post(chat_id, day, self.inbox.owner, self.clock()):
            return False
        return await self._post(settings, daily_key(chat_id, day))

    async def resume(self, entry: OpenEntry) -> bool:
        """Make a claimed post that a crashed process never sent, if it is still within the grace window."""
        settings = await self.store.find(entry.chat_id)
        now = self.clock()
        if (
            settings is None
            or not settings.schedule_enabled
            or now - entry.received_at > self.grace
            or quiet_at(settings, now)
        ):
            log.info("Dropping the unfinished daily speech of chat %s for %s", entry.chat_id, entry.day)
            self.metrics.daily_post("dropped")
            await self.inbox.mark(entry.key, ANSWERED, self.clock())
            return False
        return await self._post(settings, entry.key)

    async def _post(self, settings: ChatSettings, key: str) -> bool:
        try:
            posted = await self._write_and_send(settings, key)
        except Exception:
            self.metrics.daily_post("failed")
            await self.inbox.mark(key, ANSWERED, self.clock())
            raise
        self.metrics.daily_post("sent" if posted else "chat_gone")
        # Not reached when the task is cancelled at shutdown: the entry stays open for the next start.
        await self.inbox.mark(key, ANSWERED, self.clock())
        return posted

    async def _write_and_send(self, settings: ChatSettings, key: str) -> bool:
        chat_id = settings.id
        async with self.show_typing(self.bot, chat_id):
            text = await self.write(settings)
        # From here on the post is never made again, even after a crash: Telegram may have it. A post that
        # another process took over while this one was cut off from the database is that process's to send.
        if not await self.inbox.mark(key, SENDING, self.clock()):
            log.info("The daily speech of chat %s was taken over by another process; not posting it here", chat_id)
            return False
        try:
            await send_text(self.bot, chat_id, text, self.chat_moved)
        except (Forbidden, BadRequest) as error:
            if isinstance(error, BadRequest) and "chat not found" not in error.message.lower():
                raise
            # Blocked, removed from the group or the chat is gone: stop for good, no retry loop.
            log.info("Disabling the daily speech of chat %s: %s", chat_id, error.message)
            await self.store.update(chat_id, schedule_enabled=False)
            self.remove(chat_id)
            return False
        return True
