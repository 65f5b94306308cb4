"""Two real `python -m bot run` replicas in webhook mode behind a real nginx on 127.0.0.1, on one PostgreSQL
database, fed by the Bot API emulator through the proxy as Telegram would feed them (docs/operations.md, "Two
replicas behind a reverse proxy"); and bursts of /speech requests to them, with each request's answers.

nginx runs from its own configuration in a temporary folder, on ports of its own, in the foreground as a child
of the test: no system service is used or touched. Its upstream block is the one docs/operations.md shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.bot_harness import private_chat
from tests.support.bot_process import BotProcess, killable_bot
from tests.support.postgres_server import free_port
from tests.support.telegram_emulator import Call, TelegramEmulator

HOOK_PATH = "/telegram/hook"
PUBLIC_URL = f"https://bot.example.org{HOOK_PATH}"  # what the replicas register; the emulator posts to the proxy
SECRET = "replica-test-secret_0123456789"
WHERE_NGINX = ("nginx on PATH", "/usr/sbin/nginx")

NGINX_CONFIG = """\
daemon off;
worker_processes 1;
{user}pid {folder}/nginx.pid;
error_log {folder}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream speechbot {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location {path} {{
            proxy_pass http://speechbot;
            # A replica that refuses the connection is skipped; a request it already took is not resent.
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""


def find_nginx() -> Path | None:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    return None if found is None else Path(found)


async def _until_listening(port: int, process: asyncio.subprocess.Process, log: Path, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}: {log.read_text(errors='replace')}")
            with contextlib.suppress(OSError):
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def nginx_proxy(folder: Path, upstream_ports: list[int]) -> AsyncIterator[str]:
    """nginx on a free port of 127.0.0.1 in front of `upstream_ports`; yields the URL it serves the hook at."""
    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError(f"no nginx found (looked at {', '.join(WHERE_NGINX)}); apt-get install nginx-light")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in upstream_ports)
    # As root, nginx's worker would run as `nobody`, who cannot use the test's private folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = folder / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(user=user, folder=folder, servers=servers, port=port, path=HOOK_PATH))
    log = folder / "error.log"
    process = await asyncio.create_subprocess_exec(
        str(nginx), "-p", str(folder), "-c", str(config), "-e", str(log), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await _until_listening(port, process, log)
        yield f"http://127.0.0.1:{port}{HOOK_PATH}"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@dataclass
class Replicas:
    emulator: TelegramEmulator
    processes: dict[str, BotProcess]
    proxy_url: str


@contextlib.asynccontextmanager
async def replicas_behind_nginx(
    emulator: TelegramEmulator,
    database_url: str,
    folder: Path,
    model: Path,
    names: tuple[str, ...] = ("a", "b"),
    **environment: str,
) -> AsyncIterator[Replicas]:
    """`python -m bot run` per name, each its own webhook port, behind one nginx; the emulator posts there."""
    ports = {name: free_port() for name in names}
    async with contextlib.AsyncExitStack() as stack:
        proxy_url = await stack.enter_async_context(nginx_proxy(folder / "nginx", list(ports.values())))
        emulator.deliver_to = proxy_url

        async def start(name: str) -> BotProcess:
            settings = {
                "WEBHOOK_URL": PUBLIC_URL,
                "WEBHOOK_LISTEN": "127.0.0.1",
                "WEBHOOK_PORT": str(ports[name]),
                "WEBHOOK_SECRET": SECRET,
                "LOG_LEVEL": "DEBUG",
            } | environment
            return await stack.enter_async_context(
                killable_bot(emulator, database_url, folder, name=name, model=model, via=name, **settings)
            )

        # One after the other: each start loads a model and migrates, and two at once on two cores gain little.
        processes = {name: await start(name) for name in names}
        yield Replicas(emulator, processes, proxy_url)


@dataclass
class Request:
    """One /speech a user sent: its message and update id."""

    chat: dict
    message: dict
    update_id: int


def users(count: int, first_id: int = 7000) -> list[dict]:
    return [{"id": first_id + number, "is_bot": False, "first_name": f"User{number}"} for number in range(count)]


def burst(emulator: TelegramEmulator, senders: list[dict], text: str = "/speech") -> list[Request]:
    """Each of `senders` sends `text` in its private chat, all at once."""
    requests = []
    for user in senders:
        chat = private_chat(user)
        message = emulator.message(chat, user, text)
        requests.append(Request(chat, message, emulator.push_update({"message": message})))
    return requests


def answers(emulator: TelegramEmulator) -> dict[int, list[Call]]:
    """The replies Telegram accepted (status 200), by the message id they quote, from every replica."""
    replies: dict[int, list[Call]] = {}
    for call in emulator.calls:
        if call.method == "sendMessage" and call.status == 200:
            quoted = call.params.get("reply_parameters", {}).get("message_id")
            if quoted is not None:
                replies.setdefault(quoted, []).append(call)
    return replies


async def all_answered(emulator: TelegramEmulator, requests: list[Request], timeout: float) -> dict[int, list[Call]]:
    """Wait until every request has a reply; returns answers(). TimeoutError names the requests with none."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                replies = answers(emulator)
                if all(request.message["message_id"] in replies for request in requests):
                    return replies
                await asyncio.sleep(0.1)
    except TimeoutError:
        replies = answers(emulator)
        missing = [request.update_id for request in requests if request.message["message_id"] not in replies]
        raise TimeoutError(
            f"{len(missing)} of {len(requests)} requests unanswered after {timeout} s: {missing}"
        ) from None
