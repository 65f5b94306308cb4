"""`python -m model evaluate`: loss in nats and bits per character on a split or any text file.

`--dynamic-lr` turns on dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural
Sequence Models"): the network scores a segment, then takes one SGD step on it, so it keeps learning
from the text it has just read, as PPMd and the other compressors do. It changes a copy of the weights
only; the checkpoint and the bot's model stay as trained.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.cli import UsageError
from model.dataset import load_dataset
from model.model import CharRNN, detach_state, nats_to_bits
from model.prepare import read_utf8
from model.text import CleaningOptions, Vocab, text_to_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model evaluate",
        description="Report loss (nats) and bits per character. Each character is predicted from all the "
        "characters before it, starting from a zero state; the first character is not scored.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="TOML/YAML/JSON file with these flags as keys")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint to evaluate")
    p.add_argument("--data", metavar="DIR", help="prepared dataset for --split")
    p.add_argument("--split", choices=("train", "val", "test"), default="val", help="split of --data to score")
    p.add_argument("--text", metavar="FILE", help="score this text file instead (cleaned like the training text)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    p.add_argument("--seq-length", type=int, default=512, help="characters per forward call (speed only)")
    p.add_argument(
        "--dynamic-lr", type=float, default=0.0, help="dynamic evaluation: SGD step size per segment (0: off)"
    )
    p.add_argument(
        "--dynamic-decay",
        type=float,
        default=0.0,
        help="dynamic evaluation: share of the way back to the trained weights after each step",
    )
    p.add_argument("--dynamic-segment", type=int, default=50, help="dynamic evaluation: characters per SGD step")
    return p


@torch.no_grad()
def char_nats(
    net: CharRNN, ids: np.ndarray, streams: int = 1, seq_length: int = 512, device: str | torch.device = "cpu"
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


def dynamic_char_nats(
    net: CharRNN,
    ids: np.ndarray,
    lr: float,
    decay: float = 0.0,
    segment: int = 50,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy (nats, float64) of each ids[t+1] from ids[..t], learning from the text as it goes.

    One stream from a zero state, like char_nats with streams=1. Each segment is scored before the
    network steps on it, so no character is predicted by weights that have seen it. Dropout stays off.
    With lr=0 this is char_nats.
    """
    if len(ids) < 2:
        raise UsageError(f"text of {len(ids)} characters is too short to evaluate (need at least 2)")
    adapted = copy.deepcopy(net).eval()
    params = [p for p in adapted.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)
    state = adapted.initial_state(1, device)
    pieces = []
    for start in range(0, len(ids) - 1, segment):
        x = data[start : min(start + segment, len(ids) - 1)][None]
        y = data[start + 1 : start + 1 + x.shape[1]][None]
        logits, state = adapted(x, state)
        nats = F.cross_entropy(logits.float()[0], y[0], reduction="none")
        pieces.append(nats.detach().double().cpu())
        adapted.zero_grad(set_to_none=True)
        nats.mean().backward()
        with torch.no_grad():
            for param, original in zip(params, trained, strict=True):
                param.add_(param.grad, alpha=-lr)
                if decay:
                    param.add_(original - param, alpha=decay)
        state = detach_state(state)
    return torch.cat(pieces)


def evaluate_ids(
    net: CharRNN, ids: np.ndarray, streams: int = 1, seq_length: int = 512, device: str | torch.device = "cpu"
) -> tuple[float, int]:
    """Mean cross-entropy (nats) over the scored characters (see char_nats), and how many were scored."""
    nats = char_nats(net, ids, streams, seq_length, device)
    return float(nats.mean()), nats.numel()


def main(args: argparse.Namespace) -> None:
    net, ckpt = load_checkpoint(args.checkpoint, args.device)
    vocab = Vocab(ckpt["vocab"], ckpt.get("unknown_policy", "nearest"))
    unknown = 0
    if args.text:
        text, _ = read_utf8(Path(args.text))
        token_ids, unknown = text_to_ids(text, vocab, CleaningOptions.from_dict(ckpt["cleaning"]))
        ids = np.array(token_ids, dtype=np.int64)
        source = args.text
    elif args.data:
        dataset = load_dataset(args.data)
        if dataset.vocab.chars != vocab.chars:
            raise UsageError(f"{args.data} has a different vocabulary from the checkpoint")
        ids, source = dataset.splits[args.split], f"{args.data} ({args.split} split)"
    else:
        raise UsageError("give --data DIR (with --split) or --text FILE")
    if args.dynamic_lr < 0 or not 0 <= args.dynamic_decay <= 1 or args.dynamic_segment < 1:
        raise UsageError("--dynamic-lr must be at least 0, --dynamic-decay from 0 to 1, --dynamic-segment at least 1")
    if args.dynamic_lr:
        all_nats = dynamic_char_nats(net, ids, args.dynamic_lr, args.dynamic_decay, args.dynamic_segment, args.device)
        nats, count = float(all_nats.mean()), all_nats.numel()
        how = (
            f", dynamic evaluation (lr {args.dynamic_lr:g}, decay {args.dynamic_decay:g}, "
            f"segment {args.dynamic_segment})"
        )
    else:
        nats, count = evaluate_ids(net, ids, streams=1, seq_length=args.seq_length, device=args.device)
        how = ""
    print(f"{source}: {count:,} characters scored, {unknown:,} outside the vocabulary ({vocab.unknown_policy} policy)")
    print(f"loss {nats:.4f} nats/char, {nats_to_bits(nats):.4f} bits/char{how}")
