"""`python -m model prepare`: clean one or more text files into a dataset of token ids."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from model.cli import UsageError, command_parser, read_utf8_text, writable_dir
from model.dataset import load_dataset, split_sizes, write_dataset
from model.text import CAPS_POLICIES, UNKNOWN_POLICIES, CleaningOptions, Vocab, clean_text

DEFAULT_BATCH_SIZE = 32
DEFAULT_SEQ_LENGTH = 128


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m model prepare",
        "Clean text files and write a dataset: meta.json, train/val/test.npy (token ids) and "
        "train/val/test.txt (the cleaned text of each split, e.g. for `--text DIR/val.txt`).",
    )
    p.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, in order (val, test: the tail)"
    )
    p.add_argument(
        "--train-only",
        nargs="+",
        default=[],
        metavar="FILE",
        help="more UTF-8 text files that go into the training split only, after the --input text's train part "
        "(val and test stay the tail of --input, so scores stay comparable)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the dataset")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of the text for validation")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of the text for test")
    p.add_argument(
        "--remove-headers", action=argparse.BooleanOptionalAction, default=True, help="remove 'SPEECH 12' header lines"
    )
    p.add_argument(
        "--remove-stage-directions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="remove (APPLAUSE), [ CHEERING ] and other bracketed directions",
    )
    p.add_argument(
        "--normalize-typography",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="map ’ “ ” … and dashes to keyboard characters",
    )
    p.add_argument(
        "--collapse-whitespace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="collapse runs of spaces and blank lines",
    )
    p.add_argument("--lowercase", action="store_true", help="lowercase everything (as the article did)")
    p.add_argument(
        "--caps-policy",
        choices=CAPS_POLICIES,
        default="sentence",
        help="what to do with lines typed in capitals: rewrite in sentence case, keep, lowercase or drop them",
    )
    p.add_argument(
        "--unknown-policy",
        choices=UNKNOWN_POLICIES,
        default="nearest",
        help="characters outside the vocabulary at sampling/evaluation time: fold to the "
        "nearest ASCII character, replace with a space, or skip",
    )
    p.add_argument(
        "--vocab-from",
        metavar="DIR",
        help="use this prepared dataset's vocabulary (and its --unknown-policy) instead of the text's own, so "
        "that a model trained on DIR can be fine-tuned on this text with `train --init-from`",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="the training batch size the corpus must be large enough for",
    )
    p.add_argument(
        "--seq-length",
        type=int,
        default=DEFAULT_SEQ_LENGTH,
        help="the training sequence length the corpus must be large enough for",
    )
    return p


def read_utf8(path: Path) -> tuple[str, str]:
    """The text and its sha256; a clear error for a missing, non-file or non-UTF-8 input."""
    text, data = read_utf8_text(path, "input file")
    return text, hashlib.sha256(data).hexdigest()


def read_cleaned(
    paths: list[Path], options: CleaningOptions, role: str, vocab: Vocab | None = None
) -> tuple[str, list[dict]]:
    """The files' cleaned texts joined by newlines, and a provenance record for each (meta.json's sources);
    with `vocab`, characters outside it already folded by its unknown-character policy."""
    documents, sources = [], []
    for path in paths:
        raw, digest = read_utf8(path)
        cleaned = clean_text(raw, options)
        documents.append(vocab.decode(vocab.encode(cleaned)) if vocab else cleaned)
        sources.append({"path": path.name, "sha256": digest, "bytes": path.stat().st_size, "role": role})
    return "\n".join(doc for doc in documents if doc.strip()), sources


def prepare(
    inputs: list[Path],
    out_dir: Path,
    options: CleaningOptions,
    unknown_policy: str = "nearest",
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_length: int = DEFAULT_SEQ_LENGTH,
    train_only: list[Path] = (),
    vocab_from: Path | None = None,
) -> dict:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise UsageError("--val-frac and --test-frac must be in [0, 1) and add up to less than 1")
    for name, value in (("--batch-size", batch_size), ("--seq-length", seq_length)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    writable_dir(out_dir, "--out")
    # A borrowed vocabulary folds the text's other characters by its policy first, so that the split
    # sizes below count the characters that will be stored.
    vocab = Vocab.from_meta(load_dataset(vocab_from).meta) if vocab_from else None
    text, sources = read_cleaned(inputs, options, "train+val+test", vocab)
    if not text.strip():
        raise UsageError("the input is empty after cleaning; check the files or turn cleaning steps off")
    sizes = split_sizes(len(text), val_frac, test_frac)
    if train_only:
        extra, extra_sources = read_cleaned(list(train_only), options, "train", vocab)
        if not extra.strip():
            raise UsageError("the --train-only files are empty after cleaning; check them")
        # The extra text follows the main train part, so val and test remain exactly the main input's tail.
        head, tail = text[: sizes["train"]], text[sizes["train"] :]
        text = head + "\n" + extra + tail
        sizes["train"] += len(extra) + 1
        sources += extra_sources
    # One batch needs batch_size streams of seq_length + 1 characters.
    needed = batch_size * (seq_length + 1)
    if sizes["train"] < needed:
        raise UsageError(
            f"the training split has {sizes['train']:,} characters, fewer than one batch needs "
            f"({batch_size} x ({seq_length} + 1) = {needed:,}); add text or lower --batch-size / --seq-length"
        )
    vocab = vocab or Vocab.from_text(text, unknown_policy)
    ids = np.array(vocab.encode(text), dtype=np.int64)
    write_dataset(
        writable_dir(out_dir, "--out"), ids, vocab, {"cleaning": options.to_dict(), "sources": sources}, sizes
    )
    return {"chars": len(text), "vocab_size": len(vocab), "split_sizes": sizes, "sources": sources}


def main(args: argparse.Namespace) -> None:
    options = CleaningOptions(
        remove_headers=args.remove_headers,
        remove_stage_directions=args.remove_stage_directions,
        normalize_typography=args.normalize_typography,
        collapse_whitespace=args.collapse_whitespace,
        lowercase=args.lowercase,
        caps_policy=args.caps_policy,
    )
    summary = prepare(
        [Path(p) for p in args.input],
        Path(args.out),
        options,
        args.unknown_policy,
        args.val_frac,
        args.test_frac,
        args.batch_size,
        args.seq_length,
        [Path(p) for p in args.train_only],
        Path(args.vocab_from) if args.vocab_from else None,
    )
    sizes = summary["split_sizes"]
    print(f"wrote {args.out}: {summary['chars']:,} characters, vocabulary of {summary['vocab_size']}")
    print(f"  split: train {sizes['train']:,} / val {sizes['val']:,} / test {sizes['test']:,}")
    for source in summary["sources"]:
        print(f"  {source['path']} ({source['role']}): {source['bytes']:,} bytes, sha256 {source['sha256']}")
