"""Export to one ONNX file: parity with PyTorch, metadata, int8/fp16 variants, refusals, and `export evaluate`."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bot.inference.engine import GenerationEngine
from bot.inference.int8_weights import INT8, to_layout
from bot.inference.modelfile import INT8_UNSIGNED_WEIGHTS, INT8_WEIGHTS, MetadataError, parse_props
from bot.inference.runner import ModelFileError, ProviderError, read_model_info
from export.__main__ import main as export_main
from export.int8_lstm import WEIGHT_ZERO, int8_matmul_model
from export.pipeline import export_checkpoint, info_from_checkpoints, serialize
from export.requantize import main as requantize_main
from export.torch_graph import fp16_weights_graph, fp32_graph
from export.verify import VerificationError, verify
from model.checkpoint import load_checkpoint
from model.evaluate import evaluate_ids
from model.sampling import BOT_SAMPLING
from tests.support.tiny_model import TINY_CORPUS, train_tiny


def torch_and_onnx_logits(net, session, tokens: np.ndarray, state: list[np.ndarray]):
    torch_state = tuple(torch.from_numpy(s) for s in state)
    with torch.no_grad():
        expected, _ = net(torch.from_numpy(tokens), torch_state if net.is_lstm else torch_state[0])
    names = ["h0", "c0"][: len(state)]
    (got,) = session.run(["logits"], {"tokens": tokens, **dict(zip(names, state, strict=True))})
    return expected.numpy(), got


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 100), (8, 1), (8, 100)])
def test_fp32_export_matches_pytorch(tiny_checkpoint, tiny_onnx, batch, seq):
    net, _ = load_checkpoint(tiny_checkpoint)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch * 1000 + seq)
    tokens = rng.integers(0, net.config.vocab_size, (batch, seq))
    state = [np.tanh(rng.standard_normal((2, batch, 16))).astype(np.float32) for _ in range(2)]
    expected, got = torch_and_onnx_logits(net, session, tokens, state)
    assert got.shape == (batch, seq, net.config.vocab_size)
    assert np.abs(expected - got).max() <= 1e-4


def test_export_is_one_valid_file_with_contract_io(tiny_onnx):
    assert [p.name for p in tiny_onnx.parent.iterdir() if p.name.startswith(tiny_onnx.name)] == [tiny_onnx.name]
    model = onnx.load(str(tiny_onnx), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["tokens", "h0", "c0"]
    assert [o.name for o in model.graph.output] == ["logits", "h", "c"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


def test_metadata_round_trip(tiny_checkpoint, tiny_onnx):
    _, ckpt = load_checkpoint(tiny_checkpoint)
    _, info = read_model_info(tiny_onnx)
    assert info.vocab == ckpt.vocab
    assert info.cleaning == ckpt.cleaning
    assert info.unknown_policy == ckpt.unknown_policy
    assert info.model_config == ckpt.model_config
    assert info.corpus_sha256 == ckpt.dataset_sha256
    assert info.val_bpc == pytest.approx(ckpt.val_bpc)
    assert info.precision == "fp32"
    assert parse_props(info.to_props()) == info


def test_metadata_validation_names_the_problem(tiny_checkpoint):
    _, ckpt = load_checkpoint(tiny_checkpoint)
    props = info_from_checkpoints([ckpt]).to_props()
    with pytest.raises(MetadataError, match="not made by"):
        parse_props({})
    with pytest.raises(MetadataError, match="vocab"):
        parse_props({**props, "vocab": "[1, 2"})
    with pytest.raises(MetadataError, match="tokens but the vocabulary has"):
        parse_props({**props, "vocab": '["a", "b"]'})
    with pytest.raises(MetadataError, match="format"):
        parse_props({**props, "speechbot_format": "99"})


def test_fp16_weight_storage_is_metadata_of_an_fp32_file(tiny_checkpoint):
    _, ckpt = load_checkpoint(tiny_checkpoint)
    props = info_from_checkpoints([ckpt], "fp16-weights").to_props()
    assert (props["precision"], props["weight_storage"]) == ("fp32", "fp16")
    assert parse_props(props).weight_storage == "fp16"
    assert parse_props(info_from_checkpoints([ckpt]).to_props()).weight_storage == "fp32"
    for bad in ({"weight_storage": "bf16"}, {"precision": "int8"}):
        with pytest.raises(MetadataError, match="only an fp32 file stores 'fp16' weights"):
            parse_props({**props, **bad})


def test_export_evaluate_agrees_with_pytorch(tiny_dir, tiny_checkpoint, tiny_onnx, capsys):
    export_main(["evaluate", str(tiny_onnx), "--text", str(tiny_dir / "corpus.txt"), "--providers", "cpu"])
    out = capsys.readouterr().out
    onnx_bpc = float(out.split("nats/char, ")[1].split(" bits")[0])
    net, _ = load_checkpoint(tiny_checkpoint)
    ids, _ = read_model_info(tiny_onnx)[1].text_ids(TINY_CORPUS)
    torch_bpc = evaluate_ids(net, ids)[0] / math.log(2)
    assert abs(onnx_bpc - torch_bpc) <= 1e-3
    assert "0 outside the vocabulary" in out


def test_export_evaluate_counts_unknown_characters(tiny_dir, tiny_onnx, capsys):
    odd = tiny_dir / "odd.txt"
    odd.write_text("We will win — 漢字 and Zürich 😀 again.\n", encoding="utf-8")
    export_main(["evaluate", str(tiny_onnx), "--text", str(odd)])
    out = capsys.readouterr().out
    assert "outside the vocabulary" in out and "0 outside" not in out


def test_int8_is_close_and_batch_invariant(tiny_checkpoint, tiny_int8, capsys):
    net, _ = load_checkpoint(tiny_checkpoint)
    session = ort.InferenceSession(str(tiny_int8), providers=["CPUExecutionProvider"])
    assert read_model_info(tiny_int8)[1].precision == "int8"
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, net.config.vocab_size, (8, 20))
    state = [np.tanh(rng.standard_normal((2, 8, 16))).astype(np.float32) for _ in range(2)]
    expected, batched = torch_and_onnx_logits(net, session, tokens, state)
    assert np.abs(expected - batched).max() < 0.2
    for row in range(8):
        (alone,) = session.run(
            ["logits"],
            {"tokens": tokens[row : row + 1], "h0": state[0][:, row : row + 1], "c0": state[1][:, row : row + 1]},
        )
        assert np.array_equal(alone[0], batched[row])


def test_int8_matmul_is_exact_with_extreme_activations_and_weights():
    """int8 weights (U8S8) failed this on x86 CPUs without VNNI: VPMADDUBSW adds two uint8 × int8 products
    into an int16 that saturates (255 · 127 · 2 > 32767), off by up to half the output here."""
    rng = np.random.default_rng(0)
    weights = rng.choice([-1.0, 1.0], (256, 64)).astype(np.float32)  # every weight at ±127 once quantized
    h = np.concatenate([rng.choice([-0.999, 0.999], (4, 256)), np.tanh(rng.standard_normal((4, 256)))])
    h = h.astype(np.float32)
    model = int8_matmul_model(weights)
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"h": h})
    # The same integers, exactly: h as QuantizeLinear rounds it, weights ±127, then the scales.
    h_q = np.rint(h / np.float32(1 / 127)).astype(np.int64)
    expected = (h_q @ np.rint(weights * 127).astype(np.int64)) / (127.0 * 127.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def _int8_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    loop = next(node for node in model.graph.node if node.op_type == "Loop")
    return [node for node in loop.attribute[0].g.node if node.op_type == "MatMulIntegerToFloat"]


def test_int8_export_stores_weights_unsigned(tiny_int8):
    model = onnx.load(str(tiny_int8))
    weights = {t.name: t for t in model.graph.initializer}
    matmuls = _int8_matmuls(model)
    assert len(matmuls) == 9  # four gates of two layers, and the decoder
    for node in matmuls:
        assert weights[node.input[1]].data_type == onnx.TensorProto.UINT8
        assert node.input[5] == "weight_zero"
    assert onnx.numpy_helper.to_array(weights["weight_zero"]) == WEIGHT_ZERO
    assert read_model_info(tiny_int8)[1].extra == {INT8_WEIGHTS: INT8_UNSIGNED_WEIGHTS}


def test_requantize_turns_an_old_int8_file_into_todays(tiny_dir, tiny_int8, capsys):
    old_path, new_path = tiny_dir / "old-int8.onnx", tiny_dir / "requantized.onnx"
    onnx.save(to_layout(onnx.load(str(tiny_int8)), INT8), str(old_path))  # as files were before uint8
    assert read_model_info(old_path)[1].extra == {}  # old files still load
    requantize_main([str(old_path), str(new_path)])
    assert "zero point 128" in capsys.readouterr().out
    fresh, converted = onnx.load(str(tiny_int8)), onnx.load(str(new_path))
    # The same numbers as a fresh export: the conversion loses nothing.
    as_arrays = {t.name: onnx.numpy_helper.to_array(t) for t in fresh.graph.initializer}
    for tensor in converted.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), as_arrays.pop(tensor.name))
    assert not as_arrays
    assert [list(n.input) for n in _int8_matmuls(converted)] == [list(n.input) for n in _int8_matmuls(fresh)]
    assert read_model_info(new_path)[1] == read_model_info(tiny_int8)[1]
    rng = np.random.default_rng(3)
    feeds = {"tokens": rng.integers(0, 10, (4, 30)), "h0": np.zeros((2, 4, 16), np.float32)}
    feeds["c0"] = feeds["h0"]
    outputs = [ort.InferenceSession(str(p)).run(None, feeds) for p in (tiny_int8, new_path)]
    for want, got in zip(*outputs, strict=True):
        assert np.array_equal(want, got)


@pytest.mark.parametrize("case", ["already", "fp32", "same file"])
def test_requantize_refuses_what_it_cannot_convert(tiny_dir, tiny_onnx, tiny_int8, case, capsys):
    source, output, expected = {
        "already": (tiny_int8, tiny_dir / "twice.onnx", "already unsigned"),
        "fp32": (tiny_onnx, tiny_dir / "fp32-requantized.onnx", "fp32 model"),
        "same file": (tiny_int8, tiny_int8, "also an input"),
    }[case]
    before = source.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        requantize_main([str(source), str(output)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert source.read_bytes() == before
    assert output == source or not output.exists()


def test_cli_export_reports_size_and_bpc_change(tiny_dir, tiny_checkpoint, capsys):
    out_path = tiny_dir / "cli-int8.onnx"
    export_main([str(tiny_checkpoint), "-o", str(out_path), "--int8", "--text", str(tiny_dir / "corpus.txt")])
    out = capsys.readouterr().out
    assert out_path.is_file() and "int8" in out and "MB" in out
    change = float(out.split("change ")[1].split(")")[0])
    assert abs(change) < 0.05


def test_gru_exports_and_int8_is_refused_for_it(tiny_dir, capsys):
    ckpt = train_tiny(tiny_dir / "gru.pt", model_type="gru", iterations=5)
    result = export_checkpoint(ckpt, tiny_dir / "gru.onnx")
    assert result.check.max_logit_diff <= 1e-4
    assert [i.name for i in ort.InferenceSession(str(result.path)).get_inputs()] == ["tokens", "h0"]
    # The engine's chunk graph steps a one-state network too, and a seed keeps its text in a batch.
    with GenerationEngine(result.path, providers="cpu", threads=1, lanes=1) as engine:
        alone = engine.generate("We", length=40, seed=2, sampling=BOT_SAMPLING.with_options(top_k=5))
        others = [engine.stream("Make", length=30 + i, seed=i) for i in range(5)]
        mine = engine.stream("We", length=40, seed=2, sampling=BOT_SAMPLING.with_options(top_k=5))
        assert "".join(mine) == alone and len(alone) == 40
        assert all(len("".join(other)) == 30 + i for i, other in enumerate(others))
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ckpt), "-o", str(tiny_dir / "gru8.onnx"), "--int8"])
    assert exit_info.value.code == 2
    assert "--int8 supports LSTM" in capsys.readouterr().err
    assert not (tiny_dir / "gru8.onnx").exists()


def test_a_wrong_graph_is_refused(tiny_checkpoint):
    net, ckpt = load_checkpoint(tiny_checkpoint)
    info = info_from_checkpoints([ckpt])
    data = serialize(fp32_graph(net), info)
    with torch.no_grad():
        net.decoder.bias.add_(0.01)  # the network now differs from the exported graph
    with pytest.raises(VerificationError, match="differ from PyTorch"):
        verify(net, data, info, np.arange(200) % net.config.vocab_size, ["CPUExecutionProvider"])


def test_fp16_weights_export_is_fp32_at_about_half_the_size_and_runs_on_cpu(
    tiny_dir, tiny_checkpoint, tiny_onnx, capsys
):
    out_path = tiny_dir / "fp16-weights.onnx"
    export_main([str(tiny_checkpoint), "-o", str(out_path), "--fp16-weights", "--text", str(tiny_dir / "corpus.txt")])
    out = capsys.readouterr().out
    assert "fp16-weights" in out
    assert abs(float(out.split("change ")[1].split(")")[0])) <= 1e-4
    _, info = read_model_info(out_path)
    assert (info.precision, info.weight_storage) == ("fp32", "fp16")
    model = onnx.load(out_path)
    fp16 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    cast_from = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Cast"}
    lstms = [node for node in model.graph.node if node.op_type == "LSTM"]
    assert len(lstms) == 2 and all(cast_from[name] in fp16 for node in lstms for name in node.input[1:3])
    # The tiny network's LSTM holds about 3/4 of its weights.
    assert out_path.stat().st_size < 0.75 * tiny_onnx.stat().st_size
    # onnxruntime folds the casts of constants when it opens the file: the LSTMs read fp32 constants.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tiny_dir / "fp16-weights-optimized.onnx")
    ort.InferenceSession(str(out_path), options, providers=["CPUExecutionProvider"])
    assert not [n for n in onnx.load(options.optimized_model_filepath).graph.node if n.op_type == "Cast"]
    with GenerationEngine(out_path, providers="cpu", threads=1, lanes=1) as engine:
        assert len(engine.generate("We", length=40, seed=1)) == 40


def test_fp16_weights_that_change_bits_per_char_are_refused(tiny_checkpoint):
    net, ckpt = load_checkpoint(tiny_checkpoint)
    info = info_from_checkpoints([ckpt], "fp16-weights")
    data = serialize(fp16_weights_graph(fp32_graph(net)), info)
    with torch.no_grad():
        net.decoder.bias[0] += 1.0  # one character likelier: the network now scores the text differently
    with pytest.raises(VerificationError, match="fp16 weights change the bits/char"):
        verify(net, data, info, np.arange(200) % net.config.vocab_size, ["CPUExecutionProvider"])


def test_fp16_is_never_opened_on_cpu(tiny_dir, tiny_checkpoint, capsys):
    out_path = tiny_dir / "fp16.onnx"
    export_main([str(tiny_checkpoint), "-o", str(out_path), "--fp16"])
    assert out_path.is_file()
    _, info = read_model_info(out_path)
    assert info.precision == "fp16"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "not verified" in capsys.readouterr().out
        from bot.inference.engine import GenerationEngine

        with pytest.raises(ProviderError, match="fp16"):
            GenerationEngine(out_path, providers="auto")


def foreign_model(path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "garbage", "foreign", "tampered"])
def test_bad_model_files_are_refused_clearly(tiny_dir, tiny_onnx, kind, capsys):
    path = tiny_dir / f"bad-{kind}.onnx"
    data = tiny_onnx.read_bytes()
    expected = {
        "missing": "does not exist",
        "empty": "is empty",
        "truncated": "not a readable ONNX model",
        "garbage": "not a readable ONNX model",
        "foreign": "not a speechbot model",
        "tampered": "not a speechbot model",
    }[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "foreign":
        foreign_model(path)
    elif kind == "tampered":
        model = onnx.load(str(tiny_onnx))
        for prop in model.metadata_props:
            if prop.key == "vocab":
                prop.value = '["a", "b"]'
        onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match=expected):
        read_model_info(path)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["evaluate", str(path), "--text", str(tiny_dir / "corpus.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_cli_bad_checkpoint_is_one_line_exit_2(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tiny_dir / "nope.pt"), "-o", str(tiny_dir / "nope.onnx")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
