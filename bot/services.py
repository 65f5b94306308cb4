"""The composition root: the one place that builds the bot's parts from a Config.

Telegram (bot/telegram/app.py), the console (`python -m bot console`) and the tests all get their
database, store, generation engine and SpeechBot from build_services, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy

from bot.config import Config
from bot.core.speechbot import SpeechBot, utc_now
from bot.inference.engine import GenerationEngine
from db.database import create_db_engine, migrate
from db.store import ChatStore


def open_engine(config: Config, model_path: Path | None = None) -> GenerationEngine:
    return GenerationEngine(
        model_path or config.model_path,
        providers=config.onnx_providers,
        threads=config.onnx_threads,
        lanes=config.onnx_lanes,
    )


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


def build_services(
    config: Config, engine: GenerationEngine | None = None, *, clock: Callable[[], datetime] = utc_now
) -> Services:
    """Migrate the database and wire store, engine and core; `engine` None opens the configured model."""
    database = create_db_engine(config.database_url)
    try:
        migrate(database)
        store = ChatStore(database, config.default_temperature, config.default_length)
        owns_engine = engine is None
        engine = open_engine(config) if engine is None else engine
    except BaseException:
        database.dispose()
        raise
    core = SpeechBot(store, engine, cooldown_seconds=config.cooldown_seconds, clock=clock)
    return Services(database, store, engine, core, owns_engine)
