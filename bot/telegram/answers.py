"""Nothing a user sent is lost to a crash: each update that may get a reply is recorded in the database's
inbox (db/inbox.py) as it arrives, before Telegram is told it did (Arrivals), claimed while it is handled and
marked answered once the reply is sent. At start, and every INBOX_SWEEP_SECONDS for replicas that died,
open entries are taken over: updates younger than REPLAY_WINDOW are handled again, older ones get
LATE_APOLOGY, unfinished daily posts are resumed (docs/operations.md)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from telegram import Update
from telegram.error import TelegramError
from telegram.ext import Application, ContextTypes

from bot.core.speech import Speech
from bot.metrics import NO_METRICS, Metrics
from bot.telegram.daily import DailySpeeches
from bot.telegram.replies import send_text
from db.database import describe, is_transient
from db.inbox import ANSWERED, Inbox, OpenEntry, update_key

log = logging.getLogger(__name__)

# Requests left unanswered by a crash are answered after a restart if they are younger than this;
# older ones get LATE_APOLOGY instead, since an answer that late would be out of place.
REPLAY_WINDOW = timedelta(minutes=10)
LATE_APOLOGY = "Sorry, I was down when you sent this and could not answer it in time. Please send it again."
KEEP_ANSWERED = timedelta(days=1)  # how long answered entries refuse a repeat of their update
# How long a reply waits for a database that cannot be reached (a restart, a dropped connection) to say
# whether it is still this process's to send, and to record it answered. A restart takes seconds.
DATABASE_PATIENCE = timedelta(seconds=60)
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between tries of an unreachable database; the last repeats
# How long an arriving update waits for its record before it is queued (and Telegram told it arrived) anyway.
# A record takes milliseconds; a database that takes longer is locked or out of reach.
RECORD_WAIT = 1.0

Send = Callable[[str], Awaitable[object]]


def _answerable(item: object) -> Update | None:
    """The update if it is of a kind that may get a reply through the inbox: a new message, a button press."""
    if not isinstance(item, Update):
        return None
    if item.message is not None or (item.callback_query is not None and item.callback_query.message is not None):
        return item
    return None


async def patiently(work: Callable[[], Awaitable], patience: timedelta = DATABASE_PATIENCE):
    """`await work()`, tried again while the database cannot be reached, for up to `patience`."""
    waited = 0.0
    for attempt in itertools.count():
        try:
            return await work()
        except SQLAlchemyError as error:
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            if not is_transient(error) or waited + delay > patience.total_seconds():
                raise
            await asyncio.sleep(delay)
            waited += delay
    raise AssertionError("unreachable")


async def _claim_result(claim: asyncio.Task) -> bool | None:
    """True: the update is ours to answer; False: answered already or another process's; None: the database failed."""
    try:
        return await claim
    except SQLAlchemyError:
        return None


class Arrivals:
    """Updates recorded as they arrive (the Application's update queue), and forgotten again once handled if no
    handler claimed them (the update processor): so what arrived is owed even before its handler starts, which
    may be a while for a chat whose earlier updates are still in progress.

    A database that is slow to record (a locked SQLite file, a server out of reach) must not hold up every
    update, as updates come in one after another when polling: once a record takes longer than RECORD_WAIT,
    or fails, updates are queued without waiting for their records until one is quick again.
    """

    def __init__(self, inbox: Inbox, clock: Callable[[], datetime]) -> None:
        self.inbox = inbox
        self.clock = clock
        self._claimed: set[int] = set()  # updates in process whose handler claimed them: nothing to drop
        self._recording: dict[int, asyncio.Task] = {}
        self._recorded_here: set[int] = set()  # updates in process that this process recorded as new
        self._database_slow = False

    async def record(self, item: object) -> None:
        update = _answerable(item)
        if update is None:
            return
        task = asyncio.create_task(self._record(update))
        self._recording[update.update_id] = task
        task.add_done_callback(lambda done: self._recording.pop(update.update_id, None) if done is task else None)
        if self._database_slow:
            return
        if not (await asyncio.wait({task}, timeout=RECORD_WAIT))[0]:
            self._database_slow = True
            log.warning(
                "The inbox took more than %g s to record update %s; handling updates without waiting for their "
                "records until the database is quick again",
                RECORD_WAIT,
                update.update_id,
            )

    async def _record(self, update: Update) -> None:
        try:
            chat_id = update.effective_chat.id
            if await self.inbox.record_received(update.update_id, chat_id, update.to_dict(), self.clock()):
                self._recorded_here.add(update.update_id)
            self._database_slow = False
        except SQLAlchemyError as error:
            # Handled all the same; a crash before its handler claims it loses it (docs/operations.md).
            self._database_slow = True
            log.warning("The inbox could not record update %s as it arrived: %s", update.update_id, describe(error))

    def claimed(self, update_id: int) -> None:
        self._claimed.add(update_id)

    async def recorded_here(self, update_id: int) -> bool:
        """Whether this process recorded the update as new on arrival (waiting for a record under way): then it
        is this process's to answer, with no claim to write."""
        if (recording := self._recording.get(update_id)) is not None:
            await asyncio.wait({recording})
        return update_id in self._recorded_here

    async def processed(self, item: object) -> None:
        update = _answerable(item)
        if update is None:
            return
        if (recording := self._recording.get(update.update_id)) is not None:
            await asyncio.wait({recording})  # a late record must not outlive the drop below
        self._recorded_here.discard(update.update_id)
        if self._forget_claim(update.update_id):
            return
        try:
            await self.inbox.drop_unclaimed(update.update_id)
        except SQLAlchemyError as error:
            log.warning(
                "The inbox could not drop update %s, which needed no reply: %s", update.update_id, describe(error)
            )

    def _forget_claim(self, update_id: int) -> bool:
        if update_id in self._claimed:
            self._claimed.discard(update_id)
            return True
        return False


