"""`python -m export evaluate MODEL.onnx --text FILE`: bits per character of an exported model. Torch-free.

Same protocol as `python -m model evaluate`: the text is cleaned with the model's own options, every
character after the first is predicted from all characters before it, starting from a zero state.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from bot.inference.api import INT8_WEIGHT_CHOICES, PROVIDER_CHOICES, PROVIDERS
from bot.inference.modelfile import ModelInfo, state_names
from bot.inference.runner import ModelRunner, usable_cores
from model.cli import UsageError
from model.prepare import read_utf8

# Characters a stream reads before it scores: enough that the state no longer depends on its zero start,
# so the many-stream score matches the one-stream score (bench/export_evaluate.py measures the difference).
BURN_IN = 512
STREAMS = 64
# Each part at least this long, so the burn-ins' small differences stay below 1e-4 bits/char overall.
MIN_PART = 2 * BURN_IN
# Fewer streams than this per lane leave its core waiting on small matrix-vector products (docs/export.md).
MIN_LANE_STREAMS = 16


def lane_count(provider: str, streams: int) -> int:
    """One session per core on CPU, each with at least MIN_LANE_STREAMS streams; one on a GPU."""
    if provider != PROVIDERS["cpu"]:
        return 1
    return max(1, min(usable_cores(), streams // MIN_LANE_STREAMS))


def stream_count(scored: int, streams: int = STREAMS) -> int:
    """At most `streams` parts of at least MIN_PART characters each (at least one)."""
    return min(streams, max(1, scored // MIN_PART))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export evaluate",
        description="Report an exported model's bits per character on a text file, after the model's own cleaning.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="model written by `python -m export`")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto", help="onnxruntime execution provider")
    p.add_argument(
        "--int8-weights",
        choices=INT8_WEIGHT_CHOICES,
        default="auto",
        help="an int8 model's weights as served, as the bot's ONNX_INT8_WEIGHTS (auto: int8 where the CPU has "
        "VNNI or AMX, else uint8; both exact there)",
    )
    p.add_argument("--seq-length", type=int, default=512, help="characters per call (speed only)")
    p.add_argument(
        "--streams",
        type=int,
        default=STREAMS,
        help=f"at most this many parts of the text (each at least {MIN_PART} characters) scored side by side "
        f"in one batch, each after a burn-in of {BURN_IN} characters (speed; 1: the text as one stream)",
    )
    p.add_argument(
        "--lanes",
        type=int,
        help=f"onnxruntime sessions scoring their share of the streams side by side (default: one per core on "
        f"CPU, each with at least {MIN_LANE_STREAMS} streams; one on a GPU)",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return p


def zero_state(info: ModelInfo, batch: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(info.state_shape(batch), np.float32) for name in state_names(info.is_lstm)[0]}


def stream_layout(scored: int, streams: int, burn_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each stream starts reading and where its scored part starts, for `scored` predictions.

    The predictions are cut into `streams` consecutive parts. Stream k reads from `burn_in` characters
    before its part (from the text's start for the first), so its state has forgotten the zero start
    by the time it scores; the first stream is exactly the one-stream protocol.
    """
    bounds = np.linspace(0, scored, streams + 1).round().astype(np.int64)
    return np.maximum(bounds[:-1] - burn_in, 0), bounds


