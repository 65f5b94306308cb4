"""The composition root: the one place that builds the bot's parts from a Config.

build_services makes what every front end runs on (database, store, generation engine, core); the console
(`python -m bot console`) and the tests use it as it is. build_application adds the Telegram side (inbox,
daily posts, handlers, python-telegram-bot's Application) around the same parts. Every part gets what it
calls in its constructor.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import sqlalchemy
from telegram import BotCommand
from telegram.error import InvalidToken
from telegram.ext import Application

from bot.config import Config
from bot.core.commands import COMMANDS
from bot.core.speech import daily_speech
from bot.core.speechbot import SpeechBot
from bot.heartbeat import HEARTBEAT_SECONDS, beat
from bot.heartbeat import stop as stop_beating
from bot.inference.engine import GenerationEngine
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
    return GenerationEngine(
        model_path or config.model_path,
        providers=config.onnx_providers,
        threads=config.onnx_threads,
        lanes=config.onnx_lanes,
        int8_weights=config.onnx_int8_weights,
        on_queue_wait=metrics.queue_wait if metrics.enabled else None,
    )


def new_metrics(config: Config) -> Metrics:
    """What records the metrics: Prometheus's registry when METRICS_PORT is set, else nothing."""
    return PrometheusMetrics() if config.metrics_port is not None else NO_METRICS


@dataclass
class Services:
    """What one bot process runs on; close() when done."""

    database: sqlalchemy.Engine
    store: ChatStore
    engine: GenerationEngine
    core: SpeechBot
    owns_engine: bool  # opened here, so closed here; a shared engine (tests) is closed by its owner

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()
        self.store.close()  # its database threads, then the engine's connections


def _open_storage_and_engine(
    config: Config, engine: GenerationEngine | None, metrics: Metrics = NO_METRICS
) -> tuple[sqlalchemy.Engine, ChatStore, GenerationEngine, bool]:
    """The migrated database, its store and the engine (`engine` None opens the configured model, which the
    caller then owns)."""
    database = create_db_engine(config.database_url)
    try:
        migrate(database)
        on_call = metrics.database_call if metrics.enabled else None
        store = ChatStore(database, config.default_temperature, config.default_length, on_database_call=on_call)
        return database, store, engine or open_engine(config, metrics=metrics), engine is None
    except BaseException:
        database.dispose()
        raise


def voice_of(config: Config) -> str:
    """What /stats names as the voice: the served model file, the same for every chat."""
    return f"{config.model_path.name} (the same model for every chat)"


def build_services(
    config: Config,
    engine: GenerationEngine | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
    on_schedule_change: Callable[[ChatSettings], None] | None = None,
    rng: random.Random | None = None,
) -> Services:
    """Migrate the database and wire store, engine and core; `engine` None opens the configured model.
    `rng` draws the chatter's choices (a seeded one repeats them)."""
    database, store, engine, owns_engine = _open_storage_and_engine(config, engine)
    core = SpeechBot(
        store,
        engine,
        cooldown_seconds=config.cooldown_seconds,
        clock=clock,
        on_schedule_change=on_schedule_change,
        rng=rng,
        voice=voice_of(config),
    )
    return Services(database, store, engine, core, owns_engine)


def build_application(
    config: Config,
    engine: GenerationEngine | None = None,
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

    `engine` None opens the configured model (closed at shutdown). `concurrent_updates` None sizes the
    update processor by the engine: every request it can hold, generating or queued, plus
    UPDATES_BEYOND_ENGINE, so a speech past a full queue still reaches the engine and is told "busy".
    `rng` draws the chatter's choices, as in build_services.
    `metrics` None records them as the configuration says (new_metrics); they are served on METRICS_PORT
    while the bot runs. An engine opened elsewhere reports its queue waits only if it was opened with the
    same metrics (open_engine).
    `on_token_rejected` hears of a 401 or 404 on getUpdates, after which polling has ended for good
    (bot.telegram.app.Stop.token_rejected stops the process).
    """
    token = config.require_token()
    metrics = new_metrics(config) if metrics is None else metrics
    database, store, engine, owns_engine = _open_storage_and_engine(config, engine, metrics)
    metrics.watch_engine(engine)
    metered_engine = metrics.meter(engine)
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
        concurrent_updates or engine.capacity + UPDATES_BEYOND_ENGINE,
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
        write=partial(daily_speech, metered_engine),
        show_typing=progress.typing,
        grace=timedelta(minutes=config.missed_post_grace_minutes),
        clock=clock,
        metrics=metrics,
    )
    core = SpeechBot(
        store,
        metered_engine,
        cooldown_seconds=config.cooldown_seconds,
        clock=clock,
        on_schedule_change=daily.sync,
        rng=rng,
        voice=voice_of(config),
        # Known once the Application has started (getMe): privacy mode off lets the bot read every message.
        reads_all_group_messages=lambda: bool(application.bot.can_read_all_group_messages),
        on_forget=daily.remove,
        on_busy=metrics.busy_refusal,
    )
    services = Services(database, store, engine, core, owns_engine)
    application.bot_data["core"] = core  # for whoever holds only the Application (tests, benches)
    answers = Answers(inbox, arrivals, daily, clock, metrics)
    interactive = InteractiveHandlers(core, answers, progress, daily.chat_moved)
    register(application, Handlers(core, answers, progress, daily, Admins(), interactive), interactive)
    return application
