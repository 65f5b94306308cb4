"""The bundled model on the CUDA provider, checked against the CPU provider: `python -m bench.gpu_check`.

Needs onnxruntime-gpu and an NVIDIA GPU; torch-free (bench/gpu_check.sh runs it, then the generation
benchmark on CUDA). What it checks, each printed as `ok` or `FAILED` (exit code 1 if any failed):

- **the choice**: an engine asked for `cuda` with the default model path serves
  bot/assets/speechbot-cuda.onnx on CUDAExecutionProvider (the int8 file has no CUDA kernel);
- **the casts**: onnxruntime folded the file's fp16-to-fp32 weight casts when it opened it on CUDA, so
  the LSTM nodes read fp32 constants (cuDNN prepares its weights once only for constants);
- **logits**: the same text primed on CUDA and on CPU, at most LOGIT_TOLERANCE apart (both fp32; TF32
  or a wrong state would show here);
- **bits/char**: the file's score on a text (data/both/val.txt when prepared, else README.md) on CUDA
  and CPU, at most BPC_TOLERANCE apart, in 64 streams as `python -m export evaluate` reads;
- **text**: speeches of the same seeds from the CUDA engine and a CPU engine on the same file. Both
  sample by inverse CDF from their own logits, so a last-digit difference can change a character where
  two are nearly tied and the texts part there; each pair must share at least its first
  MIN_SHARED_PREFIX characters (a wrong graph parts at once), and how many are equal is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.report import write_json
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import CUDA_MODEL_PATH, DEFAULT_MODEL_PATH
from bot.inference.runner import ModelRunner, session_options
from export.evaluate import onnx_char_nats, stream_count
from model.cli import fail
from model.prepare import read_utf8

LOGIT_TOLERANCE = 1e-3
BPC_TOLERANCE = 1e-4
MIN_SHARED_PREFIX = 100
PROMPTS = ("", "We will", "The wall", "China")
ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument(
        "--text", type=Path, help="text for the bits/char check (default: data/both/val.txt, else README.md)"
    )
    p.add_argument("--seeds", type=int, default=8, help="speeches per prompt for the text check")
    p.add_argument("--length", type=int, default=500, help="characters per speech")
    p.add_argument("--json", default="docs/bench/gpu_check.json", help="where to write the results")
    return p


def folded_casts(path: Path) -> int:
    """Cast nodes left in the graph onnxruntime optimised for the CUDA provider (0: all folded)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(1)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return sum(node.op_type == "Cast" for node in onnx.load(options.optimized_model_filepath).graph.node)


def bits_per_char(runner: ModelRunner, ids: np.ndarray) -> float:
    streams = stream_count(len(ids) - 1)
    return float(onnx_char_nats(runner.session, runner.info, ids, streams=streams).mean() / np.log(2))


def main() -> None:
    args = build_parser().parse_args()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        fail("this onnxruntime has no CUDA provider: install onnxruntime-gpu on a machine with an NVIDIA GPU")
    if args.text is not None and not args.text.is_file():
        fail(f"--text {args.text} is not a file")
    text_path = args.text or next(p for p in (ROOT / "data/both/val.txt", ROOT / "README.md") if p.is_file())
    results: dict = {"onnxruntime": ort.__version__, "text": str(text_path), "checks": {}}
    failed = []

    def check(name: str, ok: bool, detail: str) -> None:
        results["checks"][name] = {"ok": ok, "detail": detail}
        print(f"{'ok' if ok else 'FAILED':>6}  {name}: {detail}")
        if not ok:
            failed.append(name)

    start = time.perf_counter()
    cuda = GenerationEngine(DEFAULT_MODEL_PATH, providers="cuda", threads=1)
    cpu = GenerationEngine(CUDA_MODEL_PATH, providers="cpu", threads=1, lanes=1)
    try:
        results["load_s"] = time.perf_counter() - start
        check(
            "choice",
            cuda.runner.path == CUDA_MODEL_PATH and cuda.provider == "CUDAExecutionProvider",
            f"MODEL_PATH unset, providers cuda: {cuda.runner.path.name} on {cuda.provider}",
        )
        casts = folded_casts(CUDA_MODEL_PATH)
        check("casts", casts == 0, f"{casts} Cast nodes left after onnxruntime's optimisation on CUDA")

        text, _ = read_utf8(text_path)
        ids, _ = cuda.info.text_ids(text)
        window = ids[None, :2000]
        logits = [engine.runner.prime(window, engine.runner.zero_state(1))[0] for engine in (cuda, cpu)]
        diff = float(np.abs(logits[0] - logits[1]).max())
        check("logits", diff <= LOGIT_TOLERANCE, f"max |CUDA - CPU| {diff:.3g} over {window.shape[1]} characters")

        scores = [bits_per_char(engine.runner, ids) for engine in (cuda, cpu)]
        results["bits_per_char"] = {"cuda": scores[0], "cpu": scores[1]}
        change = scores[0] - scores[1]
        check(
            "bits/char",
            abs(change) <= BPC_TOLERANCE,
            f"{text_path.name} ({len(ids) - 1:,} scored): CUDA {scores[0]:.6f}, CPU {scores[1]:.6f} ({change:+.2e})",
        )

        equal, shortest = 0, args.length
        for prompt in PROMPTS:
            for seed in range(args.seeds):
                pair = [e.generate(prompt, length=args.length, temperature=0.8, seed=seed) for e in (cuda, cpu)]
                shared = next((i for i, (a, b) in enumerate(zip(*pair, strict=False)) if a != b), len(pair[0]))
                equal += pair[0] == pair[1]
                shortest = min(shortest, shared)
        total = len(PROMPTS) * args.seeds
        results["text"] = {"speeches": total, "equal": equal, "shortest_shared_prefix": shortest}
        check(
            "text",
            shortest >= MIN_SHARED_PREFIX,
            f"{equal} of {total} speeches equal on CUDA and CPU; the shortest shared start {shortest} characters",
        )
    finally:
        cuda.close()
        cpu.close()
    results["failed"] = failed
    write_json(args.json, results)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
