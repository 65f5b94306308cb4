"""Bits per character of the model against classic baselines, on the same split of the same text.

    python -m bench.quality --data data/both data/speeches --source ../shared/data/speeches.txt \
        --onnx bot/assets/speechbot.onnx old.onnx --text ../shared/data/speeches.txt \
        --text-train-only ../shared/data/trump-2015-2016-rallies.txt

--data scores prepared datasets (cleaned text, the models' exact split), each with its own training
text for the baselines; --source is the raw main file they were prepared from, needed only to mark
which characters were typed in capitals before cleaning rewrote them in sentence case. --text scores
a raw file (BOM removed, CRLF -> LF, the same 0.8/0.1/0.1 split in file order), to compare with numbers
measured on the raw corpus; --text-train-only adds raw files to its training split only, as
`prepare --train-only` does. Every --onnx model is scored on every dataset whose val and test text
its vocabulary covers, so models trained on different training text meet on the same held-out text.

Rows: the network as a PyTorch checkpoint (--checkpoint) and as the exported file the bot runs
(--onnx; both --data only), unigram, interpolated modified Kneser-Ney with its order chosen on val,
PPMd at several orders, and zlib, bzip2, xz, zstd as conditional compression
8 * (|C(train + split)| - |C(train)|) / chars(split). Test is also reported split by case: the
characters on lines that were shouted (model.text.is_shouted on the raw line) and the rest.
Prints a table and writes JSON and a markdown page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.baselines import KneserNey, compressors, conditional_bits, ppmd, shouted_mask, unigram_bits
from bench.text_stats import DOCS_HEADING
from bot.inference.runner import ModelFileError, ModelRunner
from export.evaluate import onnx_char_nats
from model.cli import UsageError, fail
from model.dataset import SPLITS, load_dataset, split_sizes
from model.dynamic import DYNAMIC_DECAY, DYNAMIC_LR, DYNAMIC_SEGMENT, add_dynamic_arguments, dynamic_lr
from model.prepare import read_utf8
from model.text import clean_text, normalize_newlines

EVAL_SPLITS = ("val", "test")
OTHER_TEXT = "model, other training text"
# Measured on the raw corpus when the issue was filed (val bits per character).
DYNAMIC_ROW = "LSTM, dynamic evaluation"
ISSUE_REFERENCE = {"PPMd order 16": 1.49, "KN order 12": 1.55, "xz -9e": 1.92}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", nargs="+", metavar="DIR", help="prepared datasets (default data/speeches unless --text is given)"
    )
    p.add_argument("--source", metavar="FILE", help="raw file --data was prepared from, for the by-case split")
    p.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="CKPT",
        help="trained model to score on --data; several are also scored as their ensemble (mean probability)",
    )
    p.add_argument(
        "--onnx", nargs="+", metavar="MODEL.onnx", help="exported models (the bot's file) to score on --data"
    )
    add_dynamic_arguments(p, "also score the first --checkpoint with dynamic evaluation")
    p.add_argument("--text", metavar="FILE", help="also score this raw text file")
    p.add_argument(
        "--text-train-only", nargs="+", default=[], metavar="FILE", help="raw files added to --text's training split"
    )
    p.add_argument("--max-order", type=int, default=20, help="Kneser-Ney orders 2..this are tried on val")
    p.add_argument("--ppmd-orders", type=parse_orders, default="4,6,8,12,16", help="PPMd orders, comma-separated")
    p.add_argument("--json", default="docs/quality.json", help="where to write the results")
    p.add_argument("--markdown", default="docs/quality.md", help="where to write the report page")
    return p


@dataclass
class Corpus:
    """One text to score: token ids per split and, per split, which characters were shouted."""

    label: str
    mode: str  # "data": the model's cleaned split; "text": a raw file
    vocab: list[str]
    splits: dict[str, np.ndarray]
    texts: dict[str, str]
    shouted: dict[str, np.ndarray] | None
    rows: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    sha256: list[str] = field(default_factory=list)  # of the files a dataset was prepared from


def dataset_corpus(data_dir: str, source: str | None) -> Corpus:
    dataset = load_dataset(data_dir)
    texts = {name: dataset.vocab.decode(dataset.splits[name].tolist()) for name in SPLITS}
    shouted = None
    if source:
        raw, digest = read_utf8(Path(source))
        if digest not in dataset.sha256:
            raise UsageError(f"{source} is not the file {data_dir} was prepared from (sha256 differs)")
        # Cleaning with caps kept gives the same characters as the dataset, capitals and all, so
        # the shouted lines can be found where the dataset has them in sentence case. Only val and
        # test are split by case, and they are the main input's tail whatever went into train.
        kept = clean_text(raw, dataclasses.replace(dataset.cleaning, caps_policy="keep"))
        main_sources = [s for s in dataset.meta["sources"] if s.get("role", "train+val+test") != "train"]
        held_out = texts["val"] + texts["test"]
        if len(main_sources) > 1 or not kept.lower().endswith(held_out.lower()):
            raise UsageError(f"{data_dir} was not prepared from {source} alone; the by-case split needs that")
        mask = shouted_mask(kept)[len(kept) - len(held_out) :]
        shouted = {
            "train": np.zeros(len(texts["train"]), bool),
            "val": mask[: len(texts["val"])],
            "test": mask[len(texts["val"]) :],
        }
    splits = {name: dataset.splits[name].astype(np.int64) for name in SPLITS}
    train_files = [s["path"] for s in dataset.meta["sources"] if s.get("role") == "train"]
    label = f"{data_dir} (cleaned, the model's split" + "".join(f"; train + {name}" for name in train_files) + ")"
    return Corpus(label, "data", dataset.vocab.chars, splits, texts, shouted, sha256=dataset.sha256)


def text_corpus(path: str, train_only: list[str]) -> Corpus:
    text = normalize_newlines(read_utf8(Path(path))[0])
    sizes = split_sizes(len(text), 0.1, 0.1)
    bounds = np.cumsum([0] + [sizes[name] for name in SPLITS])
    texts = {name: text[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLITS)}
    mask = shouted_mask(text)
    shouted = {name: mask[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLITS)}
    extra = [normalize_newlines(read_utf8(Path(file))[0]) for file in train_only]
    if extra:
        texts["train"] = "\n".join([texts["train"], *extra])
        shouted["train"] = np.zeros(len(texts["train"]), bool)
    vocab = sorted(set("".join(texts.values())))
    index = {ch: i for i, ch in enumerate(vocab)}
    splits = {name: np.array([index[ch] for ch in texts[name]], np.int64) for name in SPLITS}
    label = f"{path} (raw: BOM removed, CRLF -> LF" + "".join(f"; train + {Path(f).name}" for f in train_only) + ")"
    return Corpus(label, "text", vocab, splits, texts, shouted)


def mixture_bits(member_bits: list[np.ndarray]) -> np.ndarray:
    """Per-character bits of the networks' mean probability, -log2(mean_k 2^-bits_k): exactly what
    model.ensemble computes, from the members' own scores."""
    nats = np.stack(member_bits) * math.log(2)
    return -(np.logaddexp.reduce(-nats, axis=0) - math.log(len(member_bits))) / math.log(2)


