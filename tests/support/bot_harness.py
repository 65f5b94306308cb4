"""Running the real bot (python-telegram-bot's HTTP stack, real engine, SQLite) against the emulator.

tests/conftest.py loads this as a pytest plugin (`pytest_plugins`) for its fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from telegram.ext import Application

from bot.config import VARIABLES, Config
from bot.core.voices import Voices
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.services import build_application
from bot.telegram.app import serving
from tests.support.telegram_emulator import TelegramEmulator

REPO = Path(__file__).resolve().parents[2]
TOKEN = "123456789:AAFakeTokenForTestsOnly_abcdefghijkl"
ALICE = {"id": 111, "is_bot": False, "first_name": "Alice"}
BOB = {"id": 222, "is_bot": False, "first_name": "Bob"}


def private_chat(user: dict) -> dict:
    return {"id": user["id"], "type": "private", "first_name": user["first_name"]}


def group_chat(chat_id: int, kind: str = "group") -> dict:
    return {"id": chat_id, "type": kind, "title": f"Group {chat_id}"}


class Clock:
    """The bot's wall clock in tests: moves only when told to."""

    def __init__(self, now: datetime = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server the test starts next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bot_config(emulator: TelegramEmulator, db_path, **overrides) -> Config:
    config = Config(
        telegram_bot_token=TOKEN,
        telegram_api_base_url=emulator.base_url,
        database_url=f"sqlite:///{db_path}",
        default_length=40,  # short speeches keep the suite fast on two shared cores
        cooldown_seconds=0,
    )
    return replace(config, **overrides)


def bot_environment(model_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a `python -m bot` subprocess: none of the machine's bot settings, one CPU lane."""
    inherited = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    defaults = {"ONNX_PROVIDERS": "cpu", "ONNX_THREADS": "1", "ONNX_LANES": "1", "MODEL_PATH": str(model_path)}
    return inherited | defaults | {"PYTHONPATH": str(REPO)} | settings


def emulated_telegram_environment(emulator: TelegramEmulator, db_path: Path, model_path: Path, **settings: str) -> dict:
    """bot_environment for `python -m bot run` against the emulator, logging at DEBUG."""
    return bot_environment(
        model_path,
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_BASE_URL=emulator.base_url,
        DATABASE_URL=f"sqlite:///{db_path}",
        LOG_LEVEL="DEBUG",
        **settings,
    )


def run_bot(cwd: Path, environment: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m bot ARGS` to completion, in `cwd` (no .env there), with its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=cwd,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,  # only a safety net: a loaded machine can be slow to start Python
    )


@contextlib.asynccontextmanager
async def bot_process(cwd: Path, environment: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m bot` running in the background, writing cwd/bot.log; stopped with SIGTERM when the block ends."""
    log = cwd / "bot.log"  # a file, not a pipe: a full pipe would block the bot's logging
    with log.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=cwd, env=environment, stdout=log_file, stderr=log_file
        )
    try:
        yield process
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def running_bot(
    emulator: TelegramEmulator, engine: GenerationEngine | Voices, config: Config, clock: Clock, **build_options
) -> AsyncIterator[Application]:
    """Start the bot as `python -m bot run` does (bot.telegram.app.serving), polling the emulator; stop it after.
    One engine is one voice."""
    build_options = {"retry_delays": (0.05, 0.1), "read_timeout": 2.0} | build_options
    voices = engine if isinstance(engine, Voices) else Voices.of(engine)
    application = build_application(config, voices, clock=clock, **build_options)
    async with serving(application, config, poll_timeout=1):  # a short long-poll stops the bot sooner
        yield application


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The model the bot ships and serves by default."""
    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def engine(model_path):
    """The real engine, on one thread so parallel work elsewhere is not starved."""
    engine = GenerationEngine(model_path, providers="cpu", threads=1)
    yield engine
    engine.close()


@pytest.fixture
async def emulator():
    async with TelegramEmulator(TOKEN) as emulator:
        yield emulator
