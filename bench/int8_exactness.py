"""Are the int8 graph's integer matmuls exact on this CPU? int8 weights (U8S8) against uint8 weights with zero
point 128 (U8U8) (bot/inference/int8_weights.py), and what that does to a model's score.

    python -m bench.int8_exactness
    python -m bench.int8_exactness --model bot/assets/speechbot.onnx --text data/both/val.txt data/both/test.txt

Part 1: one quantized matmul of the step as the exporter builds it (export.int8_lstm.int8_matmul_model;
1280 inputs × 640 outputs, layer 1 of the bundled 2×640), with its weights in each layout, run by
onnxruntime on hidden states of two kinds and compared with the same integer arithmetic done exactly in
numpy (int64). A replay of VPMADDUBSW in numpy (adjacent pairs of uint8 × int8 products summed into an
int16 that saturates, then exact sums) shows whether that instruction explains the int8 layout's error.

Part 2 (--model with --text): each file's bits/char on each text as one stream from a zero state (what
`python -m export evaluate --streams 1` prints), served with each of `--int8-weights` (default: int8, then
uint8), and each later candidate against the first, character by character: the mean difference with its
standard error and how many characters' predictions moved.

Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bench.report import write_json
from bot.inference.api import INT8_WEIGHT_CHOICES
from bot.inference.int8_weights import INT8, to_layout
from bot.inference.runner import ModelRunner
from export.evaluate import onnx_char_nats
from export.int8_lstm import WEIGHT_ZERO, int8_matmul_model
from model.prepare import read_utf8

INPUTS, OUTPUTS, ROWS = 1280, 640, 8
ACT_ZERO = 128
# Relative to the largest exact output: fp32 rounding of the scaled result is ~1e-7; a saturated pair sum
# errs by at least (32768 - 32767)/2e7, and in practice by whole percents.
EXACT = 1e-5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.int8_exactness", description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=[], help="int8 model files to score side by side (first: baseline)")
    p.add_argument("--text", nargs="+", default=[], help="UTF-8 texts to score them on (e.g. data/both/val.txt)")
    p.add_argument(
        "--int8-weights",
        nargs="+",
        choices=INT8_WEIGHT_CHOICES,
        default=["int8", "uint8"],
        help="weight layouts to serve each model in (auto: the engine's choice for this CPU)",
    )
    p.add_argument("--json", default="docs/bench/int8_exactness.json", help="where to write the results")
    return p


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _quantized(model: onnx.ModelProto, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h as QuantizeLinear makes it (signed, -127..127), the signed weights, and act_scale × column scales."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h_q = np.clip(np.rint(h / inits["act_scale"]), -127, 127).astype(np.int64)  # float32 division, as onnxruntime
    w_q = inits["w_q"].astype(np.int64) - WEIGHT_ZERO
    return h_q, w_q, inits["act_scale"].astype(np.float64) * inits["w_scale"].astype(np.float64)


def vpmaddubsw_replay(h_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """uint8 activations (zero point 128) × int8 weights as VPMADDUBSW sums them: adjacent pairs along the
    inputs saturate to int16; the zero point's share, 128 × the column's sum, is taken off exactly."""
    products = (h_q + ACT_ZERO)[:, :, None] * w_q[None]
    pairs = np.clip(products[:, 0::2] + products[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1) - ACT_ZERO * w_q.sum(axis=0)


def matmul_rows(rng: np.random.Generator) -> list[dict]:
    weight_kinds = {
        # What training gives: most weights far below their column's largest.
        "gaussian": rng.standard_normal((INPUTS, OUTPUTS)),
        # Every weight at ±127 after quantization: the worst case.
        "±max": rng.choice([-1.0, 1.0], (INPUTS, OUTPUTS)),
    }
    h_kinds = {
        "tanh(normal)": np.tanh(rng.standard_normal((ROWS, INPUTS))),
        "±0.999": rng.choice([-0.999, 0.999], (ROWS, INPUTS)),
    }
    rows = []
    for weight_kind, weights in weight_kinds.items():
        new = int8_matmul_model(weights.astype(np.float32))
        for h_kind, h in h_kinds.items():
            h = h.astype(np.float32)
            h_q, w_q, scale = _quantized(new, h)
            exact = (h_q @ w_q) * scale
            top = float(np.abs(exact).max())
            replay = vpmaddubsw_replay(h_q, w_q) * scale
            for layout, model in (("int8 weights (U8S8)", to_layout(new, INT8)), ("uint8 weights (U8U8)", new)):
                (got,) = _session(model).run(["y"], {"h": h})
                error = float(np.abs(got - exact).max()) / top
                alone = np.concatenate([_session(model).run(["y"], {"h": h[r : r + 1]})[0] for r in range(ROWS)])
                rows.append(
                    {
                        "weights": weight_kind,
                        "h": h_kind,
                        "layout": layout,
                        "max_relative_error": error,
                        "exact": error <= EXACT,
                        "outputs_off_by_over_1e-5": int((np.abs(got - exact) > EXACT * top).sum()),
                        # The replay describes U8S8 only.
                        "vpmaddubsw_replay_relative_diff": float(np.abs(got - replay).max()) / top
                        if "U8S8" in layout
                        else None,
                        "rows_same_alone_and_batched": bool(np.array_equal(alone, got)),
                    }
                )
    return rows


def score_rows(models: list[str], texts: list[str], int8_weights: list[str]) -> list[dict]:
    rows = []
    for text in texts:
        bits = {}
        for model in models:
            for asked in int8_weights:
                runner = ModelRunner(model, "cpu", 1, asked)
                ids, _ = runner.info.text_ids(read_utf8(Path(text))[0])
                name = f"{Path(model).name}, {runner.int8_weights} weights" + (" (auto)" if asked == "auto" else "")
                bits[name] = onnx_char_nats(runner.session, runner.info, ids) / math.log(2)
        base = next(iter(bits.values()))
        for name, candidate in bits.items():
            diff = candidate - base
            rows.append(
                {
                    "text": text,
                    "model": name,
                    "characters": len(diff),
                    "bits_per_char": float(candidate.mean()),
                    "change": float(diff.mean()),
                    "change_standard_error": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                    "characters_moved_over_1e-4_bits": int((np.abs(diff) > 1e-4).sum()),
                    "largest_move_bits": float(np.abs(diff).max()),
                }
            )
    return rows


def main() -> None:
    args = build_parser().parse_args()
    if bool(args.model) != bool(args.text):
        raise SystemExit("error: --model and --text go together")
    matmuls = matmul_rows(np.random.default_rng(0))
    print(f"one {INPUTS}x{OUTPUTS} int8 matmul, {ROWS} rows, onnxruntime {ort.__version__} against exact integers")
    print(
        f"{'weights':<9} {'h':<13} {'layout':<21} {'max rel. error':>14} {'exact':>5} {'outputs off':>11} "
        f"{'vs replay':>9} {'alone=batch':>11}"
    )
    for r in matmuls:
        replay = "-" if r["vpmaddubsw_replay_relative_diff"] is None else f"{r['vpmaddubsw_replay_relative_diff']:.1e}"
        print(
            f"{r['weights']:<9} {r['h']:<13} {r['layout']:<21} {r['max_relative_error']:>14.2e} "
            f"{'yes' if r['exact'] else 'NO':>5} {r['outputs_off_by_over_1e-5']:>11,} "
            f"{replay:>9} {r['rows_same_alone_and_batched']!s:>11}"
        )
    scores = score_rows(args.model, args.text, args.int8_weights)
    if scores:
        print(
            f"\n{'text':<22} {'model':<40} {'bits/char':>10} {'change':>10} {'± s.e.':>9} {'moved':>7} {'largest':>8}"
        )
        for r in scores:
            print(
                f"{r['text']:<22} {r['model']:<40} {r['bits_per_char']:>10.6f} {r['change']:>+10.6f} "
                f"{r['change_standard_error']:>9.6f} {r['characters_moved_over_1e-4_bits']:>7,} "
                f"{r['largest_move_bits']:>8.3f}"
            )
    write_json(args.json, {"onnxruntime": ort.__version__, "matmuls": matmuls, "scores": scores})


if __name__ == "__main__":
    main()