def per_char_row(corpus: Corpus, name: str, kind: str, bits: dict[str, np.ndarray]) -> dict:
    """A row from per-character bits of each split's characters after the first."""
    row = {"name": name, "kind": kind, **{split: float(bits[split].mean()) for split in EVAL_SPLITS}}
    if corpus.shouted is not None:
        scored = corpus.shouted["test"][1:]
        for label, where in (("test_shouted", scored), ("test_rest", ~scored)):
            row[label] = float(bits["test"][where].mean()) if where.any() else None
    return row


def model_bits(checkpoint: str, corpus: Corpus, lr: float = 0.0) -> dict[str, np.ndarray]:
    """Per-character bits of the checkpoint, static or (lr > 0) with dynamic evaluation at step size lr."""
    import torch  # only the model rows need it

    from model.checkpoint import load_checkpoint
    from model.evaluate import char_nats, dynamic_char_nats, gradient_rms

    # One stream is a chain of small matrix-vector products: a second thread only adds waiting, and on
    # this shared 2-core CPU it measured 2-25x slower than one.
    torch.set_num_threads(1)
    net, ckpt = load_checkpoint(checkpoint)
    if ckpt.vocab != corpus.vocab:
        raise UsageError(f"{checkpoint} has a different vocabulary from the dataset")
    # One stream carrying its state: each character is predicted from its full left context,
    # exactly as `python -m model evaluate` scores it.
    if lr:
        rms = gradient_rms(net, corpus.splits["train"])
        return {
            split: dynamic_char_nats(net, corpus.splits[split], rms, lr).numpy() / math.log(2) for split in EVAL_SPLITS
        }
    return {split: char_nats(net, corpus.splits[split], seq_length=4096).numpy() / math.log(2) for split in EVAL_SPLITS}


