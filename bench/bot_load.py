"""Many chats at once: time to reply when N private chats each send /speech within a few seconds.

    python -m bench.bot_load                                   # 50, 200, 1000 chats; 30/s and 1000/s
    python -m bench.bot_load --chats 200 --rates 30            # one size, Telegram's default rate
    python -m bench.bot_load --chats 50 --wirings capacity --metrics off on   # what /metrics costs
    python -m bench.bot_load --chats 50 --rates 30 --wirings capacity --voices 1 2   # what a second voice costs

The real bot (bot.telegram.app.build_application: python-telegram-bot's HTTP stack, the real engine on
the bundled model, SQLite) polls the project's Bot API emulator (tests/support/telegram_emulator.py, which has
no flood limits) on 127.0.0.1. Each of N private chats sends `/speech` once, at a random moment within
--spread seconds, and gets a --length character speech. Time to reply runs from the moment its update
is queued at the emulator to the moment the bot's sendMessage to that chat arrives there. "CPU s" is the
process's CPU time (all its threads, the emulator's share included) from the first /speech to the last reply.

Wirings run side by side, in alternating order, each run in a process of its own (so peak RSS is
that run's): "capacity", the update processor sized by the engine as the bot has it
(bot/telegram/app.py), or a fixed number of concurrent updates, such as the 16 the bot had (the
default baseline, which the last column compares with). `--metrics off on` runs each wiring without and
with the Prometheus metrics (METRICS_PORT, bot/metrics.py), scraped every --scrape-interval seconds by
a separate process that starts scraping before the chats ask. Everything else is common to all.

The floor is what no wiring can beat: the larger of N messages at the overall rate
(TELEGRAM_MESSAGES_PER_SECOND) and N speeches at the engine's throughput, measured in the same
process right after the load with 2 × max_batch requests at once, the best of two tries (only the
speeches made count, not the chats told "busy"). Each row is run --repeats times and reports the
medians, with the range of p95 ÷ floor: a 2-core VM's speed drifts by ±20% from one run to the next.
A row at a raised rate shows the case where generation sets the floor. "busy" counts chats told to try
again because the engine's queue was full: with 1,000 chats that is by design (docs/speed.md). Prints
a table and writes JSON.

`--voices 1 2` runs each wiring (and metrics setting) with the first 1 and the first 2 model files of
--voice-models loaded (default: the bundled voices, bot.inference.modelfile.DEFAULT_MODEL_PATHS), one engine
each with the configured lanes, opened as the bot opens them (bot.services.open_voices), and the chats split
between them: the n-th chat speaks in voice n mod N, so with two voices the chats with odd ids hear the
second. Each chat's voice is stored in the database before the load, with the store calls /voice makes, in
every row (the one-voice row stores the default voice), so the load itself is the same /speech burst in
every row and the rows differ only in the engines: sending `/voice NAME` during the load would put half as
many messages again through the rate limiter and the event loop of the two-voice row alone, and sending it
before the load would make the rows of the odd chats alone, leaving the others to be made during it. The
floor then counts every engine generating at once. A second table sets each row beside the row of the first
count with the same wiring and metrics: p50, p95, throughput (the characters of the speeches served, busy
refusals left out, from the first /speech to the last reply), busy refusals, CPU s and peak RSS (the
process's, where the second engine's memory shows), with this row ÷ that one. Without --voices, one
engine on --model serves chats met for the first time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.report import ratio_text, write_json
from bot.config import Config, ConfigError
from bot.core.speechbot import ENGINE_BUSY_REPLY
from bot.core.voices import Voices
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATH, DEFAULT_MODEL_PATHS
from bot.inference.runner import ModelFileError
from bot.services import build_services, close_engines, new_metrics, open_voices
from db.models import utc_now
from tests.support.bot_harness import TOKEN, free_port, running_bot
from tests.support.telegram_emulator import TelegramEmulator

ROOT = Path(__file__).resolve().parents[1]


def shown_path(path: Path) -> str:
    """`path` as the JSON and help show it: from the repository root when it lies inside."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else path)


def wiring(text: str) -> str:
    """`capacity` (concurrent updates sized by the engine) or a fixed number of concurrent updates."""
    if text != "capacity" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'capacity' nor a whole number of concurrent updates")
    return text


PRODUCTION_REQUESTS = {"retry_delays": (1.0, 2.0, 4.0), "read_timeout": 10.0}  # build_application's defaults

