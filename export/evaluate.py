"""`python -m export evaluate MODEL.onnx --text FILE`: bits per character of an exported model. Torch-free.

Same protocol as `python -m model evaluate`: the text is cleaned with the model's own options, every
character after the first is predicted from all characters before it, starting from a zero state.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bot.modelfile import ModelInfo, state_names
from bot.runner import PROVIDER_CHOICES, ModelRunner
from model.cli import UsageError
from model.prepare import read_utf8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export evaluate",
        description="Report an exported model's bits per character on a text file, after the model's own cleaning.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="model written by `python -m export`")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto", help="onnxruntime execution provider")
    p.add_argument("--seq-length", type=int, default=512, help="characters per call (speed only)")
    return p


def zero_state(info: ModelInfo, batch: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(info.state_shape(batch), np.float32) for name in state_names(info.is_lstm)[0]}


def onnx_char_nats(
    session: ort.InferenceSession, info: ModelInfo, ids: np.ndarray, seq_length: int = 512
) -> np.ndarray:
    """Cross-entropy in nats of predicting each ids[t+1] from ids[..t]: one value per scored character."""
    if len(ids) < 2:
        raise ValueError(f"text of {len(ids)} characters is too short to evaluate (need at least 2)")
    state = zero_state(info, 1)
    _, state_out = state_names(info.is_lstm)
    pieces = []
    for start in range(0, len(ids) - 1, seq_length):
        chunk = ids[start : min(start + seq_length, len(ids) - 1)]
        targets = ids[start + 1 : start + 1 + len(chunk)]
        logits, *new_state = session.run(["logits", *state_out], {"tokens": chunk[None, :], **state})
        state = dict(zip(state, new_state, strict=True))
        scores = logits[0].astype(np.float64)
        top = scores.max(axis=1)
        log_norm = top + np.log(np.exp(scores - top[:, None]).sum(axis=1))
        pieces.append(log_norm - scores[np.arange(len(chunk)), targets])
    return np.concatenate(pieces)


def onnx_nats(session: ort.InferenceSession, info: ModelInfo, ids: np.ndarray, seq_length: int = 512) -> float:
    """Mean cross-entropy in nats of predicting ids[t+1] from ids[..t]."""
    return float(onnx_char_nats(session, info, ids, seq_length).mean())


def main(args: argparse.Namespace) -> None:
    if args.seq_length < 1:
        raise UsageError(f"--seq-length must be a positive number, not {args.seq_length}")
    runner = ModelRunner(args.model, args.providers)
    session, info, provider = runner.session, runner.info, runner.provider
    text, _ = read_utf8(Path(args.text))
    ids, unknown = info.text_ids(text)
    if len(ids) < 2:
        raise UsageError(f"{args.text} has fewer than 2 characters after cleaning; nothing to score")
    nats = onnx_nats(session, info, ids, args.seq_length)
    vocab_note = f"{unknown:,} outside the vocabulary ({info.unknown_policy} policy)"
    print(f"{args.text}: {len(ids) - 1:,} characters scored, {vocab_note}; {info.precision} model on {provider}")
    print(f"loss {nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char")
