"""`python -m bot` (or `speechbot`): run, console, migrate, generate and healthcheck commands.

Every user error (configuration, database URL, model file, arguments) ends as one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from telegram.error import InvalidToken, TelegramError

from bot import heartbeat
from bot.config import VARIABLES, Config, ConfigError, read_text
from bot.console import DEFAULT_HISTORY, HISTORY_LENGTH, console
from bot.inference.engine import GenerationEngine
from bot.inference.runner import ModelFileError
from bot.logs import redact, setup_logging
from bot.services import close_engines, open_engine, open_voices
from db.database import DatabaseConfigError, create_db_engine, describe, migrate, one_process_per_sqlite_file
from model.sampling import (
    BOT_SAMPLING,
    MIN_P_LOOSENS_ABOVE,
    TEMPERATURE_RANGE,
    InvalidSampling,
    SamplingParams,
    bot_sampling,
)

PROG = "python -m bot"
MODEL_VARIABLES = ("MODEL_PATH", "ONNX_PROVIDERS", "ONNX_THREADS", "ONNX_LANES", "ONNX_INT8_WEIGHTS")
CHAT_VARIABLES = ("DATABASE_URL", *MODEL_VARIABLES, "DEFAULT_TEMPERATURE", "DEFAULT_LENGTH")
# The environment variables each command reads (all of them come from .env too); its --help lists them.
COMMAND_VARIABLES = {
    "run": tuple(VARIABLES),
    "console": (*CHAT_VARIABLES, "LOG_LEVEL"),
    "migrate": ("DATABASE_URL",),
    "generate": MODEL_VARIABLES,
    "healthcheck": ("HEARTBEAT_FILE",),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        where = self.prog if self.prog == PROG else f"{PROG} {self.prog.split()[-1]}"
        raise ConfigError(f"{message} (see {where} --help)")


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help; text of several lines (the environment list) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = action.default in (None, "", argparse.SUPPRESS) or action.default is False  # a switch that is off
        if unset or not action.option_strings or action.help is None:
            return action.help
        return f"{action.help} (default: %(default)s)"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0, e.g. 120")
    return value


def _add_command(commands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    width = max(len(variable) for variable in VARIABLES)
    lines = [f"  {variable:<{width}}  {VARIABLES[variable]}" for variable in COMMAND_VARIABLES[name]]
    return commands.add_parser(
        name,
        help=help,
        description=description,
        epilog="environment variables (also read from .env):\n" + "\n".join(lines),
        formatter_class=_HelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A Telegram bot that talks like Donald Trump.")
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    _add_command(
        commands,
        "run",
        "run the Telegram bot (the default)",
        "Run the Telegram bot: long polling, or a webhook server when WEBHOOK_URL is set. "
        "Stops gracefully on SIGTERM (exit code 0) and Ctrl-C (130). Exit code 2: bad configuration, Telegram "
        "could not be reached at start, or it rejected the token while polling.",
    )
    console_command = _add_command(
        commands,
        "console",
        "talk to the bot in this terminal, without Telegram",
        "Talk to the bot in this terminal: the same commands, core and database as in Telegram, no token. "
        "/quit or Ctrl-D ends (exit code 0); Ctrl-C ends at once, in the middle of a speech too (130). At a "
        "terminal, lines can be edited, and the arrow keys and Ctrl-R find earlier ones (kept in --history).",
    )
    console_command.add_argument(
        "--group",
        action="store_true",
        help="plain lines are a group's chatter rather than prompts: the bot chimes in on its own as /chatter "
        "sets (marked 'chiming in:')",
    )
    console_command.add_argument("--seed", type=int, default=None, help="for repeatable chatter choices")
    console_command.add_argument(
        "--history",
        metavar="FILE",
        default=DEFAULT_HISTORY,
        help=f"where the lines typed at a terminal are kept, the last {HISTORY_LENGTH}; '' keeps none",
    )
    migrate_command = _add_command(
        commands,
        "migrate",
        "create or update the database schema",
        "Create or update the database schema. A SQLite file that the bot created and that is now missing is "
        "not made again unless --create says so.",
    )
    migrate_command.add_argument(
        "--create",
        action="store_true",
        help="make an empty SQLite database even where the bot created one before that is now missing",
    )
    generate = _add_command(
        commands,
        "generate",
        "print one speech from the model",
        "Print the prompt and the speech continuing it, sampled as the bot samples at --temperature "
        "(model/sampling.py bot_sampling) unless flags say otherwise.",
    )
    model = generate.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="ONNX model file (default: the default voice's)")
    model.add_argument("--voice", help="one of the voices MODEL_PATH serves, by name (default: the first)")
    prompt = generate.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text the speech continues")
    prompt.add_argument(
        "--prompt-file", type=Path, metavar="FILE", help="read the prompt from this UTF-8 file (- for stdin)"
    )
    generate.add_argument("--length", type=int, default=500, help="characters to generate")
    generate.add_argument(
        "--exact-length", action="store_true", help="stop at exactly --length characters, not at a sentence end near it"
    )
    generate.add_argument("--temperature", type=float, default=BOT_SAMPLING.temperature, help=TEMPERATURE_RANGE)
    generate.add_argument(
        "--top-k", type=int, default=BOT_SAMPLING.top_k, help="the k likeliest characters only (0: all)"
    )
    generate.add_argument(
        "--top-p", type=float, default=BOT_SAMPLING.top_p, help="likeliest characters up to this mass (1: all)"
    )
    generate.add_argument(
        "--min-p",
        type=float,
        default=None,
        help=f"drop characters below min_p times the likeliest's (0: off; default: the bot's, {BOT_SAMPLING.min_p:g} "
        f"up to temperature {MIN_P_LOOSENS_ABOVE:g}, then less as it rises)",
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
    health = _add_command(
        commands,
        "healthcheck",
        "exit 0 if the running bot's heartbeat is fresh",
        "Exit 0 if the running bot rewrote HEARTBEAT_FILE within --max-age seconds, else 1.",
    )
    health.add_argument("--max-age", type=_positive_seconds, default=heartbeat.HEALTHY_AGE, help="seconds")
    return parser


def run_telegram(config: Config) -> int:
    from bot.services import build_application
    from bot.telegram.app import Stop, serve

    config.require_token()
    if config.heartbeat_file is not None:
        heartbeat.check_writable(config.heartbeat_file)
    with one_process_per_sqlite_file(config.database_url):  # a second would answer the first's requests again
        stop = Stop()
        return serve(build_application(config, on_token_rejected=stop.token_rejected), config, stop)


def read_prompt(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    return read_text(path, f"--prompt-file {path}")


def voice_engine(config: Config, name: str) -> GenerationEngine:
    """The engine of MODEL_PATH's voice called `name` (the others are closed again)."""
    voices = open_voices(config)
    wanted = voices.find(name)
    close_engines(voice for voice in voices if voice is not wanted)
    if wanted is None:
        raise ConfigError(f"--voice {name!r} is not one of the voices MODEL_PATH serves: {', '.join(voices.names)}")
    return wanted.engine