# Scrapes a /metrics URL every INTERVAL seconds until killed, printing a line per good scrape. A process of its
# own, so only the bot's side of a scrape (the endpoint's thread) is measured.
SCRAPER = """
import sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
while True:
    with urllib.request.urlopen(url, timeout=30) as response:
        if b"speechbot_speeches_generated_total" in response.read():
            print("scraped", flush=True)
    time.sleep(interval)
"""


class TimingEmulator(TelegramEmulator):
    """The emulator, noting when each chat's first reply arrives and what it said."""

    def __init__(self, token: str, chats: int):
        super().__init__(token)
        self.replies: dict[int, tuple[float, str]] = {}
        self.expected = chats
        self.all_replied = asyncio.Event()

    def _send_message(self, params: dict) -> dict:
        chat_id = int(params["chat_id"])
        if chat_id not in self.replies:
            self.replies[chat_id] = (time.perf_counter(), str(params["text"]))
            if len(self.replies) == self.expected:
                self.all_replied.set()
        return super()._send_message(params)


async def engine_throughput(engines: Sequence[GenerationEngine], length: int, tries: int = 2) -> float:
    """Characters per second with every engine's batch full at once (2 × max_batch requests each), the best
    of `tries`: the higher throughput makes the lower, stricter floor."""
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        requests = [engine.agenerate(length=length) for engine in engines for _ in range(2 * engine.max_batch)]
        texts = await asyncio.gather(*requests)
        best = max(best, sum(map(len, texts)) / (time.perf_counter() - start))
    return best


def scraped_speeches(port: int) -> float:
    """speechbot_speeches_generated_total as the endpoint says it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        families = text_string_to_metric_families(response.read().decode())
        return next(f for f in families if f.name == "speechbot_speeches_generated").samples[0].value


async def store_voices(config: Config, voices: Voices, chat_ids: Sequence[int]) -> None:
    """Each chat's row with its voice, the n-th chat's the (n mod len(voices))-th, stored as /voice stores it."""
    services = build_services(config, voices)
    try:
        for n, chat_id in enumerate(chat_ids):
            await services.store.get(chat_id, "private")
            await services.store.update(chat_id, voice=voices.names[n % len(voices)])
    finally:
        services.close()


async def one_row(
    wiring: str,
    chats: int,
    rate: float,
    length: int,
    spread: float,
    models: Sequence[Path],
    seed: int,
    metrics_on: bool = False,
    scrape_interval: float = 1.0,
    voices_stored: bool = False,
) -> dict:
    """One run: `models` served, one voice each; with `voices_stored`, each chat's voice stored beforehand."""
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.uniform(0, spread, chats))
    chat_ids = [10_000 + i for i in range(chats)]
    scrapes, speeches_scraped = 0, None
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            telegram_bot_token=TOKEN,
            database_url=f"sqlite:///{tmp}/bot.db",
            model_paths=tuple(models),
            default_length=length,
            telegram_messages_per_second=rate,
            metrics_port=free_port() if metrics_on else None,
        )
        metrics = new_metrics(config)
        voices = open_voices(config, metrics=metrics)
        engines: list[GenerationEngine] = [voice.engine for voice in voices]  # type: ignore[misc]  # open_voices's
        try:
            if voices_stored:
                await store_voices(config, voices, chat_ids)
            async with TimingEmulator(TOKEN, chats) as emulator:
                config = replace(config, telegram_api_base_url=emulator.base_url)
                fixed = None if wiring == "capacity" else int(wiring)
                options = PRODUCTION_REQUESTS | {"concurrent_updates": fixed, "metrics": metrics}
                async with running_bot(emulator, voices, config, utc_now, **options) as application:
                    scraper = None
                    if metrics_on:
                        url = f"http://127.0.0.1:{config.metrics_port}/metrics"
                        scraper = subprocess.Popen(
                            [sys.executable, "-c", SCRAPER, url, str(scrape_interval)], stdout=subprocess.PIPE
                        )
                        # Its first scrape before the load: Prometheus is up already, and its start costs CPU.
                        scrapes_before = await asyncio.to_thread(scraper.stdout.readline)
                        assert scrapes_before, "the scraper got no metrics"
                    pushed: dict[int, float] = {}
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for i, (chat_id, offset) in enumerate(zip(chat_ids, offsets, strict=True)):
                        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                        user = {"id": chat_id, "is_bot": False, "first_name": f"User{i}"}
                        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
                        pushed[chat["id"]] = time.perf_counter()
                        emulator.send_text(chat, user, "/speech")
                    await asyncio.wait_for(emulator.all_replied.wait(), timeout=600)
                    load_cpu = time.process_time() - cpu_start
                    concurrency = application.update_processor.max_concurrent_updates
                    if scraper is not None:
                        scraper.terminate()
                        scrapes = scraper.communicate()[0].decode().count("scraped")
                        speeches_scraped = await asyncio.to_thread(scraped_speeches, config.metrics_port)
            peak_batches = {voice.name: engine.peak_batch for voice, engine in zip(voices, engines, strict=True)}
            throughput = await engine_throughput(engines, length)
        finally:
            close_engines(voices)
    seconds = np.array([emulator.replies[chat][0] - pushed[chat] for chat in pushed])
    busy = np.array([emulator.replies[chat][1] == ENGINE_BUSY_REPLY for chat in pushed])
    served_chars = sum(len(text) for _, text in emulator.replies.values() if text != ENGINE_BUSY_REPLY)
    load_seconds = max(moment for moment, _ in emulator.replies.values()) - start
    rate_floor, generation_floor = chats / rate, (chats - busy.sum()) * length / throughput
    floor = max(rate_floor, generation_floor)
    p95 = float(np.percentile(seconds, 95))
    return {
        "wiring": wiring,
        "metrics": "on" if metrics_on else "off",
        "voices": len(voices),
        "voice_names": voices.names,
        "voice_models": [shown_path(model) for model in models],
        "voices_stored": voices_stored,
        "scrapes": scrapes,
        "speeches_scraped": speeches_scraped,
        "concurrent_updates": concurrency,
        "messages_per_second": rate,
        "chats": chats,
        "busy": int(busy.sum()),
        "busy_p95_s": float(np.percentile(seconds[busy], 95)) if busy.any() else None,
        "p50_s": float(np.percentile(seconds, 50)),
        "p95_s": p95,
        "max_s": float(seconds.max()),
        "rate_floor_s": rate_floor,
        "generation_floor_s": generation_floor,
        "floor_s": floor,
        "p95_over_floor": p95 / floor,
        "served_chars_per_s": served_chars / load_seconds,
        "engine_chars_per_s": throughput,
        "engine_lanes": engines[0].lanes,  # each engine's: open_voices gives every voice the configured lanes
        "engine_capacity": sum(engine.capacity for engine in engines),
        "peak_batch": max(peak_batches.values()),
        "peak_batch_by_voice": peak_batches,  # every voice's above 0 shows that its chats reached it
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_cpu_s": load_cpu,
    }


