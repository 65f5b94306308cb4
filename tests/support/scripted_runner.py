"""A runner that writes a fixed script instead of running a model: the engine's lane policy and its endings
are then exact to test, with no model and no timing."""

from __future__ import annotations

import threading

import numpy as np

from bot.inference.engine import GenerationEngine
from model.text import CleaningOptions


class ScriptedRunner:
    """A runner whose every row writes SCRIPT from its start after any prompt: the engine's policy and
    endings are then exact to test. prime() waits for `gate`, so a test can queue requests while a lane
    is busy; `batches` records each chunk call's batch size."""

    def __init__(self, script: str, gate: threading.Event) -> None:
        vocab = sorted(set(script + "We will\n"))
        cleaning = CleaningOptions().to_dict()
        self.info = type("Info", (), {"vocab": vocab, "unknown_policy": "nearest", "cleaning": cleaning})()
        self.provider = "CPUExecutionProvider"
        self.script = np.array([vocab.index(ch) for ch in script] * (30_000 // len(script)), np.int64)
        self.gate = gate
        self.batches: list[int] = []

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((1, batch, 1), np.float32)]  # where each row is in the script

    def prime(self, tokens, state):
        self.gate.wait()
        return np.zeros((*tokens.shape, len(self.info.vocab)), np.float32), [np.zeros_like(state[0])]

    def sample(self, logits, state, rows, uniforms):
        self.batches.append(len(logits))
        at = state[0][0, :, 0].astype(np.int64)
        steps = uniforms.shape[1]
        tokens = np.stack([self.script[i : i + steps] for i in at])
        return tokens, logits, [state[0] + steps], (rows["history"], rows["matches"])


def scripted_engine(script: str, gate: threading.Event | None = None, **options) -> tuple[GenerationEngine, list]:
    gate = gate or threading.Event()
    gate.set()
    runners: list[ScriptedRunner] = []

    def factory(*_args) -> ScriptedRunner:
        runners.append(ScriptedRunner(script, gate))
        return runners[-1]

    return GenerationEngine("scripted", runner_factory=factory, **options), runners


SCRIPT = "We will win. And we will build it, believe me! He said “it is over.” Then a very long sentence goes on "
