"""Loading a model file for serving: the int8 graph found by its layout, files of another layout refused,
the execution provider chosen."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import INT8_LOGITS_BATCH_FIRST, INT8_LOOP, INT8_READ_TOKEN
from bot.inference.runner import ModelFileError, ModelRunner, ProviderError
from tests.support.engine_inputs import primed_rows


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
