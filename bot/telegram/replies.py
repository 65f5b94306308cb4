"""Sending to Telegram: plain text (no parse mode, so prompts cannot inject markup), the buttons under a
speech, replies that quote what they answer, and a group's move to a supergroup followed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, ReplyParameters
from telegram.error import BadRequest, ChatMigrated

from bot.core.speech import Speech, speech_choices

# Told when a chat turned out to have moved (old id, new id), before the message is sent again there.
OnChatMoved = Callable[[int, int], Awaitable[None]]
QUOTE_MAX = 1024  # ReplyParameters.quote, after entity parsing


def speech_keyboard(text: str) -> InlineKeyboardMarkup | None:
    """Another / Calmer / Wilder under a speech; None under anything else."""
    if not isinstance(text, Speech):
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(choice.label, callback_data=choice.data) for choice in speech_choices(text.temperature)]]
    )


async def send_text(
    bot, chat_id: int, text: str, on_moved: OnChatMoved, reply_to: Message | None = None, quote: str | None = None
) -> Message:
    """`text` in the chat, with its buttons if it is a speech; a chat that became a supergroup is followed."""
    reply = (
        None
        if reply_to is None
        else ReplyParameters(reply_to.message_id, allow_sending_without_reply=True, quote=quote)
    )
    keyboard = speech_keyboard(text)
    try:
        return await bot.send_message(chat_id, text, reply_parameters=reply, reply_markup=keyboard)
    except ChatMigrated as moved:
        await on_moved(chat_id, moved.new_chat_id)
        return await bot.send_message(moved.new_chat_id, text, reply_markup=keyboard)


async def send_quoting_reply(
    bot, chat_id: int, text: str, on_moved: OnChatMoved, replied: Message, quoted: str
) -> Message:
    """`text` as a reply to `replied`, quoting `quoted` (its text or caption) where Telegram takes the quote:
    one over QUOTE_MAX, or one Telegram does not find in the message as it stored it, leaves a plain reply."""
    quote = quoted if len(quoted) <= QUOTE_MAX else None
    try:
        return await send_text(bot, chat_id, text, on_moved, reply_to=replied, quote=quote)
    except BadRequest:
        if quote is None:
            raise
        return await send_text(bot, chat_id, text, on_moved, reply_to=replied)
