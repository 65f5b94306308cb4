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

from bot.inference.ending import ELLIPSIS, Ending, settle
from bot.inference.engine import EngineBusy, EngineClosed, GenerationEngine, InvalidLength, default_lanes
from bot.inference.modelfile import INT8_LOGITS_BATCH_FIRST, INT8_LOOP, INT8_READ_TOKEN
from bot.inference.runner import ModelFileError, ModelRunner, ProviderError
from model.sampling import (
    BOT_SAMPLING,
    REPEAT_WINDOW,
    InvalidSampling,
    SamplingParams,
    repeated_characters,
    repetition_start,
    repetition_step,
    sampling_distribution,
)
from model.text import CleaningOptions


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, tiny_onnx, tiny_int8):
    path = tiny_onnx if request.param == "fp32" else tiny_int8
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=64, lanes=1) as eng:
        yield eng


def test_importing_the_engine_does_not_import_torch():
    code = "import bot.inference.engine, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def mixed_settings(i: int) -> dict:
    """Sampling settings that differ from request to request: every optional step on in some, off in others."""
    return {
        "temperature": 0.3 + (i % 31) / 20,
        "top_k": i % 5 or None,
        "top_p": (1.0, 0.8, 0.95)[i % 3],
        "min_p": (0.0, 0.05, 0.2, 0.0)[i % 4],
        "repetition_penalty": (0.0, 3.0, 1.0)[i % 3],
        "repeat_ngram": 4 + i % 6,
    }


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, mixed_settings(7), mixed_settings(8)])
def test_same_seed_same_text_alone_and_batched_with_63_others(engine, settings):
    alone = engine.generate("We will", length=120, seed=7, **settings)
    others = [
        engine.stream(prompt="Make" * (i % 3), length=40 + 3 * i, seed=i, **mixed_settings(i)) for i in range(100, 131)
    ]
    mine = engine.stream("We will", length=120, seed=7, **settings)
    others += [engine.stream(prompt="", length=200 - i, seed=i, **mixed_settings(i)) for i in range(32)]
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
        expected = [one.generate(p, length=n, seed=s, **settings) for p, n, settings, s in requests]
    # Shares of 4 rows: lane 0 is full at once and hands most of the 40 to lane 1.
    with GenerationEngine(path, providers="cpu", threads=1, max_batch=8, lanes=2) as two:
        streams = [two.stream(p, length=n, seed=s, **settings) for p, n, settings, s in requests]
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


@pytest.fixture(scope="module", params=["fp32", "int8"])
def runner(request, tiny_onnx, tiny_int8):
    return ModelRunner(tiny_onnx if request.param == "fp32" else tiny_int8, "cpu", threads=1)


def primed_rows(runner: ModelRunner, rows: int) -> tuple[np.ndarray, list[np.ndarray]]:
    tokens = np.random.default_rng(0).integers(len(runner.info.vocab), size=(rows, 12))
    logits, state = runner.prime(tokens, runner.zero_state(rows))
    return logits[:, -1], state


def row_settings(params: list[SamplingParams], histories: list[list[int]], vocab: int) -> dict[str, np.ndarray]:
    """The chunk graph's per-row inputs for these settings, with each row's repetition history."""
    started = [repetition_start(tokens, vocab) for tokens in histories]
    return {
        "temperature": np.array([p.temperature for p in params], np.float32),
        "top_k": np.array([p.top_k for p in params], np.int64),
        "top_p": np.array([p.top_p for p in params], np.float32),
        "min_p": np.array([p.min_p for p in params], np.float32),
        "repetition_penalty": np.array([p.repetition_penalty for p in params], np.float32),
        "repeat_ngram": np.array([p.repeat_ngram for p in params], np.int64),
        "history": np.stack([h for h, _ in started]),
        "matches": np.stack([m for _, m in started]),
    }


