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
)
from bot.modelfile import INT8_LOGITS_BATCH_FIRST, INT8_LOOP, INT8_READ_TOKEN
from bot.runner import ModelFileError, ModelRunner, ProviderError


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


@pytest.fixture(scope="module", params=["fp32", "int8"])
def runner(request, tiny_onnx, tiny_int8):
    return ModelRunner(tiny_onnx if request.param == "fp32" else tiny_int8, "cpu", threads=1)


def primed_rows(runner: ModelRunner, rows: int) -> tuple[np.ndarray, list[np.ndarray]]:
    tokens = np.random.default_rng(0).integers(len(runner.info.vocab), size=(rows, 12))
    logits, state = runner.prime(tokens, runner.zero_state(rows))
    return logits[:, -1], state


@pytest.mark.parametrize("top_k", [0, 5])
def test_chunk_graph_samples_by_inverse_cdf_with_each_rows_settings(runner, top_k):
    logits, state = primed_rows(runner, 6)
    temperatures = np.array([0.15, 0.5, 0.9, 1.0, 1.5, 2.0], np.float32)
    scores = logits / temperatures[:, None]
    if top_k:
        scores[scores < np.sort(scores, axis=1)[:, -top_k][:, None]] = -np.inf
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    cdf = np.cumsum(probabilities / probabilities.sum(axis=1, keepdims=True), axis=1)
    # For each row the midpoint of the interval of a token it can draw; 0.5 of the way in, rounding cannot matter.
    rng = np.random.default_rng(1)
    expected = np.array([rng.choice(np.flatnonzero(np.diff(row, prepend=0) > 1e-3)) for row in cdf])
    lower = np.where(expected > 0, cdf[np.arange(6), expected - 1], 0)
    uniforms = np.zeros((6, 3), np.float32)
    # The graph draws the first token whose cdf reaches 1 - u.
    uniforms[:, 0] = 1 - (lower + cdf[np.arange(6), expected]) / 2
    top_ks = np.full(6, top_k, np.int64)
    tokens, _, _ = runner.sample(logits, state, temperatures, top_ks, uniforms)
    assert tokens.shape == (6, 3)
    assert tokens[:, 0].tolist() == expected.tolist()


def test_chunk_graph_steps_exactly_like_the_contract_graph(runner):
    logits, state = primed_rows(runner, 5)
    greedy = np.ones(5, np.int64)  # top-k 1: each token is the argmax, so the chunk can be replayed
    # Uniforms at 0, the edge: even there a token of probability 0 is never drawn.
    tokens, next_logits, new_state = runner.sample(
        logits, state, np.ones(5, np.float32), greedy, np.zeros((5, 20), np.float32)
    )
    replayed, replayed_state = runner.prime(tokens, state)
    assert tokens[:, 0].tolist() == logits.argmax(axis=1).tolist()
    assert (tokens[:, 1:] == replayed[:, :-1].argmax(axis=2)).all()
    # The int8 chunk graph runs the contract Loop's own nodes: bit for bit. fp32 steps a traced LSTM node
    # on sequences of one instead of 20, which may round differently.
    tolerance = 0 if runner.info.precision == "int8" else 1e-5
    np.testing.assert_allclose(next_logits, replayed[:, -1], rtol=0, atol=tolerance)
    for got, want in zip(new_state, replayed_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def test_a_row_samples_the_same_alone_and_in_a_batch(runner):
    logits, state = primed_rows(runner, 8)
    vocab = len(runner.info.vocab)
    top_ks = np.array([0, 1, 3, 0, vocab - 1, 2, 0, 9], np.int64)
    settings = (np.linspace(0.2, 2.0, 8).astype(np.float32), top_ks)
    uniforms = np.random.default_rng(2).random((8, 16), np.float32)
    together = runner.sample(logits, state, *settings, uniforms)
    for row in range(8):
        alone = runner.sample(
            logits[row : row + 1],
            [s[:, row : row + 1] for s in state],
            *(x[row : row + 1] for x in settings),
            uniforms[row : row + 1],
        )
        assert np.array_equal(alone[0][0], together[0][row])
        assert np.array_equal(alone[1][0], together[1][row])


def _int8_loop_body(model: onnx.ModelProto) -> onnx.GraphProto:
    return next(node for node in model.graph.node if node.op_type == "Loop").attribute[0].g


def _chunk_of(path) -> np.ndarray:
    runner = ModelRunner(path, "cpu")
    logits, state = primed_rows(runner, 3)
    uniforms = np.random.default_rng(4).random((3, 20), np.float32)
    return runner.sample(logits, state, np.full(3, 0.8, np.float32), np.zeros(3, np.int64), uniforms)[0]


def test_the_int8_loop_is_found_by_its_node_names_or_without_them(tiny_int8, tmp_path):
    model = onnx.load(tiny_int8)
    body = _int8_loop_body(model)
    assert any(node.name == INT8_READ_TOKEN and node.op_type == "Gather" for node in body.node)
    assert {INT8_LOOP, INT8_LOGITS_BATCH_FIRST} <= {node.name for node in model.graph.node}
    # The token's Gather no longer first: found by its name.
    body.node.insert(0, onnx.helper.make_node("Identity", [body.input[0].name], ["t_unused"]))
    onnx.save(model, tmp_path / "moved.onnx")
    # Files written before export named the nodes (the bundled model): found by op type and inputs.
    for graph in (model.graph, body):
        for node in graph.node:
            node.name = ""
    onnx.save(model, tmp_path / "unnamed.onnx")
    expected = _chunk_of(tiny_int8)
    assert np.array_equal(_chunk_of(tmp_path / "moved.onnx"), expected)
    assert np.array_equal(_chunk_of(tmp_path / "unnamed.onnx"), expected)


def test_an_int8_file_of_another_layout_is_refused_clearly(tiny_int8, tmp_path):
    model = onnx.load(tiny_int8)
    body = _int8_loop_body(model)
    # A valid graph whose Loop reads the token at a copy of the step number, not where export.int8_lstm does.
    read_token = next(node for node in body.node if node.name == INT8_READ_TOKEN)
    read_token.input[1] = "t_copy"
    body.node.insert(0, onnx.helper.make_node("Identity", [body.input[0].name], ["t_copy"]))
    onnx.save(model, tmp_path / "other.onnx")
    with pytest.raises(ModelFileError, match="cannot be served: not an int8 LSTM graph: it has no single Gather"):
        ModelRunner(tmp_path / "other.onnx", "cpu")


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


def test_a_caller_that_went_away_does_not_break_the_batch(engine):
    expected = engine.generate("We will", length=80, seed=5)
    loop = asyncio.new_event_loop()
    loop.close()  # delivering to this loop raises, as for a caller whose event loop has ended
    broken = engine._submit(lambda item: loop.call_soon_threadsafe(print, item), "We", 80, seed=1)
    assert engine.generate("We will", length=80, seed=5) == expected
    assert broken.cancelled
