"""Shared fixtures: a tiny LSTM trained briefly on a tiny corpus and its exports, and the databases.

`database_url` runs a test on SQLite and on a real PostgreSQL server, which one session fixture starts
from the machine's PostgreSQL programs (found by tests/postgres_bin.py; as the `postgres` user when
tests run as root, since initdb refuses root), on 127.0.0.1 with its data in a temporary folder; every
test gets a database of its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from bot.inference.engine import GenerationEngine
from export.pipeline import export_checkpoint
from tests.support.databases import new_postgres_database
from tests.support.postgres_bin import find_postgres_bin, problem
from tests.support.tiny_model import TINY_CORPUS, train_tiny

torch.set_num_threads(1)

# Registered here, before any test module imports it, so that pytest rewrites its asserts too.
pytest_plugins = ["tests.support.bot_harness"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    (root / "corpus.txt").write_text(TINY_CORPUS, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir) -> Path:
    return train_tiny(tiny_dir / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tiny_checkpoint) -> Path:
    export_checkpoint(tiny_checkpoint, tiny_dir / "tiny.onnx", "fp32", str(tiny_dir / "corpus.txt"))
    return tiny_dir / "tiny.onnx"


@pytest.fixture(scope="session")
def tiny_int8(tiny_dir, tiny_checkpoint) -> Path:
    export_checkpoint(tiny_checkpoint, tiny_dir / "tiny-int8.onnx", "int8", str(tiny_dir / "corpus.txt"))
    return tiny_dir / "tiny-int8.onnx"


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, tiny_onnx, tiny_int8):
    path = tiny_onnx if request.param == "fp32" else tiny_int8
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=64, lanes=1) as eng:
        yield eng


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server; yields the URL of its maintenance database."""
    postgres_bin = find_postgres_bin()
    if (reason := problem(postgres_bin)) is not None:
        pytest.fail(f"{reason} (apt-get install postgresql, or set POSTGRES_BIN)")
    root = Path(tempfile.mkdtemp(prefix="speechbot-postgres-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_postgres, str(postgres_bin / tool), *args], check=True, capture_output=True)

    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
    # fsync off: a test server's data need not survive a power cut, and syncing is most of its cost.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
    pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bot.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
