"""`python -m export evaluate` speed: the text as one stream against many streams in one batch.

On one model file and one text it scores the text as one stream (the exact protocol, and the command's
only mode before --streams) and then as several consecutive parts read side by side, each after a
burn-in, in one or more sessions side by side (lanes). It prints a table of seconds, bits/char, the
difference from the one-stream score and the speed-up, and writes JSON. The text defaults to the tail
of the speeches (the val/test region), 170,000 characters.

    python -m bench.export_evaluate --chars 170000 --streams 16 64 --json docs/bench/export_evaluate.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.report import write_json
from bot.inference.runner import ModelRunner
from export.evaluate import BURN_IN, onnx_char_nats, stream_count
from model.prepare import read_utf8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bot/assets/speechbot.onnx", help="exported model")
    p.add_argument("--text", default="../shared/data/speeches.txt", help="UTF-8 text; its tail is scored")
    p.add_argument("--chars", type=int, default=170_000, help="characters from the end of --text")
    p.add_argument("--streams", type=int, nargs="+", default=[16, 64], help="stream counts to compare")
    p.add_argument("--burn-in", type=int, nargs="+", default=[BURN_IN], help="burn-in lengths to compare")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    p.add_argument(
        "--lanes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="sessions side by side to compare (the default of `export evaluate` is one per core)",
    )
    p.add_argument("--json", default="docs/bench/export_evaluate.json", help="where to write the results")
    args = p.parse_args()
    runners = [ModelRunner(args.model, "cpu", args.threads) for _ in range(max(args.lanes))]
    sessions, info = [runner.session for runner in runners], runners[0].info
    ids, _ = info.text_ids(read_utf8(Path(args.text))[0][-args.chars :])

    def score(streams: int, burn_in: int, lanes: int = 1) -> tuple[float, float]:
        start = time.perf_counter()
        bits = float(onnx_char_nats(sessions[:lanes], info, ids, streams=streams, burn_in=burn_in).mean())
        return time.perf_counter() - start, bits / math.log(2)

    score(4, 16, max(args.lanes))  # warm-up: first-call allocations
    out = Path(args.json)
    record = {"model": args.model, "text": args.text, "chars": args.chars, "threads": args.threads, "rows": []}
    print(f"{args.model} ({info.precision}), last {args.chars:,} characters of {args.text}: ", end="")
    print(f"{len(ids) - 1:,} scored; `export evaluate` would use {stream_count(len(ids) - 1)} streams")
    header = (
        f"{'streams':>7} {'burn-in':>7} {'lanes':>5} {'seconds':>8} {'bits/char':>10} {'change':>10} {'speed-up':>9}"
    )
    print(header, flush=True)
    candidates = [(1, 0, 1)] + [
        (streams, burn_in, lanes) for burn_in in args.burn_in for streams in args.streams for lanes in args.lanes
    ]
    for streams, burn_in, lanes in candidates:
        seconds, bits = score(streams, burn_in, lanes)
        one = record["rows"][0] if record["rows"] else {"seconds": seconds, "bits_per_char": bits}
        row = {"streams": streams, "burn_in": burn_in, "lanes": lanes, "seconds": seconds, "bits_per_char": bits}
        row |= {"bits_change": bits - one["bits_per_char"], "speedup": one["seconds"] / seconds}
        record["rows"].append(row)
        print(
            f"{streams:>7} {burn_in:>7} {lanes:>5} {seconds:>8.2f} {bits:>10.5f} {row['bits_change']:>+10.6f} "
            f"{row['speedup']:>8.1f}×",
            flush=True,
        )
        # Written after every row, so a run cut short keeps what it measured.
        write_json(out, record, quiet=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