def onnx_char_nats(
    session: ort.InferenceSession | Sequence[ort.InferenceSession],
    info: ModelInfo,
    ids: np.ndarray,
    seq_length: int = 512,
    streams: int = 1,
    burn_in: int = BURN_IN,
    progress: bool = False,
) -> np.ndarray:
    """Cross-entropy in nats of predicting each ids[t+1] from ids[..t]: one value per scored character.

    streams=1 reads the text as one stream from a zero state. More streams read consecutive parts
    side by side in one batch, as training does, each after a burn-in (stream_layout): a batch row costs
    little more than one stream, and the score stays that of the one stream (docs/export.md, Evaluate).
    Several sessions (one per core, as the bot's lanes) each take a share of the streams, side by side.
    """
    if len(ids) < 2:
        raise ValueError(f"text of {len(ids)} characters is too short to evaluate (need at least 2)")
    sessions = [session] if isinstance(session, ort.InferenceSession) else list(session)
    scored = len(ids) - 1
    streams = max(1, min(streams, scored))
    reads, bounds = stream_layout(scored, streams, burn_in)
    width = int((bounds[1:] - reads).max())
    tokens = np.zeros((streams, width), np.int64)
    targets = np.zeros((streams, width), np.int64)
    keep = np.zeros((streams, width), bool)
    for k, (read, first, end) in enumerate(zip(reads, bounds[:-1], bounds[1:], strict=True)):
        tokens[k, : end - read] = ids[read:end]
        targets[k, : end - read] = ids[read + 1 : end + 1]
        keep[k, first - read : end - read] = True
    shares = [rows for rows in np.array_split(np.arange(streams), len(sessions)) if len(rows)]
    calls = len(shares) * -(-width // seq_length)
    with tqdm(total=calls, desc="scoring", unit="chunk", disable=not progress, leave=False) as bar:

        def score(lane: ort.InferenceSession, rows: np.ndarray) -> np.ndarray:
            return _score_rows(lane, info, tokens[rows], targets[rows], seq_length, bar.update)

        # onnxruntime releases the GIL while it runs, so the sessions' threads run on separate cores.
        with ThreadPoolExecutor(len(shares)) as pool:
            nats = np.concatenate(list(pool.map(score, sessions, shares)))
    # Row-major order: stream 0's part, then stream 1's, ...: the text's order.
    return nats[keep]


def _score_rows(
    session: ort.InferenceSession,
    info: ModelInfo,
    tokens: np.ndarray,
    targets: np.ndarray,
    seq_length: int,
    on_call: Callable[[], object],
) -> np.ndarray:
    """The nats of each of these streams' predictions, read `seq_length` characters per call."""
    state = zero_state(info, len(tokens))
    _, state_out = state_names(info.is_lstm)
    nats = np.zeros(tokens.shape)
    for start in range(0, tokens.shape[1], seq_length):
        chunk = slice(start, start + seq_length)
        logits, *new_state = session.run(["logits", *state_out], {"tokens": tokens[:, chunk], **state})
        state = dict(zip(state, new_state, strict=True))
        scores = logits.astype(np.float64)
        top = scores.max(axis=2, keepdims=True)
        log_norm = (top + np.log(np.exp(scores - top).sum(axis=2, keepdims=True)))[..., 0]
        nats[:, chunk] = log_norm - np.take_along_axis(scores, targets[:, chunk, None], axis=2)[..., 0]
        on_call()
    return nats


def onnx_nats(session: ort.InferenceSession, info: ModelInfo, ids: np.ndarray, seq_length: int = 512) -> float:
    """Mean cross-entropy in nats of predicting ids[t+1] from ids[..t]."""
    return float(onnx_char_nats(session, info, ids, seq_length).mean())


def main(args: argparse.Namespace) -> None:
    for name, value in (("--seq-length", args.seq_length), ("--streams", args.streams), ("--lanes", args.lanes)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive number, not {value}")
    runner = ModelRunner(args.model, args.providers, int8_weights=args.int8_weights)
    session, info, provider = runner.session, runner.info, runner.provider
    text, _ = read_utf8(Path(args.text))
    ids, unknown = info.text_ids(text)
    if len(ids) < 2:
        raise UsageError(f"{args.text} has fewer than 2 characters after cleaning; nothing to score")
    streams = stream_count(len(ids) - 1, args.streams)
    lanes = min(args.lanes or lane_count(provider, streams), streams)
    sessions = [session] + [
        ModelRunner(args.model, args.providers, int8_weights=args.int8_weights).session for _ in range(lanes - 1)
    ]
    nats = float(onnx_char_nats(sessions, info, ids, args.seq_length, streams, progress=args.progress).mean())
    vocab_note = f"{unknown:,} outside the vocabulary ({info.unknown_policy} policy)"
    weights = f" ({runner.int8_weights} weights)" if runner.int8_weights else ""
    how = f"{info.precision} model{weights} on {provider}, {streams} stream{'s' if streams > 1 else ''}"
    how += f" in {lanes} lanes" if lanes > 1 else ""
    print(f"{args.text}: {len(ids) - 1:,} characters scored, {vocab_note}; {how}")
    print(f"loss {nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char")
