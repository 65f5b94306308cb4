"""The interactive Telegram features: inline mode, the buttons under each speech, and /speech in reply to a
message (docs/interactive.md). Drafts that stream speeches live in bot/telegram/progress.py.

What to say lives in the core (SpeechBot.inline_speeches, .choice, .reply_speech); this module turns updates
into those calls and their answers into Bot API requests.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
import uuid

from telegram import (
    CallbackQuery,
    InlineQueryResultArticle,
    InputTextMessageContent,
    Message,
    Update,
)
from telegram.error import BadRequest
from telegram.ext import Application, CallbackQueryHandler, ChosenInlineResultHandler, ContextTypes, InlineQueryHandler

from bot.core.speech import STALE_CHOICE, Speech
from bot.core.speechbot import ChatRef, SpeechBot
from bot.telegram.answers import Answers
from bot.telegram.progress import Progress
from bot.telegram.replies import OnChatMoved, send_quoting_reply, send_text

log = logging.getLogger(__name__)

# Telegram caches inline answers per query text (per user, with is_personal). A short cache spares the engine
# when a user deletes and retypes a word, and still offers new speeches for the same words soon after.
INLINE_CACHE_SECONDS = 10
INLINE_PREVIEW_CHARS = 100


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
    """Inline queries, button presses and /speech in reply."""

    def __init__(self, core: SpeechBot, answers: Answers, progress: Progress, on_moved: OnChatMoved) -> None:
        self.core = core
        self.answers = answers
        self.progress = progress
        self.on_moved = on_moved

    def register(self, application: Application) -> None:
        # block=False: a newer query of the same user must start while the older one still generates, to
        # supersede it (SpeechBot.inline_speeches).
        application.add_handler(InlineQueryHandler(self.on_inline_query, block=False))
        application.add_handler(ChosenInlineResultHandler(self.on_chosen_inline_result))
        application.add_handler(CallbackQueryHandler(self.on_speech_button))

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
        does not swallow the press: the next start makes it (bot.telegram.answers.Answers.answer)."""
        callback = update.callback_query
        message = callback.message
        if message is None:  # a button on a message sent inline: no chat the bot could write to
            await _toast(callback, STALE_CHOICE)
            return

        async def speech_or_toast() -> str | None:
            reply = await self.core.choice(
                ChatRef(message.chat.id, message.chat.type),
                callback.data or "",
                show_typing=self.progress.showing(context.bot, message.chat),
            )
            if isinstance(reply, Speech):
                return reply
            await _toast(callback, reply)  # nothing owed to the chat: no speech, a toast for the presser
            return None

        async def send_speech(speech: str) -> None:
            await send_text(context.bot, message.chat.id, speech, self.on_moved)
            await _toast(callback, None)

        await self.answers.answer(update, speech_or_toast(), send_speech)

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
            show_typing=self.progress.showing(context.bot, message.chat),
        )

        async def send(answer: str) -> None:
            if not isinstance(answer, Speech):
                await send_text(context.bot, message.chat_id, answer, self.on_moved, reply_to=message)
                return
            await send_quoting_reply(context.bot, message.chat_id, answer, self.on_moved, replied, text)

        # Through the inbox like every other reply, so a crash while it is written does not lose it.
        await self.answers.answer(update, reply, send)
