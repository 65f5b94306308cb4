"""Generation speed: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, one stream and many.

    python -m bench.generation                     # a 2x256 LSTM with random weights
    python -m bench.generation --checkpoint CKPT # a trained model
    python -m bench.generation --model bot/assets/speechbot.onnx   # a shipped export (ORT rows only)
    python -m bench.generation --model old.onnx new.onnx           # exports side by side, in the same rounds
    python -m bench.generation --model bot/assets/speechbot.onnx --int8-weights auto,int8   # int8 weight layouts

Single stream: µs per character and the latency of one 500-character speech (empty prompt), through
each path's real sampling loop (model.sample for PyTorch, bot.inference.engine for onnxruntime; PyTorch without
the paragraph-start walk that the engine does once at load). Batched: characters per second with N
concurrent requests (agenerate from one asyncio loop, as the bot awaits them) through the engine's
continuous batching, and the ratio to one stream; each onnxruntime path runs with 1 and 2 engine lanes
(workers on separate cores, bot/inference/engine.py). "graph µs" is a bare ModelRunner.sample of whole chunks at
batch 1, per character (the chunk graph alone, bot/inference/chunk_graph.py). A host probe in the batched
rounds times bare 32-row chunk graphs on one thread and on two: what two lanes could gain at best on
this machine at that time (a shared VM's second core comes and goes). An int8 model runs once per
`--int8-weights` layout (bot/inference/int8_weights.py; default: the one the engine chooses for this CPU).
The machine is shared, so candidates are timed in rounds, each round running every candidate once
(interleaved, so a burst of someone else's load hits them alike), and each keeps its best round. The
ratio of 64 streams to one is given twice: best round against best round ("64÷1"), which reads low
when the short one-stream run catches a fast spell that the longer 64-stream run cannot, and the median
over rounds of the ratio within one round ("median"), which reads high when a round's one-stream run
hits a slow spell. On a shared host both move from run to run; read them together.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.report import write_json
from bot.inference.api import INT8_WEIGHT_CHOICES
from bot.inference.engine import CHUNK, GenerationEngine
from bot.inference.int8_weights import serving_layout
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.inference.runner import ModelRunner, read_model_info
from model.text import CleaningOptions, Vocab

# torch (and the exporter, which needs it) is imported only for a checkpoint or the random network, so that
# `--model FILE.onnx` runs where only the runtime and onnxruntime-gpu are installed (bench/gpu_check.sh).

GRAPH_CHUNKS = 20
HOST_ROWS = 32  # a lane's share of the engine's default max_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trained checkpoint (default: random 2x256 LSTM)")
    source.add_argument("--model", nargs="+", help="exported .onnx files: onnxruntime rows only, side by side")
    p.add_argument("--rnn-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--length", type=int, default=500, help="characters per speech")
    p.add_argument(
        "--repeats", type=int, default=5, help="rounds per candidate, single-stream and batched (best is kept)"
    )
    p.add_argument("--streams", default="1,8,64,256", help="concurrent streams for the batched runs")
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="engine max_batch (its default): rows stepped together in all lanes; more streams wait in its queue",
    )
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="onnxruntime execution provider: cpu compares fp32 and int8, cuda fp32 and fp16 (needs onnxruntime-gpu)",
    )
    p.add_argument("--threads", default="1,2", help="onnxruntime intra-op threads per lane to compare")
    p.add_argument(
        "--lanes",
        default="1,2",
        help="engine lanes to compare (combinations with more threads in all than cores are skipped)",
    )
    p.add_argument(
        "--int8-weights",
        default="auto",
        help=f"weight layouts to serve each int8 model in, side by side (from {', '.join(INT8_WEIGHT_CHOICES)}; "
        "auto: the engine's choice for this CPU)",
    )
    p.add_argument("--json", default="docs/bench/generation.json", help="where to write the results")
    return p


def random_checkpoint(path: Path, rnn_size: int, num_layers: int) -> Path:
    """An untrained network over the bundled model's vocabulary (the corpus's 81 characters): as fast as a
    trained one of its size."""
    import torch

    from model.checkpoint import Checkpoint
    from model.model import CharRNN, ModelConfig

    vocab = read_model_info(DEFAULT_MODEL_PATH)[1].vocab
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(vocab), rnn_size=rnn_size, num_layers=num_layers, wordvec_size=64)
    Checkpoint(
        model_config=config.to_dict(),
        model=CharRNN(config).state_dict(),
        vocab=vocab,
        cleaning=CleaningOptions().to_dict(),
    ).save(path)
    return path


def torch_version() -> str | None:
    """torch's version if it is installed, without importing it."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_rounds(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each run in each round; every round runs all of them, after one warm-up round, in
    reverse order every other round, so that no run always follows the same neighbour."""
    for run in runs.values():
        run()  # primitive creation, first allocations
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(rounds):
        for name, run in list(runs.items())[:: 1 if round_number % 2 == 0 else -1]:
            seconds[name].append(timed(run))
    return seconds


def best_in_rounds(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds of each run's best round (see timed_rounds)."""
    return {name: min(times) for name, times in timed_rounds(runs, rounds).items()}


