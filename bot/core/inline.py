"""Inline mode's speeches (`@BotName words` in any chat): three short speeches in one engine batch per
query, a newer query of the same user superseding an older one, and a per-user rate limit
(docs/interactive.md)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from bot.core.bounds import (
    INLINE_LENGTH,
    INLINE_RATE_BURST,
    INLINE_RATE_PERIOD,
    INLINE_STYLES,
    INLINE_USERS_TRACKED,
    PROMPT_MAX,
)
from bot.core.speech import compose_speech
from bot.core.voices import Voice
from bot.inference.api import EngineBusy


@dataclass(frozen=True)
class InlineSpeech:
    style: str
    temperature: float
    text: str


class InlineSpeeches:
    """Each user's latest inline query, answered with one speech per INLINE_STYLES."""

    def __init__(self, on_busy: Callable[[], None] = lambda: None) -> None:
        """`on_busy` is told when a query gets no speeches because the engine's queue is full."""
        self.on_busy = on_busy
        self._running: dict[int, asyncio.Task] = {}  # each user's batch still running
        self._limits: OrderedDict[int, AsyncLimiter] = OrderedDict()

    async def answer(self, user_id: int, query: str, voice: Voice) -> list[InlineSpeech] | None:
        """One speech per INLINE_STYLES in `voice`, continuing `query`, at most INLINE_LENGTH characters after it and
        ending on a sentence, made in one engine batch. None when a newer query of the same user superseded
        this one (its engine requests are cancelled); [] when the engine is too busy."""
        previous = self._running.get(user_id)
        if previous is not None:
            previous.cancel()  # the engine drops its requests at their next chunk
        task = asyncio.ensure_future(self._batch(user_id, query.strip()[:PROMPT_MAX], voice))
        self._running[user_id] = task
        try:
            await asyncio.wait([task])
        finally:
            task.cancel()  # no effect once done; stops the work if this caller itself was cancelled
            if self._running.get(user_id) is task:
                del self._running[user_id]
        return None if task.cancelled() else task.result()

    async def _batch(self, user_id: int, prompt: str, voice: Voice) -> list[InlineSpeech]:
        await self._limit(user_id).acquire()
        # Submitted together, the three requests join one batch of the engine.
        requests = [
            asyncio.ensure_future(
                voice.engine.agenerate(
                    prompt,
                    INLINE_LENGTH,
                    sampling=voice.sampling(temperature),
                    end_sentence=True,
                    max_chars=INLINE_LENGTH,
                )
            )
            for _, temperature in INLINE_STYLES
        ]
        try:
            continuations = await asyncio.gather(*requests)
        except EngineBusy:
            for request in requests:
                request.cancel()  # gather leaves the others running
            self.on_busy()
            return []
        return [
            InlineSpeech(style, temperature, compose_speech(prompt, continuation))
            for (style, temperature), continuation in zip(INLINE_STYLES, continuations, strict=True)
        ]

    def _limit(self, user_id: int) -> AsyncLimiter:
        limiter = self._limits.pop(user_id, None) or AsyncLimiter(
            INLINE_RATE_BURST, INLINE_RATE_BURST * INLINE_RATE_PERIOD
        )
        self._limits[user_id] = limiter  # most recently used last
        if len(self._limits) > INLINE_USERS_TRACKED:
            self._limits.popitem(last=False)
        return limiter
