"""python-telegram-bot's Application for the bot: its transport settings and every handler, registered in
one place, and how it is served (polling or the webhook server) until a signal or a rejected token stops
it. The parts are built by the composition root (bot/services.py, build_application)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlparse

from telegram.error import InvalidToken, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    ChatMemberHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from bot.config import Config, ConfigError
from bot.core.commands import COMMANDS
from bot.metrics import NO_METRICS, Metrics
from bot.telegram.handlers import Handlers
from bot.telegram.interactive import InteractiveHandlers
from bot.telegram.transport import ChatOrderedUpdateProcessor, MeteredRequest, PollingRequest, RetryingRateLimiter
from bot.telegram.webhook import WebhookServer

log = logging.getLogger(__name__)

# Updates in process beyond what the engine holds, so commands and "busy" answers go on while it is full.
UPDATES_BEYOND_ENGINE = 64
# getUpdates' long-poll timeout in seconds, python-telegram-bot's default.
POLL_TIMEOUT = 10
EXIT_ON_SIGNAL = {signal.SIGTERM: 0, signal.SIGINT: 130}  # docker stop is a clean stop; Ctrl-C says so

Hook = Callable[[Application], Awaitable[None]]


class Stop:
    """What ends serving: SIGTERM, SIGINT, or Telegram rejecting the token while polling."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.exit_code = 0
        self.rejected: InvalidToken | None = None

    def signalled(self, signum: int) -> None:
        log.info("Stopping on %s", signal.Signals(signum).name)
        self.exit_code = EXIT_ON_SIGNAL[signum]
        self.requested.set()

    def token_rejected(self, error: InvalidToken) -> None:
        self.rejected = self.rejected or error
        self.requested.set()


def new_application(
    config: Config,
    token: str,
    concurrent_updates: int,
    post_init: Hook,
    post_shutdown: Hook,
    retry_delays: tuple[float, ...],
    read_timeout: float,
    update_queue: asyncio.Queue,
    processed: Callable[[object], Awaitable[None]],
    on_token_rejected: Callable[[InvalidToken], None],
    metrics: Metrics = NO_METRICS,
) -> Application:
    """An Application with no handlers yet: rate limits and retries, chats in order, the connection pool,
    polling that reports a rejected token to `on_token_rejected`. `update_queue` is where fetched or posted
    updates go; `processed` is told of each once it was handled."""
    limiter = RetryingRateLimiter(
        retry_delays, messages_per_second=config.telegram_messages_per_second, metrics=metrics
    )
    builder = (
        ApplicationBuilder()
        .token(token)
        .rate_limiter(limiter)
        .update_queue(update_queue)
        .concurrent_updates(ChatOrderedUpdateProcessor(concurrent_updates, processed, metrics))
        .request(
            MeteredRequest(
                metrics,
                # A connection for each request the rate limiter lets on the wire, so none waits for one (and
                # fails after pool_timeout); daily posts share the pool.
                connection_pool_size=limiter.in_flight_max,
                read_timeout=read_timeout,
                write_timeout=read_timeout,
            )
        )
        .get_updates_request(PollingRequest(on_token_rejected, metrics))
        .post_init(post_init)
        .post_shutdown(post_shutdown)
    )
    if config.telegram_api_base_url:
        builder = builder.base_url(config.telegram_api_base_url)
    return builder.build()


def register(application: Application, handlers: Handlers, interactive: InteractiveHandlers) -> None:
    only_new = filters.UpdateType.MESSAGE  # edited messages and channel posts are not ours
    application.add_handler(CommandHandler(list(COMMANDS), handlers.on_command, filters=only_new))
    application.add_handler(MessageHandler(only_new & filters.COMMAND & filters.ChatType.PRIVATE, handlers.on_command))
    text = only_new & filters.TEXT & ~filters.COMMAND
    application.add_handler(MessageHandler(text & filters.ChatType.PRIVATE, handlers.on_private_text))
    application.add_handler(MessageHandler(text & filters.ChatType.GROUPS, handlers.on_group_text))
    application.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, handlers.on_migration))
    application.add_handler(ChatMemberHandler(handlers.on_my_chat_member, ChatMemberHandler.MY_CHAT_MEMBER))
    interactive.register(application)
    application.add_error_handler(handlers.on_error)


def report_polling_error(application: Application, error: TelegramError) -> None:
    """Failed getUpdates calls go to the error handler, as Application.run_polling sends them."""
    application.create_task(application.process_error(update=None, error=error))


async def start_webhook(application: Application, config: Config) -> WebhookServer:
    """Listen, then register the URL and secret with Telegram (Telegram may post at once)."""
    server = WebhookServer(application, urlparse(config.webhook_url).path, config.webhook_secret)
    try:
        server.listen(config.webhook_listen, config.webhook_port)
    except OSError as error:
        raise ConfigError(
            f"the webhook server cannot listen on WEBHOOK_LISTEN={config.webhook_listen} "
            f"WEBHOOK_PORT={config.webhook_port} ({error.strerror}); choose a free port this user may open"
        ) from None
    try:
        # Always set in webhook mode (Config makes one up if need be).
        await application.bot.set_webhook(url=config.webhook_url, secret_token=config.webhook_secret)
    except BaseException:
        await server.stop()
        raise
    return server


@contextlib.asynccontextmanager
async def serving(application: Application, config: Config, poll_timeout: int = POLL_TIMEOUT) -> AsyncIterator[None]:
    """The Application running, as Application.run_polling and run_webhook run it, until the block ends.

    Started: initialize (getMe), post_init, polling or the webhook server, start. Stopped in reverse,
    post_shutdown last, whatever happened before. A polling loop that ended on a rejected token (its
    InvalidToken, raised again when the updater stops) was reported to PollingRequest's callback already.
    """
    server = None
    try:
        await application.initialize()
        await application.post_init(application)
        if config.webhook_url:
            server = await start_webhook(application, config)
        else:
            await application.updater.start_polling(
                timeout=poll_timeout, error_callback=lambda error: report_polling_error(application, error)
            )
        await application.start()
        yield
    finally:
        if server is not None:
            await server.stop()
        if application.updater.running:
            with contextlib.suppress(InvalidToken):
                await application.updater.stop()
        if application.running:
            await application.stop()
        await application.shutdown()
        await application.post_shutdown(application)


def serve(application: Application, config: Config, stop: Stop) -> int:
    """Serve until SIGTERM (exit code 0), SIGINT (130) or a token Telegram rejects while polling (ConfigError)."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in EXIT_ON_SIGNAL:
            loop.add_signal_handler(signum, stop.signalled, signum)
        async with serving(application, config):
            await stop.requested.wait()

    asyncio.run(run())
    if stop.rejected is not None:
        raise ConfigError(
            f"Telegram rejected TELEGRAM_BOT_TOKEN while the bot was running ({stop.rejected.message}): the token "
            "was revoked or the bot deleted; get a new token from @BotFather"
        )
    return stop.exit_code
