"""python-telegram-bot's Application for the bot: its transport settings and every handler, registered in
one place, plus where the webhook server listens. The parts are built by the composition root
(bot/services.py, build_application)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

from telegram.ext import (
    Application,
    ApplicationBuilder,
    ChatMemberHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from bot.config import Config
from bot.core.commands import COMMANDS
from bot.metrics import NO_METRICS, Metrics
from bot.telegram.handlers import Handlers
from bot.telegram.interactive import InteractiveHandlers
from bot.telegram.transport import ChatOrderedUpdateProcessor, MeteredRequest, RetryingRateLimiter

# Updates in process beyond what the engine holds, so commands and "busy" answers go on while it is full.
UPDATES_BEYOND_ENGINE = 64

Hook = Callable[[Application], Awaitable[None]]


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
    metrics: Metrics = NO_METRICS,
) -> Application:
    """An Application with no handlers yet: rate limits and retries, chats in order, the connection pool.
    `update_queue` is where fetched or posted updates go; `processed` is told of each once it was handled."""
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
        .get_updates_request(MeteredRequest(metrics, connection_pool_size=1))  # as python-telegram-bot makes it
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


def webhook_options(config: Config) -> dict:
    """Where python-telegram-bot's webhook server listens and what it registers with Telegram."""
    return {
        "listen": config.webhook_listen,
        "port": config.webhook_port,
        "url_path": urlparse(config.webhook_url).path.lstrip("/"),
        "webhook_url": config.webhook_url,
        "secret_token": config.webhook_secret,  # always set in webhook mode (Config makes one up if need be)
    }


def serve(application: Application, config: Config) -> None:
    """Serve until SIGINT or SIGTERM (python-telegram-bot stops gracefully on both)."""
    if config.webhook_url:
        application.run_webhook(**webhook_options(config))
    else:
        application.run_polling()
