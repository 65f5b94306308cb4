"""The real bot as users run it, `python -m bot run` in a subprocess, pointed at a Bot API emulator.

Tests that need real signals (kill -9) or several processes sharing one database use this; the rest
run the bot in-process through bot_harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bot.inference.modelfile import DEFAULT_MODEL_PATH
from tests.support.bot_harness import TOKEN, bot_environment
from tests.support.telegram_emulator import TelegramEmulator


class BotProcess:
    def __init__(self, process: asyncio.subprocess.Process, log: Path):
        self.process = process
        self.log = log

    async def kill(self) -> None:
        """kill -9: no shutdown hook runs, nothing is flushed or confirmed."""
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


@contextlib.asynccontextmanager
async def killable_bot(
    emulator: TelegramEmulator,
    database_url: str,
    folder: Path,
    name: str = "bot",
    model: Path = DEFAULT_MODEL_PATH,
    via: str | None = None,
    **environment: str,
) -> AsyncIterator[BotProcess]:
    """Start the bot and wait until it polls for updates (or, with WEBHOOK_URL, has set its webhook); SIGTERM it
    afterwards unless it is gone already. `via`: talk to the emulator through base_url_via(via), so that its
    calls can be told from other processes' (several replicas on one emulator)."""
    since = len(emulator.calls)
    settings = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_BASE_URL": emulator.base_url if via is None else emulator.base_url_via(via),
        "DATABASE_URL": database_url,
        "DEFAULT_LENGTH": "40",  # short speeches keep the suite fast on two shared cores
        "COOLDOWN_SECONDS": "0",
    } | environment
    log = folder / f"{name}.log"
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            cwd=folder,  # away from any .env in the checkout
            env=bot_environment(model, **settings),
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    bot = BotProcess(process, log)
    ready_call = "setWebhook" if "WEBHOOK_URL" in settings else "getUpdates"

    def ready(call) -> bool:
        # A webhook is set once the bot's server listens (python-telegram-bot starts it first).
        return call.method == ready_call and call.via == via and (ready_call == "getUpdates" or call.status == 200)

    try:
        polling = asyncio.ensure_future(emulator.wait_for(ready, since, timeout=60))
        exited = asyncio.ensure_future(process.wait())
        await asyncio.wait([polling, exited], return_when=asyncio.FIRST_COMPLETED)
        if not polling.done():
            polling.cancel()
            raise AssertionError(f"the bot exited with {process.returncode}:\n{log.read_text()}")
        exited.cancel()
        polling.result()
        yield bot
    finally:
        await bot.stop()
