"""The bot token never reaches the logs, even at DEBUG level where python-telegram-bot prints its URL."""

from __future__ import annotations

import io
import logging
import re

import pytest

from bot.logs import REDACTED, RedactSecrets, setup_logging
from bot.telegram.handlers import SORRY
from tests.support.bot_harness import ALICE, TOKEN, Clock, bot_config, private_chat, running_bot
from tests.support.telegram_emulator import TelegramEmulator

OTHER_TOKEN = "987654321:BBAnotherFakeToken_0123456789abcdefgh"


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_filter_redacts_message_arguments_and_tracebacks():
    stream = io.StringIO()
    logger = logging.getLogger("speechbot.test.redact")
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets([TOKEN, "hook-secret"]))
    logger.addHandler(handler)
    try:
        logger.warning("POST %s/sendMessage with %s", f"https://api.telegram.org/bot{TOKEN}", "hook-secret")
        try:
            raise ConnectionError(f"cannot reach https://api.telegram.org/bot{OTHER_TOKEN}/getMe")
        except ConnectionError:
            logger.exception("request failed")
        logger.error("stack", stack_info=True, extra={})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert TOKEN not in output and OTHER_TOKEN not in output and "hook-secret" not in output
    assert output.count(REDACTED) >= 3
    assert "ConnectionError" in output, "the traceback itself is kept"


async def test_a_debug_session_never_logs_the_token(root_logging, engine, tmp_path):
    leaky, redacted = io.StringIO(), io.StringIO()
    # Runs before the redacting handler, so it shows what python-telegram-bot really logs.
    root_logging.addHandler(logging.StreamHandler(leaky))
    setup_logging(logging.DEBUG, secrets=[TOKEN], stream=redacted)
    assert logging.getLogger("httpx").level == logging.WARNING
    async with TelegramEmulator(TOKEN) as emulator:
        config = bot_config(emulator, tmp_path / "bot.db")
        async with running_bot(emulator, engine, config, Clock()):
            chat = private_chat(ALICE)
            emulator.inject("sendMessage", "5xx", status=502)
            await emulator.ask(chat, ALICE, "/settings")
            emulator.inject("sendMessage", "429", retry_after=1)
            await emulator.ask(chat, ALICE, "/speech 0.5 Hello")
    assert TOKEN in leaky.getvalue(), "the scenario does log the token without the filter"
    output = redacted.getvalue()
    assert "DEBUG" in output and "sendMessage" in output
    assert TOKEN not in output
    assert TOKEN.split(":")[1] not in output


async def test_bot_api_failures_log_one_warning_line_each(root_logging, engine, emulator, tmp_path):
    """A proxy's error pages and cut-off answers, while polling and while replying: one line per failure."""
    output = io.StringIO()
    setup_logging(logging.INFO, secrets=[TOKEN], stream=output)
    chat = private_chat(ALICE)
    async with running_bot(emulator, engine, bot_config(emulator, tmp_path / "bot.db"), Clock()):
        assert "/schedule" in await emulator.ask(chat, ALICE, "/help")
        before = len(output.getvalue().splitlines())
        emulator.inject("getUpdates", "page", status=502)
        emulator.inject("getUpdates", "malformed")
        await emulator.wait_for(lambda call: call.method == "getUpdates" and call.failure == "malformed")
        emulator.inject("sendMessage", "page", status=502, times=3)  # the reply fails through every retry
        assert await emulator.ask(chat, ALICE, "/help") == SORRY
        emulator.inject("sendMessage", "malformed")
        assert await emulator.ask(chat, ALICE, "/help") == SORRY
        failures = sum(call.failure is not None for call in emulator.calls)
        assert failures == 6
        lines = output.getvalue().splitlines()[before:]
        assert "Traceback" not in output.getvalue()
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines), lines
        loud = [line for line in lines if " INFO " not in line]
        assert len(loud) == failures, "\n".join(lines)
        assert all(" WARNING " in line for line in loud), "\n".join(loud)
        assert any("502" in line and "Bad Gateway" in line for line in loud), "\n".join(loud)

        setup_logging(logging.DEBUG, secrets=[TOKEN], stream=output)
        emulator.inject("sendMessage", "malformed")
        assert await emulator.ask(chat, ALICE, "/help") == SORRY
        assert "Traceback" in output.getvalue(), "the traceback is there at DEBUG"
