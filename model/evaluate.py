"""`python -m model evaluate`: loss in nats and bits per character on a split or any text file.

`--dynamic` turns on dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural
Sequence Models", its RMS variant) with the settings below; `--dynamic-lr`, `--dynamic-decay` and
`--dynamic-segment` tune it. The network scores a segment, then takes one gradient step on it, so it
keeps learning from the text it has just read, as PPMd and the other compressors do. It changes a
copy of the weights only; the checkpoint and the bot's model stay as trained.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import Checkpoint
from model.cli import UsageError, command_parser
from model.dataset import load_dataset
from model.dynamic import DYNAMIC_DECAY, DYNAMIC_SEGMENT, DYNAMIC_STATS_CHARS, add_dynamic_arguments, dynamic_lr
from model.ensemble import Ensemble, add_checkpoints_argument, load_models
from model.model import CharRNN, detach_state, nats_to_bits
from model.prepare import read_utf8
from model.text import CleaningOptions, Vocab, text_to_ids

RMS_FLOOR = 0.1  # share of the mean gradient RMS below which a weight's RMS is raised


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m model evaluate",
        "Report loss (nats) and bits per character. Each character is predicted from all the "
        "characters before it, starting from a zero state; the first character is not scored.",
    )
    add_checkpoints_argument(p, "checkpoint to evaluate")
    p.add_argument(
        "--data", metavar="DIR", help="prepared dataset for --split (default: the one the checkpoint was trained on)"
    )
    p.add_argument("--split", choices=("train", "val", "test"), default="val", help="split of --data to score")
    p.add_argument("--text", metavar="FILE", help="score this text file instead (cleaned like the training text)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    p.add_argument("--seq-length", type=int, default=512, help="characters per forward call (speed only)")
    add_dynamic_arguments(p, "score with dynamic evaluation")
    p.add_argument(
        "--dynamic-decay",
        type=float,
        default=DYNAMIC_DECAY,
        help="dynamic evaluation: pull back toward the trained weights after each step",
    )
    p.add_argument(
        "--dynamic-segment", type=int, default=DYNAMIC_SEGMENT, help="dynamic evaluation: characters per step"
    )
    return p


@torch.no_grad()
def char_nats(
    net: CharRNN | Ensemble,
    ids: np.ndarray,
    streams: int = 1,
    seq_length: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy (nats, float64) of predicting each ids[t+1] from ids[..t], stream after stream.

    streams=1 scores every character after the first from its full left context; more streams
    split the text into that many contiguous pieces (faster, used during training), each starting
    from a zero state.
    """
    length = (len(ids) - 1) // streams
    if length < 1:
        raise UsageError(f"text of {len(ids)} characters is too short to evaluate (need at least {streams + 1})")
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    x = data[: streams * length].view(streams, length)
    y = data[1 : streams * length + 1].view(streams, length)
    was_training = net.training
    net.eval()
    state = net.initial_state(streams, device)
    pieces = []
    for start in range(0, length, seq_length):
        xb = x[:, start : start + seq_length].to(device)
        yb = y[:, start : start + seq_length].to(device)
        logits, state = net(xb, state)
        state = detach_state(state)
        pieces.append(F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none").double().cpu())
    net.train(was_training)
    return torch.cat(pieces, dim=1).flatten()


def _segments(net: CharRNN, ids: np.ndarray, segment: int, after_backward: Callable[[], None], device) -> torch.Tensor:
    """Score ids one segment at a time (one stream, zero start state), backpropagate each segment's mean
    loss, and call after_backward; returns the nats of each ids[t+1] from ids[..t]."""
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)
    state = net.initial_state(1, device)
    pieces = []
    for start in range(0, len(ids) - 1, segment):
        x = data[start : min(start + segment, len(ids) - 1)][None]
        y = data[start + 1 : start + 1 + x.shape[1]][None]
        logits, state = net(x, state)
        nats = F.cross_entropy(logits.float()[0], y[0], reduction="none")
        pieces.append(nats.detach().double().cpu())
        net.zero_grad(set_to_none=True)
        nats.mean().backward()
        after_backward()
        state = detach_state(state)
    return torch.cat(pieces)


