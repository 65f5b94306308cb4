"""Generation speed: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, one stream and many.

    python bench/generation.py                     # a 2x256 LSTM with random weights
    python bench/generation.py --checkpoint CKPT # a trained model
    python bench/generation.py --model bot/assets/speechbot.onnx   # a shipped export (ORT rows only)

Single stream: µs per character and the latency of one 500-character speech (empty prompt), through
each path's real sampling loop (model.sample for PyTorch, bot.engine for onnxruntime; PyTorch without
the paragraph-start walk that the engine does once at load). Batched:
characters per second with N concurrent streams through the engine's continuous batching, and the
ratio to one stream. "step µs" is a bare session.run of one character at batch 1 (the graph alone).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bot.engine import GenerationEngine
from export.pipeline import export_checkpoint
from model.checkpoint import load_checkpoint, save_checkpoint
from model.model import CharRNN, ModelConfig
from model.sample import sample_text
from model.text import CleaningOptions, Vocab

VOCAB_81 = Vocab(list("\n !\"$%&'()*,-./0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/generation.py", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trained checkpoint (default: random 2x256 LSTM)")
    source.add_argument("--model", help="an exported .onnx file: onnxruntime rows only")
    p.add_argument("--rnn-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--length", type=int, default=500, help="characters per speech")
    p.add_argument("--repeats", type=int, default=5, help="single-stream speeches per path (best is kept)")
    p.add_argument("--streams", default="1,8,64,256", help="concurrent streams for the batched runs")
    p.add_argument("--threads", default="1,2", help="onnxruntime intra-op threads to compare")
    p.add_argument("--json", default="docs/bench/generation.json", help="where to write the results")
    return p


def random_checkpoint(path: Path, rnn_size: int, num_layers: int) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB_81), rnn_size=rnn_size, num_layers=num_layers, wordvec_size=64)
    payload = {
        "model_config": config.to_dict(),
        "model": CharRNN(config).state_dict(),
        "vocab": VOCAB_81.chars,
        "unknown_policy": "nearest",
        "cleaning": CleaningOptions().to_dict(),
        "dataset_sha256": [],
        "val_bpc": None,
        "iteration": 0,
    }
    save_checkpoint(path, payload)
    return path


def best_of(repeats: int, run) -> float:
    run()  # warm-up: primitive creation, first allocations
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return min(timings)


def torch_single(checkpoint: Path, length: int, repeats: int) -> float:
    """Seconds per character of model.sample's loop, without its paragraph-start walk.

    The engine walks to a paragraph start once at load; sample_text does it on every call, so it is
    timed at `length` and at 1 character and the difference is divided by length - 1.
    """
    torch.set_num_threads(1)
    net, ckpt = load_checkpoint(checkpoint)
    vocab = Vocab(ckpt["vocab"], ckpt["unknown_policy"])
    cleaning = CleaningOptions.from_dict(ckpt["cleaning"])
    full = best_of(repeats, lambda: sample_text(net, vocab, cleaning, length, seed=1))
    walk = best_of(repeats, lambda: sample_text(net, vocab, cleaning, 1, seed=1))
    return (full - walk) / (length - 1)


def engine_single(engine: GenerationEngine, length: int, repeats: int) -> float:
    return best_of(repeats, lambda: engine.generate("", length=length, seed=1))


def graph_step(engine: GenerationEngine, repeats: int) -> float:
    """Seconds per bare session.run of one character at batch 1: the graph without the engine around it."""
    shape = (engine.info.num_layers, 1, engine.info.rnn_size)
    feed = {"tokens": np.zeros((1, 1), np.int64), **{name: np.zeros(shape, np.float32) for name in engine._state_names}}
    steps = 200
    return best_of(repeats, lambda: [engine.session.run(None, feed) for _ in range(steps)]) / steps


def engine_batched(engine: GenerationEngine, streams: int, length: int) -> float:
    """Characters per second with `streams` requests submitted together."""

    def run() -> None:
        pending = [engine.stream("", length=length, seed=i) for i in range(streams)]
        for stream in pending:
            for _ in stream:
                pass

    return streams * length / best_of(2, run)


def main() -> None:
    args = build_parser().parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        models: dict[str, Path] = {}
        checkpoint = None
        if args.model:
            models[GenerationEngine(args.model, providers="cpu").info.precision] = Path(args.model)
            label = args.model
        else:
            checkpoint = (
                Path(args.checkpoint)
                if args.checkpoint
                else random_checkpoint(Path(tmp) / "random.pt", args.rnn_size, args.num_layers)
            )
            label = args.checkpoint or f"random {args.num_layers}x{args.rnn_size} LSTM"
            for precision in ("fp32", "int8"):
                models[precision] = export_checkpoint(checkpoint, Path(tmp) / f"{precision}.onnx", precision).path
        if checkpoint is not None:
            latency = torch_single(checkpoint, args.length, args.repeats) * args.length
            rows.append(
                {
                    "path": "pytorch eager",
                    "threads": 1,
                    "us_per_char": latency / args.length * 1e6,
                    "speech_ms": latency * 1e3,
                }
            )
        for precision, path in models.items():
            for threads in thread_counts:
                with GenerationEngine(
                    path, providers="cpu", threads=threads, max_batch=max(streams), max_queue=max(streams)
                ) as engine:
                    latency = engine_single(engine, args.length, args.repeats)
                    row = {
                        "step_us": graph_step(engine, args.repeats) * 1e6,
                        "path": f"onnxruntime {precision}",
                        "threads": threads,
                        "us_per_char": latency / args.length * 1e6,
                        "speech_ms": latency * 1e3,
                        "size_mb": path.stat().st_size / 1e6,
                    }
                    for n in streams:
                        row[f"chars_per_s_{n}"] = engine_batched(engine, n, args.length)
                    rows.append(row)
    baseline = rows[0]["us_per_char"]
    print(
        f"model: {label}; {args.length}-character speeches; CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}"
    )
    header = (
        f"{'path':<18} {'thr':>3} {'µs/char':>8} {'speech ms':>9} {'vs first':>8} {'step µs':>8}"
        + "".join(f" {f'{n} str c/s':>12}" for n in streams)
        + f" {'64÷1':>6}"
    )
    print(header)
    for row in rows:
        line = (
            f"{row['path']:<18} {row['threads']:>3} {row['us_per_char']:>8.1f} {row['speech_ms']:>9.1f} "
            f"{baseline / row['us_per_char']:>7.1f}× {row.get('step_us', float('nan')):>8.1f}"
        )
        if "chars_per_s_1" in row:
            line += "".join(f" {row[f'chars_per_s_{n}']:>12,.0f}" for n in streams)
            if 64 in streams:
                row["ratio_64_to_1"] = row["chars_per_s_64"] / row["chars_per_s_1"]
                line += f" {row['ratio_64_to_1']:>5.1f}×"
        print(line)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": label,
                "length": args.length,
                "cpu_count": os.cpu_count(),
                "onnxruntime": ort.__version__,
                "torch": torch.__version__,
                "load_average": os.getloadavg()[0],
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
