"""A throwaway PostgreSQL server for tests and benches: the machine's server programs (found by
tests/support/postgres_bin.py), as the `postgres` user when run as root (initdb refuses root), on 127.0.0.1
with its data in a temporary folder. `restart()` stops and starts it on the same port, as an operator's
restart or a crash of the server would: every connection is cut and every session's locks are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.postgres_bin import find_postgres_bin, problem


class PostgresServer:
    def __init__(self, root: Path, port: int, postgres_bin: Path, as_postgres: list[str]):
        self.root, self.port = root, port
        self.data = root / "data"
        self._bin, self._as_postgres = postgres_bin, as_postgres
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"  # the maintenance database

    def pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as_postgres, str(self._bin / tool), *args], check=True, capture_output=True)

    def start(self) -> None:
        # fsync off: a test server's data need not survive a power cut, and syncing is most of its cost.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self.pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop (every connection cut, as `pg_ctl restart` does) and start again on the same port."""
        self.stop()
        self.start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A new server, running for the block; a missing installation raises RuntimeError saying what to install."""
    postgres_bin = find_postgres_bin()
    if (reason := problem(postgres_bin)) is not None:
        raise RuntimeError(f"{reason} (apt-get install postgresql, or set POSTGRES_BIN)")
    root = Path(tempfile.mkdtemp(prefix="speechbot-postgres-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(root, free_port(), postgres_bin, as_postgres)
    server.pg("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
