"""`python -m model novel`: how much of a sample is copied verbatim from the training text.

In the spirit of torch-rnn's novel_substrings.py: for each n, the share of the sample's
n-character substrings that occur somewhere in the training text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.cli import UsageError, command_parser
from model.dataset import load_dataset
from model.prepare import read_utf8


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m model novel", "Share of a sample's n-character substrings found verbatim in the training split."
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset (its train split is searched)")
    p.add_argument("--sample", required=True, metavar="FILE", help="text file with the sample")
    p.add_argument("--n", type=int, nargs="+", default=[10, 15, 20, 30, 50], help="substring lengths")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    return p


def copied_share(sample: str, training_text: str, n: int) -> float:
    """Share of the sample's n-character substrings that appear in training_text."""
    windows = [sample[i : i + n] for i in range(len(sample) - n + 1)]
    if not windows:
        raise UsageError(f"the sample has fewer than {n} characters")
    # Distinct windows are checked once; a set of all training n-grams would cost more memory.
    found = {w: w in training_text for w in set(windows)}
    return sum(found[w] for w in windows) / len(windows)


def main(args: argparse.Namespace) -> None:
    dataset = load_dataset(args.data)
    training_text = dataset.vocab.decode(dataset.splits["train"].tolist())
    sample, _ = read_utf8(Path(args.sample))
    result = {n: copied_share(sample, training_text, n) for n in args.n}
    print(f"{'n':>4}  copied from training text")
    for n, share in result.items():
        print(f"{n:>4}  {share:7.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
