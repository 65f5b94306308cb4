"""Ensembles: several checkpoints averaged in PyTorch, exported as one file, served by the engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import quality
from bot.inference.engine import GenerationEngine
from bot.inference.runner import ModelRunner
from export.__main__ import main as export_main
from export.evaluate import onnx_nats
from export.pipeline import export_checkpoint
from model.__main__ import main as model_main
from model.checkpoint import CheckpointError
from model.dataset import load_dataset
from model.ensemble import load_models
from model.evaluate import evaluate_ids
from model.prepare import prepare
from model.text import CleaningOptions, Vocab, text_to_ids
from tests.conftest import TINY_CORPUS, train_tiny


@pytest.fixture(scope="module")
def second_checkpoint(tiny_dir):
    # Wider than tiny_checkpoint's 16 units: the narrower member's state is padded.
    return train_tiny(tiny_dir / "tiny-seed1-wide.pt", seed=1, rnn_size=24)


def test_ensemble_averages_the_members_probabilities_and_carries_their_states(tiny_checkpoint, second_checkpoint):
    ensemble, _ = load_models([tiny_checkpoint, second_checkpoint])
    (a, _), (b, _) = load_models([tiny_checkpoint]), load_models([second_checkpoint])
    tokens = torch.randint(0, ensemble.config.vocab_size, (3, 20))
    with torch.no_grad():
        mixed, (h, _) = ensemble(tokens)
        expected = torch.log((a(tokens)[0].softmax(-1) + b(tokens)[0].softmax(-1)) / 2)
        assert torch.allclose(mixed, expected, atol=1e-5)
        assert h.shape == (4, 3, 24)  # two members of two layers, stacked, as wide as the wider
        assert not h[:2, :, 16:].any()  # the narrower member's padding stays zero
        # The stacked state carries each member on: two halves give the same as one pass.
        first, state = ensemble(tokens[:, :8])
        second, _ = ensemble(tokens[:, 8:], state)
        assert torch.allclose(torch.cat([first, second], dim=1), mixed, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_exported_ensemble_matches_pytorch_and_the_engine_serves_it(
    precision, tiny_dir, tiny_checkpoint, second_checkpoint
):
    corpus = tiny_dir / "corpus.txt"
    out = tiny_dir / f"ensemble-{precision}.onnx"
    # export_checkpoint verifies the graph against PyTorch (fp32: logits within 1e-4) before writing.
    result = export_checkpoint([tiny_checkpoint, second_checkpoint], out, precision, str(corpus))
    runner = ModelRunner(out, "cpu")
    assert runner.info.members == 2 and runner.info.state_shape(5) == (4, 5, 24)
    ensemble, _ = load_models([tiny_checkpoint, second_checkpoint])
    ids, _ = runner.info.text_ids(TINY_CORPUS)
    torch_bits = evaluate_ids(ensemble, ids)[0] / math.log(2)
    onnx_bits = onnx_nats(runner.session, runner.info, ids) / math.log(2)
    assert runner.info.val_bpc == pytest.approx(result.check.torch_bpc) == pytest.approx(torch_bits, abs=1e-6)
    assert onnx_bits == pytest.approx(torch_bits, abs=1e-3 if precision == "fp32" else 0.05)
    # The averaged model predicts the text better than the worse of its members.
    members = [evaluate_ids(load_models([p])[0], ids)[0] / math.log(2) for p in (tiny_checkpoint, second_checkpoint)]
    assert torch_bits < max(members)
    # The chunk graph wraps the ensemble's step: a greedy chunk replays through the contract graph
    # (for int8 its Loop's own nodes, bit for bit).
    tokens = np.random.default_rng(0).integers(len(runner.info.vocab), size=(4, 12))
    logits, state = runner.prime(tokens, runner.zero_state(4))
    greedy = {"temperature": np.ones(4, np.float32), "top_k": np.ones(4, np.int64)}
    chunk, next_logits, _, _ = runner.sample(logits[:, -1], state, greedy, np.zeros((4, 8), np.float32))
    replayed, _ = runner.prime(chunk, state)
    assert (chunk[:, 1:] == replayed[:, :-1].argmax(axis=2)).all()
    np.testing.assert_allclose(next_logits, replayed[:, -1], rtol=0, atol=0 if precision == "int8" else 1e-5)
    with GenerationEngine(out, providers="cpu", threads=1) as engine:
        alone = engine.generate("We will", length=80, seed=3)
        batch = [engine.stream("", length=60, seed=i) for i in range(10)]
        assert "".join(engine.stream("We will", length=80, seed=3)) == alone
        assert all(len("".join(chunks)) == 60 for chunks in batch)


def test_networks_that_cannot_be_averaged_are_refused(tiny_dir, tiny_checkpoint, capsys):
    gru = train_tiny(tiny_dir / "tiny-gru.pt", model_type="gru", iterations=2)
    with pytest.raises(CheckpointError, match="same cell, number of layers and vocabulary"):
        load_models([tiny_checkpoint, gru])
    other_text = train_tiny(tiny_dir / "tiny-other-vocab.pt", text="zzz qqq xxx\n" * 40, iterations=2)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tiny_checkpoint), str(other_text), "-o", str(tiny_dir / "never.onnx")])
    assert exit_info.value.code == 2
    assert "different vocab" in capsys.readouterr().err
    assert not (tiny_dir / "never.onnx").exists()


def test_quality_script_scores_an_ensemble_like_its_pytorch_and_onnx_forms(
    tmp_path, tiny_dir, tiny_checkpoint, second_checkpoint
):
    data_dir = tmp_path / "data"
    prepare([tiny_dir / "corpus.txt"], data_dir, CleaningOptions(), batch_size=2, seq_length=16)
    exported = export_checkpoint([tiny_checkpoint, second_checkpoint], tmp_path / "ensemble.onnx").path
    out_json = tmp_path / "quality.json"
    args = ["--data", str(data_dir), "--checkpoint", str(tiny_checkpoint), str(second_checkpoint)]
    args += ["--onnx", str(exported), "--max-order", "3", "--ppmd-orders", "3", "--dynamic-lr", "0.05"]
    quality.main([*args, "--json", str(out_json), "--markdown", str(tmp_path / "q.md")])
    corpus = json.loads(out_json.read_text())["corpora"][0]
    rows = {row["name"]: row for row in corpus["rows"]}
    ensemble, _ = load_models([tiny_checkpoint, second_checkpoint])
    splits = load_dataset(data_dir).splits
    for split in ("val", "test"):
        expected = evaluate_ids(ensemble, splits[split])[0] / math.log(2)
        assert rows["LSTM ensemble of 2 (this model)"][split] == pytest.approx(expected, rel=1e-6)
        assert rows["LSTM, ONNX fp32 (ensemble.onnx)"][split] == pytest.approx(expected, abs=1e-4)
        alone = evaluate_ids(load_models([second_checkpoint])[0], splits[split])[0] / math.log(2)
        assert rows[f"LSTM {second_checkpoint} alone"][split] == pytest.approx(alone, rel=1e-6)
    assert corpus["verdict"].startswith(f"On val the model scores {rows['LSTM ensemble of 2 (this model)']['val']:.3f}")
    # Dynamic evaluation runs on the first network alone, and both the row and the verdict say so.
    dynamic = rows[f"LSTM, dynamic evaluation ({tiny_checkpoint} alone)"]
    assert f"{tiny_checkpoint} alone scores {dynamic['val']:.3f}" in corpus["verdict"]


def test_model_commands_take_several_checkpoints_as_an_ensemble(tiny_dir, tiny_checkpoint, second_checkpoint, capsys):
    both = [str(tiny_checkpoint), str(second_checkpoint)]
    model_main(["evaluate", "--checkpoint", *both, "--text", str(tiny_dir / "corpus.txt")])
    reported = float(capsys.readouterr().out.split(" bits/char")[0].rsplit(" ", 1)[1])
    ensemble, (ckpt, _) = load_models(both)
    ids, _ = text_to_ids(TINY_CORPUS, Vocab(ckpt.vocab), CleaningOptions.from_dict(ckpt.cleaning))
    assert reported == pytest.approx(evaluate_ids(ensemble, np.array(ids))[0] / math.log(2), abs=1e-4)
    samples = []
    for _ in range(2):
        model_main(["sample", "--checkpoint", *both, "--length", "40", "--seed", "5", "--start-text", "We"])
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and len(samples[0].strip()) >= 40
