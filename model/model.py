"""The character-level network: embedding -> LSTM / GRU / vanilla RNN -> linear decoder."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
INIT_SCHEMES = ("default", "xavier", "normal")
# The ModelConfig fields that only act while training, each a probability in [0, 1); `train --init-from`
# may change them.
REGULARISERS = ("dropout", "weight_drop", "embed_drop", "input_drop")

State = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


@dataclass
class ModelConfig:
    vocab_size: int
    model_type: str = "lstm"
    rnn_size: int = 512
    num_layers: int = 2
    wordvec_size: int = 64
    dropout: float = 0.0
    # DropConnect on the hidden-to-hidden matrices while training (AWD-LSTM's weight drop). It
    # regularises the recurrence itself, which plain dropout between layers leaves untouched.
    weight_drop: float = 0.0
    # AWD-LSTM's embedding dropout: whole characters' vectors dropped for a batch, so the network
    # cannot lean on any one character's embedding.
    embed_drop: float = 0.0
    # Variational ("locked") dropout on the LSTM's input: one mask per stream, the same at every time
    # step, which regularises without the step-to-step noise that plain dropout adds to a recurrence.
    input_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.model_type not in RNN_TYPES:
            raise ValueError(f"model type must be one of {', '.join(RNN_TYPES)}, not {self.model_type!r}")
        for name in ("vocab_size", "rnn_size", "num_layers", "wordvec_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer")
        for name in REGULARISERS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name.replace('_', '-')} must be in [0, 1), not {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.wordvec_size)
        self.rnn = RNN_TYPES[config.model_type](
            config.wordvec_size,
            config.rnn_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(config.rnn_size, config.vocab_size)

    @property
    def is_lstm(self) -> bool:
        return self.config.model_type == "lstm"

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch_size, self.config.rnn_size)
        h = torch.zeros(shape, device=device)
        return (h, torch.zeros_like(h)) if self.is_lstm else h

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        output, state = self._recur(self._embed(tokens), state)
        return self.decoder(self.drop(output)), state

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.embedding(tokens)
        # Each mask is dropout applied to ones of a smaller shape, broadcast: one per character (all of its
        # occurrences alike), one per stream and feature (all of its time steps alike).
        weight = self.embedding.weight
        if self.config.embed_drop > 0:
            weight = weight * F.dropout(weight.new_ones(weight.shape[0], 1), self.config.embed_drop)
        vectors = F.embedding(tokens, weight)
        if self.config.input_drop > 0:
            batch, _, width = vectors.shape
            vectors = vectors * F.dropout(vectors.new_ones(batch, 1, width), self.config.input_drop)
        return vectors

    def _recur(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not (self.training and self.config.weight_drop > 0):
            return self.rnn(inputs, state)
        # One mask per batch for each recurrent matrix, shared by every time step; the stored
        # weights stay whole, so evaluation, checkpoints and export need nothing special.
        weights = {
            name: F.dropout(param, self.config.weight_drop) if name.startswith("weight_hh") else param
            for name, param in self.rnn.named_parameters()
        }
        return functional_call(self.rnn, weights, (inputs, state))

    def init_weights(self, scheme: str = "default", std: float = 0.05) -> None:
        """PyTorch's default init, Xavier (Glorot) uniform, or N(0, std) as in the DL4J example."""
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, not {scheme!r}")
        if scheme == "default":
            return
        for name, param in self.named_parameters():
            if name.endswith("bias") or "bias_" in name:
                nn.init.zeros_(param)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(param)
            else:
                nn.init.normal_(param, 0.0, std)
        if self.is_lstm:
            # A forget-gate bias of 1 lets gradients flow through time early in training.
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    size = self.config.rnn_size
                    param.data[size : 2 * size] = 1.0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State, dtype: torch.dtype | None = None) -> State:
    """Cut the graph between consecutive batches (truncated BPTT) but keep the values (as `dtype` if given)."""
    if isinstance(state, tuple):
        return tuple(s.detach().to(dtype or s.dtype) for s in state)
    return state.detach().to(dtype or state.dtype)


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
