"""Logging setup that never writes the bot token (or the webhook secret) anywhere, and writes one line
per failure of Telegram or the network.

httpx logs every request URL, which carries the token, at INFO; exception texts carry it too.
So the HTTP loggers are held at WARNING and every record passes a redaction filter on the way out.
python-telegram-bot logs a full traceback for each failed network call (some 130 lines when
Telegram cannot be reached at start) and each answer it cannot parse (an HTML error page, quoted
whole); below DEBUG a record carrying a Bot API error keeps one line with the reason, and a record
of an unparsable answer is dropped, since the failure it causes is logged where the request was made.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import TextIO

from telegram.error import TelegramError

# Any bot token: numeric bot id, colon, secret. Also catches tokens of other bots in URLs.
TOKEN_PATTERN = re.compile(r"\d{3,}:[A-Za-z0-9_-]{30,}")
REDACTED = "[REDACTED]"
QUIET_LOGGERS = ("httpx", "httpcore")
REASON_MAX = 300  # characters of an error's text in one log line; a proxy's error page is quoted whole in it


def reason(error: BaseException) -> str:
    """An error's text for one log line: an error page quoted in it is cut short."""
    text = " ".join(str(error).split())
    return text if len(text) <= REASON_MAX else f"{text[:REASON_MAX]}…"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every bot token and each of `secrets` replaced by [REDACTED]."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, exception and stack text with secrets replaced."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret]
        self._formatter = logging.Formatter()

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(self._formatter.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class TelegramTracebacksAtDebug(logging.Filter):
    """Bot API errors as one line: the traceback tells an operator nothing the reason does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("telegram.request") and record.msg.startswith("Can not load invalid JSON data"):
            return False  # the TelegramError it raises next is logged, once, by whoever made the request
        if record.exc_info and isinstance(record.exc_info[1], TelegramError):
            record.msg, record.args = f"{record.getMessage()} ({reason(record.exc_info[1])})", None
            record.exc_info = record.exc_text = None
        return True


def setup_logging(level: int | str, secrets: Iterable[str | None] = (), stream: TextIO | None = None) -> None:
    """One redacting handler on the root logger; quiet HTTP client loggers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(level)
    if root.level > logging.DEBUG:
        handler.addFilter(TelegramTracebacksAtDebug())
    handler.addFilter(RedactSecrets(secrets))
    # Calling this again (tests, console then run) replaces the handler instead of doubling output.
    for old in [h for h in root.handlers if any(isinstance(f, RedactSecrets) for f in h.filters)]:
        root.removeHandler(old)
    root.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