def onnx_bits(path: str, corpus: Corpus) -> tuple[str, dict[str, np.ndarray], list[str]] | None:
    """The exported model's row name, per-character bits (scored by onnxruntime on one CPU thread) and
    training files' sha256; None if the split texts hold characters outside its vocabulary."""
    try:
        runner = ModelRunner(path, "cpu", threads=1)
    except ModelFileError as exc:
        raise UsageError(str(exc)) from exc
    session, info = runner.session, runner.info
    index = {ch: i for i, ch in enumerate(info.vocab)}
    if any(ch not in index for split in EVAL_SPLITS for ch in set(corpus.texts[split])):
        return None
    # Re-encoded in the model's own vocabulary: the same characters, whatever ids the dataset gave them.
    ids = {split: np.array([index[ch] for ch in corpus.texts[split]], np.int64) for split in EVAL_SPLITS}
    bits = {split: onnx_char_nats(session, info, ids[split]) / math.log(2) for split in EVAL_SPLITS}
    return f"LSTM, ONNX {info.precision} ({Path(path).name})", bits, info.corpus_sha256


def score(corpus: Corpus, args: argparse.Namespace) -> None:
    timings = {}
    vocab_size = len(corpus.vocab)
    started = time.perf_counter()
    if args.checkpoint and corpus.mode == "data":
        member_bits = [model_bits(path, corpus) for path in args.checkpoint]
        if len(member_bits) == 1:
            corpus.rows.append(per_char_row(corpus, "LSTM (this model)", "model", member_bits[0]))
        else:
            # The ensemble row comes first: it is the model the verdict speaks of.
            mixed = {split: mixture_bits([bits[split] for bits in member_bits]) for split in EVAL_SPLITS}
            name = f"LSTM ensemble of {len(member_bits)} (this model)"
            corpus.rows.append(per_char_row(corpus, name, "model", mixed))
            for path, bits in zip(args.checkpoint, member_bits, strict=True):
                corpus.rows.append(per_char_row(corpus, f"LSTM {path} alone", "model", bits))
        timings["model"] = time.perf_counter() - started
    if args.checkpoint and args.dynamic_lr and corpus.mode == "data":
        started = time.perf_counter()
        bits = model_bits(args.checkpoint[0], corpus, args.dynamic_lr)
        # It keeps learning while it reads the split, as the compressors do: it is compared with them.
        # With an ensemble, dynamic evaluation runs on its first network only: the row says which.
        name = DYNAMIC_ROW if len(args.checkpoint) == 1 else f"{DYNAMIC_ROW} ({args.checkpoint[0]} alone)"
        corpus.rows.append(per_char_row(corpus, name, "adaptive", bits))
        corpus.notes["dynamic_evaluation"] = {
            "checkpoint": args.checkpoint[0],
            "lr": args.dynamic_lr,
            "decay": DYNAMIC_DECAY,
            "segment": DYNAMIC_SEGMENT,
        }
        timings["dynamic"] = time.perf_counter() - started
    for path in args.onnx or [] if corpus.mode == "data" else []:
        started = time.perf_counter()
        scored = onnx_bits(path, corpus)
        if scored is None:
            print(f"skipped {path} on {corpus.label}: its vocabulary lacks characters of val or test")
            continue
        # A model trained on other text than this dataset's is shown, but the verdict is not about it.
        same_text = scored[2] == corpus.sha256
        kind = "model" if same_text else OTHER_TEXT
        corpus.rows.append(per_char_row(corpus, scored[0] + ("" if same_text else " *"), kind, scored[1]))
        timings[f"onnx {path}"] = time.perf_counter() - started

    train = corpus.splits["train"]
    uni = {split: unigram_bits(train, corpus.splits[split][1:], vocab_size) for split in EVAL_SPLITS}
    corpus.rows.append(per_char_row(corpus, "unigram (add-one)", "static", uni))

    started = time.perf_counter()
    kn = KneserNey(train, vocab_size, args.max_order)
    curve = {order: float(kn.bits(corpus.splits["val"], order).mean()) for order in range(2, args.max_order + 1)}
    best = min(curve, key=curve.get)
    kn_bits = {split: kn.bits(corpus.splits[split], best) for split in EVAL_SPLITS}
    corpus.rows.append(per_char_row(corpus, f"KN order {best}", "static", kn_bits))
    if 12 in curve and best != 12:
        corpus.rows.append({"name": "KN order 12", "kind": "static", "val": curve[12]})
    corpus.notes["kn_val_by_order"] = curve
    timings["kneser_ney"] = time.perf_counter() - started

    started = time.perf_counter()
    data = {name: corpus.texts[name].encode("utf-8") for name in SPLITS}
    candidates = {f"PPMd order {order}": ppmd(order) for order in args.ppmd_orders}
    candidates.update(compressors())
    for name, compress in candidates.items():
        train_size = len(compress(data["train"]))
        row = {"name": name, "kind": "adaptive"}
        for split in EVAL_SPLITS:
            chars = len(corpus.texts[split])
            row[split] = conditional_bits(compress, data["train"], data[split], chars, train_size)
        corpus.rows.append(row)
    timings["compressors"] = time.perf_counter() - started
    corpus.notes["seconds"] = timings


