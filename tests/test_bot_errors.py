"""Real `python -m bot` subprocesses given broken files and settings: one `error:` line, never a traceback.

Also the webhook: with no WEBHOOK_SECRET configured the bot makes one up, registers it with setWebhook,
and its server refuses forged updates.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp
import onnx
import pytest

from bot.inference.modelfile import DEFAULT_MODEL_PATH
from db.database import create_db_engine, migrate
from db.store import ChatStore
from tests.support.bot_harness import (
    ALICE,
    TOKEN,
    bot_environment,
    bot_process,
    emulated_telegram_environment,
    group_chat,
    private_chat,
    run_bot,
)
from tests.support.bot_process import killable_bot
from tests.support.telegram_emulator import ANONYMOUS_ADMIN, TelegramEmulator

PAGE = 4096  # SQLite's default page size
CONSOLE_CHAT_ID = 0


def assert_one_error_line(result, expected: str, code: int = 2) -> str:
    """The last stderr line is the error; nothing before it is a traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, result.stderr
    return line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stored_database(path: Path) -> Path:
    """A real bot database holding the console chat's row (length 40, so speeches are short)."""
    db = create_db_engine(f"sqlite:///{path}")
    migrate(db)
    store = ChatStore(db, 0.8, 40)
    asyncio.run(store.get(CONSOLE_CHAT_ID, "console"))
    store.close()
    return path


