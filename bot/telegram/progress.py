"""Showing that a speech is being written: drafts that stream it into private chats (sendMessageDraft,
Bot API 9.5+), "typing…" in groups (docs/interactive.md)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from aiolimiter import AsyncLimiter
from telegram import Chat
from telegram.constants import ChatAction, ChatType
from telegram.error import TelegramError

from bot.core.speechbot import TypingIndicator
from bot.metrics import NO_METRICS, Metrics

log = logging.getLogger(__name__)

# Drafts: at most one every DRAFT_INTERVAL_SECONDS per speech, and DRAFTS_PER_SECOND over all chats together,
# so they never eat the ~30 messages a second Telegram allows a bot (docs/interactive.md).
DRAFT_INTERVAL_SECONDS = 0.3
DRAFTS_PER_SECOND = 10
TYPING_REFRESH_SECONDS = 4.5  # Telegram shows "typing" for 5 s per action
# Chat actions on the wire at once; a refresh beyond that is skipped rather than queued (best effort).
TYPING_IN_FLIGHT_MAX = 32


class _Draft:
    """One speech being streamed into a private chat: the latest text, sent at most every interval."""

    def __init__(self, bot, chat_id: int, draft_id: int, budget: AsyncLimiter, on_first_draft: Callable[[float], None]):
        self.bot, self.chat_id, self.draft_id, self.budget = bot, chat_id, draft_id, budget
        self.on_first_draft = on_first_draft
        self.started = time.monotonic()
        self.drafts_sent = 0
        self.latest = ""
        self.sent_at = -math.inf
        self.sending = False
        self.stopped = False
        self.task: asyncio.Task | None = None

    def show(self, text: str) -> None:
        """Called with the speech so far after every chunk; never waits."""
        self.latest = text
        if not self.stopped and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._send_latest())

    async def _send_latest(self) -> None:
        wait = self.sent_at + DRAFT_INTERVAL_SECONDS - time.monotonic()
        if wait > 0:  # the first draft goes out at once, without giving the final message a chance to pass it
            await asyncio.sleep(wait)
        if not self.budget.has_capacity():
            return  # skipped, not queued: a later chunk tries again
        await self.budget.acquire()
        self.sending, self.sent_at = True, time.monotonic()
        try:
            await self.bot.send_message_draft(self.chat_id, self.draft_id, self.latest)
            self.drafts_sent += 1
            if self.drafts_sent == 1:
                self.on_first_draft(time.monotonic() - self.started)
        except TelegramError as error:
            # Refused (an older API, a 429, a chat that takes none): the final message comes all the same.
            log.debug("Drafts stop for chat %s: %s", self.chat_id, error)
            self.stopped = True
        except Exception:
            log.warning("A draft failed; the speech is sent without drafts", exc_info=True)
            self.stopped = True
        finally:
            self.sending = False

    def stop(self) -> None:
        """The final text is ready: no new drafts. One waiting for its turn is dropped; one already on its way
        is left to finish, since awaiting it would delay the final message."""
        self.stopped = True
        if self.task is not None and not self.sending:
            self.task.cancel()


class Drafts:
    """sendMessageDraft for speeches in private chats (Bot API 9.5+)."""

    def __init__(self, on_first_draft: Callable[[float], None]) -> None:
        """`on_first_draft` is told how many seconds after its start each speech's first draft reached Telegram."""
        self.budget = AsyncLimiter(DRAFTS_PER_SECOND, 1)
        self._ids = itertools.count(1)  # draft_id must be non-zero; one per speech
        self.on_first_draft = on_first_draft

    @contextlib.asynccontextmanager
    async def stream(self, bot, chat_id: int) -> AsyncIterator[Callable[[str], None]]:
        draft = _Draft(bot, chat_id, next(self._ids), self.budget, self.on_first_draft)
        try:
            yield draft.show
        finally:
            draft.stop()


class Progress:
    """The TypingIndicator of each speech: drafts in private chats, "typing…" elsewhere."""

    def __init__(self, metrics: Metrics = NO_METRICS) -> None:
        self.drafts = Drafts(metrics.first_draft)
        self._typing_slots = asyncio.Semaphore(TYPING_IN_FLIGHT_MAX)
        self._typing_tasks: set[asyncio.Task] = set()  # referenced until done, as asyncio asks

    def showing(self, bot, chat: Chat) -> TypingIndicator:
        """How a speech in `chat` shows its progress."""
        if chat.type == ChatType.PRIVATE:
            return lambda: self.drafts.stream(bot, chat.id)
        return lambda: self.typing(bot, chat.id)

    @contextlib.asynccontextmanager
    async def typing(self, bot, chat_id: int) -> AsyncIterator[None]:
        """Show "typing…" in the chat until the block ends, without ever holding the block up.

        The chat actions run in a task of their own, bypass the rate limiter (RetryingRateLimiter) and
        are skipped while TYPING_IN_FLIGHT_MAX are on the wire, so they neither wait for the outgoing
        rate nor take the connections that replies need. One still in flight when the block ends is
        left to finish: cancelling it would close its connection, and the reply would open a new one.
        """
        stopped = asyncio.Event()

        async def keep_typing() -> None:
            while not stopped.is_set():
                if not self._typing_slots.locked():
                    async with self._typing_slots:
                        with contextlib.suppress(TelegramError):
                            await bot.send_chat_action(chat_id, ChatAction.TYPING)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), TYPING_REFRESH_SECONDS)

        task = asyncio.create_task(keep_typing())
        self._typing_tasks.add(task)
        task.add_done_callback(self._typing_tasks.discard)
        try:
            yield
        finally:
            stopped.set()