# What differs from run to run of a row (the rest is its setting).
MEASURED = (
    "busy",
    "busy_p95_s",
    "p50_s",
    "p95_s",
    "max_s",
    "generation_floor_s",
    "floor_s",
    "p95_over_floor",
    "served_chars_per_s",
    "engine_chars_per_s",
    "peak_batch",
    "load_cpu_s",
    "peak_rss_mib",
    "scrapes",
)


def candidate_of(row: dict) -> tuple[str, str, int]:
    """What a row compares: its wiring, its metrics setting and how many voices it serves."""
    return row["wiring"], row["metrics"], row["voices"]


def grouped(runs: list[dict]) -> list[list[dict]]:
    """The runs of each (candidate, chats, rate) row, in the order the rows first ran."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((candidate_of(run), run["chats"], run["messages_per_second"]), []).append(run)
    return list(groups.values())


def median_row(runs: list[dict]) -> dict:
    """One row from its runs: the median of every measured number, and the range of p95 ÷ floor."""
    row = dict(runs[0])
    for name in MEASURED:
        values = [run[name] for run in runs if run[name] is not None]
        row[name] = float(np.median(values)) if values else None
    ratios = [run["p95_over_floor"] for run in runs]
    row |= {"runs": len(runs), "p95_over_floor_min": min(ratios), "p95_over_floor_max": max(ratios)}
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bot_load", description=__doc__.splitlines()[0])
    p.add_argument("--chats", type=int, nargs="+", default=[50, 200, 1000], help="private chats, one row each")
    p.add_argument("--rates", type=float, nargs="+", default=[30.0, 1000.0], help="overall messages per second")
    p.add_argument("--wirings", nargs="+", type=wiring, default=["16", "capacity"], help="the first is the baseline")
    p.add_argument(
        "--metrics", nargs="+", choices=["off", "on"], default=["off"], help="each wiring with /metrics off, on or both"
    )
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes with metrics on")
    p.add_argument("--length", type=int, default=500, help="characters per speech")
    p.add_argument("--spread", type=float, default=2.0, help="seconds over which the chats send /speech")
    p.add_argument(
        "--model", type=Path, help=f"the model served without --voices (default {shown_path(DEFAULT_MODEL_PATH)})"
    )
    p.add_argument(
        "--voices",
        type=int,
        nargs="+",
        metavar="N",
        help="rows serving the first N files of --voice-models, the chats split between them; the first N is the base",
    )
    p.add_argument(
        "--voice-models",
        type=Path,
        nargs="+",
        default=list(DEFAULT_MODEL_PATHS),
        metavar="FILE",
        help="the voices' model files, the default voice first (default: the bundled voices)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each row; the table shows their medians")
    p.add_argument("--json", default="docs/bench/bot-load.json")
    p.add_argument("--row", nargs=4, metavar=("WIRING", "METRICS", "CHATS", "RATE"), help=argparse.SUPPRESS)
    return p


def served_models(args: argparse.Namespace, voices: int) -> list[Path]:
    """The model files a row serving `voices` voices opens: the first of --voice-models, or --model alone."""
    return args.voice_models[:voices] if args.voices else [args.model]


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`args`, or exit with a line saying what is wrong with them."""
    if args.voices and args.model:
        parser.error("--model is the model of runs without --voices; give the voices' files with --voice-models")
    args.model = args.model or DEFAULT_MODEL_PATH
    counts = args.voices or [1]
    if len(set(counts)) < len(counts) or not all(1 <= n <= len(args.voice_models) for n in counts):
        parser.error(
            f"--voices takes different counts of voices from 1 to {len(args.voice_models)} "
            f"(the files of --voice-models), not {' '.join(map(str, counts))}"
        )
    missing = [path for path in served_models(args, max(counts)) if not path.is_file()]
    if missing:
        parser.error(f"no model file at {', '.join(map(str, missing))}; give the voices' files with --voice-models")
    return args


