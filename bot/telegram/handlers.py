"""The handlers of commands, prompts, overheard group messages and chat changes: each turns an update into a
ChatRef and text, asks the core for the reply and sends it through the inbox (bot.telegram.answers); an
interjection, which nobody is owed, goes out directly. Inline mode, buttons and /speech in reply are in
bot/telegram/interactive.py."""

from __future__ import annotations

import contextlib
import logging

from telegram import Message, MessageEntity, Update
from telegram.constants import ChatMemberStatus
from telegram.error import Forbidden, TelegramError
from telegram.ext import ContextTypes

from bot.core.commands import split_command
from bot.core.speechbot import ChatRef, SpeechBot
from bot.logs import reason
from bot.telegram.admins import Admins
from bot.telegram.answers import Answers
from bot.telegram.daily import DailySpeeches
from bot.telegram.interactive import InteractiveHandlers, replied_message
from bot.telegram.progress import Progress
from bot.telegram.replies import send_quoting_reply, send_text

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong while handling that. Please try again in a moment."


def chat_of(message: Message) -> ChatRef:
    return ChatRef(message.chat.id, message.chat.type)


class Handlers:
    def __init__(
        self,
        core: SpeechBot,
        answers: Answers,
        progress: Progress,
        daily: DailySpeeches,
        admins: Admins,
        interactive: InteractiveHandlers,
    ) -> None:
        self.core = core
        self.answers = answers
        self.progress = progress
        self.daily = daily
        self.admins = admins
        self.interactive = interactive

    def _reply_to(self, update: Update, context: ContextTypes.DEFAULT_TYPE):
        """The plain answer to an update: a reply to its message."""
        message = update.effective_message
        return lambda text: send_text(context.bot, message.chat_id, text, self.daily.chat_moved, reply_to=message)

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        name, args = split_command(message.text) or ("", "")
        if name == "speech" and replied_message(message) is not None:
            await self.interactive.speech_in_reply(update, context, args)
            return
        reply = self.core.handle_text(
            chat_of(message),
            message.text,
            check_admin=lambda: self.admins.is_admin(update, context.bot),
            show_typing=self.progress.showing(context.bot, message.chat),
        )
        await self.answers.answer(update, reply, self._reply_to(update, context))

    async def on_private_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._answer_prompt(update, context, update.effective_message.text)

    async def on_group_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """In groups replies to the bot and mentions of it are prompts; other chatter the core may chime in on
        (/chatter), if the bot sees it at all (privacy mode off) and no bot wrote it."""
        message, me = update.effective_message, context.bot
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == me.id:
            await self._answer_prompt(update, context, message.text)
            return
        mention = f"@{me.username}".lower()
        mentions = message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION])
        if any(
            text.lower() == mention or (entity.user is not None and entity.user.id == me.id)
            for entity, text in mentions.items()
        ):
            prompt = " ".join(word for word in message.text.split(" ") if word.lower() != mention)
            await self._answer_prompt(update, context, prompt)
            return
        if message.from_user is None or message.from_user.is_bot:
            return  # bots (channels and anonymous admins post as bots too) get no interjection
        await self._maybe_interject(message, context)

    async def _maybe_interject(self, message: Message, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The core's interjection, if it has one, as a reply quoting the message. Not through the inbox: a
        crash loses it, and no ordinary message is ever written down."""
        speech = await self.core.overheard(
            chat_of(message), message.text, show_typing=self.progress.showing(context.bot, message.chat)
        )
        if speech is None:
            return
        try:
            await send_quoting_reply(context.bot, message.chat_id, speech, self.daily.chat_moved, message, message.text)
        except TelegramError as error:
            # Nobody asked, so nobody is told: the error handler's apology would be out of place.
            log.info("Could not chime in in chat %s: %s", message.chat_id, error)

    async def _answer_prompt(self, update: Update, context: ContextTypes.DEFAULT_TYPE, prompt: str) -> None:
        message = update.effective_message
        reply = self.core.prompt(chat_of(message), prompt, show_typing=self.progress.showing(context.bot, message.chat))
        await self.answers.answer(update, reply, self._reply_to(update, context))

    async def on_migration(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message.migrate_to_chat_id:
            await self.daily.chat_moved(message.chat_id, message.migrate_to_chat_id)
        elif message.migrate_from_chat_id:
            await self.daily.chat_moved(message.migrate_from_chat_id, message.chat_id)

    async def on_my_chat_member(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """Removed from a group or blocked in private: its daily speech stops."""
        change = update.my_chat_member
        if change.new_chat_member.status in (ChatMemberStatus.LEFT, ChatMemberStatus.BANNED):
            settings = await self.core.store.find(change.chat.id)
            if settings is not None and settings.schedule_enabled:
                await self.core.store.update(change.chat.id, schedule_enabled=False)
                self.daily.remove(change.chat.id)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Failed handlers, and failed getUpdates calls (`update` None)."""
        error = context.error
        if isinstance(error, Forbidden):
            # The user blocked the bot or it left the chat: nothing to answer, nothing to fix.
            log.info("Cannot write to the chat: %s", error.message)
            return
        if isinstance(error, TelegramError):
            # Telegram or the network failed (an error page, a cut-off answer, a timeout): no bug of ours, so one
            # line per failure, as docs/operations.md promises; the traceback only for LOG_LEVEL=DEBUG.
            doing = "polling for updates" if update is None else "answering an update"
            log.warning("The Bot API failed while %s: %s", doing, reason(error))
            log.debug("The Bot API failure's traceback", exc_info=error)
        else:
            log.error("Error while handling an update", exc_info=error)
        if isinstance(update, Update) and update.message is not None:
            with contextlib.suppress(TelegramError):
                await send_text(context.bot, update.message.chat_id, SORRY, self.daily.chat_moved)
