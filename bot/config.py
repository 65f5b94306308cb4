"""Settings from environment variables and an optional .env file, checked once at start.

Every problem becomes a ConfigError whose message names the variable, what it was and what is
valid, so `python -m bot` can print one line and exit with code 2.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values

from bot.heartbeat import HEARTBEAT_SECONDS
from bot.inference.api import INT8_WEIGHT_CHOICES, MAX_LANES, PROVIDER_CHOICES
from bot.inference.modelfile import DEFAULT_MODEL_PATHS, is_cuda_twin
from model.sampling import BOT_SAMPLING, TEMPERATURE_MAX, TEMPERATURE_MIN, TEMPERATURE_RANGE

TOKEN_FORMAT = re.compile(r"^\d+:[A-Za-z0-9_-]{20,}$")
WEBHOOK_SECRET_FORMAT = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Telegram's documented overall flood limit; paid broadcasts or a local Bot API server allow more.
TELEGRAM_MESSAGES_PER_SECOND = 30.0
WEBHOOK_SECRET_DESCRIPTION = "1-256 of A-Z a-z 0-9 _ -"

# Bounds that the commands and the configuration share (sampling's: model.sampling).
LENGTH_MIN, LENGTH_MAX = 20, 3000


class ConfigError(ValueError):
    """A missing or invalid setting."""


@dataclass(frozen=True)
class Config:
    telegram_bot_token: str | None = None
    telegram_api_base_url: str | None = None
    telegram_messages_per_second: float = TELEGRAM_MESSAGES_PER_SECOND
    database_url: str = "sqlite:///data/bot.db"
    model_paths: tuple[Path, ...] = DEFAULT_MODEL_PATHS  # one voice each, the default first
    onnx_providers: str = "auto"
    onnx_threads: int | None = None
    onnx_lanes: int | None = None
    onnx_int8_weights: str = "auto"
    log_level: str = "INFO"
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    webhook_secret: str | None = None
    default_temperature: float = BOT_SAMPLING.temperature
    default_length: int = 500
    cooldown_seconds: float = 10.0
    missed_post_grace_minutes: float = 60.0
    heartbeat_file: Path | None = None
    metrics_port: int | None = None  # None: no /metrics endpoint
    metrics_listen: str = "127.0.0.1"
    inbox_sweep_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.webhook_url and not self.webhook_secret:
            # Telegram echoes the secret in every update it posts; without one, anyone who can reach the
            # port could post forged updates (an "anonymous admin" changing a group's settings, say).
            object.__setattr__(self, "webhook_secret", secrets.token_urlsafe(32))
        if self.webhook_url and self.metrics_port == self.webhook_port:
            raise ConfigError(
                f"METRICS_PORT={self.metrics_port} is WEBHOOK_PORT too; give the metrics endpoint a port of its own, "
                "e.g. METRICS_PORT=9464"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | Path = ".env") -> Config:
        """Read settings; variables in the environment win over the same names in `dotenv_path`."""
        values = _read_dotenv(Path(dotenv_path))
        values.update(os.environ if environ is None else environ)
        reader = _Reader({key: value.strip() for key, value in values.items() if value.strip()})
        return cls(
            telegram_bot_token=reader.token(),
            telegram_api_base_url=reader.url("TELEGRAM_API_BASE_URL", schemes=("http", "https")),
            telegram_messages_per_second=reader.number(
                "TELEGRAM_MESSAGES_PER_SECOND", cls.telegram_messages_per_second, float, low=1, high=100_000
            ),
            database_url=reader.text("DATABASE_URL", cls.database_url),
            model_paths=model_files(raw) if (raw := reader.text("MODEL_PATH", "")) else cls.model_paths,
            onnx_providers=reader.choice("ONNX_PROVIDERS", PROVIDER_CHOICES, cls.onnx_providers, str.lower),
            onnx_threads=reader.number("ONNX_THREADS", None, int, low=1, high=256),
            onnx_lanes=reader.number("ONNX_LANES", None, int, low=1, high=MAX_LANES),
            onnx_int8_weights=reader.choice("ONNX_INT8_WEIGHTS", INT8_WEIGHT_CHOICES, cls.onnx_int8_weights, str.lower),
            log_level=reader.choice("LOG_LEVEL", LOG_LEVELS, cls.log_level, str.upper),
            webhook_url=reader.url("WEBHOOK_URL", schemes=("https",)),
            webhook_listen=reader.ip_address("WEBHOOK_LISTEN", cls.webhook_listen),
            webhook_port=reader.number("WEBHOOK_PORT", cls.webhook_port, int, low=1, high=65535),
            webhook_secret=reader.pattern("WEBHOOK_SECRET", WEBHOOK_SECRET_FORMAT, WEBHOOK_SECRET_DESCRIPTION),
            default_temperature=reader.number(
                "DEFAULT_TEMPERATURE", cls.default_temperature, float, low=TEMPERATURE_MIN, high=TEMPERATURE_MAX
            ),
            default_length=reader.number("DEFAULT_LENGTH", cls.default_length, int, low=LENGTH_MIN, high=LENGTH_MAX),
            cooldown_seconds=reader.number("COOLDOWN_SECONDS", cls.cooldown_seconds, float, low=0, high=3600),
            missed_post_grace_minutes=reader.number(
                "MISSED_POST_GRACE_MINUTES", cls.missed_post_grace_minutes, float, low=0, high=1440
            ),
            heartbeat_file=Path(path) if (path := reader.text("HEARTBEAT_FILE", "")) else None,
            metrics_port=reader.number("METRICS_PORT", None, int, low=1, high=65535),
            metrics_listen=reader.ip_address("METRICS_LISTEN", cls.metrics_listen),
            inbox_sweep_seconds=reader.number("INBOX_SWEEP_SECONDS", cls.inbox_sweep_seconds, float, low=1, high=3600),
        )

    def require_token(self) -> str:
        if not self.telegram_bot_token:
            raise ConfigError(
                "TELEGRAM_BOT_TOKEN is not set; get a token from @BotFather and put "
                "TELEGRAM_BOT_TOKEN=123456:ABC... in the environment or in .env "
                "(or try the bot without Telegram: python -m bot console)"
            )
        return self.telegram_bot_token

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


def model_files(value: str) -> tuple[Path, ...]:
    """The model files MODEL_PATH names: files and folders separated by `os.pathsep` (":" on Linux), a
    folder standing for the .onnx files in it by name (CUDA twins left out: runner.serving_path picks them)."""
    files: list[Path] = []
    for entry in filter(None, (part.strip() for part in value.split(os.pathsep))):
        path = Path(entry)
        if not os.path.isdir(path):  # False for what cannot be looked at (a name too long), as for a file
            files.append(path)  # a missing or unreadable file is reported when it is opened, with the reason
            continue
        found = sorted(file for file in path.glob("*.onnx") if file.is_file() and not is_cuda_twin(file))
        if not found:
            raise ConfigError(f"MODEL_PATH names the folder {entry}, which holds no .onnx model files")
        files.extend(found)
    if not files:
        raise ConfigError(
            f"MODEL_PATH={value!r} names no model file; give .onnx files or folders separated by {os.pathsep!r}"
        )
    duplicates = sorted({str(file) for file in files if files.count(file) > 1})
    if duplicates:
        raise ConfigError(f"MODEL_PATH names {', '.join(duplicates)} more than once; name each model file once")
    return tuple(files)


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`, or a ConfigError that names `what` was given and why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} is not UTF-8 text (byte {error.start} is not valid); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{what} cannot be read ({error.strerror}); give a UTF-8 text file") from None


def _read_dotenv(path: Path) -> dict[str, str]:
    # Like python-dotenv, a missing .env or anything but a file (a virtualenv folder named .env) is no settings.
    if not path.is_file():
        return {}
    text = read_text(path, f"the settings file {path.absolute()}")
    return {key: value for key, value in dotenv_values(stream=io.StringIO(text)).items() if value is not None}


# Every variable Config.from_env reads, with what it means; `python -m bot CMD --help` lists the ones CMD uses.
VARIABLES = {
    "TELEGRAM_BOT_TOKEN": "the token from @BotFather (required)",
    "TELEGRAM_API_BASE_URL": "a self-hosted Bot API server, e.g. http://localhost:8081/bot",
    "TELEGRAM_MESSAGES_PER_SECOND": f"overall sending rate, 1-100000 (default {Config.telegram_messages_per_second:g})",
    "DATABASE_URL": f"SQLAlchemy URL (default {Config.database_url})",
    "MODEL_PATH": (
        f"the ONNX models to serve, one voice each, the default first: files or folders separated by {os.pathsep!r} "
        "(default: the bundled voices, or their fp32 twins on CUDA)"
    ),
    "ONNX_PROVIDERS": f"{', '.join(PROVIDER_CHOICES)} (default {Config.onnx_providers})",
    "ONNX_THREADS": "onnxruntime threads per lane, 1-256 (default 1)",
    "ONNX_LANES": f"generation workers, 1-{MAX_LANES} (default: from the CPU count)",
    "ONNX_INT8_WEIGHTS": (
        f"{', '.join(INT8_WEIGHT_CHOICES)}: an int8 model's weights as served (default {Config.onnx_int8_weights}: "
        "int8 where the CPU has VNNI or AMX, else uint8)"
    ),
    "LOG_LEVEL": f"{', '.join(LOG_LEVELS)} (default {Config.log_level})",
    "WEBHOOK_URL": "public https:// URL for updates; unset: long polling",
    "WEBHOOK_LISTEN": f"address the webhook server binds (default {Config.webhook_listen}; 0.0.0.0 in a container)",
    "WEBHOOK_PORT": f"port the webhook server listens on (default {Config.webhook_port})",
    "WEBHOOK_SECRET": f"{WEBHOOK_SECRET_DESCRIPTION} (default: a random one at each start)",
    "DEFAULT_TEMPERATURE": f"for new chats, {TEMPERATURE_RANGE} (default {Config.default_temperature:g})",
    "DEFAULT_LENGTH": f"speech length for new chats, {LENGTH_MIN}-{LENGTH_MAX} (default {Config.default_length})",
    "COOLDOWN_SECONDS": f"per-chat pause between speeches, 0-3600 (default {Config.cooldown_seconds:g})",
    "MISSED_POST_GRACE_MINUTES": (
        f"how late a missed daily post may still go out, 0-1440 (default {Config.missed_post_grace_minutes:g})"
    ),
    "HEARTBEAT_FILE": f"a file the bot rewrites every {HEARTBEAT_SECONDS} s, for healthcheck (default: none)",
    "METRICS_PORT": "port of the Prometheus /metrics endpoint, 1-65535 (default: none, no endpoint)",
    "METRICS_LISTEN": f"address the /metrics endpoint binds (default {Config.metrics_listen})",
    "INBOX_SWEEP_SECONDS": (
        "advanced: how often a replica looks for requests of replicas that died, 1-3600 "
        f"(default {Config.inbox_sweep_seconds:g})"
    ),
}


class _Reader:
    """Typed access to raw settings, raising ConfigError with the variable's name."""

    def __init__(self, values: Mapping[str, str]):
        self.values = values

    def text(self, name: str, default: str) -> str:
        return self.values.get(name, default)

    def token(self) -> str | None:
        token = self.values.get("TELEGRAM_BOT_TOKEN")
        if token is not None and not TOKEN_FORMAT.match(token):
            # Never echo the value: it may be a real token with a typo.
            raise ConfigError(
                "TELEGRAM_BOT_TOKEN does not look like a bot token (digits, a colon, then letters, "
                "digits, _ or -, as @BotFather gives it)"
            )
        return token

    def choice(self, name: str, valid: tuple[str, ...], default: str, normalise) -> str:
        value = normalise(self.values.get(name, default))
        if value not in valid:
            raise ConfigError(f"{name}={self.values[name]!r} is not valid; use one of: {', '.join(valid)}")
        return value

    def number(self, name, default, kind, low, high, open_low=False):
        raw = self.values.get(name)
        if raw is None:
            return default
        bound = f"{'above' if open_low else 'at least'} {low} and at most {high}"
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}; use {bound}"
            ) from None
        if not (low < value if open_low else low <= value) or not value <= high:
            raise ConfigError(f"{name}={raw!r} is out of range; use {bound}")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        raw = self.values.get(name)
        if raw is None:
            return None
        parsed = urlparse(raw)
        if parsed.scheme not in schemes or not parsed.netloc:
            raise ConfigError(f"{name}={raw!r} is not a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return raw

    def ip_address(self, name: str, default: str) -> str:
        raw = self.values.get(name, default)
        try:
            ipaddress.ip_address(raw)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is not an IP address; use 127.0.0.1 (this machine only, behind a reverse proxy) "
                "or 0.0.0.0 (every interface, e.g. in a container)"
            ) from None
        return raw

    def pattern(self, name: str, pattern: re.Pattern, description: str) -> str | None:
        raw = self.values.get(name)
        if raw is not None and not pattern.match(raw):
            raise ConfigError(f"{name} is not valid; use {description}")
        return raw
