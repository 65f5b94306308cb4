"""Two webhook replicas behind nginx on one PostgreSQL: time to reply to a burst, undisturbed, with one replica
killed in the middle, and with PostgreSQL restarted in the middle.

    python -m bench.replicas                          # 50 chats × 2 /speech, each scenario 3 times
    python -m bench.replicas --repeats 1 --sweep 5    # quicker; a sweep of 5 s instead of 1 s

Two real `python -m bot run` processes in webhook mode (the bundled model, --length characters per speech)
sit behind a real nginx on 127.0.0.1 configured as docs/operations.md shows (tests/support/replicas.py), on
one database of a throwaway PostgreSQL server. The Bot API emulator posts updates through nginx as Telegram
posts to a webhook. Each of --chats private chats sends /speech twice at once. In "kill" replica "a" is
killed with SIGKILL --disturb-after seconds later, in the middle of the replies; in "restart" PostgreSQL is
restarted (`pg_ctl stop -m fast` and start) then. Nothing is held or arranged: a kill may land in the instant
after Telegram took a reply and before the inbox recorded it, and the "dup" column shows it if it does.

Time to reply runs from the moment the emulator queued the update to the moment the first reply quoting it
arrived. "lost" counts requests with no reply within --timeout; "dup" counts replies beyond the first.
Each replica sends at most --rate messages per second (Telegram allows a bot about 30 overall, so two
replicas get 15 each). The table shows the medians of --repeats runs, in alternating order; the last
column compares each scenario's p95 with the undisturbed one's. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.report import write_json
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from db.database import create_db_engine
from tests.support.bot_harness import TOKEN
from tests.support.databases import new_postgres_database
from tests.support.postgres_server import PostgresServer, postgres_server
from tests.support.replicas import all_answered, answers, burst, replicas_behind_nginx, users
from tests.support.telegram_emulator import TelegramEmulator

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("none", "kill", "restart")


def open_entries(database_url: str) -> int:
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        count = connection.exec_driver_sql("SELECT count(*) FROM inbox WHERE answered_at IS NULL").scalar_one()
    engine.dispose()
    return count


async def one_run(server: PostgresServer, scenario: str, args: argparse.Namespace, folder: Path) -> dict:
    database_url = new_postgres_database(server.url)
    senders = users(args.chats)
    settings = {
        "DEFAULT_LENGTH": str(args.length),
        "INBOX_SWEEP_SECONDS": str(args.sweep),
        "TELEGRAM_MESSAGES_PER_SECOND": str(args.rate),
        "LOG_LEVEL": "INFO",
        "ONNX_LANES": "1",
    }
    async with (
        TelegramEmulator(TOKEN) as emulator,
        replicas_behind_nginx(emulator, database_url, folder, args.model, **settings) as replicas,
    ):
        requests = burst(emulator, senders) + burst(emulator, senders)
        disturbed_at = None
        if scenario != "none":
            # At a set time, not on seeing a reply arrive: a kill just after a reply was accepted would land in
            # the instant before its replica records it, every time, and repeat it.
            await asyncio.sleep(args.disturb_after)
            disturbed_at = time.monotonic()
            if scenario == "kill":
                await replicas.processes["a"].kill()
            else:
                await asyncio.to_thread(server.restart)
        try:
            await all_answered(emulator, requests, timeout=args.timeout)
        except TimeoutError as error:
            print(f"  {error}", file=sys.stderr)
        # A reply made again by the survivor's sweep comes after the others: wait until nothing is open.
        async with asyncio.timeout(args.timeout):
            while await asyncio.to_thread(open_entries, database_url):
                await asyncio.sleep(0.2)
        replies = answers(emulator)
    answered = [request for request in requests if request.message["message_id"] in replies]
    latencies = sorted(
        replies[request.message["message_id"]][0].at - emulator.pushed_at[request.update_id] for request in answered
    )
    after = (
        max(replies[request.message["message_id"]][0].at for request in answered) - disturbed_at
        if disturbed_at is not None and answered
        else None
    )
    return {
        "scenario": scenario,
        "requests": len(requests),
        "lost": len(requests) - len(answered),
        "duplicates": sum(len(replies[request.message["message_id"]]) - 1 for request in answered),
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "max_s": latencies[-1],
        "last_reply_after_disturbance_s": after,
    }


def median_row(runs: list[dict]) -> dict:
    row = {"scenario": runs[0]["scenario"], "runs": len(runs), "requests": runs[0]["requests"]}
    for key in ("p50_s", "p95_s", "max_s"):
        row[key] = statistics.median(run[key] for run in runs)
    row["lost"] = sum(run["lost"] for run in runs)
    row["duplicates"] = sum(run["duplicates"] for run in runs)
    afters = [run["last_reply_after_disturbance_s"] for run in runs if run["last_reply_after_disturbance_s"]]
    row["last_reply_after_disturbance_s"] = statistics.median(afters) if afters else None
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--chats", type=int, default=50, help="private chats, each sending /speech twice")
    p.add_argument("--length", type=int, default=200, help="characters per speech")
    p.add_argument("--sweep", type=float, default=1.0, help="INBOX_SWEEP_SECONDS of both replicas")
    p.add_argument("--rate", type=float, default=15.0, help="TELEGRAM_MESSAGES_PER_SECOND of each replica")
    p.add_argument("--disturb-after", type=float, default=1.5, help="seconds after the burst to kill or restart")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--repeats", type=int, default=3, help="runs of each scenario; the table shows their medians")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a run waits for every reply")
    p.add_argument("--json", default="docs/bench/replicas.json")
    return p


async def run_all(args: argparse.Namespace) -> list[dict]:
    runs = []
    with postgres_server() as server, tempfile.TemporaryDirectory(prefix="bench-replicas-") as root:
        for repeat in range(args.repeats):
            # Alternate the order, so a slow spell on the shared host hits every scenario alike.
            for scenario in args.scenarios if repeat % 2 == 0 else args.scenarios[::-1]:
                folder = Path(root) / f"{scenario}-{repeat}"
                runs.append(await one_run(server, scenario, args, folder))
                run = runs[-1]
                print(
                    f"  {scenario}: p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} s, "
                    f"lost {run['lost']}, dup {run['duplicates']}",
                    file=sys.stderr,
                )
    return runs


def main() -> None:
    args = build_parser().parse_args()
    load_before = os.getloadavg()[0]
    runs = asyncio.run(run_all(args))
    rows = [median_row([run for run in runs if run["scenario"] == scenario]) for scenario in args.scenarios]
    undisturbed = next((row["p95_s"] for row in rows if row["scenario"] == "none"), None)
    print(
        f"{args.chats} chats × 2 /speech of {args.length} characters through nginx to 2 replicas, "
        f"sweep {args.sweep:g} s, {args.rate:g} messages/s per replica; {os.cpu_count()} cores, "
        f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'scenario':>9} {'runs':>4} {'requests':>8} {'p50 s':>6} {'p95 s':>6} {'max s':>6} {'last after':>10} "
        f"{'lost':>4} {'dup':>4} {'p95÷none':>8}"
    )
    for row in rows:
        after = row["last_reply_after_disturbance_s"]
        ratio = f"{row['p95_s'] / undisturbed:>7.2f}×" if undisturbed and row["scenario"] != "none" else f"{'':>8}"
        print(
            f"{row['scenario']:>9} {row['runs']:>4} {row['requests']:>8} {row['p50_s']:>6.2f} {row['p95_s']:>6.2f} "
            f"{row['max_s']:>6.2f} {'' if after is None else f'{after:.2f}':>10} {row['lost']:>4} "
            f"{row['duplicates']:>4} {ratio}"
        )
    print(
        "medians of the runs (lost and dup: totals); last after: seconds from the kill or restart to the last "
        "request's first reply"
    )
    write_json(
        args.json,
        {
            "chats": args.chats,
            "length": args.length,
            "sweep_s": args.sweep,
            "messages_per_second_per_replica": args.rate,
            "model": os.path.relpath(args.model, ROOT),
            "load_average_before": load_before,
            "repeats": args.repeats,
            "rows": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
