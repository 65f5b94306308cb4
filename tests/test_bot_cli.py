"""`python -m bot`: one-line errors with exit code 2, migrate, generate, console, and a real run stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from bot_harness import ALICE, TOKEN, private_chat
from telegram_emulator import TelegramEmulator

from bot.__main__ import main

pytest_plugins = ["bot_harness"]

REPO = Path(__file__).resolve().parents[1]
SETTINGS = (
    "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_BASE_URL", "DATABASE_URL", "MODEL_PATH", "ONNX_PROVIDERS", "ONNX_THREADS",
    "ONNX_LANES", "LOG_LEVEL", "WEBHOOK_URL", "WEBHOOK_PORT", "WEBHOOK_SECRET", "DEFAULT_TEMPERATURE", "DEFAULT_LENGTH",
    "COOLDOWN_SECONDS", "MISSED_POST_GRACE_MINUTES", "HEARTBEAT_FILE",
)  # fmt: skip


@pytest.fixture
def env(tmp_path, monkeypatch, model_path):
    """A clean working directory (no .env) and no bot settings inherited from the machine."""
    monkeypatch.chdir(tmp_path)
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONNX_PROVIDERS", "cpu")
    monkeypatch.setenv("MODEL_PATH", str(model_path))
    monkeypatch.setenv("ONNX_THREADS", "1")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield monkeypatch
    root.handlers[:] = handlers
    root.setLevel(level)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "variables", "expected"),
    [
        (["run"], {}, "TELEGRAM_BOT_TOKEN is not set"),
        ([], {"TELEGRAM_BOT_TOKEN": "oops"}, "does not look like a bot token"),
        (["run"], {"ONNX_PROVIDERS": "tpu"}, "ONNX_PROVIDERS='tpu' is not valid"),
        (["migrate"], {"DATABASE_URL": "not a url"}, "is not a database URL"),
        (["migrate"], {"DATABASE_URL": "postgresql+psycopg://u:secret@127.0.0.1:9/db"}, "DATABASE_URL"),
        (["dance"], {}, "invalid choice: 'dance'"),
        (["generate", "--length", "many"], {}, "invalid int value: 'many'"),
        (["generate", "--model", "missing.onnx"], {}, "missing.onnx"),
        (["generate", "--min-p", "1"], {}, "--min-p must be at least 0 (off) and below 1, not 1.0"),
        (["generate", "--temperature", "3"], {}, "--temperature must be above 0 and at most 2, not 3.0"),
        (["generate", "--repeat-ngram", "99"], {}, "--repeat-ngram must be a whole number from 2 to 64"),
        (["healthcheck"], {}, "HEARTBEAT_FILE is not set"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(env, capsys, argv, variables, expected):
    for name, value in variables.items():
        env.setenv(name, value)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert expected in line
    assert "secret" not in line


def test_migrate_creates_the_database(env, tmp_path, capsys):
    assert main(["migrate"]) == 0
    with sqlite3.connect(tmp_path / "data" / "bot.db") as db:
        assert db.execute("SELECT count(*) FROM chats").fetchone() == (0,)
    assert "up to date" in capsys.readouterr().out


def test_generate_prints_a_speech(env, capsys):
    assert main(["generate", "--prompt", "We will", "--length", "40", "--seed", "3", "--temperature", "0.7"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("We will") and len(first.strip()) > len("We will")
    assert main(["generate", "--prompt", "We will", "--length", "40", "--seed", "3", "--temperature", "0.7"]) == 0
    assert capsys.readouterr().out == first, "a seed repeats the speech"


def test_generate_rejects_a_bad_temperature(env, capsys):
    assert main(["generate", "--temperature", "0"]) == 2
    assert "temperature" in one_error_line(capsys).lower()


def test_console_uses_the_same_commands_and_database(env, tmp_path, capsys):
    env.setattr("sys.stdin", io.StringIO("/temperature 1.5\n/length 30\nWe will\n/quit\n"))
    assert main(["console"]) == 0
    out = capsys.readouterr().out
    assert "Temperature set to 1.5." in out and "Speech length set to 30 characters." in out
    assert "> We will" in out
    env.setattr("sys.stdin", io.StringIO("/settings\n"))
    assert main(["console"]) == 0
    assert "temperature: 1.5" in capsys.readouterr().out, "kept in data/bot.db"


async def test_run_serves_telegram_and_stops_gracefully_on_sigterm(tmp_path, model_path):
    async with TelegramEmulator(TOKEN) as emulator:
        environment = {name: value for name, value in os.environ.items() if name not in SETTINGS} | {
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_BASE_URL": emulator.base_url,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
            "ONNX_PROVIDERS": "cpu",
            "ONNX_THREADS": "1",
            "MODEL_PATH": str(model_path),
            "DEFAULT_LENGTH": "30",
            "HEARTBEAT_FILE": str(tmp_path / "heartbeat"),
            "LOG_LEVEL": "DEBUG",
            "PYTHONPATH": str(REPO),
        }
        log = tmp_path / "bot.log"  # a file, not a pipe: a full pipe would block the bot's logging
        with log.open("w") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", cwd=tmp_path, env=environment, stdout=log_file, stderr=log_file
            )
        try:
            await emulator.wait_for(lambda call: call.method == "getUpdates", timeout=30)
            answer = await emulator.ask(private_chat(ALICE), ALICE, "/speech 0.6 We will")
            assert answer.startswith("We will")
            healthcheck = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "healthcheck", cwd=tmp_path, env=environment
            )
            assert await healthcheck.wait() == 0
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    output = log.read_text()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "DEBUG" in output and TOKEN not in output
    assert "Application.stop() complete" in output, output[-2000:]