def gradient_rms(
    net: CharRNN, train_ids: np.ndarray, segment: int = DYNAMIC_SEGMENT, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Root mean square of each weight's gradient, per parameter, over the segments of the last
    DYNAMIC_STATS_CHARS characters of the training text (the part nearest the held-out splits)."""
    model = copy.deepcopy(net).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]

    def accumulate() -> None:
        for total, param in zip(sums, params, strict=True):
            total.add_(param.grad.square())

    stats = train_ids[-DYNAMIC_STATS_CHARS:]
    _segments(model, stats, segment, accumulate, device)
    count = math.ceil((len(stats) - 1) / segment)  # one gradient per segment
    return [(total / count).sqrt() for total in sums]


def dynamic_char_nats(
    net: CharRNN,
    ids: np.ndarray,
    rms: list[torch.Tensor],
    lr: float,
    decay: float = DYNAMIC_DECAY,
    segment: int = DYNAMIC_SEGMENT,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy (nats, float64) of each ids[t+1] from ids[..t], learning from the text as it goes.

    Krause et al.'s RMS variant: after scoring a segment, each weight moves by lr * gradient / rms
    (rms from gradient_rms on training text), then back toward its trained value by decay times its
    rms relative to the mean rms, so the weights that training moves most also adapt and recover
    most. One stream from a zero state, like char_nats with streams=1; a segment is scored before
    the network steps on it. Dropout stays off. With lr=0 and decay=0 this is char_nats.
    """
    if len(ids) < 2:
        raise UsageError(f"text of {len(ids)} characters is too short to evaluate (need at least 2)")
    adapted = copy.deepcopy(net).eval()
    params = [p for p in adapted.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    # A weight whose gradient was ~0 on the statistics text (the embedding row of a character it never
    # had) would otherwise take a near-infinite step the first time that character shows up.
    rms = [torch.clamp(r, min=RMS_FLOOR * mean_rms) for r in rms]
    pull = [torch.clamp(decay * r / mean_rms, max=1.0) for r in rms]

    def step() -> None:
        with torch.no_grad():
            for param, original, r, back in zip(params, trained, rms, pull, strict=True):
                param.addcdiv_(param.grad, r, value=-lr)
                param.add_((original - param) * back)

    return _segments(adapted, ids, segment, step, device)


def evaluate_ids(
    net: CharRNN | Ensemble,
    ids: np.ndarray,
    streams: int = 1,
    seq_length: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """Mean cross-entropy (nats) over the scored characters (see char_nats), and how many were scored."""
    nats = char_nats(net, ids, streams, seq_length, device)
    return float(nats.mean()), nats.numel()


def checkpoint_dataset(ckpt: Checkpoint, path: str, remedy: str = "give --data DIR or --text FILE") -> str:
    """The dataset folder a checkpoint was trained on, if it is still there and still the same data; `remedy`
    ends the one-line error otherwise (what the calling command accepts instead)."""
    data_dir = ckpt.dataset or ckpt.train_config.get("data")
    if not data_dir:
        raise UsageError(f"{path} does not record its dataset; {remedy}")
    if not (Path(data_dir) / "meta.json").is_file():
        raise UsageError(f"{path} was trained on {data_dir}, which is not there; {remedy}")
    if load_dataset(data_dir).sha256 != ckpt.dataset_sha256:
        raise UsageError(f"{data_dir} was prepared again from other text since {path} was trained; {remedy}")
    return data_dir


def main(args: argparse.Namespace) -> None:
    lr = dynamic_lr(args)
    if not 0 <= args.dynamic_decay <= 1 or args.dynamic_segment < 1:
        raise UsageError("--dynamic-decay must be from 0 to 1 and --dynamic-segment at least 1")
    if lr and len(args.checkpoint) > 1:
        raise UsageError("dynamic evaluation trains one network; give one --checkpoint")
    net, (ckpt, *_) = load_models(args.checkpoint, args.device)
    vocab = Vocab(ckpt.vocab, ckpt.unknown_policy)
    dataset = None
    if args.data or not args.text or lr:
        data_dir = args.data or checkpoint_dataset(ckpt, args.checkpoint[0])
        dataset = load_dataset(data_dir)
        if dataset.vocab.chars != vocab.chars:
            raise UsageError(f"{data_dir} has a different vocabulary from the checkpoint")
    unknown = 0
    if args.text:
        text, _ = read_utf8(Path(args.text))
        token_ids, unknown = text_to_ids(text, vocab, CleaningOptions.from_dict(ckpt.cleaning))
        ids = np.array(token_ids, dtype=np.int64)
        source = args.text
    else:
        ids, source = dataset.splits[args.split], f"{data_dir} ({args.split} split)"
    if lr:
        rms = gradient_rms(net, dataset.splits["train"], args.dynamic_segment, args.device)
        all_nats = dynamic_char_nats(net, ids, rms, lr, args.dynamic_decay, args.dynamic_segment, args.device)
        nats, count = float(all_nats.mean()), all_nats.numel()
        how = f", dynamic evaluation (lr {lr:g}, decay {args.dynamic_decay:g}, segment {args.dynamic_segment})"
    else:
        nats, count = evaluate_ids(net, ids, streams=1, seq_length=args.seq_length, device=args.device)
        how = ""
    print(f"{source}: {count:,} characters scored, {unknown:,} outside the vocabulary ({vocab.unknown_policy} policy)")
    print(f"loss {nats:.4f} nats/char, {nats_to_bits(nats):.4f} bits/char{how}")
