"""`python -m bot` (or `speechbot`): run, console, migrate, generate and healthcheck commands.

Every user error (configuration, database URL, model file, arguments) ends as one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import OperationalError
from telegram.error import InvalidToken, TelegramError

from bot.config import Config, ConfigError
from bot.logs import redact, setup_logging
from bot.runner import ModelFileError
from bot.services import build_services, open_engine
from db.database import DatabaseConfigError, create_db_engine, migrate
from model.sampling import BOT_SAMPLING, TEMPERATURE_RANGE, InvalidSampling, SamplingParams

CONSOLE_CHAT_ID = 0  # never a Telegram chat id, so the console's settings live beside real chats
HEALTHY_HEARTBEAT_AGE = 120.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see python -m bot {self.prog.split()[-1]} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bot", description="A Telegram bot that talks like Donald Trump.")
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    commands.add_parser("run", help="run the Telegram bot (the default)")
    commands.add_parser("console", help="talk to the bot in this terminal, without Telegram")
    commands.add_parser("migrate", help="create or update the database schema")
    generate = commands.add_parser(
        "generate",
        help="print one speech from the model",
        description="Print one speech, sampled as the bot samples (model/sampling.py BOT_SAMPLING) unless flags "
        "say otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    generate.add_argument("--model", type=Path, help="ONNX model file (default: MODEL_PATH or the bundled one)")
    generate.add_argument("--prompt", default="", help="text the speech continues")
    generate.add_argument("--length", type=int, default=500, help="characters to generate (about, see --exact-length)")
    generate.add_argument("--exact-length", action="store_true", help="stop at exactly --length, not at a sentence end")
    generate.add_argument("--temperature", type=float, default=0.8, help=TEMPERATURE_RANGE)
    generate.add_argument(
        "--top-k", type=int, default=BOT_SAMPLING.top_k, help="the k likeliest characters only (0: all)"
    )
    generate.add_argument(
        "--top-p", type=float, default=BOT_SAMPLING.top_p, help="likeliest characters up to this mass (1: all)"
    )
    generate.add_argument(
        "--min-p",
        type=float,
        default=BOT_SAMPLING.min_p,
        help="drop characters below min_p times the likeliest's (0: off)",
    )
    generate.add_argument(
        "--repetition-penalty",
        type=float,
        default=BOT_SAMPLING.repetition_penalty,
        help="logit penalty for repeating a recent --repeat-ngram (0: off; docs/engine.md)",
    )
    generate.add_argument(
        "--repeat-ngram", type=int, default=BOT_SAMPLING.repeat_ngram, help="characters that count as a repeat"
    )
    generate.add_argument("--seed", type=int, default=None, help="for a repeatable speech")
    health = commands.add_parser("healthcheck", help="exit 0 if the running bot's heartbeat is fresh")
    health.add_argument("--max-age", type=float, default=HEALTHY_HEARTBEAT_AGE, help="seconds")
    return parser


def run_telegram(config: Config) -> None:
    from bot.telegram_app import run

    config.require_token()
    run(config)


async def console(config: Config) -> None:
    from bot.core import ChatRef

    services = build_services(replace(config, cooldown_seconds=0))  # one person at a keyboard
    core = services.core
    chat = ChatRef(CONSOLE_CHAT_ID, "console")
    print("Talk to the bot: commands such as /speech 0.9 We will or plain text as a prompt. /quit or Ctrl-D ends.")
    try:
        while True:
            try:
                line = await asyncio.to_thread(input, "> ")
            except EOFError:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip():
                print(await core.handle_text(chat, line) or "")
    finally:
        services.close()


def generate(config: Config, args: argparse.Namespace) -> None:
    from bot.core import compose_speech, speech_options

    try:
        sampling = SamplingParams.from_args(args)
    except InvalidSampling as exc:
        raise ConfigError(exc.as_flag()) from None
    engine = open_engine(config, args.model)
    try:
        ending = {} if args.exact_length else speech_options(args.prompt)
        text = engine.generate(prompt=args.prompt, length=args.length, sampling=sampling, seed=args.seed, **ending)
        print(args.prompt + text if args.exact_length else compose_speech(args.prompt, text))
    finally:
        engine.close()


def healthcheck(config: Config, max_age: float) -> int:
    if config.heartbeat_file is None:
        raise ConfigError("HEARTBEAT_FILE is not set, so there is no heartbeat to check")
    try:
        age = time.time() - config.heartbeat_file.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat file at {config.heartbeat_file}", file=sys.stderr)
        return 1
    if age > max_age:
        print(f"unhealthy: last heartbeat {age:.0f} s ago", file=sys.stderr)
        return 1
    return 0


def fail(message: str, code: int = 2) -> int:
    # Error texts can quote request URLs, which carry the token, and drivers' texts span lines.
    print(f"error: {redact(' '.join(message.split()))}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = Config.from_env()
        command = args.command or "run"
        # One-shot commands print their result; INFO chatter would bury it (and stderr's error line).
        level = config.log_level_number if command == "run" else max(config.log_level_number, logging.WARNING)
        setup_logging(level, secrets=[config.telegram_bot_token, config.webhook_secret])
        if command == "run":
            run_telegram(config)
        elif command == "console":
            asyncio.run(console(config))
        elif command == "migrate":
            migrate(create_db_engine(config.database_url))
            print("The database schema is up to date.")
        elif command == "generate":
            generate(config, args)
        else:
            return healthcheck(config, args.max_age)
    except (ConfigError, DatabaseConfigError, ModelFileError, ValueError) as error:
        return fail(str(error))
    except InvalidToken:
        return fail("Telegram rejected TELEGRAM_BOT_TOKEN; check it with @BotFather")
    except OperationalError as error:
        return fail(f"the database at DATABASE_URL cannot be used: {error.orig}")
    except TelegramError as error:
        return fail(f"Telegram could not be reached: {error}", code=1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