def parse_orders(text: str) -> list[int]:
    try:
        orders = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        orders = []
    if not orders or not all(2 <= order <= 64 for order in orders):
        raise argparse.ArgumentTypeError(f"need comma-separated integers from 2 to 64, not {text!r}")
    return orders


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def print_table(corpus: Corpus) -> None:
    print(f"\n{corpus.label}: val {len(corpus.texts['val']):,} / test {len(corpus.texts['test']):,} characters")
    header = f"{'model':<20} {'kind':<9} {'val':>7} {'test':>7}"
    if corpus.shouted is not None:
        header += f" {'shouted':>8} {'rest':>7}"
    print(header)
    for row in sorted(corpus.rows, key=lambda r: r["val"]):
        line = f"{row['name']:<20} {row['kind']:<9} {fmt(row['val']):>7} {fmt(row.get('test')):>7}"
        if corpus.shouted is not None:
            line += f" {fmt(row.get('test_shouted')):>8} {fmt(row.get('test_rest')):>7}"
        print(line)


def verdict(corpus: Corpus) -> str:
    """How the network compares on val with the best baseline, the best PPMd and the best static model."""
    model = next((r for r in corpus.rows if r["kind"] == "model"), None)
    dynamic = next((r for r in corpus.rows if r["name"].startswith(DYNAMIC_ROW)), None)
    baselines = [r for r in corpus.rows if r["kind"] not in ("model", OTHER_TEXT) and r is not dynamic]
    best = min(baselines, key=lambda r: r["val"])
    best_ppmd = min((r for r in baselines if r["name"].startswith("PPMd")), key=lambda r: r["val"])
    if model is None:
        return f"Best baseline on val: {best['name']} at {best['val']:.3f} bits per character."

    def against(subject: dict, row: dict) -> str:
        gap = subject["val"] - row["val"]
        if gap < 0:
            return f"beats {row['name']} ({row['val']:.3f}) by {-gap:.3f} bits per character ({-gap / row['val']:.1%})"
        share = gap / row["val"]
        return f"does not beat {row['name']} ({row['val']:.3f}): it is {gap:.3f} bits per character worse ({share:.1%})"

    text = f"On val the model scores {model['val']:.3f} bits per character and {against(model, best)}"
    if best is not best_ppmd:
        text += f"; it {against(model, best_ppmd)}"
    best_static = min((r for r in baselines if r["kind"] == "static"), key=lambda r: r["val"])
    if best_static is not best:
        text += f". Among static models, fit on train like it, it {against(model, best_static)}"
    if dynamic is not None:
        best_adaptive = min((r for r in baselines if r["kind"] == "adaptive"), key=lambda r: r["val"])
        alone = dynamic["name"].removeprefix(DYNAMIC_ROW).strip(" ()")
        text += (
            f". With dynamic evaluation, learning from the split while it reads it as the compressors do, "
            f"{alone or 'it'} scores {dynamic['val']:.3f} and {against(dynamic, best_adaptive)}"
        )
    return text + "."


