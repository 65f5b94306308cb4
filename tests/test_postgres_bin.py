"""The tests' PostgreSQL server is found wherever the machine's packages put it, not only at Debian 12's
/usr/lib/postgresql/15/bin (Debian 13 has 17, Ubuntu 24.04 16)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postgres_bin import SERVER_PROGRAMS, find_postgres_bin, has_server

TESTS = Path(__file__).resolve().parent


def install(root: Path, version: str, programs: tuple[str, ...] = SERVER_PROGRAMS) -> Path:
    """A /usr/lib/postgresql/<version>/bin as Debian's packages leave it (client-only versions lack the server)."""
    folder = root / version / "bin"
    folder.mkdir(parents=True)
    for program in programs:
        (folder / program).write_text("")
    return folder


def test_the_newest_version_with_a_server_is_chosen(tmp_path):
    root = tmp_path / "postgresql"
    install(root, "9.6")
    install(root, "15")
    newest_server = install(root, "16")
    install(root, "17", programs=("psql", "pg_dump"))  # postgresql-client-17 alone
    (root / "common").mkdir()
    no_pg_config = {"PATH": str(tmp_path / "empty")}
    assert find_postgres_bin(no_pg_config, debian_root=root) == newest_server
    assert find_postgres_bin(no_pg_config | {"POSTGRES_BIN": "/opt/pg/bin"}, debian_root=root) == Path("/opt/pg/bin")
    assert find_postgres_bin(no_pg_config, debian_root=tmp_path / "none") is None


@pytest.mark.skipif(shutil.which("pg_config") is None, reason="no pg_config on this machine")
def test_pg_config_is_asked_first(tmp_path):
    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    if not has_server(bindir):
        pytest.skip(f"this machine's pg_config names {bindir}, which holds no server")
    install(tmp_path / "postgresql", "99")
    assert find_postgres_bin({"PATH": str(Path(shutil.which("pg_config")).parent)}, tmp_path / "postgresql") == bindir


def test_ci_asks_the_same_question_before_any_virtual_environment_exists():
    found = subprocess.run([sys.executable, str(TESTS / "support" / "postgres_bin.py")], capture_output=True, text=True)
    if found.returncode == 0:
        assert has_server(Path(found.stdout.strip()))
    else:
        assert found.stderr.startswith("no PostgreSQL server programs found"), found.stderr
    wrong = subprocess.run(
        [sys.executable, str(TESTS / "support" / "postgres_bin.py")],
        capture_output=True,
        text=True,
        env={"POSTGRES_BIN": "/nope"},
    )
    assert wrong.returncode == 1
    assert wrong.stderr == "POSTGRES_BIN=/nope holds no initdb and pg_ctl; name the folder that does\n"
    assert "tests/support/postgres_bin.py" in (TESTS.parent / ".ci" / "run").read_text(encoding="utf-8")