def generate(config: Config, args: argparse.Namespace) -> None:
    from bot.core.speech import compose_speech, reply_room

    prompt = args.prompt if args.prompt_file is None else read_prompt(args.prompt_file)
    engine = open_engine(config, args.model) if args.voice is None else voice_engine(config, args.voice)
    try:
        try:
            base = bot_sampling(args.temperature, engine.info.min_p_floor)  # as the bot samples this model
            sampling = SamplingParams.from_args(args, base=base)
        except InvalidSampling as exc:
            raise ConfigError(exc.as_flag()) from None
        text = engine.generate(
            prompt,
            args.length,
            sampling=sampling,
            seed=args.seed,
            end_sentence=not args.exact_length,
            max_chars=None if args.exact_length else reply_room(prompt),
        )
        print(prompt + text if args.exact_length else compose_speech(prompt, text))
    finally:
        engine.close()


def healthcheck(config: Config, max_age: float) -> int:
    if config.heartbeat_file is None:
        raise ConfigError("HEARTBEAT_FILE is not set, so there is no heartbeat to check")
    reason = heartbeat.unhealthy(config.heartbeat_file, max_age)
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
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
            return run_telegram(config)
        elif command == "console":
            console(config, args.group, args.seed, args.history)
        elif command == "migrate":
            migrate(create_db_engine(config.database_url), create=args.create)
            print("The database schema is up to date.")
        elif command == "generate":
            generate(config, args)
        else:
            return healthcheck(config, args.max_age)
    except (ConfigError, DatabaseConfigError, ModelFileError, ValueError) as error:
        return fail(str(error))
    except InvalidToken:
        return fail("Telegram rejected TELEGRAM_BOT_TOKEN; check it with @BotFather")
    except SQLAlchemyError as error:
        return fail(f"the database at DATABASE_URL cannot be used ({describe(error)})")
    except TelegramError as error:
        # Not the user's input but the network or Telegram: 1, so a supervisor's restart may help.
        return fail(f"Telegram could not be reached: {error}")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
