"""What operators watch with Prometheus: the bot's metrics and their /metrics endpoint (docs/operations.md, "Metrics").

`Metrics` is the recorder every part is handed: its methods record nothing, which is what runs while
METRICS_PORT is unset. `PrometheusMetrics` records the same calls in a registry of its own and serves it
over HTTP from a thread. The composition root (bot/services.py) makes one of them per process and hands
it to the Telegram adapter's parts in their constructors. The core and the engine never see this module:
they get plain callbacks (SpeechBot's on_busy, GenerationEngine's on_queue_wait), `MeteredEngine`
counts speeches where the core calls the engine, and the engine's gauges are read when Prometheus scrapes,
so the lanes' threads do no extra work per chunk.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from telegram import Update

from bot.inference.api import Engine

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from bot.core.voices import Voices
    from bot.inference.engine import GenerationEngine

PREFIX = "speechbot"
# Seconds. Speeches take from under a second (a short one, an idle engine) to tens of seconds (a crowd at
# Telegram's 30 messages a second, docs/speed.md); database calls take milliseconds unless something waits.
SPEECH_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
FIRST_DRAFT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DATABASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class MetricsError(ValueError):
    """The metrics endpoint cannot listen where METRICS_LISTEN and METRICS_PORT say."""


def update_kind(update: object) -> str:
    """The Bot API's name of what an update carries ("message", "callback_query", ...); "other" for the rest."""
    if isinstance(update, Update):
        for kind in Update.ALL_TYPES:
            if getattr(update, kind, None) is not None:
                return kind
    return "other"


def api_outcome(status: int) -> str:
    """A Bot API answer's HTTP status as the outcome label: ok, 429, 5xx, or the 4xx code."""
    if 200 <= status <= 299:
        return "ok"
    if status >= 500:
        return "5xx"
    return str(status)


class Metrics:
    """The recording calls the bot's parts make; this class records nothing (metrics off)."""

    enabled = False

    def serve(self, listen: str, port: int) -> None:
        """Serve /metrics on `listen`:`port` until close()."""

    def close(self) -> None:
        """Stop serving."""

    def watch_voices(self, voices: Voices) -> None:
        """Read each voice's model, queue and lanes (its GenerationEngine's) whenever the metrics are scraped."""

    def meter(self, engine: Engine) -> Engine:
        """`engine` as the core should call it: counting the speeches it writes when metrics are on."""
        return engine

    def update_received(self, update: object) -> None:
        """An update starts being handled."""

    def reply_sent(self, speech: bool, seconds: float) -> None:
        """A reply to an update was sent, `seconds` after its handling began."""

    def speech_generated(self, characters: int) -> None:
        """The engine finished a continuation of `characters` characters."""

    def first_draft(self, seconds: float) -> None:
        """A streamed speech's first draft reached Telegram, `seconds` after the speech was asked of the engine."""

    def queue_wait(self, seconds: float) -> None:
        """An engine request waited `seconds` in the queue before a lane took it (called from a lane's thread)."""

    def busy_refusal(self) -> None:
        """A speech was refused because the engine's queue was full."""

    def api_call(self, method: str, outcome: str) -> None:
        """A Bot API request ended: ok, 429, 5xx, a 4xx code, timeout or network (no answer)."""

    def api_retry(self, method: str) -> None:
        """A Bot API request is sent again after a 429, a 5xx or a network error."""

    def flood_wait(self, method: str) -> None:
        """Telegram answered 429 to a request that the rate limiter waits out and retries."""

    def database_call(self, seconds: float, error: BaseException | None) -> None:
        """A database call took `seconds` (thread hand-off included) and failed with `error`, if not None."""

    def inbox_taken_over(self, kind: str) -> None:
        """An inbox entry left by a crashed process was taken over: replayed, apologised or daily."""

    def daily_post(self, outcome: str) -> None:
        """A daily post: sent, failed, dropped (found too late after a crash) or chat_gone."""

    def heartbeat(self) -> None:
        """The event loop's heartbeat job ran."""


NO_METRICS = Metrics()


