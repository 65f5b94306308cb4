"""The interactive Telegram features: inline mode, the buttons under each speech, speeches streamed as
drafts in private chats, and /speech in reply to a message (docs/interactive.md).

What to say lives in bot/core/speechbot.py (SpeechBot.inline_speeches, .choice, .reply_speech); this module turns
updates into those calls and their answers into Bot API requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiolimiter import AsyncLimiter
from telegram import (
    CallbackQuery,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InlineQueryResultArticle,
    InputTextMessageContent,
    Message,
    Update,
)
from telegram.constants import ChatType
from telegram.error import BadRequest, TelegramError
from telegram.ext import Application, CallbackQueryHandler, ChosenInlineResultHandler, ContextTypes, InlineQueryHandler

from bot.core.speechbot import STALE_CHOICE, ChatRef, Speech, speech_choices

if TYPE_CHECKING:
    from bot.telegram.app import TelegramFrontend

log = logging.getLogger(__name__)

# Telegram caches inline answers per query text (per user, with is_personal). A short cache spares the engine
# when a user deletes and retypes a word, and still offers new speeches for the same words soon after.
INLINE_CACHE_SECONDS = 10
INLINE_PREVIEW_CHARS = 100
# Drafts: at most one every DRAFT_INTERVAL_SECONDS per speech, and DRAFTS_PER_SECOND over all chats together,
# so they never eat the ~30 messages a second Telegram allows a bot (docs/interactive.md).
DRAFT_INTERVAL_SECONDS = 0.3
DRAFTS_PER_SECOND = 10
QUOTE_MAX = 1024  # ReplyParameters.quote, after entity parsing


def speech_keyboard(text: str) -> InlineKeyboardMarkup | None:
    """Another / Calmer / Wilder under a speech; None under anything else."""
    if not isinstance(text, Speech):
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(choice.label, callback_data=choice.data) for choice in speech_choices(text.temperature)]]
    )


class _Draft:
    """One speech being streamed into a private chat: the latest text, sent at most every interval."""

    def __init__(self, bot, chat_id: int, draft_id: int, budget: AsyncLimiter):
        self.bot, self.chat_id, self.draft_id, self.budget = bot, chat_id, draft_id, budget
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

    def __init__(self) -> None:
        self.budget = AsyncLimiter(DRAFTS_PER_SECOND, 1)
        self._ids = itertools.count(1)  # draft_id must be non-zero; one per speech

    @contextlib.asynccontextmanager
    async def stream(self, bot, chat_id: int) -> AsyncIterator[Callable[[str], None]]:
        draft = _Draft(bot, chat_id, next(self._ids), self.budget)
        try:
            yield draft.show
        finally:
            draft.stop()


async def _toast(callback: CallbackQuery, text: str | None) -> None:
    """Answer a button press, with a short notice or none (Telegram shows a spinner until it is answered)."""
    with contextlib.suppress(BadRequest):  # "query is too old" after a long wait: nothing left to show
        await callback.answer(None if text is None else text[:200])


def replied_message(message: Message) -> Message | None:
    """The message a command replies to; in forum topics every message "replies" to the topic's first one."""
    replied = message.reply_to_message
    if replied is None or replied.forum_topic_created is not None:
        return None
    return replied


class InteractiveHandlers:
    """The handlers of this module, sharing the frontend's sending, typing and core."""

    def __init__(self, frontend: TelegramFrontend):
        self.frontend = frontend
        self.core = frontend.core
        self.drafts = Drafts()

    def register(self, application: Application) -> None:
        # block=False: a newer query of the same user must start while the older one still generates, to
        # supersede it (SpeechBot.inline_speeches).
        application.add_handler(InlineQueryHandler(self.on_inline_query, block=False))
        application.add_handler(ChosenInlineResultHandler(self.on_chosen_inline_result))
        application.add_handler(CallbackQueryHandler(self.on_speech_button))

    def showing_progress(self, bot, chat: Chat):
        """The TypingIndicator for a speech in `chat`: drafts in private chats, "typing…" in groups."""
        if chat.type == ChatType.PRIVATE:
            return lambda: self.drafts.stream(bot, chat.id)
        return lambda: self.frontend.typing(bot, chat.id)

    # ---- inline mode ----

    async def on_inline_query(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.inline_query
        speeches = await self.core.inline_speeches(query.from_user.id, query.query)
        if speeches is None:
            return  # superseded by a newer query, which Telegram shows instead
        results = [
            InlineQueryResultArticle(
                id=f"{speech.style.lower()}-{uuid.uuid4().hex}",
                title=f"{speech.style} speech ({speech.temperature:g})",
                description=textwrap.shorten(speech.text, INLINE_PREVIEW_CHARS, placeholder="…"),
                input_message_content=InputTextMessageContent(speech.text),
            )
            for speech in speeches
        ]
        with contextlib.suppress(BadRequest):  # "query is too old": the user has moved on
            await query.answer(results, cache_time=INLINE_CACHE_SECONDS if results else 0, is_personal=True)

    async def on_chosen_inline_result(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        # Only sent with /setinlinefeedback on; tells which style people pick.
        log.info("Inline speech chosen: %s", update.chosen_inline_result.result_id.split("-")[0])

    # ---- buttons ----

    async def on_speech_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Another / Calmer / Wilder: a new speech in that chat, or a toast (cooldown, stale or forged data).

        A speech goes through the durable inbox as a command's reply does, so a crash while it is made
        does not swallow the press: the next start makes it (bot.telegram.app.TelegramFrontend.answer)."""
        callback = update.callback_query
        message = callback.message
        if message is None:  # a button on a message sent inline: no chat the bot could write to
            await _toast(callback, STALE_CHOICE)
            return

        async def speech_or_toast() -> str | None:
            reply = await self.core.choice(
                ChatRef(message.chat.id, message.chat.type),
                callback.data or "",
                show_typing=self.showing_progress(context.bot, message.chat),
            )
            if isinstance(reply, Speech):
                return reply
            await _toast(callback, reply)  # nothing owed to the chat: no speech, a toast for the presser
            return None

        async def send_speech(speech: str) -> None:
            await self.frontend.send(context.bot, message.chat.id, speech)
            await _toast(callback, None)

        await self.frontend.answer(update, context, speech_or_toast(), send=send_speech)

    # ---- /speech in reply ----

    async def speech_in_reply(self, update: Update, context: ContextTypes.DEFAULT_TYPE, args: str) -> None:
        """/speech [temperature] as a reply: continues the replied-to message, quoting it."""
        message = update.effective_message
        replied = replied_message(message)
        text = replied.text or replied.caption
        reply = self.core.reply_speech(
            ChatRef(message.chat.id, message.chat.type),
            args,
            text,
            show_typing=self.showing_progress(context.bot, message.chat),
        )

        async def send(answer: str) -> None:
            if not isinstance(answer, Speech):
                await self.frontend.send(context.bot, message.chat_id, answer, reply_to=message)
                return
            quote = text if len(text) <= QUOTE_MAX else None
            try:
                await self.frontend.send(context.bot, message.chat_id, answer, reply_to=replied, quote=quote)
            except BadRequest:
                if quote is None:
                    raise
                # Telegram matches quotes against the message as it stored it; without the quote the reply stands.
                await self.frontend.send(context.bot, message.chat_id, answer, reply_to=replied)

        # Through the inbox like every other reply, so a crash while it is written does not lose it.
        await self.frontend.answer(update, context, reply, send=send)
