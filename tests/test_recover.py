"""`python -m export recover`: a PyTorch checkpoint rebuilt from an int8 export computes the int8 file's network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.__main__ import main as export_main
from export.pipeline import build_graph, info_from_checkpoints, serialize
from model.checkpoint import Checkpoint
from model.ensemble import load_models


def logits(session: ort.InferenceSession, tokens: np.ndarray, state: list[np.ndarray]) -> np.ndarray:
    return session.run(["logits"], {"tokens": tokens, "h0": state[0], "c0": state[1]})[0]


@pytest.fixture(scope="module")
def tiny_int8(tiny_dir, tiny_checkpoint) -> Path:
    """The tiny network's int8 file, built and written by the exporter's own parts without its bits/char
    check, which this few-iteration network does not always pass (what is recovered is what the file holds)."""
    net, ckpts = load_models([tiny_checkpoint])
    path = tiny_dir / "recover-source-int8.onnx"
    path.write_bytes(serialize(build_graph(net, "int8"), info_from_checkpoints(ckpts, "int8")))
    return path


@pytest.fixture(scope="module")
def recovered(tiny_dir, tiny_int8) -> Checkpoint:
    path = tiny_dir / "recovered.pt"
    export_main(["recover", str(tiny_int8), "-o", str(path)])
    return Checkpoint.load(path)


def test_recovered_weights_are_the_int8_files_dequantized(tiny_int8, tiny_checkpoint, recovered):
    original = Checkpoint.load(tiny_checkpoint)
    assert (recovered.model_config, recovered.vocab, recovered.cleaning) == (
        original.model_config,
        original.vocab,
        original.cleaning,
    )
    assert recovered.dataset_sha256 == original.dataset_sha256
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(tiny_int8).graph.initializer}
    hh = recovered.model["rnn.weight_hh_l0"].numpy()
    forget = hh[16:32].T  # gate order i, f, g, o; int8_lstm stores [in, out]
    weight_zero = 128 if stored["m0_w0f_q"].dtype == np.uint8 else 0  # export.int8_lstm.WEIGHT_ZERO
    assert np.array_equal(forget, (stored["m0_w0f_q"].astype(np.float32) - weight_zero) * stored["m0_w0f_scale"])
    # The int8-rounded weights are within half a quantization step (their column's scale) of the trained ones.
    trained = original.model["rnn.weight_hh_l0"].numpy()[16:32].T
    assert (np.abs(forget - trained) <= stored["m0_w0f_scale"] * 0.5001).all()


def test_recovered_checkpoint_exported_as_int8_gives_the_same_file_back(tiny_dir, tiny_int8, recovered):
    # Requantizing int8-rounded weights finds the same scales and integers, and the embedding the SVD
    # split out rebuilds layer 0's table: the two files compute the same logits.
    net, ckpts = load_models([tiny_dir / "recovered.pt"])
    again = serialize(build_graph(net, "int8"), info_from_checkpoints(ckpts, "int8"))
    rng = np.random.default_rng(0)
    vocab = recovered.model_config["vocab_size"]
    tokens = rng.integers(0, vocab, (4, 30))
    state = [np.tanh(rng.standard_normal((2, 4, 16))).astype(np.float32) for _ in range(2)]
    first, second = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (str(tiny_int8), again))
    assert np.abs(logits(first, tokens, state) - logits(second, tokens, state)).max() < 1e-4


def test_recover_refuses_what_is_not_an_int8_lstm(tiny_dir, tiny_onnx, tiny_checkpoint, capsys):
    for source, message in (
        (tiny_onnx, "is not an int8 LSTM file (it is fp32, lstm)"),
        (tiny_checkpoint, "is not a readable ONNX model"),
        (tiny_dir / "missing.onnx", "does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["recover", str(source), "-o", str(tiny_dir / "refused.pt")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tiny_dir / "refused.pt").exists()
