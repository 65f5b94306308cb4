"""`python -m model sample`: generate text from a checkpoint with PyTorch."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.cli import UsageError, command_parser
from model.ensemble import Ensemble, add_checkpoints_argument, load_models
from model.model import CharRNN
from model.sampling import (
    TEMPERATURE_RANGE,
    InvalidSampling,
    SamplingParams,
    bot_sampling,
    paragraph_start,
    repeated_characters,
    repetition_start,
    repetition_step,
    sampling_distribution,
)
from model.text import CleaningOptions, Vocab, normalize_prompt


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m model sample", "Generate text from a checkpoint.")
    add_checkpoints_argument(p, "checkpoint to sample from")
    p.add_argument("--length", type=int, default=2000, help="characters to generate")
    p.add_argument("--start-text", default="", help="prime the model with this text (printed first)")
    p.add_argument("--temperature", type=float, default=0.9, help=f"softmax temperature, {TEMPERATURE_RANGE}")
    p.add_argument("--argmax", action="store_true", help="always take the most likely character")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely characters (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the likeliest characters up to this mass (1: all)"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop characters below min_p times the likeliest's probability (0: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=0.0,
        help="subtracted from the logit of a character that repeats a recent --repeat-ngram (0: off; docs/engine.md)",
    )
    p.add_argument("--repeat-ngram", type=int, default=6, help="characters in a string the penalty counts as repeated")
    p.add_argument(
        "--bot-sampling",
        action="store_true",
        help="the bot's min-p, top-p and repetition penalty at --temperature (model/sampling.py bot_sampling)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    p.add_argument("--verbose", action="store_true", help="print timing")
    return p


# A sane ceiling for one request: about two minutes for the default 2x640 on one CPU thread.
MAX_LENGTH = 100_000


def validate_length(length: int, prefix: str = "--") -> None:
    """prefix: how the flags are named where they are checked (`--` here, `--sample-` in training)."""
    if not 1 <= length <= MAX_LENGTH:
        raise UsageError(f"{prefix}length must be a number of characters from 1 to {MAX_LENGTH:,}, not {length}")


def validate_sampling(length: int, temperature: float, top_k: int = 0, prefix: str = "--") -> SamplingParams:
    """Plain sampling settings, checked by SamplingParams; prefix as for validate_length."""
    validate_length(length, prefix)
    try:
        return SamplingParams(temperature=temperature, top_k=top_k)
    except InvalidSampling as exc:
        raise UsageError(exc.as_flag(prefix)) from None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams (--length checked too); --bot-sampling starts from the bot's settings
    (then only --temperature and --top-k change them)."""
    validate_length(args.length)
    try:
        if args.bot_sampling:
            return bot_sampling(args.temperature).with_options(top_k=args.top_k)
        return SamplingParams.from_args(args)
    except InvalidSampling as exc:
        raise UsageError(exc.as_flag()) from None


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
    sampling: SamplingParams | None = None,
) -> str:
    """The continuation of start_text (not including it). Uses its own generator, never the global RNG.

    `sampling` replaces temperature and top_k when given. Plain sampling (temperature, top-k) draws as it
    always has, so a seed gives the same text as before min-p, top-p and the penalty existed; with any
    of those the draw follows model.sampling's reference arithmetic, as the bot's chunk graph does.
    """
    params = sampling or SamplingParams(temperature=temperature, top_k=top_k)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = net.training
    net.eval()

    def step(tokens: list[int], state):
        logits, state = net(torch.tensor([tokens], device=device), state)
        return logits[0, -1], state

    logits, state = paragraph_start(step, vocab.encode)
    prompt_ids = vocab.encode(normalize_prompt(start_text, cleaning))
    if prompt_ids:
        logits, state = step(prompt_ids, state)
    pad = len(vocab)
    history, matches = (x[None] for x in repetition_start(prompt_ids, pad))
    ngram = np.array([params.repeat_ngram])
    out: list[int] = []
    for _ in range(length):
        last = logits.float().cpu()
        if argmax:
            token = int(last.argmax())
        elif params.is_plain:
            scaled = last / params.temperature
            if params.top_k:
                kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, -torch.inf)
            token = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
        else:
            repeated = repeated_characters(history, matches, ngram, pad)
            probabilities = torch.from_numpy(sampling_distribution(last.numpy()[None], [params], repeated)[0])
            token = int(torch.multinomial(probabilities, 1, generator=generator))
        history, matches = repetition_step(history, matches, np.array([token]))
        out.append(token)
        logits, state = step([token], state)
    net.train(was_training)
    return vocab.decode(out)


def main(args: argparse.Namespace) -> None:
    sampling = sampling_params(args)
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
        argmax=args.argmax,
        seed=args.seed,
        device=args.device,
        sampling=sampling,
    )
    done = time.perf_counter()
    print(args.start_text + text)
    if args.verbose:
        per_char = (done - loaded) / args.length * 1e6
        print(
            f"\nloaded in {loaded - start:.2f} s; generated {args.length} characters in {done - loaded:.2f} s "
            f"({per_char:.0f} µs/char)"
        )
