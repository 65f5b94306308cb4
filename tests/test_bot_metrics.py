"""The /metrics endpoint operators scrape: it is off unless METRICS_PORT is set, and its counters move as the bot
works, scraped over HTTP while the real bot runs against the Bot API emulator (in-process and as `python -m bot
run`). Daily posts and database errors are read from the bot's own registry; inbox take-overs are checked in
tests/test_crash_recovery.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bot.config import Config, ConfigError
from bot.core.speechbot import ENGINE_BUSY_REPLY
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATHS
from bot.metrics import MetricsError, PrometheusMetrics
from db.database import Database, create_db_engine
from tests.support.bot_harness import (
    ALICE,
    BOB,
    TOKEN,
    Clock,
    bot_config,
    bot_environment,
    free_port,
    private_chat,
    running_bot,
)
from tests.support.bot_process import killable_bot
from tests.test_bot_errors import assert_one_error_line, refused_in_time
from tests.test_bot_scheduling import daily_job

ALICE_CHAT, BOB_CHAT = private_chat(ALICE), private_chat(BOB)
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
BUNDLED_MODEL = {"file": "speechbot.onnx", "precision": "int8", "weights": "int8", "provider": "CPUExecutionProvider"}
BUNDLED_MODEL["voice"] = "rally"  # the default voice

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(exposition: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled counter that has not been touched yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        return parse(await response.text())


async def scrape_until(port: int, ready: Callable[[Samples], bool]) -> Samples:
    """Scrapes until `ready` holds: the bot records a call once its answer is back, just after the emulator saw it."""
    for _ in range(300):
        samples = await scrape(port)
        if ready(samples):
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"the metrics never got there: {samples}")


def registry_samples(metrics: PrometheusMetrics) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


# ---- configuration ----


def test_metrics_are_off_unless_a_port_is_set_and_listen_on_loopback_by_default(tmp_path):
    assert Config.from_env({}, tmp_path / ".env").metrics_port is None
    config = Config.from_env({"METRICS_PORT": "9464"}, tmp_path / ".env")
    assert (config.metrics_port, config.metrics_listen) == (9464, "127.0.0.1")
    assert Config.from_env({"METRICS_PORT": "9464", "METRICS_LISTEN": "0.0.0.0"}, tmp_path / ".env").metrics_listen


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"METRICS_PORT": "metrics"}, "METRICS_PORT='metrics' is not an integer; use at least 1 and at most 65535"),
        ({"METRICS_PORT": "0"}, "METRICS_PORT='0' is out of range; use at least 1 and at most 65535"),
        ({"METRICS_PORT": "9464", "METRICS_LISTEN": "localhost"}, "METRICS_LISTEN='localhost' is not an IP address"),
        (
            {"METRICS_PORT": "8443", "WEBHOOK_URL": "https://bot.example.org/hook"},
            "METRICS_PORT=8443 is WEBHOOK_PORT too",
        ),
    ],
)
def test_bad_metrics_settings_are_named(tmp_path, settings, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        Config.from_env(settings, tmp_path / ".env")


# ---- the endpoint while the bot runs ----


@pytest.mark.parametrize("engine", ["int8"], indirect=True)  # one model is enough here
async def test_a_speech_a_flood_wait_a_5xx_and_a_timeout_move_the_counters(emulator, engine, tmp_path):
    port = free_port()
    config = bot_config(emulator, tmp_path / "bot.db", metrics_port=port)
    async with running_bot(emulator, engine, config, Clock()):
        await emulator.ask(ALICE_CHAT, ALICE, "/length 600")  # long enough to stream drafts (test_bot_interactive)
        before = await scrape_until(port, lambda s: value(s, "speechbot_replies_sent_total", kind="text") == 1)
        speech = await emulator.ask(ALICE_CHAT, ALICE, "/speech")
        after = await scrape_until(port, lambda s: value(s, "speechbot_replies_sent_total", kind="speech") == 1)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("speechbot_updates_total", kind="message") == 1
        assert moved("speechbot_speeches_generated_total") == 1
        assert len(speech) <= moved("speechbot_generated_characters_total") <= len(speech) + 2  # stripped ends
        assert moved("speechbot_speech_latency_seconds_count") == 1
        assert moved("speechbot_speech_latency_seconds_sum") > 0
        assert moved("speechbot_bot_api_calls_total", method="sendMessage", outcome="ok") == 1
        assert moved("speechbot_database_call_seconds_count") >= 1, "the cooldown and the inbox"
        assert value(after, "speechbot_database_errors_total", error="OperationalError") == 0
        drafts = {call.params["draft_id"] for call in emulator.sent("sendMessageDraft")}
        assert drafts and value(after, "speechbot_first_draft_seconds_count") == len(drafts)
        assert value(after, "speechbot_busy_refusals_total") == 0
        model = {"file": "tiny-int8.onnx", "precision": "int8", "weights": "int8", "provider": "CPUExecutionProvider"}
        model["voice"] = "default"
        assert value(after, "speechbot_model_info", **model) == 1
        assert value(after, "speechbot_engine_batch_capacity", voice="default", lane="0") == engine.lane_shares[0]
        assert ("speechbot_engine_queue_depth", (("voice", "default"),)) in after
        assert ("speechbot_heartbeat_age_seconds", ()) in after
        assert ("process_resident_memory_bytes", ()) in after

        emulator.inject("sendMessage", "429", retry_after=1)
        assert "/speech" in await emulator.ask(ALICE_CHAT, ALICE, "/help")
        flood = await scrape_until(port, lambda s: value(s, "speechbot_replies_sent_total", kind="text") == 2)
        assert value(flood, "speechbot_bot_api_calls_total", method="sendMessage", outcome="429") == 1
        assert value(flood, "speechbot_bot_api_flood_waits_total", method="sendMessage") == 1
        assert value(flood, "speechbot_bot_api_retries_total", method="sendMessage") == 1

        emulator.inject("sendMessage", "5xx")
        emulator.inject("sendMessage", "timeout", delay=2.5)  # past running_bot's read timeout of 2 s
        assert "/speech" in await emulator.ask(ALICE_CHAT, ALICE, "/help")
        faults = await scrape_until(port, lambda s: value(s, "speechbot_replies_sent_total", kind="text") == 3)
        assert value(faults, "speechbot_bot_api_calls_total", method="sendMessage", outcome="5xx") == 1
        assert value(faults, "speechbot_bot_api_calls_total", method="sendMessage", outcome="timeout") == 1
        assert value(faults, "speechbot_bot_api_retries_total", method="sendMessage") == 3
        assert value(faults, "speechbot_bot_api_calls_total", method="sendMessage", outcome="ok") == 4
        assert value(faults, "speechbot_bot_api_calls_total", method="getUpdates", outcome="ok") >= 1
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(port)  # the endpoint stops with the bot


async def test_busy_refusals_queue_waits_and_lanes(emulator, model_path, tmp_path):
    """Room for one speech being written and one waiting (as test_bot_concurrency's): the third is refused."""
    metrics = PrometheusMetrics()
    small = GenerationEngine(
        model_path, providers="cpu", threads=1, max_batch=1, max_queue=1, on_queue_wait=metrics.queue_wait
    )
    carol = {"id": 333, "is_bot": False, "first_name": "Carol"}
    try:
        config = bot_config(emulator, tmp_path / "bot.db")
        async with running_bot(emulator, small, config, Clock(), metrics=metrics):
            await emulator.ask(ALICE_CHAT, ALICE, "/length 1000")
            emulator.send_text(ALICE_CHAT, ALICE, "/speech")
            while small.peak_batch == 0:  # until Alice's speech has left the queue for the batch
                await asyncio.sleep(0.01)
            emulator.send_text(BOB_CHAT, BOB, "/speech")
            emulator.send_text(private_chat(carol), carol, "/speech")
            await emulator.wait_for(lambda call: len(emulator.sent()) == 4, timeout=60)
    finally:
        small.close()
    assert sum(call.params["text"] == ENGINE_BUSY_REPLY for call in emulator.sent()) == 1
    samples = registry_samples(metrics)
    assert value(samples, "speechbot_busy_refusals_total") == 1
    assert value(samples, "speechbot_engine_queue_wait_seconds_count") == 2, "Alice's and Bob's"
    assert value(samples, "speechbot_speeches_generated_total") == 2
    assert value(samples, "speechbot_replies_sent_total", kind="speech") == 2
    assert value(samples, "speechbot_replies_sent_total", kind="text") == 2, "/length's answer and busy"
    assert value(samples, "speechbot_engine_batch_capacity", voice="default", lane="0") == 1
    assert value(samples, "speechbot_engine_queue_capacity", voice="default") == 1
    assert value(samples, "speechbot_engine_batch_requests", voice="default", lane="0") == 0
    assert value(samples, "speechbot_engine_queue_depth", voice="default") == 0


async def test_python_m_bot_run_serves_metrics_and_a_port_in_use_is_one_error_line(emulator, tmp_path, tiny_int8):
    port = free_port()
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    bundled_voices = os.pathsep.join(str(path) for path in DEFAULT_MODEL_PATHS)  # MODEL_PATH's default
    async with killable_bot(emulator, url, tmp_path, METRICS_PORT=str(port), MODEL_PATH=bundled_voices):
        assert "/schedule" in await emulator.ask(ALICE_CHAT, ALICE, "/help", timeout=60)
        samples = await scrape_until(port, lambda s: value(s, "speechbot_replies_sent_total", kind="text") == 1)
        assert value(samples, "speechbot_updates_total", kind="message") == 1
        assert value(samples, "speechbot_bot_api_calls_total", method="setMyCommands", outcome="ok") == 1
        assert value(samples, "speechbot_model_info", **BUNDLED_MODEL) == 1
        speeches_voice = BUNDLED_MODEL | {"voice": "speeches", "file": "speeches.onnx"}
        assert value(samples, "speechbot_model_info", **speeches_voice) == 1, "each voice has its own"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        environment = bot_environment(
            tiny_int8,
            TELEGRAM_BOT_TOKEN=TOKEN,
            TELEGRAM_API_BASE_URL=emulator.base_url,
            DATABASE_URL=f"sqlite:///{tmp_path / 'other.db'}",
            METRICS_PORT=str(taken_port),
        )
        refused = await refused_in_time(tmp_path, environment, "run")
    line = assert_one_error_line(refused, f"the metrics endpoint cannot listen on 127.0.0.1:{taken_port}")
    assert "Address already in use" in line and "METRICS_PORT" in line, line


def test_serving_on_a_port_in_use_raises_a_metrics_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MetricsError, match="Address already in use"):
            PrometheusMetrics().serve("127.0.0.1", taken.getsockname()[1])