SETTINGS_CASES = {
    "temperature": [SamplingParams(temperature=t) for t in (0.15, 0.5, 0.9, 1.0, 1.5, 2.0)],
    "top_k": [SamplingParams(temperature=t, top_k=5) for t in (0.15, 0.5, 0.9, 1.0, 1.5, 2.0)],
    "min_p": [
        SamplingParams(temperature=t, min_p=m)
        for t, m in [(0.5, 0.05), (1, 0.1), (1.5, 0.3), (2, 0.6), (2, 0.9), (1, 0)]
    ],
    "top_p": [
        SamplingParams(temperature=t, top_p=p)
        for t, p in [(0.5, 0.5), (1, 0.9), (1.5, 0.3), (2, 0.99), (2, 0.01), (1, 1)]
    ],
    "penalty": [
        SamplingParams(temperature=t, repetition_penalty=r, repeat_ngram=n)
        for t, r, n in [(0.15, 3, 2), (1, 5, 3), (2, 20, 4), (0.5, 1, 2), (1, 0, 3), (1.5, 2, 64)]
    ],
    "all": [
        SamplingParams(temperature=0.3, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=4, repeat_ngram=2),
        SamplingParams(temperature=2.0, top_p=0.95, min_p=0.1, repetition_penalty=1, repeat_ngram=3),
        BOT_SAMPLING,
        SamplingParams(),
        SamplingParams(temperature=1.2, top_k=3, min_p=0.2),
        SamplingParams(temperature=0.9, top_p=0.7, repetition_penalty=2, repeat_ngram=2),
    ],
}


@pytest.mark.parametrize("case", SETTINGS_CASES)
def test_chunk_graph_samples_as_the_reference_with_each_rows_settings(runner, case):
    """Each row draws, by inverse CDF, from model.sampling's distribution for its own settings."""
    params = SETTINGS_CASES[case]
    rows = len(params)
    logits, state = primed_rows(runner, rows)
    vocab = len(runner.info.vocab)
    # Histories that repeat short strings, so that the penalty has characters to penalise.
    rng = np.random.default_rng(3)
    histories = [np.tile(rng.integers(vocab, size=1 + i), 30).tolist() for i in range(rows)]
    settings = row_settings(params, histories, vocab)
    repeated = repeated_characters(settings["history"], settings["matches"], settings["repeat_ngram"], vocab)
    if case in ("penalty", "all"):
        assert repeated.any(axis=1)[[0, 1, 2]].all()  # the test does exercise the penalty
    cdf = np.cumsum(sampling_distribution(logits, params, repeated), axis=1)
    # For each row the midpoint of the interval of a token it can draw; 0.5 of the way in, rounding cannot matter.
    expected = np.array([rng.choice(np.flatnonzero(np.diff(row, prepend=0) > 1e-3)) for row in cdf])
    lower = np.where(expected > 0, cdf[np.arange(rows), expected - 1], 0)
    uniforms = np.zeros((rows, 3), np.float32)
    # The graph draws the first token whose cdf reaches 1 - u.
    uniforms[:, 0] = 1 - (lower + cdf[np.arange(rows), expected]) / 2
    tokens, _, _, (history, matches) = runner.sample(logits, state, settings, uniforms)
    assert tokens.shape == (rows, 3)
    assert tokens[:, 0].tolist() == expected.tolist()
    # The history carried out of the graph is the reference's after the same three tokens.
    want_history, want_matches = settings["history"], settings["matches"]
    for step in range(3):
        want_history, want_matches = repetition_step(want_history, want_matches, tokens[:, step].astype(np.int32))
    if case in ("penalty", "all"):
        assert np.array_equal(history, want_history) and np.array_equal(matches, want_matches)


def test_truncation_keeps_what_min_p_and_top_p_promise():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.06, 0.04]], np.float32))
    kept = lambda p: np.flatnonzero(sampling_distribution(logits, [p])[0] > 0).tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1, min_p=0.3)) == [0, 1]  # 0.15 < 0.3 * 0.5
    assert kept(SamplingParams(temperature=2, min_p=0.3)) == [0, 1]  # the same set at any temperature
    assert kept(SamplingParams(temperature=1, top_p=0.8)) == [0, 1, 2]  # 0.5 + 0.25 < 0.8
    assert kept(SamplingParams(temperature=1, top_p=0.01)) == [0]
    assert kept(SamplingParams(temperature=2)) == [0, 1, 2, 3, 4]


def test_repetition_history_finds_every_repeat_of_an_ngram():
    """The incremental match lengths agree with a brute-force search for each n-gram size."""
    rng = np.random.default_rng(4)
    vocab = 4
    tokens = rng.integers(vocab, size=REPEAT_WINDOW + 300).tolist()
    history, matches = repetition_start(tokens, vocab)
    window = tokens[-REPEAT_WINDOW:]
    for ngram in (2, 3, 5, 8):
        context = window[len(window) - ngram + 1 :]
        brute = {window[j + 1] for j in range(ngram - 2, len(window) - 1) if window[j - ngram + 2 : j + 1] == context}
        found = repeated_characters(history[None], matches[None], np.array([ngram]), vocab)[0]
        assert set(np.flatnonzero(found).tolist()) == brute
    # No history: nothing repeats.
    empty = repetition_start([], vocab)
    assert not repeated_characters(empty[0][None], empty[1][None], np.array([2]), vocab).any()


