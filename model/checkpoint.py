"""Saving and loading training checkpoints (model, optimizer, schedule, RNG and data position)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model.cli import UsageError
from model.model import CharRNN, ModelConfig

CHECKPOINT_FORMAT = "speechbot-checkpoint/1"


class CheckpointError(UsageError):
    """A checkpoint file that is missing, corrupt or not ours."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically, so that a kill during the save never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold RNG states and plain Python values besides tensors.
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a speechbot checkpoint (made by `python -m model train`)")
    return ckpt


def build_model(ckpt: dict, device: str | torch.device = "cpu") -> CharRNN:
    net = CharRNN(ModelConfig(**ckpt["model_config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CharRNN, dict]:
    """The network in eval mode and the checkpoint dict."""
    ckpt = read_checkpoint(path, device)
    net = build_model(ckpt, device)
    net.eval()
    return net, ckpt