@pytest.fixture
def corrupt_db(tmp_path) -> Path:
    """What `head -c 24576 /dev/urandom > x.db` makes, but the same bytes every run."""
    path = tmp_path / "x.db"
    path.write_bytes(bytes(range(256)) * (6 * PAGE // 256))
    return path


@pytest.mark.parametrize(
    ("argv", "settings"),
    [(["migrate"], {}), (["console"], {}), (["run"], {"TELEGRAM_BOT_TOKEN": TOKEN, "LOG_LEVEL": "WARNING"})],
)
def test_a_file_that_is_not_a_database(tmp_path, model_path, corrupt_db, argv, settings):
    environment = bot_environment(model_path, DATABASE_URL=f"sqlite:///{corrupt_db}", **settings)
    result = run_bot(tmp_path, environment, *argv)
    line = assert_one_error_line(result, "file is not a database")
    assert "DATABASE_URL" in line and "new file" in line, line
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_database_corrupted_mid_way_is_reported_by_the_console_which_goes_on(tmp_path, model_path):
    path = stored_database(tmp_path / "bot.db")
    names = dict(sqlite3.connect(path).execute("SELECT name, rootpage FROM sqlite_master").fetchall())
    with path.open("r+b") as file:  # the chats table's pages; the schema and alembic_version stay readable
        file.seek((names["chats"] - 1) * PAGE)
        file.write(b"\xa5" * PAGE)
    environment = bot_environment(model_path, DATABASE_URL=f"sqlite:///{path}")
    result = run_bot(tmp_path, environment, "console", stdin="/settings\n/help\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "My settings database cannot be used right now (database disk image is malformed)" in result.stdout
    assert "/schedule 08:30" in result.stdout, "the next command is still answered"


def test_a_read_only_database_refuses_writes_and_answers_the_rest(tmp_path, model_path):
    path = stored_database(tmp_path / "bot.db")
    # SQLite opens a file it may not write (chmod 444, a read-only mount) read-only; this asks for that directly,
    # which also holds when the tests run as root.
    environment = bot_environment(model_path, DATABASE_URL=f"sqlite:///file:{path}?mode=ro&uri=true")
    result = run_bot(tmp_path, environment, "console", stdin="/temperature 1.5\n/settings\nWe will\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "my settings database is read-only" in result.stdout
    assert "temperature: 0.8" in result.stdout, "reads still work, and the write did not happen"
    assert "> We will" in result.stdout, "speeches still work"


def test_a_sqlite_folder_that_cannot_be_created(tmp_path, model_path):
    (tmp_path / "data").write_text("a file where the folder should be")
    environment = bot_environment(model_path, DATABASE_URL="sqlite:///data/db/bot.db")
    line = assert_one_error_line(run_bot(tmp_path, environment, "migrate"), "a folder that cannot be created")
    assert "data/db" in line


async def refused_in_time(cwd: Path, environment: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m bot ARGS` that must exit soon; killed, and the test failed, if it goes on running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=cwd, env=environment, stdout=PIPE, stderr=PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"python -m bot {' '.join(args)} was not refused: it is still running") from None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def test_a_second_bot_process_on_one_sqlite_file_is_refused(emulator, tmp_path, model_path):
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    settings = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": emulator.base_url, "DATABASE_URL": url}
    async with killable_bot(emulator, url, tmp_path, name="first") as first:
        second = await refused_in_time(tmp_path, bot_environment(model_path, **settings), "run")
        line = assert_one_error_line(second, f"another bot process (pid {first.process.pid}) is running")
        assert "data/bot.db.lock" in line and "PostgreSQL" in line, line
        assert second.stderr.count("\n") == 1, second.stderr
        assert "/schedule" in await emulator.ask(private_chat(ALICE), ALICE, "/help", timeout=60), "the first goes on"
    # The lock dies with its process: test_crash_recovery restarts the bot on the SQLite file it was killed -9 on.


@pytest.mark.parametrize(
    ("heartbeat", "reason"),
    [
        ("missing/heartbeat", "No such file or directory"),
        ("/sys/speechbot-heartbeat", ""),  # read-only even for root: Permission denied, or a read-only file system
        (".", "Is a directory"),
    ],
)
def test_an_unwritable_heartbeat_file_is_refused_at_start(tmp_path, model_path, heartbeat, reason):
    environment = bot_environment(model_path, TELEGRAM_BOT_TOKEN=TOKEN, HEARTBEAT_FILE=heartbeat)
    line = assert_one_error_line(run_bot(tmp_path, environment, "run"), "cannot be written")
    assert f"HEARTBEAT_FILE='{heartbeat}'" in line and reason in line
    assert not (tmp_path / "data").exists(), "refused before the database was touched"


def test_an_onnx_file_whose_metadata_disagrees_with_its_graph(tmp_path, tiny_onnx):
    model = onnx.load(tiny_onnx)
    for prop in model.metadata_props:
        if prop.key == "model_config":
            prop.value = json.dumps(json.loads(prop.value) | {"rnn_size": 24})
    edited = tmp_path / "edited.onnx"
    onnx.save(model, edited)
    result = run_bot(tmp_path, bot_environment(edited), "generate", "--length", "20")
    line = assert_one_error_line(result, "metadata does not match its graph")
    assert "h0 is [2, batch, 16]" in line and "[2, batch, 24]" in line, line


def test_telegram_unreachable_at_start_is_one_line_without_a_traceback(tmp_path, model_path):
    environment = bot_environment(
        model_path,
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_BASE_URL=f"http://127.0.0.1:{free_port()}/bot",  # nothing listens there
        LOG_LEVEL="WARNING",
    )
    result = run_bot(tmp_path, environment, "run")
    assert_one_error_line(result, "Telegram could not be reached", code=2)
    assert len(result.stderr.splitlines()) <= 6, result.stderr  # the retry warnings and PTB's one line


async def test_webhook_without_a_configured_secret_refuses_forged_updates(tmp_path, model_path):
    port = free_port()
    group = group_chat(-4242)
    async with TelegramEmulator(TOKEN) as emulator:
        environment = emulated_telegram_environment(
            emulator,
            tmp_path / "bot.db",
            model_path,
            WEBHOOK_URL="https://bot.example.org/telegram/hook",
            WEBHOOK_PORT=str(port),
        )
        async with bot_process(tmp_path, environment) as process:
            registered = await emulator.wait_for(lambda call: call.method == "setWebhook", timeout=300)
            secret = registered.params["secret_token"]
            assert re.fullmatch(r"[A-Za-z0-9_-]{32,256}", secret), "Telegram's allowed characters, hard to guess"
            url = f"http://127.0.0.1:{port}/telegram/hook"

            async def post(text: str, update_id: int, headers: dict[str, str]) -> int:
                message = emulator.message(group, ANONYMOUS_ADMIN, text, sender_chat=group)
                for _ in range(100):  # the server starts listening just after setWebhook
                    try:
                        async with session.post(
                            url, json={"update_id": update_id, "message": message}, headers=headers
                        ) as response:
                            return response.status
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
                raise AssertionError(f"nothing listens on {url}")

            async with aiohttp.ClientSession() as session:
                assert await post("/temperature 2", 1, {}) == 403
                assert await post("/temperature 2", 2, {"X-Telegram-Bot-Api-Secret-Token": "guessed"}) == 403
                genuine = {"X-Telegram-Bot-Api-Secret-Token": secret}
                assert await post("/temperature", 3, genuine) == 200
                shown = await emulator.wait_for(
                    lambda call: call.method == "sendMessage" and call.status == 200, timeout=120
                )
                assert "Temperature is 0.8" in shown.params["text"], "the forged updates changed nothing"
                assert await post("/temperature 2", 4, genuine) == 200
                since = emulator.calls.index(shown) + 1
                changed = await emulator.wait_for(lambda call: call.method == "sendMessage", since=since, timeout=120)
                assert changed.params["text"] == "Temperature set to 2."
            assert len(emulator.sent()) == 2
    output = (tmp_path / "bot.log").read_text()
    assert process.returncode == 0, output[-3000:]
    assert "Request did not include the secret token" in output  # python-telegram-bot's refusal, at DEBUG
    assert secret not in output, "the made-up secret is redacted from the logs like a configured one"


def test_a_model_path_that_is_a_directory_is_named_as_one(tmp_path):
    environment = bot_environment(tmp_path)  # MODEL_PATH is the folder itself
    line = assert_one_error_line(run_bot(tmp_path, environment, "generate", "--length", "20"), "is a directory")
    assert str(tmp_path) in line


def unreadable_file(tmp_path: Path) -> Path:
    """A regular file this process cannot open for reading: mode 000, or for root (who reads any such file)
    a write-only sysfs attribute, which even root cannot open to read."""
    path = tmp_path / "unreadable.onnx"
    path.write_bytes(b"\x08\x07")
    path.chmod(0)
    for candidate in [path, *sorted(Path("/sys/bus").glob("*/drivers_probe"))]:
        try:
            candidate.open("rb").close()
        except PermissionError:
            return candidate
    pytest.skip("no file here that this user cannot read")


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("unreadable", "cannot be read (Permission denied)"),
        ("too long", "is too long for this system (File name too long)"),
        ("/dev/zero", "is not a regular file (a character device)"),
        ("FIFO", "is not a regular file (a FIFO)"),
        ("checkpoint", "is a training checkpoint, not an ONNX model: export it with `python -m export "),
    ],
)
def test_a_model_file_that_cannot_be_served_is_named_in_one_line(tmp_path, tiny_checkpoint, command, kind, expected):
    if kind == "unreadable":
        model = unreadable_file(tmp_path)
    elif kind == "too long":
        model = Path("m" * 300 + ".onnx")  # longer than a file name may be (255 bytes on Linux)
    elif kind == "FIFO":
        model = tmp_path / "model.onnx"
        os.mkfifo(model)  # opening it to read would wait for a writer forever
    else:
        model = Path(kind) if kind == "/dev/zero" else tiny_checkpoint
    if command == "generate":
        result = run_bot(tmp_path, bot_environment(DEFAULT_MODEL_PATH), "generate", "--model", str(model))
    else:
        environment = bot_environment(model, TELEGRAM_BOT_TOKEN=TOKEN, LOG_LEVEL="WARNING")
        result = run_bot(tmp_path, environment, "run")
    line = assert_one_error_line(result, expected)
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(model)[:100] in line


def test_a_model_file_that_reads_the_bots_env_file_is_refused(tmp_path, tiny_onnx):
    """The attack of issue 24: a model whose decoder bias is the bytes of .env in the bot's working directory."""
    model = onnx.load(tiny_onnx)
    bias = next(tensor for tensor in model.graph.initializer if tensor.name == "net.decoder.bias")
    length = len(bias.raw_data)
    (tmp_path / ".env").write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\n# {'x' * length}\n")
    bias.ClearField("raw_data")
    bias.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": ".env", "offset": "0", "length": str(length)}.items():
        bias.external_data.add(key=key, value=value)
    (tmp_path / "crafted.onnx").write_bytes(model.SerializeToString())
    for args, environment in [
        (["generate", "--model", "crafted.onnx"], bot_environment(DEFAULT_MODEL_PATH)),
        (["run"], bot_environment(Path("crafted.onnx"), LOG_LEVEL="WARNING")),  # the token comes from .env
    ]:
        line = assert_one_error_line(run_bot(tmp_path, environment, *args), "crafted.onnx is refused: ")
        assert "tensor 'net.decoder.bias' keeps its data in another file ('.env')" in line, line


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("not UTF-8", "is not UTF-8 text (byte 18 is not valid)"),
        ("unreadable", "cannot be read (Permission denied)"),
    ],
)
def test_a_settings_file_that_cannot_be_read_is_named(tmp_path, kind, expected):
    dotenv = tmp_path / ".env"
    if kind == "unreadable":
        dotenv.symlink_to(unreadable_file(tmp_path))
    else:
        dotenv.write_bytes(b"DEFAULT_LENGTH=40\n\xff\xfeCOOLDOWN_SECONDS=0\n")
    line = assert_one_error_line(run_bot(tmp_path, bot_environment(DEFAULT_MODEL_PATH), "migrate"), expected)
    assert f"the settings file {dotenv}" in line, line
    assert not (tmp_path / "data").exists()
    dotenv.unlink()
    (tmp_path / ".env" / "bin").mkdir(parents=True)  # a virtualenv named .env is no settings file
    result = run_bot(tmp_path, bot_environment(DEFAULT_MODEL_PATH), "migrate")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["run", "healthcheck"])
def test_a_heartbeat_file_name_too_long_for_the_system_is_named(tmp_path, command):
    name = "h" * 300  # longer than a file name may be (255 bytes on Linux)
    environment = bot_environment(DEFAULT_MODEL_PATH, TELEGRAM_BOT_TOKEN=TOKEN, HEARTBEAT_FILE=name)
    result = run_bot(tmp_path, environment, command)
    line = assert_one_error_line(result, "(File name too long)")
    assert f"HEARTBEAT_FILE='{name[:50]}" in line
    assert result.stderr.count("\n") == 1, result.stderr


def test_the_console_with_stdin_closed_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bot", "console"],
        cwd=tmp_path,
        env=bot_environment(DEFAULT_MODEL_PATH),
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(0),  # the child closes its stdin, as `<&-` does
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_error_line(result, "stdin is closed")
    assert not (tmp_path / "data").exists(), "refused before the database was opened"
