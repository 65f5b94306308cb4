"""Real `python -m bot` subprocesses given broken files and settings: one `error:` line, never a traceback.

Also the webhook: with no WEBHOOK_SECRET configured the bot makes one up, registers it with setWebhook,
and its server refuses forged updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
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
    free_port,
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


def webhook_environment(emulator: TelegramEmulator, folder: Path, model_path: Path, port: int, **settings) -> dict:
    """`python -m bot run` in webhook mode on 127.0.0.1:`port`, logging at DEBUG unless `settings` say otherwise."""
    environment = emulated_telegram_environment(
        emulator, folder / "bot.db", model_path, WEBHOOK_URL="https://bot.example.org/telegram/hook"
    )
    return environment | {"WEBHOOK_PORT": str(port)} | settings


async def test_webhook_without_a_configured_secret_refuses_forged_updates(tmp_path, model_path):
    port = free_port()
    group = group_chat(-4242)
    async with TelegramEmulator(TOKEN) as emulator:
        environment = webhook_environment(emulator, tmp_path, model_path, port)
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
    assert "Refused a webhook request from 127.0.0.1 without the secret token" in output  # at DEBUG
    assert secret not in output, "the made-up secret is redacted from the logs like a configured one"


def test_a_model_path_folder_without_models_is_named_as_one(tmp_path):
    environment = bot_environment(tmp_path)  # MODEL_PATH is a folder (of voices) with no model in it
    result = run_bot(tmp_path, environment, "generate", "--length", "20")
    line = assert_one_error_line(result, "which holds no .onnx model files")
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


@pytest.mark.parametrize(("fault", "reason"), [("unauthorized", "Unauthorized"), ("not found", "Not Found")])
async def test_a_token_rejected_while_polling_ends_the_bot_with_one_error_line(tmp_path, fault, reason):
    """A token revoked with @BotFather (401) or a deleted bot (404): PTB's polling loop ends for good on it."""
    heartbeat = tmp_path / "heartbeat"
    async with TelegramEmulator(TOKEN) as emulator:
        database = f"sqlite:///{tmp_path / 'bot.db'}"
        async with killable_bot(emulator, database, tmp_path, HEARTBEAT_FILE=str(heartbeat)) as bot:
            for _ in range(2):  # a few good polls
                assert "/schedule" in await emulator.ask(private_chat(ALICE), ALICE, "/help", timeout=60)
            assert heartbeat.exists()
            emulator.inject("getUpdates", fault, times=1000)
            emulator.send_text(private_chat(ALICE), ALICE, "/help")  # ends the long poll in progress
            code = await asyncio.wait_for(bot.process.wait(), 60)  # a safety net: it exits at once
    output = bot.log.read_text()
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [output.strip().splitlines()[-1]], output[-3000:]
    assert f"Telegram rejected TELEGRAM_BOT_TOKEN while the bot was running ({reason})" in errors[0]
    assert "@BotFather" in errors[0] and TOKEN not in output
    assert not heartbeat.exists(), "no heartbeat, so the healthcheck fails at once"
    rejected = [call for call in emulator.calls if call.failure == fault]
    assert len(rejected) <= 2, "polling stopped (the last call marks fetched updates read)"


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024


def post_body(port: int, size: int, headers: dict[str, str]) -> tuple[int, int]:
    """POST `size` bytes to the webhook, reading whenever the answer comes; returns its status and the bytes
    sent before it came (all of them for a server that reads a body before looking at it).

    A plain socket, as curl's: a server that answers without reading closes a connection with data unread,
    which resets it, and only a client that reads what arrived before the reset sees the answer.
    """
    head = {"Host": "bot.example.org", "Content-Type": "application/json", "Content-Length": str(size)} | headers
    lines = ["POST /telegram/hook HTTP/1.1", *(f"{name}: {value}" for name, value in head.items()), "", ""]
    sent, chunk, answer = 0, b" " * (1 << 16), b""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall("\r\n".join(lines).encode())
        connection.setblocking(False)
        while b"\r\n" not in answer:
            sending = [connection] if sent < size else []
            readable, writable, _ = select.select([connection], sending, [], 120)  # a safety net
            assert readable or writable, "no answer in 120 s"
            if readable:
                answer += connection.recv(4096) or b"closed without an answer\r\n"
            else:
                try:
                    sent += connection.send(chunk[: size - sent])
                except (BrokenPipeError, ConnectionResetError):
                    size = sent  # the server closed; what it answered before is still to be read
    return int(answer.split()[1]), sent


async def post_update(port: int, update: dict, secret: str) -> int:
    url = f"http://127.0.0.1:{port}/telegram/hook"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as response,
    ):
        return response.status


async def test_large_webhook_posts_are_refused_unread(tmp_path, model_path):
    """Issue 26: six unauthenticated 90 MB posts took the process from 175 MB to 607 MB."""
    port, secret, size = free_port(), "s3cret-Value", 90 * 1024 * 1024
    async with TelegramEmulator(TOKEN) as emulator:
        environment = webhook_environment(emulator, tmp_path, model_path, port, WEBHOOK_SECRET=secret, LOG_LEVEL="INFO")
        async with bot_process(tmp_path, environment) as process:
            await emulator.wait_for(lambda call: call.method == "setWebhook", timeout=300)
            for _ in range(100):  # the server starts listening just after setWebhook
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    assert await post_update(port, {}, "guessed") == 403
                    break
                await asyncio.sleep(0.1)
            before = resident_mib(process.pid)
            for _ in range(6):
                status, let_through = await asyncio.to_thread(post_body, port, size, {})
                assert status == 403 and let_through < 8 * 1024 * 1024, (status, let_through)
            genuine = {"X-Telegram-Bot-Api-Secret-Token": secret}
            status, let_through = await asyncio.to_thread(post_body, port, size, genuine)
            assert status == 413 and let_through < 8 * 1024 * 1024, (status, let_through)
            grown = resident_mib(process.pid) - before
            assert grown < 30, f"the bot grew by {grown:.0f} MiB"
            message = emulator.message(private_chat(ALICE), ALICE, "/temperature")
            assert await post_update(port, {"update_id": 1, "message": message}, secret) == 200
            shown = await emulator.wait_for(lambda call: call.method == "sendMessage", timeout=120)
            assert "Temperature is" in shown.params["text"], "updates of the usual size still come in"
    assert process.returncode == 0
