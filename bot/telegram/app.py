"""The Telegram adapter: python-telegram-bot 22 wired to the transport-free core in one place.

Handlers stay small: they turn an update into a ChatRef and text, ask SpeechBot for the reply and
send it as plain text. Around them: admin checks for groups (anonymous admins included), a typing
action while generating, ChatMigrated handling, retries for 429, 5xx and network errors, a global
error handler and the daily-speech scheduler. Updates run side by side across chats and one after
another within a chat (ChatOrderedUpdateProcessor), as many at once as the engine can hold; replies
leave at the configured overall rate (docs/speed.md, "Many chats at once"). Inline mode, the buttons
under speeches, drafts and /speech in reply live in bot/telegram/interactive.py.

Nothing a user sent is lost to a crash: each update that will get a reply is recorded in the
database's inbox (db/inbox.py) while it is handled and marked answered once the reply is sent. At
start, and every INBOX_SWEEP_SECONDS for replicas that died, open entries are taken over: updates
younger than REPLAY_WINDOW are handled again, older ones get LATE_APOLOGY. See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from urllib.parse import urlparse

from sqlalchemy.exc import SQLAlchemyError
from telegram import BotCommand, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    BaseUpdateProcessor,
    ChatMemberHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.config import TELEGRAM_MESSAGES_PER_SECOND, Config
from bot.core.speechbot import COMMANDS, ChatRef, SpeechBot, split_command, utc_now
from bot.heartbeat import HEARTBEAT_SECONDS, beat
from bot.inference.engine import GenerationEngine
from bot.services import build_services
from bot.telegram.daily import DailySpeeches
from bot.telegram.interactive import InteractiveHandlers, replied_message, speech_keyboard
from db.database import describe
from db.inbox import ANSWERED, Inbox, OpenEntry, update_key

log = logging.getLogger(__name__)

ADMIN_CACHE_SECONDS = 60.0
TYPING_REFRESH_SECONDS = 4.5  # Telegram shows "typing" for 5 s per action
# Updates in process beyond what the engine holds, so commands and "busy" answers go on while it is full.
UPDATES_BEYOND_ENGINE = 64
# Chat actions on the wire at once; a refresh beyond that is skipped rather than queued (best effort).
TYPING_IN_FLIGHT_MAX = 32
# Bot API requests on the wire at once (all but getUpdates, which has its own connections). httpcore's
# pool scans its connections for every request, in work that grows with their square: with one connection
# per update in process (~400) a burst of 1,000 chats spent three quarters of the event loop there
# (docs/speed.md). 64 carry far more than the 30 messages a second Telegram allows; the rest wait here.
HTTP_IN_FLIGHT_MAX = 64
SORRY = "Sorry, something went wrong while handling that. Please try again in a moment."
# Requests left unanswered by a crash are answered after a restart if they are younger than this;
# older ones get LATE_APOLOGY instead, since an answer that late would be out of place.
REPLAY_WINDOW = timedelta(minutes=10)
LATE_APOLOGY = "Sorry, I was down when you sent this and could not answer it in time. Please send it again."
INBOX_SWEEP_SECONDS = 60
KEEP_ANSWERED = timedelta(days=1)  # how long answered entries refuse a repeat of their update


class RetryingRateLimiter(AIORateLimiter):
    """AIORateLimiter (flood limits, 429 retried after retry_after) plus backoff on 5xx and network errors."""

    def __init__(
        self,
        retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
        max_retries: int = 3,
        messages_per_second: float = TELEGRAM_MESSAGES_PER_SECOND,
    ):
        super().__init__(overall_max_rate=messages_per_second, max_retries=max_retries)
        self.retry_delays = retry_delays
        self._on_the_wire = asyncio.Semaphore(HTTP_IN_FLIGHT_MAX)

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        async def on_the_wire(*call_args, **call_kwargs):
            # Held only while the request is on the wire, not while a 429's retry_after is waited out.
            async with self._on_the_wire:
                return await callback(*call_args, **call_kwargs)

        if endpoint in ("sendChatAction", "sendMessageDraft"):
            # Best effort, and it must not use up the 20-messages-a-minute budget of a group, nor hold up other
            # requests while a 429 is waited out (drafts have their own budget, bot/telegram/interactive.py).
            return await on_the_wire(*args, **kwargs)
        for delay in (*self.retry_delays, None):
            try:
                return await super().process_request(on_the_wire, args, kwargs, endpoint, data, rate_limit_args)
            except BadRequest:
                raise  # the request itself is wrong (BadRequest derives from NetworkError)
            except NetworkError as error:
                if delay is None:
                    raise
                log.warning("Bot API %s failed (%s); retrying in %.1f s", endpoint, error.message, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class ChatOrderedUpdateProcessor(BaseUpdateProcessor):
    """Each chat's updates one after another, in the order they came; different chats side by side.

    With PTB's plain concurrent processing a chat's `/length 600` and the `/speech` after it race, and
    without any, one chat's speech holds up every other chat. Updates without a chat (inline queries)
    run unordered. An update waiting for its chat's turn already holds one of max_concurrent_updates:
    PTB takes the slot before do_process_update.
    """

    def __init__(self, max_concurrent_updates: int):
        super().__init__(max_concurrent_updates)
        self._latest: dict[int, asyncio.Future] = {}  # per chat with updates in process: the last one's end

    async def do_process_update(self, update: object, coroutine: Awaitable) -> None:
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            return
        previous = self._latest.get(chat.id)
        finished = asyncio.get_running_loop().create_future()
        self._latest[chat.id] = finished
        try:
            if previous is not None:
                await asyncio.wait([previous])  # not `await previous`, which would cancel it with this one
            await coroutine
        finally:
            finished.set_result(None)
            if self._latest.get(chat.id) is finished:
                del self._latest[chat.id]

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


class TelegramFrontend:
    """The handlers and lifecycle hooks; one instance per Application."""

    def __init__(self, config: Config, core: SpeechBot, clock: Callable[[], datetime]):
        self.config = config
        self.core = core
        self.store = core.store
        self.inbox = Inbox(core.store.database)
        self.clock = clock
        self.daily: DailySpeeches | None = None
        self._admins: dict[int, tuple[float, frozenset[int]]] = {}
        self._typing_slots = asyncio.Semaphore(TYPING_IN_FLIGHT_MAX)
        self._typing_tasks: set[asyncio.Task] = set()  # referenced until done, as asyncio asks
        self.interactive = InteractiveHandlers(self)

    # ---- lifecycle ----

    async def post_init(self, application: Application) -> None:
        await application.bot.set_my_commands([BotCommand(name, text) for name, text in COMMANDS.items()])
        await self.inbox.open()
        self.daily = DailySpeeches(
            application.job_queue,
            self.core,
            self.inbox,
            send=lambda chat_id, text: self.send(application.bot, chat_id, text),
            show_typing=lambda chat_id: self.typing(application.bot, chat_id),
            grace=timedelta(minutes=self.config.missed_post_grace_minutes),
            clock=self.clock,
        )
        self.core.on_schedule_change = self.daily.sync
        await self.daily.rebuild()
        await self.take_over_inbox(application)
        application.job_queue.run_repeating(
            self._sweep_inbox,
            interval=INBOX_SWEEP_SECONDS,
            first=INBOX_SWEEP_SECONDS,
            job_kwargs={"misfire_grace_time": INBOX_SWEEP_SECONDS},
        )
        if self.config.heartbeat_file is not None:
            await self._heartbeat(None)
            application.job_queue.run_repeating(
                self._heartbeat, interval=HEARTBEAT_SECONDS, job_kwargs={"misfire_grace_time": HEARTBEAT_SECONDS}
            )
        log.info("Bot @%s is up", application.bot.username)

    async def take_over_inbox(self, application: Application) -> None:
        """Answer what crashed processes (an earlier run of this one, or another replica) left unanswered."""
        now = self.clock()
        for entry in await self.inbox.take_over(now):
            if not entry.is_update:
                application.job_queue.run_once(self._resume_daily, when=0, data=entry, name=f"resume:{entry.key}")
            elif now - entry.received_at <= REPLAY_WINDOW:
                log.info("Handling %s again, left unanswered by a crash", entry.key)
                await application.update_queue.put(Update.de_json(entry.payload, application.bot))
            else:
                await self._apologise(application.bot, entry)
        await self.inbox.forget_answered(now - KEEP_ANSWERED)

    async def _sweep_inbox(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.take_over_inbox(context.application)

    async def _resume_daily(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self.daily.resume(context.job.data)

    async def _apologise(self, bot, entry: OpenEntry) -> None:
        message = Update.de_json(entry.payload, bot).effective_message
        try:
            await self.send(bot, entry.chat_id, LATE_APOLOGY, reply_to=message)
        except TelegramError as error:
            log.info("Could not apologise in chat %s: %s", entry.chat_id, error)
        await self.inbox.mark(entry.key, ANSWERED, self.clock())

    async def _heartbeat(self, _context: ContextTypes.DEFAULT_TYPE | None) -> None:
        # Proves to the container's healthcheck that the event loop is alive.
        beat(self.config.heartbeat_file)

    # ---- sending ----

    async def send(
        self, bot, chat_id: int, text: str, reply_to: Message | None = None, quote: str | None = None
    ) -> Message:
        """Plain text (no parse mode, so prompts cannot inject markup), a speech with its buttons; follows a
        group's migration."""
        reply = (
            None
            if reply_to is None
            else ReplyParameters(reply_to.message_id, allow_sending_without_reply=True, quote=quote)
        )
        keyboard = speech_keyboard(text)
        try:
            return await bot.send_message(chat_id, text, reply_parameters=reply, reply_markup=keyboard)
        except ChatMigrated as moved:
            await self.chat_moved(chat_id, moved.new_chat_id)
            return await bot.send_message(moved.new_chat_id, text, reply_markup=keyboard)

    async def chat_moved(self, old_id: int, new_id: int) -> None:
        settings = await self.store.migrate_chat(old_id, new_id)
        log.info("Chat %s became supergroup %s", old_id, new_id)
        if settings is not None and self.daily is not None:
            self.daily.remove(old_id)
            self.daily.sync(settings)

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

    # ---- who may change things ----

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
        cached = self._admins.get(chat_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            members = await bot.get_chat_administrators(chat_id)
        except TelegramError as error:
            log.warning("Could not list the administrators of chat %s: %s", chat_id, error)
            return frozenset()
        ids = frozenset(member.user.id for member in members)
        self._admins[chat_id] = (time.monotonic() + ADMIN_CACHE_SECONDS, ids)
        return ids

    # ---- handlers ----

    def _chat(self, update: Update) -> ChatRef:
        return ChatRef(update.effective_chat.id, update.effective_chat.type)

    async def answer(
        self,
        update: Update,
        context: ContextTypes.DEFAULT_TYPE,
        reply: Awaitable[str | None],
        send: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """Send what `reply` comes to (if anything) with the update kept in the inbox until it is answered;
        `send` replaces the plain reply to the update's message (e.g. /speech in reply quotes another one)."""
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
                await (send(text) if send else self.send(context.bot, message.chat_id, text, reply_to=message))
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

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        name, args = split_command(message.text) or ("", "")
        if name == "speech" and replied_message(message) is not None:
            await self.interactive.speech_in_reply(update, context, args)
            return
        reply = self.core.handle_text(
            self._chat(update),
            message.text,
            check_admin=lambda: self.is_admin(update, context.bot),
            show_typing=self.interactive.showing_progress(context.bot, message.chat),
        )
        await self.answer(update, context, reply)

    async def on_private_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._answer_prompt(update, context, update.effective_message.text)

    async def on_group_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """In groups only replies to the bot and mentions of it are prompts; other chatter is not ours."""
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

    async def _answer_prompt(self, update: Update, context: ContextTypes.DEFAULT_TYPE, prompt: str) -> None:
        message = update.effective_message
        reply = self.core.prompt(
            self._chat(update), prompt, show_typing=self.interactive.showing_progress(context.bot, message.chat)
        )
        await self.answer(update, context, reply)

    async def on_migration(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message.migrate_to_chat_id:
            await self.chat_moved(message.chat_id, message.migrate_to_chat_id)
        elif message.migrate_from_chat_id:
            await self.chat_moved(message.migrate_from_chat_id, message.chat_id)

    async def on_my_chat_member(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """Removed from a group or blocked in private: its daily speech stops."""
        change = update.my_chat_member
        if change.new_chat_member.status in (ChatMemberStatus.LEFT, ChatMemberStatus.BANNED):
            settings = await self.store.find(change.chat.id)
            if settings is not None and settings.schedule_enabled:
                await self.store.update(change.chat.id, schedule_enabled=False)
                if self.daily is not None:
                    self.daily.remove(change.chat.id)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        if isinstance(context.error, Forbidden):
            # The user blocked the bot or it left the chat: nothing to answer, nothing to fix.
            log.info("Cannot write to the chat: %s", context.error.message)
            return
        log.error("Error while handling an update", exc_info=context.error)
        if isinstance(update, Update) and update.message is not None:
            with contextlib.suppress(TelegramError):
                await self.send(context.bot, update.message.chat_id, SORRY)


def build_application(
    config: Config,
    engine: GenerationEngine | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
    read_timeout: float = 10.0,
    concurrent_updates: int | None = None,
) -> Application:
    """The whole bot: services (bot.services), handlers, scheduler hooks. Does not start it.

    `engine` None opens the configured model (closed at shutdown). `concurrent_updates` None sizes the
    update processor by the engine: every request it can hold, generating or queued, plus
    UPDATES_BEYOND_ENGINE, so a speech past a full queue still reaches the engine and is told "busy".
    """
    token = config.require_token()
    services = build_services(config, engine, clock=clock)
    concurrent_updates = concurrent_updates or services.engine.capacity + UPDATES_BEYOND_ENGINE
    frontend = TelegramFrontend(config, services.core, clock)

    async def post_shutdown(_application: Application) -> None:
        frontend.inbox.close()
        services.close()

    builder = (
        ApplicationBuilder()
        .token(token)
        .rate_limiter(RetryingRateLimiter(retry_delays, messages_per_second=config.telegram_messages_per_second))
        .concurrent_updates(ChatOrderedUpdateProcessor(concurrent_updates))
        .read_timeout(read_timeout)
        .write_timeout(read_timeout)
        # A connection for each request the rate limiter lets on the wire, so none waits for one (and
        # fails after pool_timeout); daily posts share the pool.
        .connection_pool_size(HTTP_IN_FLIGHT_MAX)
        .post_init(frontend.post_init)
        .post_shutdown(post_shutdown)
    )
    if config.telegram_api_base_url:
        builder = builder.base_url(config.telegram_api_base_url)
    application = builder.build()
    application.bot_data["frontend"] = frontend

    only_new = filters.UpdateType.MESSAGE  # edited messages and channel posts are not ours
    application.add_handler(CommandHandler(list(COMMANDS), frontend.on_command, filters=only_new))
    application.add_handler(MessageHandler(only_new & filters.COMMAND & filters.ChatType.PRIVATE, frontend.on_command))
    text = only_new & filters.TEXT & ~filters.COMMAND
    application.add_handler(MessageHandler(text & filters.ChatType.PRIVATE, frontend.on_private_text))
    application.add_handler(MessageHandler(text & filters.ChatType.GROUPS, frontend.on_group_text))
    application.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, frontend.on_migration))
    application.add_handler(ChatMemberHandler(frontend.on_my_chat_member, ChatMemberHandler.MY_CHAT_MEMBER))
    frontend.interactive.register(application)
    application.add_error_handler(frontend.on_error)
    return application


def webhook_options(config: Config) -> dict:
    """Where python-telegram-bot's webhook server listens and what it registers with Telegram."""
    return {
        "listen": config.webhook_listen,
        "port": config.webhook_port,
        "url_path": urlparse(config.webhook_url).path.lstrip("/"),
        "webhook_url": config.webhook_url,
        "secret_token": config.webhook_secret,  # always set in webhook mode (Config makes one up if need be)
    }


def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM (python-telegram-bot stops gracefully on both)."""
    application = build_application(config)
    if config.webhook_url:
        application.run_webhook(**webhook_options(config))
    else:
        application.run_polling()
