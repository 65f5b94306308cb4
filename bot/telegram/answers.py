"""Nothing a user sent is lost to a crash: each update that will get a reply is recorded in the database's
inbox (db/inbox.py) while it is handled and marked answered once the reply is sent. At start, and every
INBOX_SWEEP_SECONDS for replicas that died, open entries are taken over: updates younger than REPLAY_WINDOW
are handled again, older ones get LATE_APOLOGY, unfinished daily posts are resumed (docs/operations.md)."""

from __future__ import annotations

import asyncio
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
from db.database import describe
from db.inbox import ANSWERED, Inbox, OpenEntry, update_key

log = logging.getLogger(__name__)

# Requests left unanswered by a crash are answered after a restart if they are younger than this;
# older ones get LATE_APOLOGY instead, since an answer that late would be out of place.
REPLAY_WINDOW = timedelta(minutes=10)
LATE_APOLOGY = "Sorry, I was down when you sent this and could not answer it in time. Please send it again."
INBOX_SWEEP_SECONDS = 60
KEEP_ANSWERED = timedelta(days=1)  # how long answered entries refuse a repeat of their update

Send = Callable[[str], Awaitable[object]]


class Answers:
    """Replies that go through the inbox, and the take-over of what crashed processes left open."""

    def __init__(
        self, inbox: Inbox, daily: DailySpeeches, clock: Callable[[], datetime], metrics: Metrics = NO_METRICS
    ) -> None:
        self.inbox = inbox
        self.daily = daily
        self.clock = clock
        self.metrics = metrics

    async def answer(self, update: Update, reply: Awaitable[str | None], send: Send) -> None:
        """Send what `reply` comes to (if anything) with `send`, the update kept in the inbox until then."""
        started = time.perf_counter()
        message = update.effective_message
        # Recorded beside the handling rather than before it, so a locked database holds up only the
        # replies that need it; a crash within the few milliseconds the record takes loses the update.
        claim = asyncio.create_task(
            self.inbox.claim_update(update.update_id, message.chat_id, update.to_dict(), self.clock())
        )
        try:
            text = await reply
            if self._answered_elsewhere(claim):
                log.info(
                    "Update %s is answered already or by another process; not answering it again", update.update_id
                )
                return
            if text is not None:
                await send(text)
                self.metrics.reply_sent(isinstance(text, Speech), time.perf_counter() - started)
        except Exception:
            await self._close_entry(claim, update.update_id)  # the error handler's apology is the answer
            raise
        # Not reached when the task is cancelled at shutdown: the entry stays open for the next start.
        await self._close_entry(claim, update.update_id)

    @staticmethod
    def _answered_elsewhere(claim: asyncio.Task) -> bool:
        # Only when the inbox has already said so: waiting for it would hold up replies that need no database.
        return claim.done() and not claim.cancelled() and claim.exception() is None and not claim.result()

    async def _close_entry(self, claim: asyncio.Task, update_id: int) -> None:
        try:
            if await claim:
                await self.inbox.mark(update_key(update_id), ANSWERED, self.clock())
        except SQLAlchemyError as error:
            log.warning("The inbox could not record update %s: %s", update_id, describe(error))

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
        await self.take_over(context.application)

    async def _resume_daily(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.daily.resume(context.job.data)

    async def _apologise(self, bot, entry: OpenEntry) -> None:
        message = Update.de_json(entry.payload, bot).effective_message
        try:
            await send_text(bot, entry.chat_id, LATE_APOLOGY, self.daily.chat_moved, reply_to=message)
        except TelegramError as error:
            log.info("Could not apologise in chat %s: %s", entry.chat_id, error)
        await self.inbox.mark(entry.key, ANSWERED, self.clock())
