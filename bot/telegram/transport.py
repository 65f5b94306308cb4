"""How updates come in and requests go out: chats' updates in order and side by side
(ChatOrderedUpdateProcessor), the overall sending rate with retries on 429, 5xx and network errors, and a
cap on the requests on the wire (RetryingRateLimiter), and polling that reports a token Telegram no longer
accepts (PollingRequest). Why these limits: docs/speed.md, "Many chats at once". Each of them, and every
HTTP request (MeteredRequest), reports to the metrics (bot/metrics.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from telegram import Update
from telegram.error import BadRequest, InvalidToken, NetworkError, RetryAfter, TimedOut
from telegram.ext import AIORateLimiter, BaseUpdateProcessor
from telegram.request import HTTPXRequest

from bot.config import TELEGRAM_MESSAGES_PER_SECOND
from bot.logs import reason
from bot.metrics import NO_METRICS, Metrics, api_outcome

log = logging.getLogger(__name__)

# Bot API requests on the wire at once (all but getUpdates, which has its own connections): httpcore's pool
# work grows with the square of its connections (docs/speed.md), and 64 carry far more than the rate allows.
HTTP_IN_FLIGHT_MAX = 64


class RetryingRateLimiter(AIORateLimiter):
    """AIORateLimiter (flood limits, 429 retried after retry_after) plus backoff on 5xx and network errors."""

    def __init__(
        self,
        retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
        max_retries: int = 3,
        messages_per_second: float = TELEGRAM_MESSAGES_PER_SECOND,
        metrics: Metrics = NO_METRICS,
    ):
        super().__init__(overall_max_rate=messages_per_second, max_retries=max_retries)
        self.retry_delays = retry_delays
        self.in_flight_max = HTTP_IN_FLIGHT_MAX
        self._on_the_wire = asyncio.Semaphore(self.in_flight_max)
        self.metrics = metrics

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        async def on_the_wire(*call_args, **call_kwargs):
            # Held only while the request is on the wire, not while a 429's retry_after is waited out.
            async with self._on_the_wire:
                return await callback(*call_args, **call_kwargs)

        if endpoint in ("sendChatAction", "sendMessageDraft"):
            # Best effort, and it must not use up the 20-messages-a-minute budget of a group, nor hold up other
            # requests while a 429 is waited out (drafts have their own budget, bot/telegram/progress.py).
            return await on_the_wire(*args, **kwargs)
        attempts = 0

        async def metered(*call_args, **call_kwargs):
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self.metrics.api_retry(endpoint)
            try:
                return await on_the_wire(*call_args, **call_kwargs)
            except RetryAfter:
                self.metrics.flood_wait(endpoint)  # AIORateLimiter waits it out, up to max_retries times
                raise

        for delay in (*self.retry_delays, None):
            try:
                return await super().process_request(metered, args, kwargs, endpoint, data, rate_limit_args)
            except BadRequest:
                raise  # the request itself is wrong (BadRequest derives from NetworkError)
            except NetworkError as error:
                if delay is None:
                    raise
                log.warning("Bot API %s failed (%s); retrying in %.1f s", endpoint, reason(error), delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class MeteredRequest(HTTPXRequest):
    """python-telegram-bot's HTTP requests, each reported to the metrics by Bot API method and outcome."""

    def __init__(self, metrics: Metrics = NO_METRICS, **options) -> None:
        super().__init__(**options)
        self.metrics = metrics

    async def do_request(self, url: str, *args, **kwargs) -> tuple[int, bytes]:
        method = url.rsplit("/", 1)[-1]
        try:
            status, payload = await super().do_request(url, *args, **kwargs)
        except TimedOut:
            self.metrics.api_call(method, "timeout")
            raise
        except NetworkError:
            self.metrics.api_call(method, "network")
            raise
        self.metrics.api_call(method, api_outcome(status))
        return status, payload


class ChatOrderedUpdateProcessor(BaseUpdateProcessor):
    """Each chat's updates one after another, in the order they came; different chats side by side.

    With PTB's plain concurrent processing a chat's `/length 600` and the `/speech` after it race, and
    without any, one chat's speech holds up every other chat. Updates without a chat (inline queries)
    run unordered. An update waiting for its chat's turn already holds one of max_concurrent_updates:
    PTB takes the slot before do_process_update. `processed` is told of each update once its handlers
    have run (not when they were cut short by a shutdown).
    """

    def __init__(
        self,
        max_concurrent_updates: int,
        processed: Callable[[object], Awaitable[None]],
        metrics: Metrics = NO_METRICS,
    ):
        super().__init__(max_concurrent_updates)
        self._latest: dict[int, asyncio.Future] = {}  # per chat with updates in process: the last one's end
        self._processed = processed
        self.metrics = metrics

    async def do_process_update(self, update: object, coroutine: Awaitable) -> None:
        self.metrics.update_received(update)
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            await self._processed(update)
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
        await self._processed(update)  # after the chat's next update may start: it need not wait for this

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


class PollingRequest(MeteredRequest):
    """getUpdates' connection (one, as python-telegram-bot's own) that reports a token Telegram rejects.

    A 401 (token revoked) or 404 (bot deleted) on getUpdates raises InvalidToken, which ends
    python-telegram-bot's polling loop for good without calling start_polling's error_callback: the
    process would stay up, answering nobody. `on_token_rejected` hears of it first.
    """

    def __init__(self, on_token_rejected: Callable[[InvalidToken], None], metrics: Metrics = NO_METRICS):
        super().__init__(metrics, connection_pool_size=1)
        self._on_token_rejected = on_token_rejected

    async def post(self, *args, **kwargs):
        try:
            return await super().post(*args, **kwargs)
        except InvalidToken as error:
            self._on_token_rejected(error)
            raise
