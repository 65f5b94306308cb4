"""Fresh databases on the test PostgreSQL server that tests/conftest.py starts."""

from __future__ import annotations

import itertools
import os

from sqlalchemy import create_engine, text

_database_names = itertools.count()


def new_postgres_database(server_url: str) -> str:
    name = f"test_{os.getpid()}_{next(_database_names)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
