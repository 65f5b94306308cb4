"""The voices a bot serves: one model file each, by name, the first being the default.

A chat picks its voice with /voice (stored with its settings); a chat that never did, or whose voice is no
longer served, hears the default. Transport- and engine-free: a Voice holds whatever Engine the composition
root opened for its file (docs/voices.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from bot.inference.api import Engine
from model.sampling import SamplingParams, bot_sampling


@dataclass(frozen=True)
class Voice:
    name: str  # as users type it after /voice (bot.inference.modelfile.VOICE_NAME_FORMAT)
    description: str  # one line, may be empty
    engine: Engine
    min_p_floor: float = 0.0  # its model file's (bot.inference.modelfile.MIN_P_FLOOR_KEY)

    def sampling(self, temperature: float) -> SamplingParams:
        """The bot's sampling at `temperature` for this voice (model.sampling.bot_sampling)."""
        return bot_sampling(temperature, self.min_p_floor)


class Voices:
    """The served voices in order; the first is the default."""

    def __init__(self, voices: Sequence[Voice]) -> None:
        if not voices:
            raise ValueError("a bot needs at least one voice")
        names = [voice.name for voice in voices]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two voices cannot share a name: {', '.join(twice)}")
        self._voices = {voice.name: voice for voice in voices}

    @classmethod
    def of(cls, engine: Engine, name: str = "default", description: str = "") -> Voices:
        """One voice: what a bot serving a single model has."""
        return cls([Voice(name, description, engine)])

    @property
    def default(self) -> Voice:
        return next(iter(self._voices.values()))

    def __iter__(self) -> Iterator[Voice]:
        return iter(self._voices.values())

    def __len__(self) -> int:
        return len(self._voices)

    @property
    def names(self) -> list[str]:
        return list(self._voices)

    def find(self, name: str) -> Voice | None:
        """The served voice called `name` (in any case), or None."""
        return self._voices.get(name.strip().lower())

    def pick(self, name: str | None) -> Voice:
        """The voice a chat whose stored choice is `name` hears: that one if it is served, else the default."""
        return (self.find(name) if name else None) or self.default

    @property
    def all_full(self) -> bool:
        """True while every voice's engine would refuse one more request (bot.inference.api.Engine.full)."""
        return all(voice.engine.full for voice in self)

    def with_engines(self, wrap: Callable[[Engine], Engine]) -> Voices:
        """The same voices, each engine wrapped (by the metrics, say)."""
        return Voices([replace(voice, engine=wrap(voice.engine)) for voice in self])