def dynamic_setting(corpora: list[Corpus]) -> float:
    """The step size the dynamic evaluation rows were scored with (`--dynamic`'s when there are none)."""
    return next((c.notes["dynamic_evaluation"]["lr"] for c in corpora if "dynamic_evaluation" in c.notes), DYNAMIC_LR)


def markdown(corpora: list[Corpus], command: str) -> str:
    lines = [
        "# Quality in numbers: the model against classic baselines",
        "",
        "Bits per character (lower is better) on the validation and test splits, each model or compressor given",
        "the training split. Made by:",
        "",
        f"    {command}",
        "",
        "- **static** models are fit on train once and then score the split, like the network. The network, unigram",
        "  and Kneser-Ney score every character after a split's first from all the characters before it in the split.",
        "- **adaptive** rows are compressors: `8·(len(C(train+split)) − len(C(train))) / chars(split)`. They keep",
        "  learning while they read the split, an advantage the static models do not have. zlib's window is 32 KB, so",
        "  it sees almost none of the training text: its number is effectively unconditional. A compressor gives",
        "  one size per split, so it has no by-case numbers.",
        "- **LSTM, dynamic evaluation** (with `--dynamic`): the (first) `--checkpoint` network, scoring each",
        f"  {DYNAMIC_SEGMENT}-character segment of the split and then taking one RMS-normalised gradient step on it",
        f"  (Krause et al., 2018; step {dynamic_setting(corpora):g} of each weight's gradient RMS, decay "
        f"{DYNAMIC_DECAY:g}), so it too",
        "  learns from the split as it reads it: the like-for-like comparison with the compressors. The bot serves",
        "  the static network.",
        "- **LSTM ensemble** (when several `--checkpoint`s are given): the mean of the networks' probabilities,",
        "  as `python -m export CKPT CKPT ...` builds it into one file (`model/ensemble.py`); each network alone too.",
        f"- **{OTHER_TEXT}** (rows marked *): an `--onnx` model trained on other text than this section's",
        "  dataset, scored on the same val and test characters; the verdict below each table is not about it.",
        "- Kneser-Ney: interpolated modified Kneser-Ney (Chen & Goodman discounts per order), order chosen on val.",
        "- **shouted / rest**: test bits on the characters of lines typed in capitals in the raw text",
        "  (`model.text.is_shouted`), and on all the others. The test split is dominated by one speech typed in",
        "  capitals. In the cleaned dataset the default caps policy rewrote those lines in sentence case, so there the",
        "  column measures how well each model predicts that machine-cased speech; in the raw text it is capitals.",
        "",
    ]
    for corpus in corpora:
        lines += [f"## {corpus.label}", ""]
        share = ""
        if corpus.shouted is not None:
            share = f", {corpus.shouted['test'].mean():.0%} of test on shouted lines"
        lines += [
            f"val {len(corpus.texts['val']):,} and test {len(corpus.texts['test']):,} characters, "
            f"vocabulary of {len(corpus.vocab)}{share}.",
            "",
        ]
        reference = corpus.mode == "text"
        head = "| Model | Kind | Val BPC | Test BPC |"
        rule = "| --- | --- | --- | --- |"
        if corpus.shouted is not None:
            head, rule = head + " Test, shouted lines | Test, the rest |", rule + " --- | --- |"
        if reference:
            head, rule = head + " Issue's reference (val) |", rule + " --- |"
        lines += [head, rule]
        for row in sorted(corpus.rows, key=lambda r: r["val"]):
            cells = [row["name"], row["kind"], fmt(row["val"]), fmt(row.get("test"))]
            if corpus.shouted is not None:
                cells += [fmt(row.get("test_shouted")), fmt(row.get("test_rest"))]
            if reference:
                cells.append(str(ISSUE_REFERENCE.get(row["name"], "")))
            lines.append("| " + " | ".join(cells) + " |")
        curve = corpus.notes["kn_val_by_order"]
        lines += [
            "",
            "Kneser-Ney val bits per character by order: "
            + ", ".join(f"{order}: {bpc:.3f}" for order, bpc in curve.items())
            + ".",
            "",
            verdict(corpus),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_order < 2:
        raise UsageError(f"--max-order must be at least 2, not {args.max_order}")
    for flag, value in (("--checkpoint", args.checkpoint), ("--onnx", args.onnx)):
        if value and not args.data and args.text:
            raise UsageError(f"{flag} needs --data: the model reads cleaned text, not the raw --text file")
    if args.text_train_only and not args.text:
        raise UsageError("--text-train-only adds training text to --text's corpus; give --text too")
    args.dynamic_lr = dynamic_lr(args)
    if args.dynamic_lr and not (args.checkpoint and (args.data or not args.text)):
        raise UsageError(
            "dynamic evaluation trains a PyTorch network: give --checkpoint and --data (an ONNX file cannot "
            "learn; `python -m export recover` rebuilds a checkpoint from one)"
        )
    corpora = [
        dataset_corpus(data_dir, args.source) for data_dir in args.data or ([] if args.text else ["data/speeches"])
    ]
    if args.text:
        corpora.append(text_corpus(args.text, args.text_train_only))
    for corpus in corpora:
        score(corpus, args)
    command = "python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    for corpus in corpora:
        print_table(corpus)
        print(verdict(corpus))
    results = {
        "command": command,
        "corpora": [
            {
                "label": c.label,
                "mode": c.mode,
                "vocab_size": len(c.vocab),
                "chars": {name: len(c.texts[name]) for name in SPLITS},
                "test_shouted_share": None if c.shouted is None else float(c.shouted["test"].mean()),
                "rows": sorted(c.rows, key=lambda r: r["val"]),
                "kn_val_by_order": c.notes["kn_val_by_order"],
                "dynamic_evaluation": c.notes.get("dynamic_evaluation"),
                "seconds": c.notes["seconds"],
                "verdict": verdict(c),
            }
            for c in corpora
        ],
    }
    page = markdown(corpora, command)
    previous = Path(args.markdown).read_text(encoding="utf-8") if Path(args.markdown).is_file() else ""
    if f"\n{DOCS_HEADING}\n" in previous:  # bench/text_stats.py's section: not ours to drop
        page = page.rstrip("\n") + "\n\n" + previous[previous.index(f"\n{DOCS_HEADING}\n") + 1 :]
    for path, content in (
        (args.json, json.dumps(results, indent=2) + "\n"),
        (args.markdown, page),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content, encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as exc:
        fail(str(exc))