def run_row(args: argparse.Namespace, candidate: tuple[str, str, int], chats: int, rate: float) -> dict:
    """One row in a fresh process: its own engines, its own peak RSS."""
    wiring, metrics, voices = candidate
    command = [sys.executable, "-m", "bench.bot_load", "--row", wiring, metrics, str(chats), str(rate)]
    command += ["--length", str(args.length), "--spread", str(args.spread)]
    command += ["--seed", str(args.seed), "--scrape-interval", str(args.scrape_interval)]
    command += ["--voices", str(voices), "--voice-models", *map(str, args.voice_models)] if args.voices else []
    command += [] if args.voices else ["--model", str(args.model)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench.bot_load: the run of {wiring} with {voices} voice(s) failed (its error above)")
    return json.loads(done.stdout.splitlines()[-1])


def print_voices_table(rows: list[dict], base_voices: int) -> None:
    """Each row beside the row serving `base_voices` voices with the same wiring, metrics, chats and rate."""

    def setting(row: dict) -> tuple:
        return row["wiring"], row["metrics"], row["chats"], row["messages_per_second"]

    bases = {setting(row): row for row in rows if row["voices"] == base_voices}
    compared = ("p50_s", "p95_s", "served_chars_per_s", "load_cpu_s", "peak_rss_mib")
    print(
        f"\n{'rate/s':>7} {'chats':>5} {'wiring':>8} {'metrics':>7} {'voices':>6} {'busy':>4} {'p50 s':>6} "
        f"{'p95 s':>6} {'served/s':>8} {'CPU s':>6} {'RSS MiB':>7}   ÷ {base_voices} voice(s): "
        f"{'p50':>6} {'p95':>6} {'served/s':>8} {'CPU s':>6} {'RSS':>6}"
    )
    for row in rows:
        base = bases.get(setting(row))
        ratios = [
            ratio_text(row[name], base[name], width) if base and row is not base else " " * width
            for name, width in zip(compared, (6, 6, 8, 6, 6), strict=True)
        ]
        print(
            f"{row['messages_per_second']:>7g} {row['chats']:>5} {row['wiring']:>8} {row['metrics']:>7} "
            f"{row['voices']:>6} {row['busy']:>4.0f} {row['p50_s']:>6.2f} {row['p95_s']:>6.2f} "
            f"{row['served_chars_per_s']:>8,.0f} {row['load_cpu_s']:>6.2f} {row['peak_rss_mib']:>7.0f}"
            f"{'':>{len(f'   ÷ {base_voices} voice(s): ')}}{' '.join(ratios)}".rstrip()
        )
    print(
        "served/s: the speeches' characters served (busy refusals left out) from the first /speech to the last "
        f"reply; ÷ {base_voices} voice(s): this row over the row of {base_voices} voice(s) with the same wiring "
        "and metrics; RSS: the process's peak, every engine's memory in it"
    )


def main() -> None:
    parser = build_parser()
    args = checked(parser, parser.parse_args())
    if args.row:
        logging.basicConfig(level=logging.WARNING)
        wiring, metrics, chats, rate = args.row
        try:
            row = asyncio.run(
                one_row(
                    wiring,
                    int(chats),
                    float(rate),
                    args.length,
                    args.spread,
                    served_models(args, args.voices[0] if args.voices else 1),
                    args.seed,
                    metrics_on=metrics == "on",
                    scrape_interval=args.scrape_interval,
                    voices_stored=bool(args.voices),
                )
            )
        except (ConfigError, ModelFileError) as error:
            sys.exit(f"bench.bot_load: {error}")
        print(json.dumps(row))
        return
    load_before = os.getloadavg()[0]
    candidates = [
        (wiring, metrics, voices)
        for wiring in args.wirings
        for metrics in args.metrics
        for voices in args.voices or [1]
    ]
    runs = []
    for repeat in range(args.repeats):
        for rate in args.rates:
            for i, chats in enumerate(args.chats):
                # Alternate which candidate goes first, so a slow spell on the shared host hits them alike.
                for candidate in candidates if (i + repeat) % 2 == 0 else candidates[::-1]:
                    runs.append(run_row(args, candidate, chats, rate))
                    print(
                        f"  {candidate[0]} (metrics {candidate[1]}, {candidate[2]} voice(s)) "
                        f"{chats} chats at {rate:g}/s: "
                        f"p95 {runs[-1]['p95_s']:.2f} s, {runs[-1]['p95_over_floor']:.2f}× the floor",
                        file=sys.stderr,
                    )
    rows = [median_row(group) for group in grouped(runs)]
    rows.sort(key=lambda r: (r["messages_per_second"], r["chats"], candidates.index(candidate_of(r))))
    print(
        f"{args.length}-character speeches, chats sending within {args.spread:g} s; {os.cpu_count()} cores, "
        f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'rate/s':>7} {'chats':>5} {'wiring':>8} {'metrics':>7} {'voices':>6} {'updates':>7} {'busy':>4} "
        f"{'busy p95':>8} {'p50 s':>6} {'p95 s':>6} {'max s':>6} {'floor s':>7} {'p95÷floor':>9} {'range':>9} "
        f"{'base÷this':>9} {'chars/s':>7} {'batch':>5} {'RSS MiB':>7} {'CPU s':>6}"
    )
    base = candidates[0]
    p95_of_base = {(r["messages_per_second"], r["chats"]): r["p95_s"] for r in rows if candidate_of(r) == base}
    for row in rows:
        baseline = p95_of_base.get((row["messages_per_second"], row["chats"]))
        versus = f"{'':>9}" if candidate_of(row) == base else ratio_text(baseline, row["p95_s"], 9)
        print(
            f"{row['messages_per_second']:>7g} {row['chats']:>5} {row['wiring']:>8} {row['metrics']:>7} "
            f"{row['voices']:>6} {row['concurrent_updates']:>7} "
            f"{row['busy']:>4.0f} {row['busy_p95_s'] or float('nan'):>8.2f} "
            f"{row['p50_s']:>6.2f} {row['p95_s']:>6.2f} {row['max_s']:>6.2f} "
            f"{row['floor_s']:>7.2f} {row['p95_over_floor']:>9.2f} "
            f"{row['p95_over_floor_min']:>4.2f}–{row['p95_over_floor_max']:<4.2f} {versus} "
            f"{row['engine_chars_per_s']:>7,.0f} "
            f"{row['peak_batch']:>5.0f} {row['peak_rss_mib']:>7.0f} {row['load_cpu_s']:>6.2f}"
        )
    print(
        f"medians of {args.repeats} runs each; floor: the larger of chats ÷ rate and speeches × length ÷ chars/s "
        "(the engine's throughput, measured in each run's process); range: p95÷floor's lowest and highest run; "
        f"base÷this: the p95 of wiring {base[0]} with metrics {base[1]} and {base[2]} voice(s) over this row's; "
        "batch: the most rows one engine lane stepped together; CPU s: the bot process's CPU time while the chats "
        "were served"
    )
    if args.voices and len(args.voices) > 1:
        print_voices_table(rows, args.voices[0])
    write_json(
        args.json,
        {
            "length": args.length,
            "spread_s": args.spread,
            "scrape_interval_s": args.scrape_interval,
            "model": None if args.voices else shown_path(args.model),
            "voices": args.voices,
            "voice_models": [shown_path(path) for path in args.voice_models] if args.voices else None,
            "load_average_before": load_before,
            "repeats": args.repeats,
            "rows": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
