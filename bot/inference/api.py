"""What the rest of the bot needs from the generation engine without loading it: the `Engine` protocol,
its limits, the execution providers and int8 weight layouts it knows and the errors its callers handle.

Light on purpose: the configuration and the core import this, not bot.inference.engine, so they never
load onnxruntime or a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from model.sampling import SamplingParams

MAX_LANES = 8
# The `providers` choices, and the onnxruntime execution provider each names ("auto" picks one of them).
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
# How int8 models' weights are served (bot.inference.int8_weights): "auto" picks the one this CPU multiplies
# exactly and fastest; "int8" (U8S8) and "uint8" (U8U8) force one.
INT8_WEIGHT_CHOICES = ("auto", "int8", "uint8")


class EngineBusy(RuntimeError):
    """The request queue is full; try again later."""


class EngineClosed(RuntimeError):
    """The engine was closed before or while the request ran."""


class Engine(Protocol):
    """What the core asks of bot.inference.engine.GenerationEngine: a continuation of `prompt`, whole or as
    it is written, sampled with `sampling` (None: the bot's, model.sampling.bot_sampling()). `end_sentence`
    ends it as a speech ends (bot.inference.ending) at about `length` characters and at most `max_chars`."""

    @property
    def full(self) -> bool: ...

    async def agenerate(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> str: ...

    def astream(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> AsyncIterator[str]: ...
