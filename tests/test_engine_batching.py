"""The generation engine's requests: seeds kept alone and in batches, lanes, streaming, asyncio, busy and
closed engines, validation of lengths."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest

from bot.inference.engine import EngineBusy, EngineClosed, GenerationEngine, InvalidLength, _Ask, default_lanes
from model.sampling import BOT_SAMPLING
from tests.support.engine_inputs import mixed_settings
from tests.support.scripted_runner import SCRIPT, scripted_engine


def test_importing_the_engine_does_not_import_torch():
    code = "import bot.inference.engine, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("settings", [BOT_SAMPLING.with_options(temperature=1.0), mixed_settings(7), mixed_settings(8)])
def test_same_seed_same_text_alone_and_batched_with_63_others(engine, settings):
    alone = engine.generate("We will", length=120, seed=7, sampling=settings)
    others = [
        engine.stream(prompt="Make" * (i % 3), length=40 + 3 * i, seed=i, sampling=mixed_settings(i))
        for i in range(100, 131)
    ]
    mine = engine.stream("We will", length=120, seed=7, sampling=settings)
    others += [engine.stream(prompt="", length=200 - i, seed=i, sampling=mixed_settings(i)) for i in range(32)]
    assert "".join(mine) == alone
    for other in others:
        "".join(other)
    assert engine.peak_batch >= 32  # it really ran in a batch
    assert len(alone) == 120


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_lanes_share_a_burst_and_each_seed_keeps_its_text(precision, tiny_onnx, tiny_int8):
    path = tiny_onnx if precision == "fp32" else tiny_int8
    requests = [("We" * (s % 3), 60 + s, mixed_settings(s), s) for s in range(40)]
    with GenerationEngine(path, providers="cpu", threads=1, lanes=1) as one:
        expected = [one.generate(p, length=n, seed=s, sampling=settings) for p, n, settings, s in requests]
    # Shares of 4 rows: lane 0 is full at once and hands most of the 40 to lane 1.
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=8, lanes=2) as two:
        streams = [two.stream(p, length=n, seed=s, sampling=settings) for p, n, settings, s in requests]
        assert ["".join(stream) for stream in streams] == expected
        assert two.lanes == 2 and two.lane_peaks[0] <= 4 and 1 <= two.lane_peaks[1] <= 4


def test_lanes_are_validated_and_capped_by_max_batch(tiny_int8):
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match="lanes must be a whole number from 1 to 8"):
            GenerationEngine(tiny_int8, providers="cpu", lanes=bad)
    with GenerationEngine(tiny_int8, providers="cpu", max_batch=1, lanes=4) as eng:
        assert eng.lanes == 1
    # By default each lane keeps at least MIN_LANE_BATCH rows of max_batch, and a GPU gets one lane.
    assert default_lanes("CPUExecutionProvider", 1, max_batch=16) == 1
    assert default_lanes("CPUExecutionProvider", 1, max_batch=1024) == min(8, len(os.sched_getaffinity(0)))
    assert default_lanes("CUDAExecutionProvider", 1, max_batch=1024) == 1


def test_requests_that_join_later_keep_their_text(engine):
    expected = [engine.generate("Our jobs", length=80, seed=s) for s in range(6)]
    results: dict[int, str] = {}

    def run(seed: int) -> None:
        results[seed] = engine.generate("Our jobs", length=80, seed=seed)

    long_one = engine.stream("", length=400, seed=99)
    next(long_one)  # the batch is running when the others join
    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    "".join(long_one)
    assert [results[s] for s in range(6)] == expected


def test_different_seeds_differ_and_top_k_1_is_greedy(engine):
    texts = {
        engine.generate("We", length=60, seed=s, sampling=BOT_SAMPLING.with_options(temperature=1.5)) for s in range(5)
    }
    assert len(texts) > 1
    greedy = {engine.generate("We", length=60, seed=s, sampling=BOT_SAMPLING.with_options(top_k=1)) for s in range(3)}
    assert len(greedy) == 1


def test_a_prompt_ending_in_characters_the_model_lacks_is_continued_after_a_separator(engine):
    for prompt in ("We will 😀", "We will😀", "We will 漢字", "Tremendous ❤️"):
        text = engine.generate(prompt, length=40, seed=1)
        assert len(text) == 40 and text[0] == " " and not text[1].isspace(), (prompt, text)
        assert "".join(engine.stream(prompt, length=40, seed=1)) == text
        speech = engine.generate(prompt, length=40, seed=1, end_sentence=True)
        assert speech[0] == " " and not speech[1].isspace(), (prompt, speech)
    assert engine.generate("😀", length=40, seed=1)[0] == "\n"  # nothing of it visible: a line of its own
    assert engine.generate("We 😀", length=1, seed=1) == " ", "the separator alone, when that is all there is room for"


def test_stream_yields_chunks_that_make_the_text(engine):
    chunks = list(engine.stream("We will", length=100, seed=3))
    assert len(chunks) > 1
    assert "".join(chunks) == engine.generate("We will", length=100, seed=3)


def test_unknown_characters_and_empty_prompts_work(engine):
    for prompt in ["", "Zürich — “naïve” café 漢字 😀\t\r\n", "😀😀", "   ", "\x00\x07"]:
        text = engine.generate(prompt, length=30, seed=1)
        assert len(text) == 30
        assert set(text) <= set(engine.vocab.chars)


@pytest.mark.parametrize("length", [0, -1, 20_001, 1.5, "10"])
def test_bad_length_is_refused(engine, length):
    with pytest.raises(InvalidLength, match="from 1 to"):
        engine.generate("We", length=length)


async def test_agenerate_from_asyncio_batches_and_matches_generate(engine):
    expected = [engine.generate("We will", length=50, seed=s) for s in range(10)]
    got = await asyncio.gather(*(engine.agenerate("We will", length=50, seed=s) for s in range(10)))
    assert list(got) == expected


async def test_astream_yields_chunks(engine):
    chunks = [chunk async for chunk in engine.astream("We", length=64, seed=2)]
    assert len(chunks) > 1 and "".join(chunks) == engine.generate("We", length=64, seed=2)


def test_full_queue_raises_busy_at_once(tiny_onnx):
    with GenerationEngine(tiny_onnx, providers="cpu", threads=1, max_batch=1, max_queue=2) as eng:
        running = eng.stream("", length=20_000, seed=0)
        next(running)  # the worker holds this one; the queue is empty again
        waiting = [eng.stream("", length=5, seed=i) for i in range(2)]
        with pytest.raises(EngineBusy, match="busy"):
            eng.stream("", length=5)
        running.close()  # cancels it, so the waiting ones run
        assert all(len("".join(w)) == 5 for w in waiting)


def test_closed_engine_refuses_and_fails_waiting_requests(tiny_onnx):
    eng = GenerationEngine(tiny_onnx, providers="cpu", threads=1)
    assert len(eng.generate("We", length=5)) == 5
    eng.close()
    with pytest.raises(EngineClosed):
        eng.generate("We", length=5)


def test_a_caller_that_went_away_does_not_break_the_batch(engine):
    expected = engine.generate("We will", length=80, seed=5)
    loop = asyncio.new_event_loop()
    loop.close()  # delivering to this loop raises, as for a caller whose event loop has ended
    broken = engine._submit(
        lambda item: loop.call_soon_threadsafe(print, item), _Ask("We", 80, None, 1, False, None), streaming=True
    )
    assert engine.generate("We will", length=80, seed=5) == expected
    assert broken.cancelled


def test_lane_0_fills_its_share_then_hands_requests_on():
    gate = threading.Event()
    engine, runners = scripted_engine(SCRIPT, gate, max_batch=64, lanes=2)
    with engine:
        gate.clear()  # lane 0 stops at its first prime until all requests are queued
        streams = [engine.stream("We", length=100, seed=i) for i in range(80)]
        gate.set()
        texts = ["".join(stream) for stream in streams]
        assert texts == [SCRIPT[:100]] * 80
        # 32 rows each; the other 16 waited in the engine's queue until lane 0 had room again.
        assert engine.lane_peaks == [32, 32]
        calls_in_lane_1 = len(runners[1].batches)
        gate.clear()
        few = [engine.stream("We", length=50, seed=i) for i in range(3)]
        gate.set()
        assert ["".join(stream) for stream in few] == [SCRIPT[:50]] * 3
        assert len(runners[1].batches) == calls_in_lane_1, "a few requests share lane 0"
        assert runners[0].batches[-1] == 3