def test_chunk_graph_steps_exactly_like_the_contract_graph(runner):
    logits, state = primed_rows(runner, 5)
    # top-k 1: each token is the argmax, so the chunk can be replayed.
    greedy = {"temperature": np.ones(5, np.float32), "top_k": np.ones(5, np.int64)}
    # Uniforms at 0, the edge: even there a token of probability 0 is never drawn.
    tokens, next_logits, new_state, _ = runner.sample(logits, state, greedy, np.zeros((5, 20), np.float32))
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
    """Alone, a row runs the graph with only the steps it uses; in the batch, the graph with all of them."""
    vocab = len(runner.info.vocab)
    params = [SamplingParams(**{k: v for k, v in mixed_settings(i).items() if v is not None}) for i in range(8)]
    params[1] = SamplingParams(top_k=vocab - 1, temperature=2.0)
    logits, state = primed_rows(runner, 8)
    rng = np.random.default_rng(2)
    settings = row_settings(params, [rng.integers(3, size=50).tolist() for _ in range(8)], vocab)
    uniforms = rng.random((8, 16), np.float32)
    together = runner.sample(logits, state, settings, uniforms)
    for row in range(8):
        alone = runner.sample(
            logits[row : row + 1],
            [s[:, row : row + 1] for s in state],
            {name: x[row : row + 1] for name, x in settings.items()},
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
    return runner.sample(logits, state, {"temperature": np.full(3, 0.8, np.float32)}, uniforms)[0]


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


@pytest.mark.parametrize("length", [20, 60, 150])
def test_speeches_end_at_a_sentence_near_their_length(engine, length):
    ending = Ending(length, 4096)
    for seed in range(6):
        full = engine.generate("We will", length=ending.to_generate, seed=seed)
        speech = engine.generate("We will", length=length, seed=seed, end_sentence=True)
        assert ending.low <= len(speech) <= ending.high
        if speech.endswith(ELLIPSIS):  # no sentence ended near the length: cut between words
            cut = speech[: -len(ELLIPSIS)]
            assert full.startswith(cut) and not full[len(cut)].isalnum()
        else:
            assert full.startswith(speech) and speech[-1] in ".!?\"”’'" and full[len(speech)].isspace()
        assert "".join(engine.stream("We will", length=length, seed=seed, end_sentence=True)) == speech


def test_unknown_characters_and_empty_prompts_work(engine):
    for prompt in ["", "Zürich — “naïve” café 漢字 😀\t\r\n", "😀😀", "   ", "\x00\x07"]:
        text = engine.generate(prompt, length=30, seed=1)
        assert len(text) == 30
        assert set(text) <= set(engine.vocab.chars)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        *(
            ("temperature", t, "above 0 and at most 2")
            for t in (0, -0.5, 2.01, float("nan"), float("inf"), "hot", True)
        ),
        *(("top_k", k, "top_k must be a whole number") for k in (-1, 1.5, True)),
        *(("top_p", p, "top_p must be above 0 and at most 1") for p in (0, 1.5, -0.1, float("nan"))),
        *(("min_p", p, "min_p must be at least 0") for p in (1, -0.1, "0.1")),
        *(("repetition_penalty", r, "repetition_penalty must be from 0") for r in (-1, 21, float("inf"))),
        *(("repeat_ngram", n, "repeat_ngram must be a whole number from 2 to 64") for n in (1, 65, 3.0)),
    ],
)
def test_bad_sampling_settings_are_refused(engine, setting, value, message):
    with pytest.raises(InvalidSampling, match=message):
        engine.generate("We", length=10, **{setting: value})


@pytest.mark.parametrize("length", [0, -1, 20_001, 1.5, "10"])
def test_bad_length_is_refused(engine, length):
    with pytest.raises(InvalidLength, match="from 1 to"):
        engine.generate("We", length=length)


def test_sampling_edges_work(engine):
    assert len(engine.generate("We", length=10, temperature=2.0, top_k=10_000, seed=1)) == 10
    assert len(engine.generate("We", length=1, temperature=1e-3, top_k=0, seed=1)) == 1
    assert len(engine.generate("We", length=30, temperature=2.0, top_p=1e-6, min_p=0.999, seed=1)) == 30
    greedy = engine.generate("We", length=30, top_k=1, seed=1, repetition_penalty=0)
    assert engine.generate("We", length=30, top_p=1e-6, seed=2, repetition_penalty=0) == greedy


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


