"""Training-speed benchmark: the whole training loop against a bare LSTM step and the matmul peak.

For 2-layer LSTMs of several sizes at the default batch and sequence length it measures, in one run,
in fp32 and in the mixed precision that `--amp` (the default) picks on this machine (bf16 autocast on
a CPU with AMX or AVX512-BF16; none elsewhere, and then only fp32 is timed):
- this machine's matmul peak in each precision (GFLOP/s, best of a few square sizes);
- the bare step: embedding + nn.LSTM + decoder forward, backward and an Adam step on fixed random data;
- the whole loop: `model.train.train()` itself (data, state carry, clipping, logging and one validation
  per --eval-every iterations, the default), timed from its own metrics after warm-up;
and prints a table of chars/s, the share of the fp32 peak and of the precision's own peak, whole/bare,
and the whole loop's speed against fp32, and writes JSON. Each size runs --rounds rounds of
(bare, whole) per precision and keeps the best of each.

    python -m bench.train_speed --data data/speeches --json docs/bench/train_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import write_json
from model import train as train_module
from model.config import TrainConfig
from model.dataset import load_dataset
from model.model import CharRNN, ModelConfig
from model.plot import read_metrics


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_char(config: ModelConfig) -> float:
    """Forward multiply-adds of the LSTM layers and decoder, x2 for FLOPs, x3 for forward + backward."""
    forward, inputs = 0, config.wordvec_size
    for _ in range(config.num_layers):
        forward += 2 * 4 * config.rnn_size * (inputs + config.rnn_size)
        inputs = config.rnn_size
    forward += 2 * config.rnn_size * config.vocab_size
    return 3 * forward


def bare_step_chars_per_sec(
    config: ModelConfig,
    batch: int,
    seq: int,
    iters: int,
    amp_dtype: torch.dtype | None,
    warmup: int = 10,
    windows: int = 3,
) -> float:
    """Best of `windows` timing windows, because on a shared machine one slow window is someone else's load."""
    net = CharRNN(config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randint(config.vocab_size, (batch, seq))
    y = torch.randint(config.vocab_size, (batch, seq))
    autocast = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else nullcontext()

    def step() -> None:
        with autocast:
            logits, _ = net(x)
            loss = F.cross_entropy(logits.float().view(-1, config.vocab_size), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # oneDNN builds its primitives on the first calls
        step()
    per_window = max(1, iters // windows)
    best = 0.0
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            step()
        best = max(best, batch * seq * per_window / (time.perf_counter() - start))
    return best


def whole_loop_chars_per_sec(data: str, rnn_size: int, iters: int, warmup: int, threads: int, amp: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data=data,
            out=out,
            rnn_size=rnn_size,
            max_iters=iters,
            print_every=warmup,
            sample_every=0,
            plots=False,
            tensorboard=False,
            progress=False,
            threads=threads,
            amp=amp,
        )
        train_module.train(config)
        train, val = read_metrics(Path(out))
    first = next(r for r in train if r["iter"] == warmup)
    last = val[-1]  # the validation after the last iteration, so its cost is included
    return config.batch_size * config.seq_length * (iters - warmup) / (last["elapsed"] - first["elapsed"])


def precision_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset (python -m model prepare)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 640], help="LSTM hidden sizes (2 layers)")
    p.add_argument("--iters", type=int, default=200, help="whole-loop iterations (one validation at the end)")
    p.add_argument("--bare-iters", type=int, default=60, help="bare-step iterations, timed as the best of 3 windows")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds of (bare, whole) per size and precision; the best of each is kept"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", default="docs/bench/train_speed.json", help="where to write the results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    defaults = TrainConfig(data=args.data)
    vocab_size = len(load_dataset(args.data).vocab)
    precisions = dict.fromkeys([None, train_module.autocast_dtype(torch.device("cpu"), enabled=True)])
    peaks = {dtype: matmul_peak_gflops(dtype or torch.float32) for dtype in precisions}
    fp32_peak = peaks[None]
    rows = []
    for size in args.sizes:
        # The default network at this size; its weight drop is part of the training step, so of both sides.
        config = dataclasses.replace(defaults, rnn_size=size, num_layers=2).model_config(vocab_size)
        per_char = flops_per_char(config)
        fp32_whole = None
        for dtype in precisions:
            # Rounds of (bare, whole), best of each: a slow spell of this shared machine then cannot land
            # on one side only.
            bare = whole = 0.0
            for _ in range(args.rounds):
                bare = max(
                    bare,
                    bare_step_chars_per_sec(config, defaults.batch_size, defaults.seq_length, args.bare_iters, dtype),
                )
                whole = max(
                    whole,
                    whole_loop_chars_per_sec(args.data, size, args.iters, 10, args.threads, amp=dtype is not None),
                )
            fp32_whole = fp32_whole or whole
            rows.append(
                {
                    "model": f"2x{size}",
                    "precision": precision_name(dtype),
                    "batch": defaults.batch_size,
                    "seq": defaults.seq_length,
                    "bare_chars_per_sec": bare,
                    "whole_loop_chars_per_sec": whole,
                    "whole_over_bare": whole / bare,
                    "bare_share_of_fp32_peak": bare * per_char / 1e9 / fp32_peak,
                    "whole_share_of_fp32_peak": whole * per_char / 1e9 / fp32_peak,
                    "whole_share_of_own_peak": whole * per_char / 1e9 / peaks[dtype],
                    "whole_vs_fp32": whole / fp32_whole,
                    "gflop_per_kchar": per_char / 1e6,
                }
            )
    peak_text = ", ".join(f"{precision_name(dtype)} {peak:.1f} GFLOP/s" for dtype, peak in peaks.items())
    print(f"matmul peak on {args.threads} threads: {peak_text}")
    print(
        f"{'model':<7} {'prec':<5} {'bare chars/s':>13} {'whole chars/s':>14} {'whole/bare':>11} "
        f"{'bare %fp32pk':>13} {'whole %fp32pk':>14} {'whole %ownpk':>13} {'vs fp32':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<7} {r['precision']:<5} {r['bare_chars_per_sec']:>13,.0f} "
            f"{r['whole_loop_chars_per_sec']:>14,.0f} {r['whole_over_bare']:>11.2f} "
            f"{r['bare_share_of_fp32_peak']:>13.0%} {r['whole_share_of_fp32_peak']:>14.0%} "
            f"{r['whole_share_of_own_peak']:>13.0%} {r['whole_vs_fp32']:>7.2f}×"
        )
    write_json(
        args.json,
        {
            "matmul_peak_gflops": {precision_name(dtype): peak for dtype, peak in peaks.items()},
            "threads": args.threads,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
