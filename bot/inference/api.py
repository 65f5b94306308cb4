"""What the rest of the bot needs from the generation engine without loading it: its limits and the
errors its callers handle. Light on purpose: the configuration and the commands import this, not
bot.inference.engine, so they never load onnxruntime or a model.
"""

from __future__ import annotations

MAX_LANES = 8


class EngineBusy(RuntimeError):
    """The request queue is full; try again later."""


class EngineClosed(RuntimeError):
    """The engine was closed before or while the request ran."""
