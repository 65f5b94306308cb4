"""Latency users see in the interactive features: the three inline speeches, and a streamed speech's first text.

Inline answers: Telegram drops inline answers that come late and users expect results within a second, so
the goal is p95 ≤ 1 s for one user with the bundled model. Each round, in alternating order, times:
- `batch`: SpeechBot.inline_speeches, what the bot runs (three requests in one engine batch, the
  per-user limit and supersede bookkeeping included);
- `serial`: the same three speeches one after another, the design the batch replaces;
- `single`: one speech of the same length, the floor a batch of three is compared with.
Queries are spaced by --pause seconds, as a user reading the results would, so the per-user limit
(bot/core/speechbot.py INLINE_RATE_*) does not hold them back.

First visible text: in private chats a speech streams in with sendMessageDraft, so the user sees text
after the engine's first chunk instead of after its last. For a --first-text-length speech (500, the
default chat length) each round times /speech through SpeechBot, in alternating order:
- `whole`: as before drafts, until the whole text is back (what a user waited for until now);
- `streamed first text` and `streamed whole`: with a draft callback, until its first text (the first
  draft) and until the whole text (so streaming's own cost on the final message shows too). Goal: ≤ 0.3 s.

Both print p50 / p95 / max per candidate and its ratio to the first row, and go to one JSON file. The
engine is opened as the bot opens it by default (CPU, default threads and lanes). Telegram's round trip
(one request per answer, draft or message) is not included.

    python -m bench.inline_latency --json docs/bench/inline_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bench.report import write_json
from bot.config import Config
from bot.core.bounds import INLINE_LENGTH, INLINE_STYLES
from bot.core.speechbot import ChatRef, SpeechBot
from bot.core.voices import Voices
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.services import build_services
from model.sampling import bot_sampling

QUERIES = ("", "We will", "Our jobs are", "Believe me, folks,", "Mexico", "The wall", "China is", "We're going to")
USER_ID = 1
CHAT = ChatRef(1, "private")

# A candidate runs once and returns the seconds of each measure it takes.
Candidate = Callable[[int], Awaitable[dict[str, float]]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.inline_latency", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="ONNX model (default: the bundled one)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per candidate")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between one user's inline queries")
    p.add_argument("--first-text-length", type=int, default=500, help="characters of the streamed speech")
    p.add_argument("--json", default="docs/bench/inline_latency.json", help="where to write the results")
    return p


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_s": statistics.median(seconds),
        "p95_s": statistics.quantiles(seconds, n=20, method="inclusive")[-1],
        "max_s": max(seconds),
    }


async def rounds(args: argparse.Namespace, candidates: list[Candidate], pause: float) -> dict[str, list[float]]:
    """Every candidate once per round, in alternating order; the seconds of each measure after warm-up."""
    times: dict[str, list[float]] = {}
    for round_index in range(args.warmup + args.rounds):
        for candidate in candidates if round_index % 2 == 0 else candidates[::-1]:
            measured = await candidate(round_index)
            if round_index >= args.warmup:
                for name, seconds in measured.items():
                    times.setdefault(name, []).append(seconds)
            await asyncio.sleep(pause)
    return times


def inline_candidates(engine: GenerationEngine, core: SpeechBot) -> list[Candidate]:
    def timed(name: str, run: Callable[[str], Awaitable[object]]) -> Candidate:
        async def candidate(round_index: int) -> dict[str, float]:
            start = time.perf_counter()
            await run(QUERIES[round_index % len(QUERIES)])
            return {name: time.perf_counter() - start}

        return candidate

    async def batch(query: str) -> None:
        speeches = await core.inline_speeches(USER_ID, query)
        assert speeches is not None and len(speeches) == len(INLINE_STYLES)

    async def serial(query: str) -> None:
        for _, temperature in INLINE_STYLES:
            await engine.agenerate(
                query,
                INLINE_LENGTH,
                sampling=bot_sampling(temperature),
                end_sentence=True,
                max_chars=INLINE_LENGTH,
            )

    async def single(query: str) -> None:
        await engine.agenerate(
            query,
            INLINE_LENGTH,
            end_sentence=True,
            max_chars=INLINE_LENGTH,
            sampling=bot_sampling(0.9),
        )

    return [timed("batch", batch), timed("serial", serial), timed("single", single)]


def first_text_candidates(core: SpeechBot) -> list[Candidate]:
    async def whole(_round: int) -> dict[str, float]:
        start = time.perf_counter()
        await core.handle_text(CHAT, "/speech")
        return {"whole": time.perf_counter() - start}

    async def streamed(_round: int) -> dict[str, float]:
        start = time.perf_counter()
        first: list[float] = []

        @contextlib.asynccontextmanager
        async def drafts() -> AsyncIterator[Callable[[str], None]]:
            yield lambda _text: first or first.append(time.perf_counter() - start)

        await core.handle_text(CHAT, "/speech", show_typing=drafts)
        return {"streamed first text": first[0], "streamed whole": time.perf_counter() - start}

    return [whole, streamed]


def print_table(title: str, stats: dict[str, dict[str, float]]) -> None:
    print(title)
    base = next(iter(stats))
    print(f"  {'candidate':<20} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {f'p95 vs {base}':>14}")
    for name, row in stats.items():
        ratio = row["p95_s"] / stats[base]["p95_s"]
        print(f"  {name:<20} {row['p50_s']:>8.3f} {row['p95_s']:>8.3f} {row['max_s']:>8.3f} {ratio:>13.2f}x")


def main() -> None:
    args = build_parser().parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, GenerationEngine(args.model, providers="cpu") as engine:
        config = Config(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            default_length=args.first_text_length,
            cooldown_seconds=0,
        )
        services = build_services(config, Voices.of(engine))
        try:
            inline = asyncio.run(rounds(args, inline_candidates(engine, services.core), args.pause))
            first_text = asyncio.run(rounds(args, first_text_candidates(services.core), 0.0))
        finally:
            services.close()
        lanes = engine.lanes
    results = {
        "inline": {name: summary(seconds) for name, seconds in inline.items()},
        "first_text": {name: summary(seconds) for name, seconds in first_text.items()},
    }
    print(
        f"model: {args.model.name}; {args.rounds} rounds; {os.cpu_count()} CPUs, {lanes} lanes; "
        f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print_table(f"three {INLINE_LENGTH}-character inline speeches, one user:", results["inline"])
    print_table(f"/speech of {args.first_text_length} characters in a private chat:", results["first_text"])
    inline_p95, first_p95 = results["inline"]["batch"]["p95_s"], results["first_text"]["streamed first text"]["p95_s"]
    print(f"inline p95 {inline_p95:.3f} s {'meets' if inline_p95 <= 1.0 else 'misses'} the goal of 1 s")
    print(f"first text p95 {first_p95:.3f} s {'meets' if first_p95 <= 0.3 else 'misses'} the goal of 0.3 s")
    run = {
        "model": str(args.model),
        "inline_length": INLINE_LENGTH,
        "styles": dict(INLINE_STYLES),
        "first_text_length": args.first_text_length,
        "rounds": args.rounds,
        "pause_s": args.pause,
        "lanes": lanes,
        "load_average_before": load_before,
    }
    write_json(args.json, run | {"summary": results, "seconds": {"inline": inline, "first_text": first_text}})


if __name__ == "__main__":
    main()
