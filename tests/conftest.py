"""Shared fixtures: a tiny LSTM trained briefly on a tiny corpus and its exports, and the databases.

`database_url` runs a test on SQLite and on a real PostgreSQL server, which one session fixture starts
from the machine's PostgreSQL programs (found by tests/postgres_bin.py; as the `postgres` user when
tests run as root, since initdb refuses root), on 127.0.0.1 with its data in a temporary folder; every
test gets a database of its own.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from postgres_bin import find_postgres_bin, problem
from sqlalchemy import create_engine, text

from export.pipeline import export_checkpoint
from model.checkpoint import Checkpoint
from model.model import CharRNN, ModelConfig
from model.text import CleaningOptions, Vocab, clean_text

torch.set_num_threads(1)

# Registered here, before any test module imports it, so that pytest rewrites its asserts too.
pytest_plugins = ["bot_harness"]

TINY_CORPUS = (
    "SPEECH 1\nThank you very much. We are going to make America great again! (APPLAUSE)\n"
    "We will win so much, you'll get tired of winning. Believe me, folks. Who pays for the wall? Mexico.\n"
    "Our jobs are leaving; our trade deals are terrible. It’s true. We're going to bring them back.\n"
) * 8


def train_tiny(
    path: Path,
    text: str = TINY_CORPUS,
    model_type: str = "lstm",
    iterations: int = 80,
    seed: int = 0,
    rnn_size: int = 16,
) -> Path:
    """A 2x16 network trained for a few iterations with plain torch, saved as a real checkpoint."""
    cleaning = CleaningOptions()
    cleaned = clean_text(text, cleaning)
    vocab = Vocab.from_text(cleaned)
    ids = torch.tensor(vocab.encode(cleaned))
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(vocab), model_type=model_type, rnn_size=rnn_size, num_layers=2, wordvec_size=8)
    net = CharRNN(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    seq = 32
    for _ in range(iterations):
        starts = torch.randint(0, len(ids) - seq - 1, (8,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        logits, _ = net(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    Checkpoint(
        model_config=config.to_dict(),
        model=net.state_dict(),
        vocab=vocab.chars,
        unknown_policy=vocab.unknown_policy,
        cleaning=cleaning.to_dict(),
        dataset_sha256=[hashlib.sha256(text.encode("utf-8")).hexdigest()],  # as if prepared from the text's file
        val_bpc=loss.item() / math.log(2),
        iteration=iterations,
    ).save(path)
    return path


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


_database_names = itertools.count()


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


def new_postgres_database(server_url: str) -> str:
    name = f"test_{os.getpid()}_{next(_database_names)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bot.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
