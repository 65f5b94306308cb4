"""Several trained networks used as one model: their next-character distributions are averaged.

Networks trained with different seeds or regularisation make different mistakes, so the average of
their probabilities predicts held-out text better than any one of them (docs/default-model.md). The
members must have the same shape; their recurrent states are stacked along the layer axis, so an
ensemble of K networks of L layers has the state of one network with K·L layers and fits the same
ONNX contract, engine and batching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointError, load_checkpoint
from model.model import CharRNN, State

# Checkpoint fields that must agree for networks to be averaged: same tokens, same text cleaning.
SHARED_FIELDS = ("vocab", "cleaning", "unknown_policy")


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[CharRNN]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two networks")
        first = members[0].config
        for net in members[1:]:
            shape = ("model_type", "num_layers", "rnn_size", "vocab_size")
            if any(getattr(net.config, key) != getattr(first, key) for key in shape):
                raise ValueError(
                    "ensemble members must have the same cell, layers, hidden size and vocabulary; got "
                    + " and ".join(f"{n.config.model_type} {n.config.num_layers}x{n.config.rnn_size}" for n in members)
                )
        self.members = nn.ModuleList(members)
        self.config = first  # what callers read: vocab_size, model_type; the state is K times deeper

    @property
    def is_lstm(self) -> bool:
        return self.members[0].is_lstm

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        states = [net.initial_state(batch_size, device) for net in self.members]
        return _stack(states, self.is_lstm)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Log of the members' mean next-character probabilities (usable as logits) and the stacked state."""
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        parts = _unstack(state, len(self.members), self.is_lstm)
        log_probs, new_states = [], []
        for net, part in zip(self.members, parts, strict=True):
            logits, new_state = net(tokens, part)
            log_probs.append(F.log_softmax(logits.float(), dim=-1))
            new_states.append(new_state)
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))
        return mixed, _stack(new_states, self.is_lstm)


def _stack(states: list[State], is_lstm: bool) -> State:
    if is_lstm:
        return tuple(torch.cat(parts) for parts in zip(*states, strict=True))
    return torch.cat(states)


def _unstack(state: State, members: int, is_lstm: bool) -> list[State]:
    if is_lstm:
        return list(zip(*(s.chunk(members) for s in state), strict=True))
    return list(state.chunk(members))


def load_models(
    paths: str | Path | Sequence[str | Path], device: str | torch.device = "cpu"
) -> tuple[CharRNN | Ensemble, list[dict]]:
    """One checkpoint's network, or several checkpoints' ensemble, in eval mode, with the checkpoint dicts."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    loaded = [load_checkpoint(path, device) for path in paths]
    if len(loaded) == 1:
        net, ckpt = loaded[0]
        return net, [ckpt]
    ckpts = [ckpt for _, ckpt in loaded]
    for path, ckpt in zip(paths[1:], ckpts[1:], strict=True):
        for key in SHARED_FIELDS:
            if ckpt.get(key) != ckpts[0].get(key):
                raise CheckpointError(f"{path} has a different {key.replace('_', ' ')} from {paths[0]}; not averaged")
    try:
        net = Ensemble([net for net, _ in loaded])
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return net.eval(), ckpts
