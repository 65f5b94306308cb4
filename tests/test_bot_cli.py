"""`python -m bot`: one-line errors with exit code 2, migrate, generate, console (piped and at a terminal), and a
real run stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from bot.__main__ import main
from bot.config import VARIABLES
from tests.support.bot_harness import (
    ALICE,
    TOKEN,
    bot_environment,
    bot_process,
    emulated_telegram_environment,
    private_chat,
    run_bot,
)
from tests.support.telegram_emulator import TelegramEmulator
from tests.support.terminal import CTRL_C, CTRL_D, CTRL_P, Terminal


@pytest.fixture
def env(tmp_path, monkeypatch, model_path):
    """A clean working directory (no .env) and no bot settings inherited from the machine."""
    monkeypatch.chdir(tmp_path)
    for name in VARIABLES:
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
        # migrate passed, then every command found an empty database of its own
        (["migrate"], {"DATABASE_URL": "sqlite:///:memory:"}, "is a SQLite database in memory"),
        (["migrate"], {"DATABASE_URL": "sqlite://"}, "name a file, e.g. sqlite:///data/bot.db"),
        (["console"], {"DATABASE_URL": "sqlite:///file::memory:?cache=shared&uri=true"}, "in memory"),
        (["migrate"], {"DATABASE_URL": "sqlite:///file:bot?mode=memory&uri=true"}, "in memory"),
        (["dance"], {}, "invalid choice: 'dance'"),
        (["generate", "--length", "many"], {}, "invalid int value: 'many'"),
        (["generate", "--model", "missing.onnx"], {}, "missing.onnx"),
        (["generate", "--min-p", "1"], {}, "--min-p must be at least 0 (off) and below 1, not 1.0"),
        (["generate", "--temperature", "3"], {}, "--temperature must be from 0.001 to 2, not 3.0"),
        (["generate", "--temperature", "1e-320"], {}, "--temperature must be from 0.001 to 2, not 1e-320"),
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


def test_generate_samples_as_the_bot_at_its_temperature(env, capsys):
    def speech(*flags: str) -> str:
        assert main(["generate", "--prompt", "We will", "--length", "60", "--seed", "4", *flags]) == 0
        return capsys.readouterr().out

    # At 2 the bot's min-p is 0.025 (model.sampling.bot_sampling), not BOT_SAMPLING's 0.1.
    hot = speech("--temperature", "2")
    assert hot == speech("--temperature", "2", "--min-p", "0.025") != speech("--temperature", "2", "--min-p", "0.1")


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


def test_console_offers_the_buttons_as_numbered_options(env, capsys):
    env.setattr("sys.stdin", io.StringIO("/length 30\n/speech 0.8\n2\n3\n"))
    assert main(["console"]) == 0
    out = capsys.readouterr().out
    assert "[1] Another (0.8)   [2] Calmer (0.6)   [3] Wilder (1)" in out
    assert "[1] Another (0.6)   [2] Calmer (0.4)   [3] Wilder (0.8)" in out, "2 picked Calmer"
    assert "[1] Another (0.8)   [2] Calmer (0.6)   [3] Wilder (1)" in out.split("Calmer (0.4)")[1], "3 picked Wilder"


def test_console_shows_a_groups_chatter_quiet_stats_and_forget(env, capsys):
    # --group: plain lines are a group's talk; random.Random(1) draws 0.134 first, a hit at 1/2.
    lines = ["/chatter 1/2", "We had lunch.", "And dessert.", "/stats", "/quiet 30m", "/forget", "/forget yes"]
    env.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["console", "--group", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "Chatter is on: I answer on my own about 1 message in 2 (50%)" in out
    assert out.count("chiming in: ") == 1, "the second line is within the minimum gap"
    assert "speeches today (UTC): 1" in out and "1 of at most 20 today" in out
    assert "Quiet until" in out and "Send /forget yes" in out
    assert "Deleted what I stored about this chat" in out and "2 recent messages I held in memory" in out
    assert "privacy mode" not in out, "the console reads every line"


def test_console_offers_no_option_that_would_not_change_the_temperature(env, capsys):
    env.setattr("sys.stdin", io.StringIO("/length 30\n/speech 2\n3\n/speech 2\n2\n"))
    assert main(["console"]) == 0
    out = capsys.readouterr().out
    assert "[1] Another (2)   [2] Calmer (1.8)\n" in out, "no Wilder at the highest temperature"
    assert "\n> 3" in out, "3 is no option there, so it is a prompt"
    assert "[1] Another (1.8)   [2] Calmer (1.6)   [3] Wilder (2)" in out, "2 picked Calmer"


@pytest.fixture
def at_a_terminal(tmp_path, model_path) -> dict[str, str]:
    """The environment of a console at a terminal: a database and a home (where the history goes) of its own,
    short speeches, and readline's default keys (no inputrc; TERM=dumb, so no escape sequences either)."""
    home = tmp_path / "home"
    home.mkdir()
    database_url = f"sqlite:///{tmp_path / 'bot.db'}"
    return bot_environment(
        model_path, DATABASE_URL=database_url, DEFAULT_LENGTH="30", HOME=str(home), INPUTRC=os.devnull, TERM="dumb"
    )


