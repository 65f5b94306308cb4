"""Who may change a group's settings: its administrators, anonymous ones included, from a short cache."""

from __future__ import annotations

import logging
import time

from telegram import Update
from telegram.constants import ChatType
from telegram.error import TelegramError

log = logging.getLogger(__name__)

ADMIN_CACHE_SECONDS = 60.0


class Admins:
    def __init__(self) -> None:
        self._cached: dict[int, tuple[float, frozenset[int]]] = {}

    async def is_admin(self, update: Update, bot) -> bool:
        chat, message = update.effective_chat, update.effective_message
        if chat.type == ChatType.PRIVATE:
            return True
        if message.sender_chat is not None:
            # Anonymous admins post as GroupAnonymousBot with the group itself as sender_chat.
            # A linked channel or a user posting as a channel has another sender_chat: not admin.
            return message.sender_chat.id == chat.id
        user = update.effective_user
        return user is not None and user.id in await self._admin_ids(bot, chat.id)

    async def _admin_ids(self, bot, chat_id: int) -> frozenset[int]:
        # getChatAdministrators is cheap for Telegram but not free for flood limits: cache it briefly.
        # A demoted admin can therefore still change settings for up to a minute.
        cached = self._cached.get(chat_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            members = await bot.get_chat_administrators(chat_id)
        except TelegramError as error:
            log.warning("Could not list the administrators of chat %s: %s", chat_id, error)
            return frozenset()
        ids = frozenset(member.user.id for member in members)
        self._cached[chat_id] = (time.monotonic() + ADMIN_CACHE_SECONDS, ids)
        return ids
