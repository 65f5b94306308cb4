"""How unprompted speeches open and close: their first words against the training text's paragraph
openings, and how many end inside a quote.

    python -m bench.openings --model bot/assets/speechbot.onnx --train data/both --json docs/bench/openings.json

The bot's engine writes --speeches unprompted speeches (seeds 0, 1, ...) as /speech does in a new chat:
the bot's sampling at the default temperature, the default length, ended as speeches end, composed as
the reply is. The script measures:
- first words: the share of speeches opening with each word, against the share of the training text's
  paragraphs (its non-empty lines) opening with it; what opens with no word counts as its first
  character. Their distance is the total variation, half the summed absolute differences over all
  openings (0: the same distribution, 1: nothing in common). Even as many openings drawn from the
  training text's own paragraphs are that far from it by chance (many openings are rare): the script
  gives that floor too, the mean over FLOOR_DRAWS draws;
- unclosed quotes: the share of speeches that end inside a quotation (bot.inference.ending.quote_is_open),
  with the share that end with an ellipsis and their mean length, which closing quotes must not spoil.
--train is a prepared dataset folder (its train split) or text files, as bench/text_stats.py takes them.
Prints the top openings and the numbers, and writes JSON.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter

import numpy as np

from bench.report import write_json
from bench.text_stats import training_text
from bot.config import Config
from bot.core.speech import compose_speech, reply_room
from bot.inference.ending import ELLIPSIS, quote_is_open
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from model.cli import UsageError
from model.sampling import bot_sampling

TOP = 10
FLOOR_DRAWS = 20
_FIRST_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def opening(text: str) -> str:
    """A text's first word as written (case kept: "And" opens, "and" continues), else its first character."""
    text = text.lstrip()
    match = _FIRST_WORD.match(text)
    return match.group(0) if match else text[:1]


def shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {key: count / total for key, count in counts.items()}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(abs(p.get(key, 0.0) - q.get(key, 0.0)) for key in p.keys() | q.keys()) / 2


def paragraph_openings(text: str) -> dict[str, float]:
    return shares(Counter(opening(line) for line in text.split("\n") if line.strip()))


def speeches(engine: GenerationEngine, count: int, temperature: float, length: int) -> list[str]:
    """`count` unprompted speeches as the bot writes them, all submitted at once so they batch."""
    streams = [
        engine.stream(
            "",
            length,
            sampling=bot_sampling(temperature),
            seed=seed,
            end_sentence=True,
            max_chars=reply_room(""),
        )
        for seed in range(count)
    ]
    return [compose_speech("", "".join(stream)) for stream in streams]


def chance_floor(training: dict[str, float], count: int) -> float:
    """The mean total variation between `count` openings drawn from the training text's and its own."""
    keys = list(training)
    rng = np.random.default_rng(0)
    draws = [Counter(rng.choice(keys, count, p=[training[key] for key in keys])) for _ in range(FLOOR_DRAWS)]
    return float(np.mean([total_variation(shares(draw), training) for draw in draws]))


def measure(texts: list[str], training: dict[str, float]) -> dict:
    first = shares(Counter(opening(text) for text in texts))
    top = sorted(training, key=lambda key: (-training[key], key))[:TOP]
    top += [key for key in sorted(first, key=lambda key: (-first[key], key))[:TOP] if key not in top]
    count = max(1, len(texts))
    return {
        "total_variation": total_variation(first, training),
        "chance_floor": chance_floor(training, len(texts)),
        "unclosed_quote_rate": sum(map(quote_is_open, texts)) / count,
        "ellipsis_rate": sum(text.endswith(ELLIPSIS) for text in texts) / count,
        "mean_chars": sum(map(len, texts)) / count,
        "top": [{"opening": key, "training": training.get(key, 0.0), "speeches": first.get(key, 0.0)} for key in top],
        "distinct_openings": len(first),
    }


def markdown(result: dict) -> str:
    lines = ["| first word | training paragraphs | speeches |", "| --- | --- | --- |"]
    lines += [f"| {row['opening']} | {row['training']:.3f} | {row['speeches']:.3f} |" for row in result["top"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.openings", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="exported .onnx model")
    p.add_argument("--train", nargs="+", required=True, help="prepared dataset folder(s) or text files")
    p.add_argument("--speeches", type=int, default=200, help="how many speeches (seeds 0 to N-1)")
    p.add_argument("--temperature", type=float, default=Config.default_temperature)
    p.add_argument("--length", type=int, default=Config.default_length, help="characters per speech, as /length")
    p.add_argument("--json", default="docs/bench/openings.json", help="where to write the results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.speeches < 1:
            raise UsageError(f"--speeches must be at least 1, not {args.speeches}")
        start = time.perf_counter()
        with GenerationEngine(
            args.model, providers="cpu", threads=1, lanes=1, max_queue=max(256, args.speeches)
        ) as engine:
            training = paragraph_openings(training_text(args.train, engine.cleaning))
            texts = speeches(engine, args.speeches, args.temperature, args.length)
        seconds = time.perf_counter() - start
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = measure(texts, training)
    print(
        f"{args.speeches} unprompted speeches of {args.length} characters at temperature {args.temperature:g} "
        f"({args.model}) against the paragraph openings of {' '.join(args.train)}: total variation "
        f"{result['total_variation']:.3f} (as many draws from the training openings: {result['chance_floor']:.3f}), "
        f"{result['distinct_openings']} distinct openings; unclosed quotes in {result['unclosed_quote_rate']:.1%} "
        f"of the speeches, an ellipsis at the end of {result['ellipsis_rate']:.1%}, {result['mean_chars']:.0f} "
        f"characters on average ({seconds:.0f} s).\n\n{markdown(result)}"
    )
    write_json(args.json, vars(args) | result | {"seconds": seconds, "openings": [opening(t) for t in texts]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
