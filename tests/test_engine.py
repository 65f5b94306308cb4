"""The onnxruntime generation engine: seeds, continuous batching, validation, streaming, asyncio, busy errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bot.engine import (
    EngineBusy,
    EngineClosed,
    GenerationEngine,
    InvalidLength,
    InvalidTemperature,
    InvalidTopK,
    default_lanes,
    sample_rows,
)
from bot.runner import ModelRunner, ProviderError
from export.int8_lstm import step_graph


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, tiny_onnx, tiny_int8):
    path = tiny_onnx if request.param == "fp32" else tiny_int8
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=64, lanes=1) as eng:
        yield eng


def test_importing_the_engine_does_not_import_torch():
    code = "import bot.engine, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_seed_same_text_alone_and_batched_with_63_others(engine):
    alone = engine.generate("We will", length=120, temperature=1.0, top_k=None, seed=7)
    others = [
        engine.stream(
            prompt="Make" * (i % 3), length=40 + 3 * i, temperature=0.3 + (i - 100) / 20, top_k=i % 5 or None, seed=i
        )
        for i in range(100, 131)
    ]
    mine = engine.stream("We will", length=120, temperature=1.0, seed=7)
    others += [engine.stream(prompt="", length=200 - i, seed=i) for i in range(32)]
    assert "".join(mine) == alone
    for other in others:
        "".join(other)
    assert engine.peak_batch >= 32  # it really ran in a batch
    assert len(alone) == 120


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_lanes_share_a_burst_and_each_seed_keeps_its_text(precision, tiny_onnx, tiny_int8):
    path = tiny_onnx if precision == "fp32" else tiny_int8
    requests = [("We" * (s % 3), 60 + s, 0.5 + s / 40, s % 4 or None, s) for s in range(40)]
    with GenerationEngine(path, providers="cpu", threads=1, lanes=1) as one:
        expected = [one.generate(p, length=n, temperature=t, top_k=k, seed=s) for p, n, t, k, s in requests]
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=64, lanes=2) as two:
        streams = [two.stream(p, length=n, temperature=t, top_k=k, seed=s) for p, n, t, k, s in requests]
        assert ["".join(stream) for stream in streams] == expected
        # Lane 0 holds half of max_batch and hands the rest of the 40 requests to lane 1.
        assert two.lanes == 2 and two.lane_peaks[0] == 32 and 1 <= two.lane_peaks[1] <= 8
        # A few requests at once share lane 0's batch.
        two.lane_peaks[:] = [0, 0]
        few = [two.stream(p, length=n, temperature=t, top_k=k, seed=s) for p, n, t, k, s in requests[:3]]
        assert ["".join(stream) for stream in few] == expected[:3]
        assert two.lane_peaks[1] == 0 and two.lane_peaks[0] >= 2


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


def test_int8_step_graph_gives_the_contract_graphs_logits_bit_for_bit(tiny_int8):
    runner = ModelRunner(tiny_int8, "cpu", threads=1)
    assert runner.uses_step_graph
    tokens = np.random.default_rng(0).integers(len(runner.info.vocab), size=(8, 40))
    whole, (h, c) = runner.prime(tokens, runner.zero_state(8))
    # Prime the first 10 characters with the contract graph, as the engine does with a prompt, then step.
    primed, state = runner.prime(tokens[:, :10], runner.zero_state(8))
    state = runner.step_state(state)
    stepped = [primed[:, -1]]
    for t in range(10, 40):
        logits, state = runner.step(tokens[:, t], state)
        stepped.append(logits)
    assert np.array_equal(np.stack(stepped[:-1], axis=1), whole[:, 9:39])
    assert np.array_equal(stepped[-1], whole[:, 39])
    assert np.array_equal(state[0], c)
    assert np.array_equal(state[1], runner.step_state([h, c])[1])


def test_step_graph_and_contract_graph_engines_write_the_same_text(tiny_int8):
    with (
        GenerationEngine(tiny_int8, providers="cpu", threads=1) as fast,
        GenerationEngine(tiny_int8, providers="cpu", threads=1, fast_step=False) as plain,
    ):
        assert fast.runner.uses_step_graph and not plain.runner.uses_step_graph
        for seed, prompt in enumerate(["", "We will", "Make Am"]):
            options = {"length": 150, "temperature": 1.0, "seed": seed}
            assert fast.generate(prompt, **options) == plain.generate(prompt, **options)


def test_models_without_the_int8_loop_step_through_the_contract_graph(tiny_onnx):
    with pytest.raises(ValueError, match="Loop"):
        step_graph(onnx.load(tiny_onnx))
    assert not ModelRunner(tiny_onnx, "cpu").uses_step_graph


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
    texts = {engine.generate("We", length=60, seed=s, temperature=1.5) for s in range(5)}
    assert len(texts) > 1
    greedy = {engine.generate("We", length=60, seed=s, top_k=1) for s in range(3)}
    assert len(greedy) == 1


def test_stream_yields_chunks_that_make_the_text(engine):
    chunks = list(engine.stream("We will", length=100, seed=3))
    assert len(chunks) > 1
    assert "".join(chunks) == engine.generate("We will", length=100, seed=3)


def test_stop_at_sentence_end(engine):
    for seed in range(5):
        full = engine.generate("", length=150, seed=seed)
        cut = engine.generate("", length=150, seed=seed, stop_at_sentence_end=True)
        assert full.startswith(cut)
        ends = [i for i, ch in enumerate(full) if ch in ".!?"]
        assert cut == (full[: ends[-1] + 1] if ends else full)


def test_unknown_characters_and_empty_prompts_work(engine):
    for prompt in ["", "Zürich — “naïve” café 漢字 😀\t\r\n", "😀😀", "   ", "\x00\x07"]:
        text = engine.generate(prompt, length=30, seed=1)
        assert len(text) == 30
        assert set(text) <= set(engine.vocab.chars)


@pytest.mark.parametrize("temperature", [0, -0.5, 2.01, float("nan"), float("inf"), "hot", True])
def test_bad_temperature_is_refused(engine, temperature):
    with pytest.raises(InvalidTemperature, match="above 0 and at most 2"):
        engine.generate("We", length=10, temperature=temperature)


@pytest.mark.parametrize("length", [0, -1, 20_001, 1.5, "10"])
def test_bad_length_is_refused(engine, length):
    with pytest.raises(InvalidLength, match="from 1 to"):
        engine.generate("We", length=length)


def test_bad_top_k_is_refused_and_edges_work(engine):
    with pytest.raises(InvalidTopK, match="top_k"):
        engine.generate("We", length=10, top_k=-1)
    assert len(engine.generate("We", length=10, temperature=2.0, top_k=10_000, seed=1)) == 10
    assert len(engine.generate("We", length=1, temperature=1e-3, top_k=0, seed=1)) == 1


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


def test_provider_choice(tiny_onnx):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        with GenerationEngine(tiny_onnx, providers="cuda") as eng:
            assert eng.provider == "CUDAExecutionProvider"
    else:
        with pytest.raises(ProviderError, match="onnxruntime-gpu"):
            GenerationEngine(tiny_onnx, providers="cuda")
    with pytest.raises(ProviderError, match="must be one of"):
        GenerationEngine(tiny_onnx, providers="tpu")
    with GenerationEngine(tiny_onnx, providers="cpu") as eng:
        assert eng.provider == "CPUExecutionProvider"


def test_sample_rows_follows_the_distribution():
    logits = np.log(np.array([[0.1, 0.2, 0.7]] * 3, np.float32))
    uniforms = np.array([0.05, 0.25, 0.95])
    assert sample_rows(logits, np.ones(3), None, uniforms).tolist() == [0, 1, 2]
    assert sample_rows(logits, np.ones(3), np.full(3, 3), uniforms).tolist() == [0, 1, 2]
    assert sample_rows(logits, np.ones(3), np.full(3, 1), uniforms).tolist() == [2, 2, 2]


def test_a_caller_that_went_away_does_not_break_the_batch(engine):
    expected = engine.generate("We will", length=80, seed=5)
    loop = asyncio.new_event_loop()
    loop.close()  # delivering to this loop raises, as for a caller whose event loop has ended
    broken = engine._submit(lambda item: loop.call_soon_threadsafe(print, item), "We", 80, seed=1)
    assert engine.generate("We will", length=80, seed=5) == expected
    assert broken.cancelled
