"""The chunk graph samples as the reference arithmetic in model/sampling.py says, row by row, with every
sampling setting; bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from bot.inference.runner import ModelRunner
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
from tests.support.engine_inputs import mixed_settings, primed_rows


@pytest.fixture(scope="module", params=["fp32", "int8"])
def runner(request, tiny_onnx, tiny_int8):
    return ModelRunner(tiny_onnx if request.param == "fp32" else tiny_int8, "cpu", threads=1)


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
    params = [mixed_settings(i) for i in range(8)]
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


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        *(("temperature", t, "from 0.001 to 2") for t in (0, -0.5, 2.01, float("nan"), float("inf"), "hot", True)),
        *(("top_k", k, "top_k must be a whole number") for k in (-1, 1.5, True)),
        *(("top_p", p, "top_p must be above 0 and at most 1") for p in (0, 1.5, -0.1, float("nan"))),
        *(("min_p", p, "min_p must be at least 0") for p in (1, -0.1, "0.1")),
        *(("repetition_penalty", r, "repetition_penalty must be from 0") for r in (-1, 21, float("inf"))),
        *(("repeat_ngram", n, "repeat_ngram must be a whole number from 2 to 64") for n in (1, 65, 3.0)),
    ],
)
def test_bad_sampling_settings_are_refused(engine, setting, value, message):
    with pytest.raises(InvalidSampling, match=message):
        engine.generate("We", length=10, sampling=BOT_SAMPLING.with_options(**{setting: value}))


def test_sampling_edges_work(engine):
    assert (
        len(engine.generate("We", length=10, seed=1, sampling=BOT_SAMPLING.with_options(temperature=2.0, top_k=10_000)))
        == 10
    )
    assert (
        len(engine.generate("We", length=1, seed=1, sampling=BOT_SAMPLING.with_options(temperature=1e-3, top_k=0))) == 1
    )
    assert (
        len(
            engine.generate(
                "We", length=30, seed=1, sampling=BOT_SAMPLING.with_options(temperature=2.0, top_p=1e-6, min_p=0.999)
            )
        )
        == 30
    )
    greedy = engine.generate("We", length=30, seed=1, sampling=BOT_SAMPLING.with_options(top_k=1, repetition_penalty=0))
    assert (
        engine.generate("We", length=30, seed=2, sampling=BOT_SAMPLING.with_options(top_p=1e-6, repetition_penalty=0))
        == greedy
    )


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