class PrometheusMetrics(Metrics):
    """Metrics recorded in a registry of this object's own (so tests and benches can make several)."""

    enabled = True

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)  # CPU, memory, open files, Python version, garbage collection

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", text, buckets=buckets, registry=registry)

        self.updates = counter("updates", "Updates handled, by what they carry", ("kind",))
        self.replies = counter("replies_sent", "Replies to updates sent, speeches and other text", ("kind",))
        self.speeches = counter("speeches_generated", "Continuations the engine finished (chats, daily, inline)")
        self.characters = counter("generated_characters", "Characters the engine wrote")
        self.speech_latency = histogram(
            "speech_latency_seconds", "From a speech's update being handled to Telegram taking it", SPEECH_BUCKETS
        )
        self.first_drafts = histogram(
            "first_draft_seconds", "From a streamed speech's start to Telegram taking a draft", FIRST_DRAFT_BUCKETS
        )
        self.queue_waits = histogram(
            "engine_queue_wait_seconds", "Time engine requests waited for a lane", QUEUE_WAIT_BUCKETS
        )
        self.busy = counter("busy_refusals", "Speeches refused because the engine's queue was full")
        self.api_calls = counter("bot_api_calls", "Bot API requests, by method and outcome", ("method", "outcome"))
        self.api_retries = counter("bot_api_retries", "Bot API requests sent again", ("method",))
        self.flood_waits = counter("bot_api_flood_waits", "429 answers waited out before a retry", ("method",))
        self.database_calls = histogram(
            "database_call_seconds", "Database calls, waiting for a database thread included", DATABASE_BUCKETS
        )
        self.database_errors = counter("database_errors", "Database calls that failed, by error", ("error",))
        self.taken_over = counter("inbox_taken_over", "Inbox entries taken over from crashed processes", ("kind",))
        self.daily_posts = counter("daily_posts", "Daily posts, by outcome", ("outcome",))
        self._last_beat = time.monotonic()
        age = Gauge(f"{PREFIX}_heartbeat_age_seconds", "Seconds since the event loop last beat", registry=registry)
        age.set_function(lambda: time.monotonic() - self._last_beat)
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, listen: str, port: int) -> None:
        try:
            self._server = start_http_server(port, listen, self.registry)
        except OSError as error:
            raise MetricsError(
                f"the metrics endpoint cannot listen on {listen}:{port} ({error.strerror}); set METRICS_PORT to a "
                "free port, or METRICS_LISTEN to an address of this machine"
            ) from None

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, once serving."""
        return None if self._server is None else self._server[0].server_port

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join()
            self._server = None

    def watch_voices(self, voices: Voices) -> None:
        per_voice = {"labelnames": ("voice",), "registry": self.registry}
        model = Info(f"{PREFIX}_model", "Each voice's model file and how it is served", **per_voice)
        depth = Gauge(f"{PREFIX}_engine_queue_depth", "Requests waiting for a lane", **per_voice)
        capacity = Gauge(f"{PREFIX}_engine_queue_capacity", "Requests the queue holds", **per_voice)
        rows = Gauge(
            f"{PREFIX}_engine_batch_requests", "Requests each lane holds now", ("voice", "lane"), registry=self.registry
        )
        shares = Gauge(
            f"{PREFIX}_engine_batch_capacity",
            "Requests each lane holds at most",
            ("voice", "lane"),
            registry=self.registry,
        )
        for voice in voices:
            engine: GenerationEngine = voice.engine  # type: ignore[assignment]  # what open_voices opens
            model.labels(voice.name).info(
                {
                    "file": engine.runner.path.name,
                    "precision": engine.info.precision,
                    "weights": engine.info.weight_storage,
                    "provider": engine.provider,
                }
            )
            depth.labels(voice.name).set_function(lambda engine=engine: engine.queued)
            capacity.labels(voice.name).set(engine.capacity - engine.max_batch)
            for lane, share in enumerate(engine.lane_shares):
                rows.labels(voice.name, str(lane)).set_function(lambda engine=engine, lane=lane: engine.lane_rows[lane])
                shares.labels(voice.name, str(lane)).set(share)

    def meter(self, engine: Engine) -> Engine:
        return MeteredEngine(engine, self.speech_generated)

    def update_received(self, update: object) -> None:
        self.updates.labels(update_kind(update)).inc()

    def reply_sent(self, speech: bool, seconds: float) -> None:
        self.replies.labels("speech" if speech else "text").inc()
        if speech:
            self.speech_latency.observe(seconds)

    def speech_generated(self, characters: int) -> None:
        self.speeches.inc()
        self.characters.inc(characters)

    def first_draft(self, seconds: float) -> None:
        self.first_drafts.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.queue_waits.observe(seconds)

    def busy_refusal(self) -> None:
        self.busy.inc()

    def api_call(self, method: str, outcome: str) -> None:
        self.api_calls.labels(method, outcome).inc()

    def api_retry(self, method: str) -> None:
        self.api_retries.labels(method).inc()

    def flood_wait(self, method: str) -> None:
        self.flood_waits.labels(method).inc()

    def database_call(self, seconds: float, error: BaseException | None) -> None:
        self.database_calls.observe(seconds)
        if error is not None:
            self.database_errors.labels(type(error).__name__).inc()

    def inbox_taken_over(self, kind: str) -> None:
        self.taken_over.labels(kind).inc()

    def daily_post(self, outcome: str) -> None:
        self.daily_posts.labels(outcome).inc()

    def heartbeat(self) -> None:
        self._last_beat = time.monotonic()


class MeteredEngine:
    """An Engine (bot.inference.api) that reports each finished continuation's length to `on_speech`."""

    def __init__(self, engine: Engine, on_speech: Callable[[int], None]) -> None:
        self.engine = engine
        self.on_speech = on_speech

    @property
    def full(self) -> bool:
        return self.engine.full

    async def agenerate(self, prompt: str = "", length: int = 500, **options) -> str:
        text = await self.engine.agenerate(prompt, length, **options)
        self.on_speech(len(text))
        return text

    async def astream(self, prompt: str = "", length: int = 500, **options) -> AsyncIterator[str]:
        characters = 0
        # aclosing: a caller that stops early closes the engine's stream at once, which cancels its request.
        async with contextlib.aclosing(self.engine.astream(prompt, length, **options)) as chunks:
            async for chunk in chunks:
                characters += len(chunk)
                yield chunk
        self.on_speech(characters)
