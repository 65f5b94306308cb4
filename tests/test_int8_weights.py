"""The int8 graph's weight layout: chosen from the CPU's flags, converted without loss in memory, exact where
chosen (so an old file serves as a new one does), and forced by ONNX_INT8_WEIGHTS."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bot.config import Config
from bot.inference.int8_weights import (
    DESCRIPTIONS,
    INT8,
    UINT8,
    Int8WeightsError,
    choose_layout,
    cpu_flags,
    serving_layout,
    stored_layout,
    to_layout,
)
from bot.inference.modelfile import DEFAULT_MODEL_PATH, INT8_WEIGHTS
from bot.inference.runner import ModelFileError, ModelRunner
from bot.services import open_engine
from export.__main__ import main as export_main
from export.evaluate import onnx_char_nats
from export.int8_lstm import int8_matmul_model
from model.prepare import read_utf8

# This VM's flags (AMD EPYC, AVX2, no AVX512, no VNNI), abridged.
EPYC_AVX2 = frozenset({"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"})
AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})
# The CPU the running tests are on: where it picks uint8 for want of VNNI, int8 weights must saturate here.
HERE = choose_layout(cpu_flags())


@pytest.mark.parametrize(
    ("flags", "layout", "named"),
    [
        (EPYC_AVX2, UINT8, "none of avx512_vnni, avx_vnni, amx_int8"),
        (EPYC_AVX2 | AVX512_CORE, UINT8, "none of"),  # Skylake-SP: AVX512 without VNNI saturates too
        (EPYC_AVX2 | AVX512_CORE | {"avx512_vnni"}, INT8, "avx512_vnni"),  # Cascade Lake, Ice Lake, Zen 4
        (EPYC_AVX2 | {"avx_vnni"}, INT8, "avx_vnni"),  # Alder Lake
        (EPYC_AVX2 | AVX512_CORE | {"avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}, INT8, "avx512_vnni"),
        (frozenset({"amx_tile", "amx_int8"}), INT8, "amx_int8"),
        # onnxruntime uses AVX512-VNNI only with AVX512 BW/DQ/VL; no such CPU is known, but then it would saturate.
        (EPYC_AVX2 | {"avx512f", "avx512_vnni"}, UINT8, "none of"),
        (frozenset(), UINT8, "none of"),
        (None, UINT8, "unknown"),  # not Linux, or no flags line (ARM): uint8 is exact everywhere
    ],
)
def test_the_layout_is_int8_only_where_the_cpu_has_vnni_or_amx(flags, layout, named):
    choice = choose_layout(flags)
    assert choice.layout == layout
    assert named in choice.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_the_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx_vnni"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(arm) is None
    assert cpu_flags(tmp_path / "missing") is None
    assert (cpu_flags() is not None) == ("\nflags" in "\n" + Path("/proc/cpuinfo").read_text())


def test_the_conversion_is_lossless_both_ways(tiny_int8):
    fresh = onnx.load(tiny_int8)
    old = to_layout(fresh, INT8)
    assert stored_layout(old) == INT8 and INT8_WEIGHTS not in {p.key for p in old.metadata_props}
    again = to_layout(old, UINT8)
    # Every initializer back as it was (names and numbers), the matmuls' inputs and the metadata too.
    as_arrays = {t.name: onnx.numpy_helper.to_array(t) for t in fresh.graph.initializer}
    for tensor in again.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), as_arrays.pop(tensor.name))
    assert not as_arrays
    assert [str(n) for n in again.graph.node] == [str(n) for n in fresh.graph.node]
    assert list(again.metadata_props) == list(fresh.metadata_props)
    # The bundled file (int8 weights) to uint8 and back: the same bytes.
    shipped = DEFAULT_MODEL_PATH.read_bytes()
    bundled = onnx.load_from_string(shipped)
    assert stored_layout(bundled) == INT8
    assert to_layout(to_layout(bundled, UINT8), INT8).SerializeToString() == shipped


def test_graphs_it_cannot_convert_are_named(tiny_onnx, tiny_int8):
    with pytest.raises(Int8WeightsError, match="already unsigned"):
        to_layout(onnx.load(tiny_int8), UINT8)
    with pytest.raises(Int8WeightsError, match="no MatMulIntegerToFloat"):
        to_layout(onnx.load(tiny_onnx), INT8)
    with pytest.raises(Int8WeightsError, match="must be int8 or uint8"):
        to_layout(onnx.load(tiny_int8), "int4")
    with pytest.raises(ValueError, match="must be one of auto, int8, uint8, not 'fast'"):
        ModelRunner(tiny_int8, "cpu", 1, "fast")


def _logits(runner: ModelRunner) -> np.ndarray:
    """Logits of 30 random characters from states near ±1, where a saturating pair sum is likeliest."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(len(runner.info.vocab), size=(4, 30))
    state = [rng.choice([-0.999, 0.999], runner.info.state_shape(4)).astype(np.float32) for _ in runner.state_names]
    return runner.prime(tokens, state)[0]


@pytest.fixture(scope="module")
def old_int8(tiny_dir, tiny_int8):
    """The tiny int8 model as export.int8_lstm wrote files before its weights became unsigned."""
    path = tiny_dir / "tiny-int8-weights.onnx"
    onnx.save(to_layout(onnx.load(tiny_int8), INT8), path)
    return path


