"""Configuration from the environment and .env: defaults, precedence and one-line errors."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

from bot.config import VARIABLES, Config, ConfigError
from bot.heartbeat import HeartbeatError, check_writable
from bot.inference.modelfile import DEFAULT_MODEL_PATHS

TOKEN = "123456789:AAFakeTokenForTestsOnly_abcdefghijkl"


def test_defaults_without_anything(tmp_path):
    config = Config.from_env({}, dotenv_path=tmp_path / "missing.env")
    assert config.database_url == "sqlite:///data/bot.db"
    assert config.model_paths == DEFAULT_MODEL_PATHS
    assert (config.onnx_providers, config.log_level, config.webhook_url) == ("auto", "INFO", None)
    assert config.telegram_messages_per_second == 30, "Telegram's documented overall limit"
    with pytest.raises(ConfigError, match=r"TELEGRAM_BOT_TOKEN is not set.*@BotFather"):
        config.require_token()


def test_dotenv_is_read_and_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        f"TELEGRAM_BOT_TOKEN={TOKEN}\nLOG_LEVEL=debug\nONNX_PROVIDERS=CPU\nDEFAULT_LENGTH=300\n"
        "TELEGRAM_MESSAGES_PER_SECOND=1000\n"
    )
    config = Config.from_env({"DEFAULT_LENGTH": "120", "MODEL_PATH": "m.onnx"}, dotenv_path=dotenv)
    assert config.require_token() == TOKEN
    assert (config.log_level, config.onnx_providers, config.default_length) == ("DEBUG", "cpu", 120)
    assert config.model_paths == (Path("m.onnx"),)
    assert config.telegram_messages_per_second == 1000


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("TELEGRAM_BOT_TOKEN", "not-a-token", "does not look like a bot token"),
        ("ONNX_PROVIDERS", "tpu", "use one of: auto, cpu, cuda"),
        ("LOG_LEVEL", "loud", "use one of: DEBUG"),
        ("WEBHOOK_PORT", "http", "not an integer; use at least 1 and at most 65535"),
        ("WEBHOOK_PORT", "70000", "out of range"),
        ("WEBHOOK_URL", "http://example.com/hook", "starting with https://"),
        ("WEBHOOK_SECRET", "has spaces", "WEBHOOK_SECRET is not valid"),
        ("TELEGRAM_API_BASE_URL", "localhost:8081", "starting with http:// or https://"),
        ("DEFAULT_TEMPERATURE", "0", "use at least 0.001 and at most 2.0"),
        ("DEFAULT_TEMPERATURE", "1e-320", "out of range"),  # 0 in float32: every speech would be empty
        ("DEFAULT_TEMPERATURE", "nan", "out of range"),
        ("DEFAULT_LENGTH", "1e309", "not an integer"),
        ("COOLDOWN_SECONDS", "-1", "out of range"),
        ("ONNX_THREADS", "0", "out of range"),
        ("ONNX_LANES", "9", "out of range"),
        ("ONNX_INT8_WEIGHTS", "int4", "use one of: auto, int8, uint8"),
        ("TELEGRAM_MESSAGES_PER_SECOND", "0.5", "use at least 1 and at most 100000"),
        ("TELEGRAM_MESSAGES_PER_SECOND", "fast", "not a number"),
        ("WEBHOOK_LISTEN", "everywhere", "is not an IP address; use 127.0.0.1"),
    ],
)
def test_invalid_values_name_the_variable_and_the_valid_form(tmp_path, name, value, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        Config.from_env({name: value}, dotenv_path=tmp_path / "none")
    assert name in str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_token_is_never_echoed(tmp_path):
    secret = "123:" + "x" * 10 + " oops"
    with pytest.raises(ConfigError) as error:
        Config.from_env({"TELEGRAM_BOT_TOKEN": secret}, dotenv_path=tmp_path / "none")
    assert secret not in str(error.value)


def test_webhook_mode_always_has_a_secret_and_listens_on_loopback_by_default(tmp_path):
    hook = {"WEBHOOK_URL": "https://bot.example.org/hook"}
    first, second = (Config.from_env(hook, dotenv_path=tmp_path / "none") for _ in range(2))
    assert first.webhook_secret and second.webhook_secret and first.webhook_secret != second.webhook_secret
    assert len(first.webhook_secret) >= 32
    assert first.webhook_listen == "127.0.0.1"
    configured = Config.from_env(
        hook | {"WEBHOOK_SECRET": "mine", "WEBHOOK_LISTEN": "::"}, dotenv_path=tmp_path / "none"
    )
    assert (configured.webhook_secret, configured.webhook_listen) == ("mine", "::")
    assert Config.from_env({}, dotenv_path=tmp_path / "none").webhook_secret is None, "long polling needs none"


def test_the_heartbeat_check_leaves_no_fresh_heartbeat_behind(tmp_path):
    missing = tmp_path / "heartbeat"
    check_writable(missing)
    assert not missing.exists(), "a file made by the check would look like a beat"
    old = tmp_path / "old-heartbeat"
    old.write_text("0\n")
    os.utime(old, (1000, 1000))
    check_writable(old)
    assert old.stat().st_mtime == 1000
    for bad in (tmp_path / "no" / "heartbeat", tmp_path):
        with pytest.raises(HeartbeatError, match=r"HEARTBEAT_FILE=.* cannot be written"):
            check_writable(bad)


def test_every_variable_read_is_described_for_help():
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', inspect.getsource(Config.from_env)))
    assert read | {"TELEGRAM_BOT_TOKEN"} == set(VARIABLES)  # the token's name is in _Reader.token