# ---- lanes and endings with a scripted runner: no model, no timing ----


class ScriptedRunner:
    """A runner whose every row writes SCRIPT from its start after any prompt: the engine's policy and
    endings are then exact to test. prime() waits for `gate`, so a test can queue requests while a lane
    is busy; `batches` records each chunk call's batch size."""

    def __init__(self, script: str, gate: threading.Event) -> None:
        vocab = sorted(set(script + "We will\n"))
        cleaning = CleaningOptions().to_dict()
        self.info = type("Info", (), {"vocab": vocab, "unknown_policy": "nearest", "cleaning": cleaning})()
        self.provider = "CPUExecutionProvider"
        self.script = np.array([vocab.index(ch) for ch in script] * (30_000 // len(script)), np.int64)
        self.gate = gate
        self.batches: list[int] = []

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((1, batch, 1), np.float32)]  # where each row is in the script

    def prime(self, tokens, state):
        self.gate.wait()
        return np.zeros((*tokens.shape, len(self.info.vocab)), np.float32), [np.zeros_like(state[0])]

    def sample(self, logits, state, rows, uniforms):
        self.batches.append(len(logits))
        at = state[0][0, :, 0].astype(np.int64)
        steps = uniforms.shape[1]
        tokens = np.stack([self.script[i : i + steps] for i in at])
        return tokens, logits, [state[0] + steps], (rows["history"], rows["matches"])


def scripted_engine(script: str, gate: threading.Event | None = None, **options) -> tuple[GenerationEngine, list]:
    gate = gate or threading.Event()
    gate.set()
    runners: list[ScriptedRunner] = []

    def factory(*_args) -> ScriptedRunner:
        runners.append(ScriptedRunner(script, gate))
        return runners[-1]

    return GenerationEngine("scripted", runner_factory=factory, **options), runners


SCRIPT = "We will win. And we will build it, believe me! He said “it is over.” Then a very long sentence goes on "


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


def test_ending_picks_the_sentence_end_nearest_the_length():
    engine, _ = scripted_engine(SCRIPT, lanes=1)
    ends = [SCRIPT.index(end) + len(end) for end in ("win.", "me!", "over.”")]
    assert ends == [12, 46, 68]
    with engine:
        for length in (12, 14, 40, 45, 56, 57, 60, 70):
            speech = engine.generate("", length=length, end_sentence=True)
            window = [e for e in ends if Ending(length, 4096).low <= e <= Ending(length, 4096).high]
            assert speech == SCRIPT[: min(window, key=lambda e: (abs(e - length), e))]
        assert engine.generate("", length=68, end_sentence=True).endswith("over.”")


def test_without_a_sentence_end_the_speech_stops_between_words_with_an_ellipsis():
    words = "Then a very long sentence goes on and on, and "
    engine, _ = scripted_engine(words, lanes=1)
    with engine:
        for length in range(20, 60, 3):
            speech = engine.generate("", length=length, end_sentence=True)
            cut = speech[: -len(ELLIPSIS)]
            assert speech.endswith(ELLIPSIS) and (words * 20).startswith(cut)
            assert not (words * 20)[len(cut)].isalnum() and cut[-1].isalpha(), "cut between words, no comma"
            assert Ending(length, 4096).low <= len(speech) <= Ending(length, 4096).high
        # Streaming gives the same text, and nothing it streamed had to be taken back.
        assert "".join(engine.stream("", length=41, end_sentence=True)) == engine.generate("", 41, end_sentence=True)


def test_the_message_limit_is_hit_mid_sentence(tmp_path):
    """/length 3000: the sentence that ends nearest the length ends 3100 characters in. After a short prompt
    that is the speech; after a 1000-character prompt it would pass Telegram's 4096, so the speech stops
    inside the limit between words. The prompt stays as it was sent."""
    from bot.core.speechbot import MESSAGE_MAX, ChatRef, SpeechBot
    from db.database import create_db_engine, migrate
    from db.store import ChatStore

    sentence = "We won. " + ("and the wall goes on " * 200)[: 3100 - 8 - 4] + "end. "
    assert sentence.index("end.") + 4 == 3100
    engine, _ = scripted_engine(sentence + "Next. " * 200, lanes=1)
    db = create_db_engine(f"sqlite:///{tmp_path / 'bot.db'}")
    migrate(db)
    bot = SpeechBot(ChatStore(db, 0.8, 3000), engine, cooldown_seconds=0)
    with engine:
        short = asyncio.run(bot.prompt(ChatRef(1, "private"), "We will"))
        assert short == "We will" + sentence[:3100]
        prompt = ("We will build a great wall " * 40)[:999] + "x"
        reply = asyncio.run(bot.prompt(ChatRef(1, "private"), prompt))
        assert reply.startswith(prompt) and len(reply) <= MESSAGE_MAX and reply.endswith(ELLIPSIS)
        continuation = reply[len(prompt) : -len(ELLIPSIS)]
        assert Ending(3000, MESSAGE_MAX - len(prompt)).low <= len(continuation) + 1 <= MESSAGE_MAX - len(prompt)
        assert sentence.startswith(continuation) and sentence[len(continuation)] == " ", "not mid-word"

        # A daily post ends the same way, at the sentence.
        async def daily() -> str:
            return await bot.daily_speech(await bot.store.get(2, "private"))

        assert asyncio.run(daily()) == sentence[:3100]


@pytest.mark.parametrize(
    ("text", "target", "limit", "exhausted", "expected"),
    [
        ("One. Two. Three. ", 9, 100, False, (9, "One. Two.")),  # the end at the target
        ("One. Two three", 20, 100, False, (4, None)),  # not yet: an end nearer 20 may come
        # 2 past the target, as "much." is 2 before it: no end still to come is nearer, so stop generating.
        ("We win, win, win so very much. And", 32, 100, False, (30, "We win, win, win so very much.")),
        ("We win, win, win so very much. An", 32, 100, False, (30, None)),  # one character sooner: not yet
        ("One two three. Four five six seven", 14, 100, False, (14, "One two three.")),  # none after it in the window
        ("One. Two three four five six", 9, 100, False, (4, "One. Two" + ELLIPSIS)),  # "One." is too short
        ("Yes! ", 4, 100, True, (4, "Yes!")),
        ('He said "no." Then', 13, 100, False, (13, 'He said "no."')),  # a closing quote after the end
        ("Oh. Yes. No. ", 9, 7, True, (3, "Oh.")),  # the limit cuts the window
        ("The U.S.A is big and strong ok", 12, 100, True, (0, "The U.S.A is" + ELLIPSIS)),  # no end inside words
        ("Go, go, go, go", 8, 100, True, (0, "Go, go" + ELLIPSIS)),  # no comma before the ellipsis
        ("Supercalifragilistic", 8, 100, True, (0, "Supercali" + ELLIPSIS)),  # one word: its start
    ],
)
def test_settle(text, target, limit, exhausted, expected):
    assert settle(text, Ending(target, limit), exhausted) == expected


# ---- `python -m model sample`: plain by default, the new settings on request ----


def test_model_sample_is_plain_by_default_and_takes_the_new_settings(tiny_checkpoint, capsys):
    from model.__main__ import main as model_main
    from model.checkpoint import load_checkpoint
    from model.sample import sample_text
    from model.text import Vocab

    net, ckpt = load_checkpoint(tiny_checkpoint)
    vocab, cleaning = Vocab(ckpt.vocab, ckpt.unknown_policy), CleaningOptions.from_dict(ckpt.cleaning)
    plain = sample_text(net, vocab, cleaning, 200, "We", temperature=0.15, seed=5)
    # SamplingParams with only a temperature is the old path: the same text for the same seed.
    assert sample_text(net, vocab, cleaning, 200, "We", seed=5, sampling=SamplingParams(temperature=0.15)) == plain
    penalised = SamplingParams(temperature=0.15, repetition_penalty=20, repeat_ngram=4)
    varied = sample_text(net, vocab, cleaning, 200, "We", seed=5, sampling=penalised)
    grams = lambda text: [text[i : i + 4] for i in range(len(text) - 3)]  # noqa: E731
    assert len(set(grams(varied))) > len(set(grams(plain)))  # the penalty breaks the loops of 0.15
    model_main(["sample", "--checkpoint", str(tiny_checkpoint), "--length", "40", "--min-p", "0.1", "--top-p", "0.9"])
    assert len(capsys.readouterr().out.strip()) >= 30
    for flag, value, message in [
        ("--top-p", "0", "--top-p must be above 0 and at most 1"),
        ("--min-p", "1", "--min-p must be at least 0"),
        ("--repetition-penalty", "-1", "--repetition-penalty must be from 0"),
        ("--repeat-ngram", "1", "--repeat-ngram must be a whole number from 2 to 64"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            model_main(["sample", "--checkpoint", str(tiny_checkpoint), flag, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
