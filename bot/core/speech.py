"""What a speech is to the bot: its text composed from the prompt and the engine's continuation, the
temperature it was written at, and the choices offered under it (Another, Calmer, Wilder)."""

from __future__ import annotations

from dataclasses import dataclass

from bot.core.bounds import MESSAGE_MAX, TEMPERATURE_STEP
from bot.core.commands import ArgumentError, parse_temperature
from bot.core.voices import Voice
from db.store import ChatSettings
from model.sampling import TEMPERATURE_MAX, TEMPERATURE_MIN

CHOICE_PREFIX = "speech:"  # callback data of the buttons under a speech: CHOICE_PREFIX + temperature
STALE_CHOICE = "That button no longer works. Send /speech for a new speech."


class Speech(str):
    """A speech's text, knowing the temperature it was written at (the choices under it step from there)."""

    temperature: float

    def __new__(cls, text: str, temperature: float) -> Speech:
        speech = super().__new__(cls, text)
        speech.temperature = temperature
        return speech


@dataclass(frozen=True)
class Choice:
    """One option under a speech: a button in Telegram, a numbered line in the console."""

    label: str
    temperature: float

    @property
    def data(self) -> str:
        """Telegram's callback data (at most 64 bytes): all the next speech needs."""
        return f"{CHOICE_PREFIX}{self.temperature:g}"


def speech_choices(temperature: float) -> tuple[Choice, ...]:
    """Another (same temperature), then Calmer and Wilder: one TEMPERATURE_STEP down or up, stopping at
    the bounds; one that would not change the temperature (already at a bound) is left out."""
    # Rounded so that 0.8 - 0.2 is 0.6, not 0.6000000000000001: the label and callback data show it.
    calmer = max(round(temperature - TEMPERATURE_STEP, 6), TEMPERATURE_MIN)
    wilder = min(round(temperature + TEMPERATURE_STEP, 6), TEMPERATURE_MAX)
    steps = (Choice("Calmer", calmer), Choice("Wilder", wilder))
    return (Choice("Another", temperature), *(choice for choice in steps if choice.temperature != temperature))


def parse_choice(data: str) -> float:
    """The temperature a choice's callback data carries; ArgumentError(STALE_CHOICE) for anything else."""
    if not data.startswith(CHOICE_PREFIX):
        raise ArgumentError(STALE_CHOICE)
    try:
        return parse_temperature(data.removeprefix(CHOICE_PREFIX))
    except ArgumentError:
        raise ArgumentError(STALE_CHOICE) from None


def compose_speech(prompt: str, continuation: str) -> str:
    """The reply: the prompt as it was sent and its continuation, which the engine ended as a speech ends
    within what one Telegram message holds (reply_room)."""
    # A lone surrogate in the prompt (JSON allows "\ud800") cannot be encoded, so the whole reply would fail to send.
    prompt, continuation = (
        part.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for part in (prompt, continuation)
    )
    text = (prompt + continuation).rstrip() if prompt else continuation.strip()
    return text or "…"  # Telegram rejects empty messages


def reply_room(prompt: str) -> int:
    """The most characters a continuation of `prompt` may have so that both fit one message."""
    return max(1, MESSAGE_MAX - len(prompt))


async def daily_speech(voice: Voice, settings: ChatSettings) -> Speech:
    """A chat's scheduled post in `voice`, at its length and temperature; no cooldown, since the schedule
    limits it."""
    continuation = await voice.engine.agenerate(
        "",
        settings.length,
        sampling=voice.sampling(settings.temperature),
        end_sentence=True,
        max_chars=reply_room(""),
    )
    return Speech(compose_speech("", continuation), settings.temperature)
