"""The chat commands: their names and descriptions, how a message splits into command and arguments, how
arguments are parsed, and the help text. Bad arguments raise ArgumentError, whose message is the reply."""

from __future__ import annotations

import re

from bot.core.bounds import LENGTH_MAX, LENGTH_MIN, QUIET_MAX_DAYS
from model.sampling import TEMPERATURE_RANGE, InvalidSampling, SamplingParams

SHOWN_ARGUMENT_MAX = 24  # how much of a bad argument a reply quotes back

# Shown by /help and registered with setMyCommands, in this order.
COMMANDS = {
    "speech": "a speech: /speech [temperature] [prompt], or as a reply to continue that message",
    "temperature": f"show or set the temperature ({TEMPERATURE_RANGE})",
    "length": f"show or set the speech length ({LENGTH_MIN}-{LENGTH_MAX} characters)",
    "schedule": "a daily speech: /schedule HH:MM [time zone]",
    "unschedule": "stop the daily speech",
    "chatter": "in groups, answer on my own now and then: /chatter 1/20, /chatter off",
    "quiet": "no chatter or daily speech for a while: /quiet 2h, /quiet off",
    "settings": "this chat's settings",
    "stats": "this chat's speeches, chatter, quiet time and next daily speech",
    "voice": "list the voices, or pick this chat's: /voice NAME",
    "forget": "delete what I store about this chat",
    "help": "what this bot does and how to use it",
    "start": "say hello",
}
# Commands that change a chat: in groups only administrators may use them with arguments, and those in
# CHANGING_WITHOUT_ARGUMENTS bare too (/quiet is quiet for an hour, /forget begins a deletion).
CHANGING_COMMANDS = {"temperature", "length", "schedule", "unschedule", "chatter", "quiet", "voice", "forget"}
CHANGING_WITHOUT_ARGUMENTS = {"unschedule", "quiet", "forget"}

_COMMAND = re.compile(r"^/([A-Za-z0-9_]+)(?:@\S+)?(?:\s+(.*))?$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


class ArgumentError(ValueError):
    """A bad argument; the message is the reply, naming what was wrong and the valid form."""


def split_command(text: str) -> tuple[str, str] | None:
    """`/speech@Bot 0.5 We will` -> ("speech", "0.5 We will"); None if `text` is no command."""
    match = _COMMAND.match(text.strip())
    return (match[1].lower(), (match[2] or "").strip()) if match else None


def shown(argument: str) -> str:
    """A bad argument as a reply quotes it: in quotes, and cut short."""
    return repr(argument if len(argument) <= SHOWN_ARGUMENT_MAX else argument[:SHOWN_ARGUMENT_MAX] + "…")


def looks_like_number(word: str) -> bool:
    return bool(_NUMBER.match(word))


def parse_temperature(text: str) -> float:
    example = f"Use a number {TEMPERATURE_RANGE}, e.g. /temperature 0.8 or /speech 1.2"
    if not looks_like_number(text):
        raise ArgumentError(f"{shown(text)} is not a temperature. {example}.")
    try:
        return SamplingParams(temperature=float(text.replace(",", "."))).temperature
    except InvalidSampling:
        raise ArgumentError(f"Temperature {shown(text)} is out of range. {example}.") from None


def parse_length(text: str) -> int:
    example = f"Use a whole number of characters from {LENGTH_MIN} to {LENGTH_MAX}, e.g. /length 600"
    if not re.fullmatch(r"[+-]?\d{1,9}", text):
        raise ArgumentError(f"{shown(text)} is not a length. {example}.")
    value = int(text)
    if not LENGTH_MIN <= value <= LENGTH_MAX:
        raise ArgumentError(f"Length {value} is out of range. {example}.")
    return value


def help_text() -> str:
    return (
        "Commands:\n"
        "/speech - a speech. /speech 0.5 - calmer; /speech 1.3 - wilder; "
        "/speech 0.9 We will build - continues your words; sent as a reply to a message, /speech continues "
        "that message\n"
        f"/temperature 0.8 - this chat's default temperature ({TEMPERATURE_RANGE})\n"
        f"/length 600 - speech length in characters ({LENGTH_MIN} to {LENGTH_MAX})\n"
        "/schedule 08:30 Europe/Berlin - a speech every day at that local time (zone optional, default UTC)\n"
        "/unschedule - stop the daily speech\n"
        "/chatter 1/20 - in a group, I answer on my own about one message in 20, replying to it (off by default; "
        "/chatter off)\n"
        f"/quiet 2h - no chatter and no daily speech for two hours (30m, 1d, up to {QUIET_MAX_DAYS}d; /quiet off)\n"
        "/settings - this chat's settings\n"
        "/stats - this chat's speeches, chatter, quiet time and next daily speech\n"
        "/voice - the voices I speak in (models trained on different speeches); /voice NAME picks this chat's\n"
        "/forget - delete everything I store about this chat (asks first)\n\n"
        "In a private chat, any text you send is a prompt. In a group, reply to one of my "
        "messages or mention me. In groups only administrators can change settings. "
        "Chatter needs my privacy mode off (@BotFather, Group Privacy), or I never see ordinary messages.\n\n"
        "Under each speech: Another, Calmer and Wilder ask for a new one (anyone may press them). "
        "In any chat, type my @username and a few words to pick one of three short speeches."
    )