# ---- daily posts, the inbox, the database ----


@pytest.mark.parametrize("engine", ["int8"], indirect=True)
async def test_daily_posts_sent_and_missed(emulator, engine, tmp_path):
    config = bot_config(emulator, tmp_path / "bot.db")
    clock = Clock(NOON)
    async with running_bot(emulator, engine, config, clock):
        await emulator.ask(ALICE_CHAT, ALICE, "/schedule 12:30")
    clock.advance(hours=2)  # down at 12:30 and past the hour of grace
    metrics = PrometheusMetrics()
    async with running_bot(emulator, engine, config, clock, metrics=metrics) as app:
        assert value(registry_samples(metrics), "speechbot_daily_posts_total", outcome="missed") == 1
        clock.advance(days=1, hours=-1, minutes=-30)  # the next day's 12:30
        await daily_job(app, ALICE_CHAT["id"]).run(app)
    samples = registry_samples(metrics)
    assert value(samples, "speechbot_daily_posts_total", outcome="sent") == 1
    assert value(samples, "speechbot_daily_posts_total", outcome="missed") == 1


async def test_database_calls_and_their_errors_are_reported(tmp_path):
    calls: list[tuple[float, BaseException | None]] = []
    engine = create_db_engine(f"sqlite:///{tmp_path / 'bot.db'}")
    database = Database(engine, on_call=lambda seconds, error: calls.append((seconds, error)))
    metrics = PrometheusMetrics()
    try:
        assert await database.run(lambda session: session.execute(text("SELECT 1")).scalar()) == 1
        with pytest.raises(Exception, match="no such table"):
            await database.run(lambda session: session.execute(text("SELECT * FROM nowhere")))
    finally:
        database.close()
    assert [error is None for _seconds, error in calls] == [True, False]
    for seconds, error in calls:
        metrics.database_call(seconds, error)
    samples = registry_samples(metrics)
    assert value(samples, "speechbot_database_call_seconds_count") == 2
    assert value(samples, "speechbot_database_errors_total", error="OperationalError") == 1
