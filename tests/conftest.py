"""Shared fixtures: a tiny LSTM trained briefly on a tiny corpus and its exports, and the databases.

`database_url` runs a test on SQLite and on a real PostgreSQL server, which one session fixture starts
from the machine's PostgreSQL programs (tests/support/postgres_server.py: found by postgres_bin.py; as
the `postgres` user when tests run as root, since initdb refuses root), on 127.0.0.1 with its data in a
temporary folder; every test gets a database of its own. A test that restarts PostgreSQL gets a server of
its own (`restartable_postgres`), so the others are not disturbed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.inference.engine import GenerationEngine
from export.pipeline import export_checkpoint
from tests.support.databases import new_postgres_database
from tests.support.postgres_server import postgres_server as postgres_server_running
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


# The second voice's whole corpus: owls, whose few letters show what it wrote (tests/test_voices.py).
HOOTING_CORPUS = "Boo! Woo. Bow wow, boo hoo. Oh wow! Hoo hoo.\n" * 40


@pytest.fixture(scope="session")
def hooting_voice(tiny_dir) -> Path:
    """A second voice: a tiny network of HOOTING_CORPUS, exported with a voice name and description (the
    first, tiny_int8, has none: its file name names it)."""
    corpus = tiny_dir / "hooting.txt"
    corpus.write_text(HOOTING_CORPUS, encoding="utf-8")
    checkpoint = train_tiny(tiny_dir / "hooting.pt", text=HOOTING_CORPUS, seed=1)
    path = tiny_dir / "voices" / "hooting.onnx"
    path.parent.mkdir()
    export_checkpoint(checkpoint, path, "int8", str(corpus), voice_name="hoot", voice_description="Owls only.")
    return path


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, tiny_onnx, tiny_int8):
    path = tiny_onnx if request.param == "fp32" else tiny_int8
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=64, lanes=1) as eng:
        yield eng


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server shared by the session; yields the URL of its maintenance database."""
    try:
        with postgres_server_running() as server:
            yield server.url
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture
def restartable_postgres():
    """A PostgreSQL server of the test's own, which it may restart (tests/support/postgres_server.py)."""
    try:
        with postgres_server_running() as server:
            yield server
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bot.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