def round_ratios(numerators: list[float], denominators: list[float]) -> np.ndarray:
    """Each round's ratio: the runs of one round are timed within a second or so of each other, so they
    share more of the host's speed of that moment than the best rounds of two runs do."""
    return np.array(numerators) / np.array(denominators)


def torch_runs(checkpoint: Path, length: int) -> dict[str, Callable[[], object]]:
    """model.sample's loop at `length` and at 1 character: it walks to a paragraph start on every call
    (the engine does that once at load), so the difference over length - 1 is its time per character."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.sample import sample_text

    torch.set_num_threads(1)
    net, ckpt = load_checkpoint(checkpoint)
    vocab = Vocab(ckpt.vocab, ckpt.unknown_policy)
    cleaning = CleaningOptions.from_dict(ckpt.cleaning)
    return {
        "torch_full": lambda: sample_text(net, vocab, cleaning, length, seed=1),
        "torch_walk": lambda: sample_text(net, vocab, cleaning, 1, seed=1),
    }


def bare_chunks(runner: ModelRunner, rows: int) -> Callable[[], object]:
    """ModelRunner.sample of GRAPH_CHUNKS chunks of `rows` rows: the chunk graph without the engine around it."""
    inputs = (
        np.zeros((rows, len(runner.info.vocab)), np.float32),
        runner.zero_state(rows),
        {"temperature": np.ones(rows, np.float32)},
        np.full((rows, CHUNK), 0.5, np.float32),
    )
    return lambda: [runner.sample(*inputs) for _ in range(GRAPH_CHUNKS)]


def host_scaling_runs(model: Path, int8_weights: str) -> dict[tuple[str, int], Callable[[], object]]:
    """Bare chunk graphs of HOST_ROWS rows on one thread, and on two at once (a runner each): whether the
    host lets this process use two whole cores while the batched rounds run (a shared VM often does not)."""
    work = [bare_chunks(ModelRunner(model, "cpu", 1, int8_weights), HOST_ROWS) for _ in range(2)]

    def both() -> None:
        threads = [threading.Thread(target=run) for run in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return {("host", 1): work[0], ("host", 2): both}


def concurrent_streams(
    loop: asyncio.AbstractEventLoop, engine: GenerationEngine, streams: int, length: int
) -> Callable[[], object]:
    """`streams` requests awaited together on `loop`, as the bot's handlers await them. One loop serves
    every round, like the bot's: a new loop per round (asyncio.run) costs ~0.7 ms, which would weigh
    on one stream more than on 64 and so flatter their ratio."""

    async def together() -> None:
        await asyncio.gather(*(engine.agenerate("", length=length, seed=i) for i in range(streams)))

    return lambda: loop.run_until_complete(together())


def served_as(files: dict[str, Path], int8_weights: list[str]) -> dict[str, tuple[Path, str]]:
    """Each file under its label, an int8 file once per weight layout (labelled with the layout it is served
    in): label -> (file, int8_weights)."""
    models = {}
    for label, path in files.items():
        if read_model_info(path)[1].precision != "int8":
            models[label] = (path, "auto")
            continue
        for asked in int8_weights:
            served = serving_layout(asked)
            models[f"{label} {served} weights" + (" (auto)" if asked == "auto" else "")] = (path, asked)
    return models


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    int8_weights = args.int8_weights.split(",")
    if unknown := [w for w in int8_weights if w not in INT8_WEIGHT_CHOICES]:
        parser.error(f"--int8-weights {unknown[0]!r} is not one of {', '.join(INT8_WEIGHT_CHOICES)}")
    streams = [int(s) for s in args.streams.split(",")]
    layouts = [
        (int(t), int(n))
        for t in args.threads.split(",")
        for n in args.lanes.split(",")
        if int(t) * int(n) <= (os.cpu_count() or 1) or int(n) == 1
    ]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        checkpoint = None
        if args.model:
            for path in args.model:
                files[f"{read_model_info(path)[1].precision} ({Path(path).name})"] = Path(path)
            label = ", ".join(args.model)
        else:
            checkpoint = (
                Path(args.checkpoint)
                if args.checkpoint
                else random_checkpoint(Path(tmp) / "random.pt", args.rnn_size, args.num_layers)
            )
            label = args.checkpoint or f"random {args.num_layers}x{args.rnn_size} LSTM"
            from export.pipeline import export_checkpoint

            for precision in ("fp32", "int8") if args.provider == "cpu" else ("fp32", "fp16"):
                files[precision] = export_checkpoint(checkpoint, Path(tmp) / f"{precision}.onnx", precision).path
        models = served_as(files, int8_weights)
        engines = {
            (f"onnxruntime {name}", threads, lanes): GenerationEngine(
                path,
                providers=args.provider,
                threads=threads,
                max_batch=args.max_batch,
                max_queue=max(streams),
                lanes=lanes,
                int8_weights=asked,
            )
            for name, (path, asked) in models.items()
            for threads, lanes in layouts
        }
        loop = asyncio.new_event_loop()
        try:
            singles = {
                key: lambda e=engine: e.generate("", length=args.length, seed=1) for key, engine in engines.items()
            }
            if checkpoint is not None:
                singles |= torch_runs(checkpoint, args.length)
            single = best_in_rounds(singles, args.repeats)
            chunk = best_in_rounds(
                {key: bare_chunks(engine.runner, 1) for key, engine in engines.items()}, args.repeats
            )
            # All stream counts in the same rounds, so that a slow spell cannot favour one side of a ratio;
            # the host probe runs in them too, so it describes the machine the ratios were measured on.
            batched_rounds = timed_rounds(
                {
                    (key, n): concurrent_streams(loop, engine, n, args.length)
                    for key, engine in engines.items()
                    for n in streams
                }
                | (host_scaling_runs(*models[list(models)[-1]]) if args.provider == "cpu" else {}),
                args.repeats,
            )
            batched = {key: min(times) for key, times in batched_rounds.items()}
            host_scaling = host_scaling_median = None
            if args.provider == "cpu":
                host_scaling = 2 * batched[("host", 1)] / batched[("host", 2)]
                host_scaling_median = 2 * float(
                    np.median(round_ratios(batched_rounds[("host", 1)], batched_rounds[("host", 2)]))
                )
        finally:
            loop.close()
            for engine in engines.values():
                engine.close()
        if checkpoint is not None:
            per_char = (single["torch_full"] - single["torch_walk"]) / (args.length - 1)
            rows.append(
                {
                    "path": "pytorch eager",
                    "threads": 1,
                    "lanes": 1,
                    "us_per_char": per_char * 1e6,
                    "speech_ms": per_char * args.length * 1e3,
                }
            )
        for key in engines:
            name, threads, lanes = key
            row = {
                "path": name,
                "threads": threads,
                "lanes": lanes,
                "us_per_char": single[key] / args.length * 1e6,
                "speech_ms": single[key] * 1e3,
                "graph_us_per_char": chunk[key] / (GRAPH_CHUNKS * CHUNK) * 1e6,
                "size_mb": models[name.removeprefix("onnxruntime ")][0].stat().st_size / 1e6,
                "int8_weights": engines[key].runner.int8_weights,
            }
            for n in streams:
                row[f"chars_per_s_{n}"] = n * args.length / batched[(key, n)]
            if 1 in streams and 64 in streams:
                row["ratio_64_to_1"] = row["chars_per_s_64"] / row["chars_per_s_1"]
                # 64 streams against one in the same round: 64 × (one stream's seconds / 64 streams' seconds)
                ratios = 64 * round_ratios(batched_rounds[(key, 1)], batched_rounds[(key, 64)])
                row["ratio_64_to_1_median_of_rounds"] = float(np.median(ratios))
                row["ratio_64_to_1_rounds"] = [round(float(r), 2) for r in ratios]
            rows.append(row)
    baseline = rows[0]["us_per_char"]
    print(
        f"model: {label}; {args.length}-character speeches; CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
        f"onnxruntime {ort.__version__}, torch {torch_version()}"
    )
    width = max(40, *(len(row["path"]) for row in rows))
    header = (
        f"{'path':<{width}} {'thr':>3} {'lanes':>5} {'µs/char':>8} {'speech ms':>9} {'vs first':>8} {'graph µs':>8}"
        + "".join(f" {f'{n} str c/s':>12}" for n in streams)
        + (f" {'64÷1':>6} {'median':>6}" if 1 in streams and 64 in streams else "")
    )
    print(header)
    for row in rows:
        line = (
            f"{row['path']:<{width}} {row['threads']:>3} {row['lanes']:>5} {row['us_per_char']:>8.1f} "
            f"{row['speech_ms']:>9.1f} {baseline / row['us_per_char']:>7.1f}× "
            f"{row.get('graph_us_per_char', float('nan')):>8.1f}"
        )
        if "chars_per_s_1" in row:
            line += "".join(f" {row[f'chars_per_s_{n}']:>12,.0f}" for n in streams)
            if "ratio_64_to_1" in row:
                line += f" {row['ratio_64_to_1']:>5.1f}× {row['ratio_64_to_1_median_of_rounds']:>5.1f}×"
        print(line)
    if host_scaling is not None:
        print(
            f"host: two bare chunk graphs of {HOST_ROWS} rows on two threads did {host_scaling:.2f}× the work of one "
            f"in the batched rounds, best against best ({host_scaling_median:.2f}× the median of rounds; 2.00 would "
            "be two whole cores; lanes cannot do better)"
        )
    write_json(
        args.json,
        {
            "model": label,
            "length": args.length,
            "onnxruntime": ort.__version__,
            "torch": torch_version(),
            "host_two_thread_scaling": host_scaling,
            "host_two_thread_scaling_median_of_rounds": host_scaling_median,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
