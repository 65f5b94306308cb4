"""compose.yaml parses and agrees with the image it runs: the variables the bot reads (bot.config.VARIABLES),
the Dockerfile's /data volume and HEALTHCHECK, its PostgreSQL driver, and a DATABASE_URL the bot accepts
pointing at the compose file's own PostgreSQL service."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from bot.config import VARIABLES
from db.database import create_db_engine

ROOT = Path(__file__).resolve().parent.parent
# ${NAME}, ${NAME:-default}, ${NAME:?error}: the forms of Compose's interpolation this file uses.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
PASSWORD = "0123abcd"


def interpolated(text: str, values: dict[str, str]) -> str:
    return INTERPOLATION.sub(lambda match: values[match.group(1)], text)


@pytest.fixture(scope="module")
def compose() -> dict:
    text = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    assert set(INTERPOLATION.findall(text)) == {"POSTGRES_PASSWORD"}, "every variable it needs comes from .env"
    return yaml.safe_load(interpolated(text, {"POSTGRES_PASSWORD": PASSWORD}))


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, str]:
    """The Dockerfile's instructions by keyword, each on one line (continuations joined)."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    instructions: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions[keyword] = instructions.get(keyword, "") + " " + rest.strip()
    return instructions


def environment(service: dict) -> dict[str, str]:
    values = service.get("environment", {})
    if isinstance(values, list):  # the `- NAME=value` form
        values = dict(item.split("=", 1) for item in values)
    return {name: str(value) for name, value in values.items()}


def test_the_bot_reads_only_variables_it_knows_and_its_token_from_an_env_file(compose):
    bot = compose["services"]["bot"]
    assert set(environment(bot)) <= set(VARIABLES), set(environment(bot)) - set(VARIABLES)
    assert bot["env_file"] in (".env", [".env"]), "TELEGRAM_BOT_TOKEN comes from .env, never from the file"
    assert "TELEGRAM_BOT_TOKEN" not in environment(bot)
    assert bot["build"] in (".", {"context": "."}), "the image is the repository's Dockerfile"


def test_the_bot_keeps_the_images_data_volume(compose, dockerfile):
    volume = dockerfile["VOLUME"].strip()
    mounts = [mount.split(":") for mount in compose["services"]["bot"]["volumes"]]
    assert [name for name, target in mounts if target == volume], f"nothing mounted at the image's {volume}"
    for name, _target in mounts:
        assert name in compose["volumes"], f"{name} is a named volume, declared at the top"


def test_the_bot_is_checked_as_the_image_checks_it(compose, dockerfile):
    options, _, command = dockerfile["HEALTHCHECK"].strip().partition(" CMD ")
    image_check = dict(option.removeprefix("--").split("=") for option in shlex.split(options))
    check = compose["services"]["bot"]["healthcheck"]
    assert check["test"] == ["CMD", *json.loads(command)]
    assert {name.replace("-", "_"): value for name, value in image_check.items()} == {
        name: str(value) for name, value in check.items() if name != "test"
    }


def test_the_bot_talks_to_the_compose_files_postgresql_as_the_bot_accepts_it(compose, dockerfile):
    bot, postgres = compose["services"]["bot"], compose["services"]["postgres"]
    engine = create_db_engine(environment(bot)["DATABASE_URL"])  # the bot's own URL check and driver
    url, server = engine.url, environment(postgres)
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    assert url.host in compose["services"] and url.host == "postgres"
    assert (url.username, url.password, url.database) == (
        server["POSTGRES_USER"],
        server["POSTGRES_PASSWORD"],
        server["POSTGRES_DB"],
    )
    assert url.password == PASSWORD, "one password, from .env, on both sides"
    engine.dispose()
    assert "'.[postgres]'" in dockerfile["RUN"], "the image has the PostgreSQL driver (the postgres extra)"
    assert bot["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_postgresql_keeps_its_data_in_a_volume_and_says_when_it_is_ready(compose):
    postgres = compose["services"]["postgres"]
    name, target = postgres["volumes"][0].split(":")
    assert target == "/var/lib/postgresql/data" and name in compose["volumes"]
    check = postgres["healthcheck"]["test"]
    server = environment(postgres)
    assert check[:2] == ["CMD", "pg_isready"]
    assert f"--username={server['POSTGRES_USER']}" in check and f"--dbname={server['POSTGRES_DB']}" in check
