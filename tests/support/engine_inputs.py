"""Inputs for the engine and chunk-graph tests: sampling settings that differ from request to request, and
rows primed by a real runner."""

from __future__ import annotations

import numpy as np

from bot.inference.runner import ModelRunner
from model.sampling import BOT_SAMPLING, SamplingParams


def mixed_settings(i: int) -> SamplingParams:
    """Sampling settings that differ from request to request: every optional step on in some, off in others."""
    return BOT_SAMPLING.with_options(
        temperature=0.3 + (i % 31) / 20,
        top_k=i % 5 or None,
        top_p=(1.0, 0.8, 0.95)[i % 3],
        min_p=(0.0, 0.05, 0.2, 0.0)[i % 4],
        repetition_penalty=(0.0, 3.0, 1.0)[i % 3],
        repeat_ngram=4 + i % 6,
    )


def primed_rows(runner: ModelRunner, rows: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Next-character logits and state of `rows` rows after 12 random characters each."""
    tokens = np.random.default_rng(0).integers(len(runner.info.vocab), size=(rows, 12))
    logits, state = runner.prime(tokens, runner.zero_state(rows))
    return logits[:, -1], state
