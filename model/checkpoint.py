"""The `Checkpoint` type: what `python -m model train` saves, and the one safe way to load it.

Loading never runs code from the file: `torch.load(..., weights_only=True)` unpickles tensors and plain
Python values only. A checkpoint written before this type existed also holds numpy's RNG state, a
numpy uint32 array; numpy's array reconstruction (no code of the file's choosing) is the only thing
allow-listed for it. New checkpoints store that state as plain ints (docs/training.md, Checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.cli import UsageError, check_input_file
from model.model import CharRNN, ModelConfig, State

CHECKPOINT_FORMAT = "speechbot-checkpoint/1"

# What checkpoints written before plain-type RNG states need beyond weights_only's defaults.
_numpy_core = getattr(np, "_core", None) or np.core
LEGACY_SAFE_GLOBALS = [_numpy_core.multiarray._reconstruct, np.ndarray, np.dtype]
if hasattr(np, "dtypes"):
    LEGACY_SAFE_GLOBALS.append(np.dtypes.UInt32DType)


class CheckpointError(UsageError):
    """A checkpoint file that is missing, corrupt or not ours."""


def rng_state() -> dict:
    """Every RNG training draws from, as tensors and plain ints (so weights_only loads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # a legacy checkpoint's numpy array
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A trained network and what it was trained on; the training fields let `--resume` continue exactly."""

    model_config: dict
    model: dict[str, torch.Tensor]
    vocab: list[str]
    unknown_policy: str = "nearest"
    cleaning: dict = field(default_factory=dict)
    dataset_sha256: list[str] = field(default_factory=list)
    # The corpora (sha256) of the checkpoints this one was fine-tuned from (`train --init-from`), oldest
    # first, so that a model tuned last on one text still names every text it learned from.
    earlier_sha256: list[str] = field(default_factory=list)
    # The prepared dataset's folder (absolute), so `evaluate --split` needs no --data.
    dataset: str | None = None
    val_bpc: float | None = None
    iteration: int = 0
    epoch: float = 0.0
    best_val_bpc: float | None = None
    elapsed: float = 0.0
    optimizer: dict | None = None
    rnn_state: State | None = None
    rng: dict | None = None
    train_config: dict = field(default_factory=dict)
    # The checkpoints whose weights `python -m model average` took the mean of (path, iteration, val_bpc
    # each, oldest first); empty for a checkpoint that training wrote.
    averaged_from: list[dict] = field(default_factory=list)

    @property
    def corpora_sha256(self) -> list[str]:
        """Every corpus the network learned from: those it was tuned from, then its own dataset's."""
        return list(dict.fromkeys([*self.earlier_sha256, *self.dataset_sha256]))

    def save(self, path: str | Path) -> None:
        """Write atomically, so that a kill during the save never leaves a half-written checkpoint."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, **dataclasses.asdict(self)}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
        path = check_input_file(path, "checkpoint")
        try:
            with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
                data = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt or unsafe file
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
            detail = (
                f"it would import {unsafe.group(1)}, and only tensors and plain values are loaded"
                if unsafe
                else f"not a PyTorch file, or a damaged one: {type(exc).__name__}"
            )
            raise CheckpointError(f"{path} is not a readable speechbot checkpoint ({detail})") from None
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a speechbot checkpoint (made by `python -m model train`)")
        data = dict(data)
        del data["format"]
        if "train_args" in data:  # the name before TrainConfig
            data["train_config"] = data.pop("train_args")
            data.setdefault("dataset", None)
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f for f in dataclasses.fields(cls) if dataclasses.MISSING is f.default is f.default_factory]
        missing = [f.name for f in required if f.name not in data]
        if missing or set(data) - names:
            fields = ", ".join(missing or sorted(set(data) - names))
            raise CheckpointError(f"{path} is not a speechbot checkpoint of this version (fields: {fields})")
        return cls(**data)

    def build_model(self, device: str | torch.device = "cpu", **config_changes: Any) -> CharRNN:
        """The network in eval mode; config_changes (e.g. dropout) apply to the rebuilt network."""
        net = CharRNN(ModelConfig(**{**self.model_config, **config_changes}))
        net.load_state_dict(self.model)
        return net.to(device).eval()


def _difference(ours: Any, first: Any) -> str:
    """The keys on which two config dicts differ, as " (key ours vs first, ...)"; nothing for other values."""
    if not (isinstance(ours, dict) and isinstance(first, dict)):
        return ""
    keys = sorted(key for key in ours.keys() | first.keys() if ours.get(key) != first.get(key))
    return " (" + ", ".join(f"{key} {ours.get(key)} vs {first.get(key)}" for key in keys) + ")"


def check_same_fields(
    paths: Sequence[str | Path], ckpts: Sequence[Checkpoint], fields: Sequence[str], consequence: str
) -> None:
    """Raise CheckpointError naming the first checkpoint, and its field, that differs from the first one;
    `consequence` ends the message (what the command does not do with them)."""
    for path, ckpt in zip(paths[1:], ckpts[1:], strict=True):
        for name in fields:
            ours, first = getattr(ckpt, name), getattr(ckpts[0], name)
            if ours != first:
                raise CheckpointError(
                    f"{path} has a different {name.replace('_', ' ')}{_difference(ours, first)} from {paths[0]}; "
                    f"{consequence}"
                )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CharRNN, Checkpoint]:
    """The network in eval mode and its checkpoint."""
    ckpt = Checkpoint.load(path, device)
    return ckpt.build_model(device), ckpt