class RecordingQueue(asyncio.Queue):
    """The Application's update queue: each update is recorded (Arrivals.record) before it is queued, which is
    before python-telegram-bot tells Telegram it arrived (a webhook's 200, polling's next offset); unless the
    database is slow (Arrivals)."""

    def __init__(self, record: Callable[[object], Awaitable[None]]) -> None:
        super().__init__()
        self._record = record

    async def put(self, item: object) -> None:
        await self._record(item)
        await super().put(item)


class Answers:
    """Replies that go through the inbox, and the take-over of what crashed processes left open."""

    def __init__(
        self,
        inbox: Inbox,
        arrivals: Arrivals,
        daily: DailySpeeches,
        clock: Callable[[], datetime],
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.inbox = inbox
        self.arrivals = arrivals
        self.daily = daily
        self.clock = clock
        self.metrics = metrics

    async def answer(self, update: Update, reply: Awaitable[str | None], send: Send) -> None:
        """Send what `reply` comes to (if anything) with `send`, the update kept in the inbox until then."""
        started = time.perf_counter()
        message = update.effective_message
        self.arrivals.claimed(update.update_id)
        # Claimed beside the handling rather than before it, so a locked database holds up only the replies
        # that need it.
        claim = asyncio.create_task(self._claim(update, message.chat_id))
        try:
            text = await reply
            if text is not None:
                ours = await self._ours_to_send(claim, update.update_id)
                if ours is None:
                    return  # left open, for whichever process takes it over once this one has stopped
                if ours:
                    await send(text)
                    self.metrics.reply_sent(isinstance(text, Speech), time.perf_counter() - started)
        except Exception:
            await self._close_entry(claim, update.update_id)  # the error handler's apology is the answer
            raise
        # Not reached when the task is cancelled at shutdown: the entry stays open for the next start.
        await self._close_entry(claim, update.update_id)

    async def _claim(self, update: Update, chat_id: int) -> bool:
        if await self.arrivals.recorded_here(update.update_id):
            return True  # recorded as new on arrival by this process: ours, nothing more to write
        return await self.inbox.claim_update(update.update_id, chat_id, update.to_dict(), self.clock())

    async def _ours_to_send(self, claim: asyncio.Task, update_id: int) -> bool | None:
        """True: send the reply; False: another process answers (or answered) it; None: the database could not say."""
        if not self.inbox.shared:
            # One process (SQLite): only a repeat of an answered update is not ours, and only when the inbox has
            # said so already: waiting for it would hold up replies that need no database.
            answered = claim.done() and not claim.cancelled() and claim.exception() is None and not claim.result()
        elif await _claim_result(claim) is False:
            answered = True
        else:
            # Replicas: another process may have taken the update over while this one was cut off from the
            # database, and answered it there. Asked of the database just before the reply goes out.
            try:
                answered = not await patiently(lambda: self.inbox.hand_over(update_key(update_id)))
            except SQLAlchemyError as error:
                log.error(
                    "Not answering update %s: the database could not say whether another process took it over "
                    "(%s); whichever process takes it over answers it",
                    update_id,
                    describe(error),
                )
                return None
        if answered:
            log.info("Update %s is answered already or by another process; not answering it again", update_id)
        return not answered

    async def _close_entry(self, claim: asyncio.Task, update_id: int) -> None:
        claimed = await _claim_result(claim)
        if claimed is False:
            return
        if claimed is None:
            log.warning("The inbox could not claim update %s; closing what it recorded on arrival", update_id)
        try:
            # Only our own entry is touched: none if it was never recorded, or taken over by another process.
            await patiently(lambda: self.inbox.mark(update_key(update_id), ANSWERED, self.clock()))
        except SQLAlchemyError as error:
            log.warning("The inbox could not record update %s answered: %s", update_id, describe(error))

    async def take_over(self, application: Application) -> None:
        """Answer what crashed processes (an earlier run of this one, or another replica) left unanswered."""
        now = self.clock()
        for entry in await self.inbox.take_over(now):
            if not entry.is_update:
                self.metrics.inbox_taken_over("daily")
                application.job_queue.run_once(self._resume_daily, when=0, data=entry, name=f"resume:{entry.key}")
            elif now - entry.received_at <= REPLAY_WINDOW:
                self.metrics.inbox_taken_over("replayed")
                log.info("Handling %s again, left unanswered by a crash", entry.key)
                await application.update_queue.put(Update.de_json(entry.payload, application.bot))
            else:
                self.metrics.inbox_taken_over("apologised")
                await self._apologise(application.bot, entry)
        await self.inbox.forget_answered(now - KEEP_ANSWERED)

    async def sweep(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        try:
            await self.take_over(context.application)
        except SQLAlchemyError as error:
            log.warning("Could not look for requests that gone processes left: %s", describe(error))

    async def _resume_daily(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.daily.resume(context.job.data)

    async def _apologise(self, bot, entry: OpenEntry) -> None:
        message = Update.de_json(entry.payload, bot).effective_message
        try:
            await send_text(bot, entry.chat_id, LATE_APOLOGY, self.daily.chat_moved, reply_to=message)
        except TelegramError as error:
            log.info("Could not apologise in chat %s: %s", entry.chat_id, error)
        await self.inbox.mark(entry.key, ANSWERED, self.clock())
