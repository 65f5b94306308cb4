"""`python -m model sample`: generate text from a checkpoint with PyTorch."""

from __future__ import annotations

import argparse
import time

import torch

from model.cli import UsageError
from model.ensemble import CHECKPOINTS_HELP, Ensemble, load_models
from model.model import CharRNN
from model.text import CleaningOptions, Vocab, normalize_prompt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model sample",
        description="Generate text from a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="TOML/YAML/JSON file with these flags as keys")
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="CKPT",
        help=f"checkpoint to sample from; {CHECKPOINTS_HELP}",
    )
    p.add_argument("--length", type=int, default=2000, help="characters to generate")
    p.add_argument("--start-text", default="", help="prime the model with this text (printed first)")
    p.add_argument("--temperature", type=float, default=0.9, help="softmax temperature, in (0, 2]")
    p.add_argument("--argmax", action="store_true", help="always take the most likely character")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely characters (0: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    p.add_argument("--verbose", action="store_true", help="print timing")
    return p


# A sane ceiling for one request: about two minutes for the default 2x640 on one CPU thread.
MAX_LENGTH = 100_000


def validate_sampling(length: int, temperature: float, top_k: int, prefix: str = "--") -> None:
    """prefix: how the flags are named where they are checked (`--` here, `--sample-` in training)."""
    if not 1 <= length <= MAX_LENGTH:
        raise UsageError(f"{prefix}length must be a number of characters from 1 to {MAX_LENGTH:,}, not {length}")
    if not 0 < temperature <= 2:
        raise UsageError(f"{prefix}temperature must be in (0, 2], not {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be 0 (off) or a positive number, not {top_k}")


@torch.no_grad()
def paragraph_start(net: CharRNN | Ensemble, vocab: Vocab, device: str | torch.device = "cpu", max_chars: int = 300):
    """Logits and state at the start of a sentence that the model wrote itself.

    Training sees a zero state once an epoch, so text sampled straight from it starts with odd
    characters ("éFire, that"). Instead the model reads a newline and writes greedily until it ends
    a sentence (". ", "? ", "! " or a newline; at most max_chars), and generation starts there.
    The bot's engine does the same.
    """
    newline = vocab.encode("\n")[:1] or [0]
    enders = set(vocab.encode(".!?"))
    breaks = set(vocab.encode(" ")) | set(newline)
    logits, state = net(torch.tensor([newline], device=device))
    previous = newline[0]
    for _ in range(max_chars):
        token = int(logits[0, -1].argmax())
        logits, state = net(torch.tensor([[token]], device=device), state)
        if token in breaks and previous in enders:
            break
        previous = token
    return logits, state


@torch.no_grad()
def sample_text(
    net: CharRNN | Ensemble,
    vocab: Vocab,
    cleaning: CleaningOptions,
    length: int,
    start_text: str = "",
    temperature: float = 0.9,
    argmax: bool = False,
    top_k: int = 0,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> str:
    """The continuation of start_text (not including it). Uses its own generator, never the global RNG."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = net.training
    net.eval()
    logits, state = paragraph_start(net, vocab, device)
    prompt_ids = vocab.encode(normalize_prompt(start_text, cleaning))
    if prompt_ids:
        logits, state = net(torch.tensor([prompt_ids], device=device), state)
    out: list[int] = []
    for _ in range(length):
        last = logits[0, -1].float().cpu()
        if argmax:
            token = int(last.argmax())
        else:
            scaled = last / temperature
            if top_k:
                kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, -torch.inf)
            token = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
        out.append(token)
        logits, state = net(torch.tensor([[token]], device=device), state)
    net.train(was_training)
    return vocab.decode(out)


def main(args: argparse.Namespace) -> None:
    validate_sampling(args.length, args.temperature, args.top_k)
    start = time.perf_counter()
    net, (ckpt, *_) = load_models(args.checkpoint, args.device)
    vocab = Vocab(ckpt.vocab, ckpt.unknown_policy)
    cleaning = CleaningOptions.from_dict(ckpt.cleaning)
    loaded = time.perf_counter()
    text = sample_text(
        net,
        vocab,
        cleaning,
        args.length,
        args.start_text,
        args.temperature,
        args.argmax,
        args.top_k,
        args.seed,
        args.device,
    )
    done = time.perf_counter()
    print(args.start_text + text)
    if args.verbose:
        per_char = (done - loaded) / args.length * 1e6
        print(
            f"\nloaded in {loaded - start:.2f} s; generated {args.length} characters in {done - loaded:.2f} s "
            f"({per_char:.0f} µs/char)"
        )
