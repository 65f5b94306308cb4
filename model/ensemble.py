"""Several trained networks used as one model: their next-character distributions are averaged.

Networks trained with different sizes, seeds or regularisation make different mistakes, so the
average of their probabilities predicts held-out text better than any one of them
(docs/default-model.md). The members need the same cell, layer count and vocabulary; their recurrent
states are stacked along the layer axis, each padded with zeros to the widest member's hidden size, so
an ensemble of K networks of L layers has the state of one network with K·L layers and fits the same
ONNX contract, engine and batching.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Checkpoint, CheckpointError, check_same_fields, load_checkpoint
from model.model import CharRNN, State

# For the --checkpoint help of every command that takes several checkpoints.
CHECKPOINTS_HELP = "several with the same cell, layer count and vocabulary act as their ensemble (mean probability)"


def add_checkpoints_argument(parser: argparse.ArgumentParser, help: str, *names: str) -> None:
    """The one or more checkpoints a command reads (`--checkpoint` unless `names` says otherwise)."""
    options = {"required": True} if not names or names[0].startswith("-") else {}
    parser.add_argument(
        *(names or ("--checkpoint",)), nargs="+", metavar="CKPT", help=f"{help}; {CHECKPOINTS_HELP}", **options
    )


# Checkpoint fields that must agree for networks to be averaged: same tokens, same text cleaning.
SHARED_FIELDS = ("vocab", "cleaning", "unknown_policy")


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[CharRNN]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two networks")
        first = members[0].config
        for net in members[1:]:
            if any(
                getattr(net.config, key) != getattr(first, key) for key in ("model_type", "num_layers", "vocab_size")
            ):
                raise ValueError(
                    "ensemble members must have the same cell, number of layers and vocabulary; got "
                    + " and ".join(f"{n.config.model_type} {n.config.num_layers}x{n.config.rnn_size}" for n in members)
                )
        self.members = nn.ModuleList(members)
        # What callers read (vocab_size, model_type, num_layers, rnn_size): the widest member's config.
        self.config = max((net.config for net in members), key=lambda config: config.rnn_size)

    @property
    def is_lstm(self) -> bool:
        return self.members[0].is_lstm

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers * len(self.members), batch_size, self.config.rnn_size)
        h = torch.zeros(shape, device=device)
        return (h, torch.zeros_like(h)) if self.is_lstm else h

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Log of the members' mean next-character probabilities (usable as logits) and the stacked state."""
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        tensors = state if self.is_lstm else (state,)
        layers, width = self.config.num_layers, self.config.rnn_size
        log_probs, new_tensors = [], []
        for k, net in enumerate(self.members):
            size = net.config.rnn_size
            own = tuple(t[k * layers : (k + 1) * layers, :, :size].contiguous() for t in tensors)
            logits, new_state = net(tokens, own if self.is_lstm else own[0])
            log_probs.append(F.log_softmax(logits.float(), dim=-1))
            new_tensors.append([F.pad(t, (0, width - size)) for t in (new_state if self.is_lstm else (new_state,))])
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))
        stacked = tuple(torch.cat(parts) for parts in zip(*new_tensors, strict=True))
        return mixed, stacked if self.is_lstm else stacked[0]


def load_models(
    paths: str | Path | Sequence[str | Path], device: str | torch.device = "cpu"
) -> tuple[CharRNN | Ensemble, list[Checkpoint]]:
    """One checkpoint's network, or several checkpoints' ensemble, in eval mode, with the checkpoint dicts."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    loaded = [load_checkpoint(path, device) for path in paths]
    if len(loaded) == 1:
        net, ckpt = loaded[0]
        return net, [ckpt]
    ckpts = [ckpt for _, ckpt in loaded]
    check_same_fields(paths, ckpts, SHARED_FIELDS, "not averaged")
    try:
        net = Ensemble([net for net, _ in loaded])
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return net.eval(), ckpts
