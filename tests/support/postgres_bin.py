"""Where this machine's PostgreSQL server programs (initdb, pg_ctl) are, for the tests' throwaway server.

Looked for in this order: `POSTGRES_BIN`; `pg_config --bindir`; the newest version under
/usr/lib/postgresql (Debian and Ubuntu install each major version there, 15 on Debian 12, 17 on
Debian 13, 16 on Ubuntu 24.04, and can hold several); `pg_ctl` on PATH (Fedora, Arch, Homebrew).
A folder counts only if it holds both programs: Debian's pg_config comes with libpq-dev and names
the folder of libpq's version, which need not have a server in it.

Standard library only, so CI can ask before any virtual environment exists:
`python3 tests/postgres_bin.py` prints the folder, or exits 1 if there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_PROGRAMS = ("initdb", "pg_ctl")
WHERE_LOOKED = "POSTGRES_BIN, pg_config --bindir, /usr/lib/postgresql/*/bin, pg_ctl on PATH"


def has_server(folder: Path) -> bool:
    return all((folder / program).is_file() for program in SERVER_PROGRAMS)


def _version(name: str) -> tuple[int, ...] | None:
    """9.6 -> (9, 6), 17 -> (17,); None for a folder that is not a version."""
    parts = name.split(".")
    return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else None


def _pg_config_bindir(path: str) -> Path | None:
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        answer = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(answer.stdout.strip())


def find_postgres_bin(environ: Mapping[str, str] = os.environ, debian_root: Path = DEBIAN_ROOT) -> Path | None:
    """The folder holding initdb and pg_ctl, or None. POSTGRES_BIN is taken as given, checked or not."""
    if environ.get("POSTGRES_BIN"):
        return Path(environ["POSTGRES_BIN"])
    path = environ.get("PATH", os.defpath)
    bindir = _pg_config_bindir(path)
    if bindir is not None and has_server(bindir):
        return bindir
    if debian_root.is_dir():
        versions = [(v, folder / "bin") for folder in debian_root.iterdir() if (v := _version(folder.name)) is not None]
        for _version_number, folder in sorted(versions, reverse=True):
            if has_server(folder):
                return folder
    pg_ctl = shutil.which("pg_ctl", path=path)
    if pg_ctl is not None and has_server(folder := Path(pg_ctl).resolve().parent):
        return folder
    return None


def problem(found: Path | None) -> str | None:
    """Why `found` (find_postgres_bin's answer) cannot start a server, or None if it can."""
    if found is None:
        return f"no PostgreSQL server programs found (looked at {WHERE_LOOKED})"
    if not has_server(found):
        return f"POSTGRES_BIN={found} holds no {' and '.join(SERVER_PROGRAMS)}; name the folder that does"
    return None


if __name__ == "__main__":
    found = find_postgres_bin()
    if (reason := problem(found)) is not None:
        print(reason, file=sys.stderr)
        sys.exit(1)
    print(found)
