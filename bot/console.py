"""`python -m bot console`: the bot's core and database in a terminal, no Telegram.

The input loop runs on the main thread and each line's answer in an asyncio.Runner, so Ctrl-C reaches
whatever is going on: input() raises KeyboardInterrupt at the prompt, and the Runner cancels a speech being
written (the engine then stops its work). Either way the console closes its services and ends with 130.
At a terminal, the standard library's readline (where there is one: not on Windows) gives line editing
and a history kept in a file; piped lines are read as plain input(). (readline acts on a signal that
interrupts its wait for a key: a Ctrl-C in the instant between the prompt and that wait is acted upon at
the next key, as at Python's own prompt.)
"""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from bot.config import Config, ConfigError
from bot.core.speech import Speech, speech_choices
from bot.core.speechbot import ChatRef, SpeechBot
from bot.services import build_services

CONSOLE_CHAT_ID = 0  # never a Telegram chat id, so the console's settings live beside real chats
DEFAULT_HISTORY = "~/.speechbot_history"
HISTORY_LENGTH = 1000  # lines kept in the history file; older ones are dropped when it is written
PRIVATE_GREETING = (
    "Talk to the bot: commands such as /speech 0.9 We will or plain text as a prompt; after a speech, "
    "a number picks one of the choices under it."
)
GROUP_GREETING = (
    "A group's chatter: plain lines are what its members say, and the bot chimes in on its own as "
    "/chatter sets (try /chatter 1/2); commands work as in Telegram."
)
ENDING = "/quit or Ctrl-D ends; Ctrl-C ends at once, in the middle of a speech too."


def console(config: Config, group: bool = False, seed: int | None = None, history: str = DEFAULT_HISTORY) -> None:
    """Read lines until /quit or end of input; KeyboardInterrupt (Ctrl-C) goes through, after a newline."""
    if sys.stdin is None:  # started with stdin closed (`<&-`, some supervisors)
        raise ConfigError(
            "stdin is closed, and the console reads what you type from it; run it in a terminal "
            "or give it lines to read (python -m bot console < lines.txt)"
        )
    # One person at a keyboard: no cooldown.
    services = build_services(replace(config, cooldown_seconds=0), rng=random.Random(seed))
    editing = _line_editing()
    history_file = _load_history(editing, history) if editing is not None else None
    print(f"{GROUP_GREETING if group else PRIVATE_GREETING} {ENDING}")
    try:
        with asyncio.Runner() as runner:
            _talk(runner, services.core, group)
    except KeyboardInterrupt:
        print(flush=True)  # after "^C", so that the shell's prompt starts a line of its own
        raise
    finally:
        services.close()
        if history_file is not None:
            _save_history(editing, history_file)


def _talk(runner: asyncio.Runner, core: SpeechBot, group: bool) -> None:
    chat = ChatRef(CONSOLE_CHAT_ID, "console")
    choices = {}  # the numbered options under the last speech, as Telegram's buttons
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if not line:
            continue
        picked = choices.get(line)
        if picked:
            reply = runner.run(core.choice(chat, picked.data))
        elif group and not line.startswith("/"):
            reply = runner.run(core.overheard(chat, line))
            if reply is None:
                continue  # the bot keeps listening
            print("chiming in: ", end="")
        else:
            reply = runner.run(core.handle_text(chat, line))
        print(reply or "", flush=True)
        if isinstance(reply, Speech):
            choices = {str(number): choice for number, choice in enumerate(speech_choices(reply.temperature), 1)}
            options = (f"[{number}] {c.label} ({c.temperature:g})" for number, c in choices.items())
            print("   ".join(options), flush=True)


def _line_editing() -> ModuleType | None:
    """readline, which input() then uses, when a person types at a terminal and the platform has it."""
    # input() edits lines only when both are terminals; importing readline elsewhere could write escape
    # sequences into piped output.
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    try:
        import readline
    except ImportError:  # Windows
        return None
    return readline


def _load_history(readline: ModuleType, history: str) -> Path | None:
    """The history file, read into readline; None (after a note on stderr) where none can be kept."""
    if not history:
        return None
    try:
        path = Path(history).expanduser()
    except RuntimeError:  # "~" with no HOME and no entry in the password database
        _note(f"no history is kept: there is no home folder for {history}; give --history FILE")
        return None
    try:
        with path.open("a", encoding="utf-8"):  # made now if missing, so a file that cannot be written is told now
            pass
        if path.stat().st_size:  # a file just made has nothing to read
            readline.read_history_file(path)
    except OSError as error:
        _note(f"no history is kept: {path} cannot be used ({error.strerror}); give --history FILE, or '' for none")
        return None
    readline.set_history_length(HISTORY_LENGTH)
    return path


def _save_history(readline: ModuleType, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError as error:  # it was writable at the start; not worth a traceback at the end
        _note(f"the history was not saved: {path} cannot be written ({error.strerror})")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)
