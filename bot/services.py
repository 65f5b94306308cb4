"""The composition root: the one place that builds the bot's parts from a Config.

build_services makes what every front end runs on (database, store, generation engine, core); the console
(`python -m bot console`) and the tests use it as it is. build_application adds the Telegram side (inbox,
daily posts, handlers, python-telegram-bot's Application) around the same parts. Every part gets what it
calls in its constructor.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy
from telegram import BotCommand
from telegram.error import InvalidToken
from telegram.ext import Application

from bot.config import Config, ConfigError
from bot.core.commands import COMMANDS
from bot.core.speech import daily_speech
from bot.core.speechbot import SpeechBot
from bot.core.voices import Voice, Voices
from bot.heartbeat import HEARTBEAT_SECONDS, beat
from bot.heartbeat import stop as stop_beating
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import voice_name_from_file
from bot.metrics import NO_METRICS, Metrics, PrometheusMetrics
from bot.telegram.admins import Admins
from bot.telegram.answers import Answers, Arrivals, RecordingQueue
from bot.telegram.app import UPDATES_BEYOND_ENGINE, new_application, register
from bot.telegram.daily import DailySpeeches
from bot.telegram.handlers import Handlers
from bot.telegram.interactive import InteractiveHandlers
from bot.telegram.progress import Progress
from db.database import create_db_engine, migrate
from db.inbox import Inbox
from db.models import utc_now
from db.store import ChatSettings, ChatStore

log = logging.getLogger(__name__)


def open_engine(config: Config, model_path: Path | None = None, metrics: Metrics = NO_METRICS) -> GenerationEngine:
    """An engine serving `model_path` (default: the default voice's file) as the configuration says."""
    return GenerationEngine(
        model_path or config.model_paths[0],
        providers=config.onnx_providers,
        threads=config.onnx_threads,
        lanes=config.onnx_lanes,
        int8_weights=config.onnx_int8_weights,
        on_queue_wait=metrics.queue_wait if metrics.enabled else None,
    )


def open_voices(config: Config, metrics: Metrics = NO_METRICS) -> Voices:
    """One engine per model file of MODEL_PATH, named by its metadata (or its file name); the caller closes them.

    Each engine has the configured lanes: an idle one costs only memory, and busy ones share the cores
    through the operating system (docs/voices.md)."""
    opened: list[Voice] = []
    files: dict[str, Path] = {}  # each voice's file, by name
    try:
        for path in config.model_paths:
            engine = open_engine(config, path, metrics)
            name = engine.info.voice_name or voice_name_from_file(path)
            opened.append(Voice(name, engine.info.voice_description, engine, engine.info.min_p_floor))
            if name in files:
                raise ConfigError(
                    f"MODEL_PATH serves two voices named {name!r} ({files[name]} and {path}); "
                    "rename one with python -m export voice FILE --name NEW"
                )
            files[name] = path
        return Voices(opened)
    except BaseException:
        close_engines(opened)
        raise


def close_engines(voices: Iterable[Voice]) -> None:
    for voice in voices:
        voice.engine.close()


def new_metrics(config: Config) -> Metrics:
    """What records the metrics: Prometheus's registry when METRICS_PORT is set, else nothing."""
    return PrometheusMetrics() if config.metrics_port is not None else NO_METRICS


@dataclass
class Services:
    """What one bot process runs on; close() when done."""

    database: sqlalchemy.Engine
    store: ChatStore
    voices: Voices  # each with its GenerationEngine
    core: SpeechBot
    owns_engines: bool  # opened here, so closed here; shared engines (tests) are closed by their owner

    def close(self) -> None:
        if self.owns_engines:
            close_engines(self.voices)
        self.store.close()  # its database threads, then the engine's connections


def _open_storage_and_voices(
    config: Config, voices: Voices | None, metrics: Metrics = NO_METRICS
) -> tuple[sqlalchemy.Engine, ChatStore, Voices, bool]:
    """The migrated database, its store and the voices (`voices` None opens the configured models, which the
    caller then owns)."""
    database = create_db_engine(config.database_url)
    try:
        migrate(database)
        on_call = metrics.database_call if metrics.enabled else None
        store = ChatStore(database, config.default_temperature, config.default_length, on_database_call=on_call)
        return database, store, voices or open_voices(config, metrics), voices is None
    except BaseException:
        database.dispose()
        raise


def build_services(
    config: Config,
    voices: Voices | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
    on_schedule_change: Callable[[ChatSettings], None] | None = None,
    rng: random.Random | None = None,
) -> Services:
    """Migrate the database and wire store, voices and core; `voices` None opens the configured models.
    `rng` draws the chatter's choices (a seeded one repeats them)."""
    database, store, voices, owns_engines = _open_storage_and_voices(config, voices)
    core = SpeechBot(
        store,
        voices,
        cooldown_seconds=config.cooldown_seconds,
        clock=clock,
        on_schedule_change=on_schedule_change,
        rng=rng,
    )
    return Services(database, store, voices, core, owns_engines)


def build_application(
    config: Config,
    voices: Voices | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
    read_timeout: float = 10.0,
    concurrent_updates: int | None = None,
    rng: random.Random | None = None,
    metrics: Metrics | None = None,
    on_token_rejected: Callable[[InvalidToken], None] = lambda _error: None,
) -> Application:
    """The whole Telegram bot: services, inbox, daily posts, handlers. Does not start it.

    `voices` None opens the configured models (closed at shutdown). `concurrent_updates` None sizes the
    update processor by the engines: every request they can hold, generating or queued, plus
    UPDATES_BEYOND_ENGINE, so a speech past a full queue still reaches the engine and is told "busy".
    `rng` draws the chatter's choices, as in build_services.
    `metrics` None records them as the configuration says (new_metrics); they are served on METRICS_PORT
    while the bot runs. Engines opened elsewhere report their queue waits only if they were opened with the
    same metrics (open_voices).
    `on_token_rejected` hears of a 401 or 404 on getUpdates, after which polling has ended for good
    (bot.telegram.app.Stop.token_rejected stops the process).
    """
    token = config.require_token()
    metrics = new_metrics(config) if metrics is None else metrics
    database, store, voices, owns_engines = _open_storage_and_voices(config, voices, metrics)
    metrics.watch_voices(voices)
    metered = voices.with_engines(metrics.meter)
    inbox = Inbox(store.database)
    arrivals = Arrivals(inbox, clock)
    progress = Progress(metrics)
    sweep_seconds = config.inbox_sweep_seconds

    def heartbeat(_context: object = None) -> None:
        if config.heartbeat_file is not None:
            beat(config.heartbeat_file)
        metrics.heartbeat()

    # The hooks run once the Application starts, after everything below is built.
    async def start(application: Application) -> None:
        if config.metrics_port is not None:
            metrics.serve(config.metrics_listen, config.metrics_port)  # first: a port in use stops the start
        await application.bot.set_my_commands([BotCommand(name, text) for name, text in COMMANDS.items()])
        await inbox.open()
        await daily.rebuild()
        await answers.take_over(application)
        application.job_queue.run_repeating(
            answers.sweep,
            interval=sweep_seconds,
            first=sweep_seconds,
            job_kwargs={"misfire_grace_time": max(1, int(sweep_seconds))},
        )
        if config.heartbeat_file is not None or metrics.enabled:
            # Proves to the container's healthcheck (and to the metrics' heartbeat age) that the event loop is alive.
            heartbeat()
            application.job_queue.run_repeating(
                heartbeat, interval=HEARTBEAT_SECONDS, job_kwargs={"misfire_grace_time": HEARTBEAT_SECONDS}
            )
        log.info("Bot @%s is up", application.bot.username)

    async def stop(_application: Application) -> None:
        metrics.close()
        if config.heartbeat_file is not None:
            stop_beating(config.heartbeat_file)  # a bot that no longer serves must not look healthy
        inbox.close()
        services.close()

    application = new_application(
        config,
        token,
        concurrent_updates or sum(voice.engine.capacity for voice in voices) + UPDATES_BEYOND_ENGINE,
        post_init=start,
        post_shutdown=stop,
        retry_delays=retry_delays,
        read_timeout=read_timeout,
        metrics=metrics,
        update_queue=RecordingQueue(arrivals.record),
        processed=arrivals.processed,
        on_token_rejected=on_token_rejected,
    )
    daily = DailySpeeches(
        application.job_queue,
        application.bot,
        store,
        inbox,
        write=lambda settings: daily_speech(metered.pick(settings.voice), settings),
        show_typing=progress.typing,
        grace=timedelta(minutes=config.missed_post_grace_minutes),
        clock=clock,
        metrics=metrics,
    )
    core = SpeechBot(
        store,
        metered,
        cooldown_seconds=config.cooldown_seconds,
        clock=clock,
        on_schedule_change=daily.sync,
        rng=rng,
        # Known once the Application has started (getMe): privacy mode off lets the bot read every message.
        reads_all_group_messages=lambda: bool(application.bot.can_read_all_group_messages),
        on_forget=daily.remove,
        on_busy=metrics.busy_refusal,
    )
    services = Services(database, store, voices, core, owns_engines)
    application.bot_data["core"] = core  # for whoever holds only the Application (tests, benches)
    answers = Answers(inbox, arrivals, daily, clock, metrics)
    interactive = InteractiveHandlers(core, answers, progress, daily.chat_moved)
    register(application, Handlers(core, answers, progress, daily, Admins(), interactive), interactive)
    return application