def assert_ended_by_ctrl_c(terminal: Terminal) -> None:
    assert terminal.end() == 130, terminal.shown
    assert "Traceback" not in terminal.shown, terminal.shown
    assert terminal.shown.endswith("\r\n"), "the shell's prompt starts a line of its own"


def test_ctrl_c_at_the_prompt_ends_the_console_with_130(tmp_path, at_a_terminal):
    history = tmp_path / "typed"
    with Terminal(tmp_path, at_a_terminal, "console", "--history", str(history)) as terminal:
        terminal.wait_for_prompt()
        terminal.type(b"We will\n")
        terminal.wait_for_prompt("Wilder (1)\r\n> ")  # the speech, its options and the next prompt
        terminal.type(CTRL_C)
        assert_ended_by_ctrl_c(terminal)
    assert history.read_text().splitlines() == ["We will"], "kept where --history says, on Ctrl-C too"
    assert not (tmp_path / "home" / ".speechbot_history").exists()


@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
def test_ctrl_c_right_after_asking_for_a_speech_ends_the_console_with_130(tmp_path, at_a_terminal, presses):
    # The longest speech takes the bundled model about a second, so Ctrl-C lands while it is written (or, on a
    # machine too busy to type it that soon, at the next prompt): either way the console ends at once. Twice:
    # issue 24, a second Ctrl-C while the first one's cleanup ran (the engine's lanes stopping) aborted the
    # process (SIGABRT) and left exit codes to chance.
    with Terminal(tmp_path, at_a_terminal, "console") as terminal:
        terminal.wait_for_prompt()
        terminal.type(b"/length 3000\n")
        terminal.wait_for_prompt("Speech length set to 3000 characters.\r\n> ")
        terminal.type(b"/speech\n")
        terminal.wait_for("/speech\r\n")  # readline has the line
        for _ in range(presses):
            terminal.type(CTRL_C)
        assert_ended_by_ctrl_c(terminal)


def test_lines_typed_at_a_terminal_are_recalled_in_the_next_session(tmp_path, at_a_terminal):
    history = Path(at_a_terminal["HOME"]) / ".speechbot_history"
    piped = run_bot(tmp_path, at_a_terminal, "console", stdin="/length 33\n")
    assert piped.returncode == 0 and "Speech length set to 33 characters." in piped.stdout, piped.stderr
    assert "\x1b" not in piped.stdout and not history.exists(), "piped lines are neither edited nor kept"
    with Terminal(tmp_path, at_a_terminal, "console") as terminal:
        terminal.wait_for_prompt()
        terminal.type(b"/length 44\n")
        terminal.wait_for_prompt("Speech length set to 44 characters.\r\n> ")
        terminal.type(CTRL_D)
        assert terminal.end() == 0, terminal.shown
    assert history.read_text().splitlines() == ["/length 44"]
    with Terminal(tmp_path, at_a_terminal, "console") as terminal:
        terminal.wait_for_prompt()
        terminal.type(b"/length 55\n")
        terminal.wait_for_prompt("Speech length set to 55 characters.\r\n> ")
        terminal.type(CTRL_P + CTRL_P + b"\n")  # two lines back: the last session's
        terminal.wait_for_prompt("Speech length set to 44 characters.\r\n> ")
        terminal.type(b"/quit\n")
        assert terminal.end() == 0, terminal.shown
    assert history.read_text().splitlines() == ["/length 44", "/length 55", "/length 44", "/quit"]