def test_an_old_file_serves_exactly_on_this_cpu(old_int8, tiny_int8, caplog):
    caplog.set_level(logging.INFO, logger="bot.inference")
    serving_layout.cache_clear()
    served = [ModelRunner(old_int8, "cpu", 1), ModelRunner(tiny_int8, "cpu", 1)]
    # The choice and its reason once, whichever runners ask; each file says how it is served.
    chosen = [r.getMessage() for r in caplog.records if r.name == "bot.inference.int8_weights"]
    assert chosen == [f"int8 models run with {DESCRIPTIONS[HERE.layout]}: {HERE.reason}"]
    assert [runner.int8_weights for runner in served] == [HERE.layout] * 2
    exact = _logits(ModelRunner(tiny_int8, "cpu", 1, UINT8))  # U8U8: exact on every CPU
    for runner in served:
        assert np.array_equal(_logits(runner), exact)
    if HERE.layout == UINT8:
        assert f"loaded {old_int8} (lstm, int8, uint8 weights, converted from the file's int8) on" in caplog.text
    # The chunk graph, built from the served graph, writes the same text from the old file and the new.
    texts = []
    for path in (old_int8, tiny_int8):
        with open_engine(Config(model_paths=(path,), onnx_providers="cpu", onnx_threads=1, onnx_lanes=1)) as engine:
            texts.append(engine.generate("We will", length=200, seed=4))
    assert texts[0] == texts[1]


def test_int8_weights_forced_where_the_cpu_lacks_vnni_saturate(old_int8, tiny_int8, tmp_path, caplog):
    """ONNX_INT8_WEIGHTS=int8 does what it says: on a CPU without VNNI the logits move (VPMADDUBSW); with it,
    int8 weights are exact too. Either way, what auto chooses here is exact (test above)."""
    caplog.set_level(logging.INFO, logger="bot.inference")
    serving_layout.cache_clear()
    environ = {"MODEL_PATH": str(tiny_int8), "ONNX_PROVIDERS": "cpu", "ONNX_LANES": "2", "ONNX_INT8_WEIGHTS": "INT8"}
    with open_engine(Config.from_env(environ, dotenv_path=tmp_path / "missing.env")) as engine:
        assert engine.runner.int8_weights == INT8
    forced = _logits(ModelRunner(tiny_int8, "cpu", 1, INT8))
    exact = _logits(ModelRunner(old_int8, "cpu", 1, UINT8))
    if HERE.layout == UINT8:
        assert np.abs(forced - exact).max() > 0.01
        # Once for the engine's two lanes and the runner after them, as a warning: it serves saturated arithmetic.
        asked = [r for r in caplog.records if "run with int8 weights (U8S8), as asked" in r.getMessage()]
        assert [r.levelname for r in asked] == ["WARNING"]
        assert "auto would choose uint8: this CPU has none of" in asked[0].getMessage()
    else:
        assert np.array_equal(forced, exact)


@pytest.mark.parametrize("layout", [INT8, UINT8])
def test_each_layout_is_exact_where_it_is_chosen_and_int8_saturates_elsewhere(layout):
    """One matmul of the step against the same integers computed exactly (as tests/test_export.py does):
    uint8 weights are exact on every CPU; int8 weights exactly where choose_layout picks them."""
    rng = np.random.default_rng(0)
    weights = rng.choice([-1.0, 1.0], (256, 64)).astype(np.float32)  # every weight at ±127 once quantized
    h = rng.choice([-0.999, 0.999], (8, 256)).astype(np.float32)
    model = int8_matmul_model(weights)
    if layout == INT8:
        model = to_layout(model, INT8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"h": h})
    h_q = np.rint(h / np.float32(1 / 127)).astype(np.int64)
    expected = (h_q @ np.rint(weights * 127).astype(np.int64)) / (127.0 * 127.0)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    if layout == UINT8 or HERE.layout == INT8:
        assert error < 1e-6
    else:
        assert error > 0.1  # VPMADDUBSW's saturated pair sums


def test_export_evaluate_and_the_bot_agree(old_int8, tiny_dir, capsys):
    """`python -m export evaluate` serves the file as the bot does: the same layout, the same bits/char."""
    text = str(tiny_dir / "corpus.txt")
    export_main(["evaluate", str(old_int8), "--text", text, "--streams", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert f"int8 model ({HERE.layout} weights) on CPUExecutionProvider" in out
    reported = float(out.split("nats/char, ")[1].split(" bits/char")[0])
    with open_engine(Config(model_paths=(old_int8,), onnx_providers="cpu", onnx_threads=1, onnx_lanes=1)) as engine:
        ids, _ = engine.runner.info.text_ids(read_utf8(tiny_dir / "corpus.txt")[0])
        bits = onnx_char_nats(engine.runner.session, engine.runner.info, ids).mean() / math.log(2)
    assert reported == pytest.approx(bits, abs=1e-4)
    export_main(["evaluate", str(old_int8), "--text", text, "--no-progress", "--int8-weights", "uint8"])
    assert "(uint8 weights)" in capsys.readouterr().out


def test_a_file_whose_weights_cannot_be_converted_is_refused_in_one_line(old_int8, tmp_path):
    model = onnx.load(old_int8)
    # Another reader of a weight: converting it would change what that node reads.
    model.graph.node.append(onnx.helper.make_node("Identity", ["m0_wd_q"], ["unused_copy"]))
    path = tmp_path / "shared-weight.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelFileError, match=r"cannot be served with uint8 weights: .* also read by a Identity node"):
        ModelRunner(path, "cpu", 1, UINT8)