def test_a_console_with_no_home_to_keep_its_history_in_still_works(tmp_path, at_a_terminal):
    # A file cannot be a home, whoever runs the test: root may write anywhere, and onnxruntime makes a missing home
    # (for a telemetry id of its own).
    not_a_home = tmp_path / "file"
    not_a_home.touch()
    at_a_terminal["HOME"] = str(not_a_home)
    with Terminal(tmp_path, at_a_terminal, "console") as terminal:
        terminal.wait_for_prompt()
        terminal.type(b"/length 44\n")
        terminal.wait_for_prompt("Speech length set to 44 characters.\r\n> ")
        terminal.type(CTRL_P + b"\n")  # what the session typed is still recalled
        terminal.wait_for_prompt(
            "Speech length set to 44 characters.\r\n> /length 44\r\nSpeech length set to 44 characters.\r\n> "
        )
        terminal.type(CTRL_D)
        assert terminal.end() == 0, terminal.shown
    assert "Traceback" not in terminal.shown
    assert (
        f"note: no history is kept: {not_a_home}/.speechbot_history cannot be used (Not a directory)" in terminal.shown
    )


async def test_run_serves_telegram_and_stops_gracefully_on_sigterm(tmp_path, model_path):
    async with TelegramEmulator(TOKEN) as emulator:
        environment = emulated_telegram_environment(
            emulator, tmp_path / "bot.db", model_path, DEFAULT_LENGTH="30", HEARTBEAT_FILE=str(tmp_path / "heartbeat")
        )
        async with bot_process(tmp_path, environment) as process:
            await emulator.wait_for(lambda call: call.method == "getUpdates", timeout=300)
            answer = await emulator.ask(private_chat(ALICE), ALICE, "/speech 0.6 We will")
            assert answer.startswith("We will")
            healthcheck = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "healthcheck", cwd=tmp_path, env=environment
            )
            assert await healthcheck.wait() == 0
    output = (tmp_path / "bot.log").read_text()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "DEBUG" in output and TOKEN not in output
    assert "Application.stop() complete" in output, output[-2000:]


@pytest.mark.parametrize("max_age", ["nan", "inf", "-5", "0", "soon"])
def test_healthcheck_refuses_a_max_age_that_is_not_a_positive_number(env, tmp_path, capsys, max_age):
    env.setenv("HEARTBEAT_FILE", str(tmp_path / "heartbeat"))
    (tmp_path / "heartbeat").write_text("0\n")
    assert main(["healthcheck", "--max-age", max_age]) == 2
    assert f"'{max_age}' is not a number of seconds above 0" in one_error_line(capsys)


def test_errors_point_at_the_right_help(env, capsys):
    assert main(["dance"]) == 2
    assert one_error_line(capsys).endswith("(see python -m bot --help)\n")
    assert main(["generate", "--length", "many"]) == 2
    assert one_error_line(capsys).endswith("(see python -m bot generate --help)\n")


def test_each_command_help_lists_its_options_defaults_and_environment(env, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in VARIABLES), out
    with pytest.raises(SystemExit):
        main(["console", "--help"])
    out = capsys.readouterr().out
    assert "DATABASE_URL" in out and "MODEL_PATH" in out and "TELEGRAM_BOT_TOKEN" not in out
    assert "--history FILE" in out and "(default: ~/.speechbot_history)" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "characters to generate (default: 500)" in out and "(default: 0.8)" in out and "--prompt-file FILE" in out


def test_generate_reads_a_long_prompt_from_a_file(env, tmp_path, capsys):
    prompt = "We will make our country great again, folks. " * 20  # far beyond what a shell line is comfortable with
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    assert main(["generate", "--prompt-file", "prompt.txt", "--length", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out.strip()) > len(prompt.strip())
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    for name, reason in [("missing.txt", "cannot be read (No such file or directory)"), ("latin1.txt", "is not UTF-8")]:
        assert main(["generate", "--prompt-file", name]) == 2
        assert reason in one_error_line(capsys)
    assert main(["generate", "--prompt", "x", "--prompt-file", "prompt.txt"]) == 2
    assert "not allowed with argument" in one_error_line(capsys)


def test_a_heartbeat_dated_in_the_future_is_unhealthy(env, tmp_path, capsys):
    heartbeat = tmp_path / "heartbeat"
    heartbeat.write_text("0\n")
    env.setenv("HEARTBEAT_FILE", str(heartbeat))
    assert main(["healthcheck"]) == 0
    capsys.readouterr()
    in_an_hour = time.time() + 3600  # what a clock set back an hour after the last beat shows
    os.utime(heartbeat, (in_an_hour, in_an_hour))
    assert main(["healthcheck"]) == 1
    assert "unhealthy: the last heartbeat is dated 3600 s in the future" in capsys.readouterr().err
