"""The model file's contract (bot.inference.modelcheck): crafted files that reach outside themselves, use
operators the exporter never writes, or are too big are refused before any onnxruntime session reads them;
a graph whose step disagrees with its metadata is refused at start; temperatures have a floor that writes text.

The external data's targets are FIFOs that notice being opened, so "never read" is observed, not assumed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnx.external_data_helper import set_external_data

from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.inference.runner import ModelFileError, ModelRunner, read_model_info
from export.__main__ import main as export_main
from model.cli import UsageError
from model.sampling import BOT_SAMPLING, InvalidSampling, SamplingParams


class OpenWatch:
    """A FIFO at `path` that records whether anything opened it to read (a writer thread waits in open)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # returns only once a reader opens the FIFO
        self._opened.set()
        os.close(fd)  # the reader then sees end of file: nothing to read

    def was_opened(self) -> bool:
        opened = self._opened.wait(0.05)  # a reader that came just now has woken the thread by then
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # frees the waiting thread
        self._thread.join()
        return opened


def externalise(tensor: TensorProto, location: str) -> None:
    """Make `tensor` keep its bytes in `location`, as onnx's external-data writer would."""
    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    set_external_data(tensor, location, offset=0, length=len(tensor.raw_data))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # onnx.save would try to write the external data itself
    return path


def in_initializer(model: onnx.ModelProto, location: str) -> None:
    bias = next(t for t in model.graph.initializer if t.name == "net.decoder.bias")
    externalise(bias, location)


def in_sparse_initializer(model: onnx.ModelProto, location: str) -> None:
    bias = next(t for t in model.graph.initializer if t.name == "net.decoder.bias")
    model.graph.initializer.remove(bias)
    values = numpy_helper.to_array(bias)
    sparse = oh.make_sparse_tensor(
        numpy_helper.from_array(values, bias.name), numpy_helper.from_array(np.arange(values.size)), values.shape
    )
    externalise(sparse.values, location)
    model.graph.sparse_initializer.append(sparse)


def in_constant_attribute(model: onnx.ModelProto, location: str) -> None:
    constant = next(node for node in model.graph.node if node.op_type == "Constant")
    externalise(constant.attribute[0].t, location)


def in_loop_body(model: onnx.ModelProto, location: str) -> None:
    """The int8 graph's decoder bias moved into its Loop body as a Constant node."""
    bias = next(t for t in model.graph.initializer if t.name == "m0_bd")
    model.graph.initializer.remove(bias)
    externalise(bias, location)
    loop = next(node for node in model.graph.node if node.op_type == "Loop")
    body = loop.attribute[0].g
    body.node.insert(0, oh.make_node("Constant", [], ["m0_bd"], value=bias))


@pytest.mark.parametrize(
    ("where", "how", "int8"),  # int8: the bundled model, whose graph steps in a Loop
    [
        ("initializer", "relative", False),
        ("initializer", "absolute", False),
        ("initializer", "parent", False),
        ("sparse initializer", "relative", False),
        ("Constant attribute", "relative", False),
        ("Loop body", "relative", True),
    ],
)
def test_a_model_file_that_points_at_other_files_is_refused_unread(tmp_path, monkeypatch, tiny_onnx, where, how, int8):
    cwd = tmp_path / "bot"  # the bot's working directory, where its .env lives
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    target = {"relative": cwd / ".env", "absolute": tmp_path / "secret", "parent": tmp_path / "secret"}[how]
    location = {"relative": ".env", "absolute": str(target), "parent": "../secret"}[how]
    watch = OpenWatch(target)
    model = onnx.load(DEFAULT_MODEL_PATH if int8 else tiny_onnx)
    {
        "initializer": in_initializer,
        "sparse initializer": in_sparse_initializer,
        "Constant attribute": in_constant_attribute,
        "Loop body": in_loop_body,
    }[where](model, location)
    path = save(model, cwd / "crafted.onnx")
    try:
        with pytest.raises(ModelFileError) as refused:
            ModelRunner(path, "cpu", threads=1)
    finally:
        opened = watch.was_opened()
    message = str(refused.value)
    assert message.startswith(f"{path} is refused: "), message
    assert f"keeps its data in another file ({location!r})" in message, message
    place = {
        "Loop body": "(in Loop node 'int8_loop' > graph 'lstm_step' > a Constant node)",
        "Constant attribute": "(in Constant node",
    }
    assert place[where] in message if where in place else "(in " not in message, message
    assert not opened, "the target was opened"


def test_export_evaluate_and_the_quality_bench_refuse_such_a_file(tmp_path, monkeypatch, tiny_dir, tiny_onnx, capsys):
    from bench import quality

    monkeypatch.chdir(tmp_path)
    watch = OpenWatch(tmp_path / ".env")
    model = onnx.load(tiny_onnx)
    in_initializer(model, ".env")
    path = save(model, tmp_path / "crafted.onnx")
    try:
        with pytest.raises(SystemExit) as exit_info:
            export_main(["evaluate", str(path), "--text", str(tiny_dir / "corpus.txt")])
        with pytest.raises(UsageError, match="keeps its data in another file"):
            quality.onnx_bits(str(path), corpus=None)
    finally:
        opened = watch.was_opened()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is refused: tensor 'net.decoder.bias'") and err.count("\n") == 1, err
    assert not opened


def add_node(model: onnx.ModelProto, node: onnx.NodeProto, graph: onnx.GraphProto | None = None) -> None:
    (graph or model.graph).node.append(node)


def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=numpy_helper.from_array(value))


def passing_on(name: str, kind: int) -> onnx.GraphProto:
    """A subgraph that gives `name` back: a branch of an If or, with the iteration inputs, a Loop body."""
    return oh.make_graph(
        [oh.make_node("Identity", [name], [f"{name}_out"])],
        "inner",
        [],
        [oh.make_tensor_value_info(f"{name}_out", kind, None)],
    )


def loop_in_the_loop(model: onnx.ModelProto) -> None:
    """A valid Loop of one iteration inside the int8 graph's Loop body."""
    body = next(node for node in model.graph.node if node.op_type == "Loop").attribute[0].g
    inner = oh.make_graph(
        [oh.make_node("Identity", ["inner_cond"], ["inner_cond_out"]), oh.make_node("Identity", ["x"], ["x_out"])],
        "inner",
        [
            oh.make_tensor_value_info(name, kind, [])
            for name, kind in [("i", TensorProto.INT64), ("inner_cond", TensorProto.BOOL), ("x", TensorProto.FLOAT)]
        ],
        [
            oh.make_tensor_value_info(name, kind, [])
            for name, kind in [("inner_cond_out", TensorProto.BOOL), ("x_out", TensorProto.FLOAT)]
        ],
    )
    add_node(model, constant("once", np.array(1, np.int64)), body)
    add_node(model, constant("x0", np.array(0.0, np.float32)), body)
    add_node(model, oh.make_node("Loop", ["once", "", "x0"], ["x_last"], name="nested", body=inner), body)


def set_precision(model: onnx.ModelProto, precision: str) -> None:
    next(prop for prop in model.metadata_props if prop.key == "precision").value = precision


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("operator", "it uses the operator Abs (node 'abs')"),
        ("vendor operator", "it uses the operator com.microsoft.Gelu (node 'gelu')"),
        ("If", "it uses the operator If (node 'branch')"),
        ("Loop outside int8", "it has control flow (Loop node 'int8_loop')"),
        ("Loop in a Loop", "it has control flow (Loop node 'nested' (in Loop node 'int8_loop'"),
    ],
)
def test_operators_the_exporter_never_writes_are_refused(tmp_path, tiny_onnx, case, expected):
    # int8: the bundled model, the exporter's int8 graph with its Loop.
    model = onnx.load(DEFAULT_MODEL_PATH if case.startswith("Loop") else tiny_onnx)
    # Each file is otherwise valid: onnxruntime would open it.
    if case == "operator":
        add_node(model, oh.make_node("Abs", ["logits"], ["abs_logits"], name="abs"))
    elif case == "vendor operator":
        add_node(model, oh.make_node("Gelu", ["logits"], ["gelu_logits"], name="gelu", domain="com.microsoft"))
    elif case == "If":
        add_node(model, constant("always", np.array(True)))
        branch = passing_on("logits", TensorProto.FLOAT)
        add_node(
            model, oh.make_node("If", ["always"], ["chosen"], name="branch", then_branch=branch, else_branch=branch)
        )
    elif case == "Loop outside int8":
        set_precision(model, "fp32")
    else:
        loop_in_the_loop(model)
    with pytest.raises(ModelFileError) as refused:
        read_model_info(save(model, tmp_path / "crafted.onnx"))
    assert str(refused.value).startswith(f"{tmp_path / 'crafted.onnx'} is refused: {expected}"), refused.value


def test_an_oversized_model_file_is_refused_before_it_is_read(tmp_path):
    from bot.inference.modelcheck import MAX_MODEL_BYTES

    path = tmp_path / "huge.onnx"
    with path.open("wb") as file:
        file.truncate(MAX_MODEL_BYTES + 1)  # sparse: no disk used, and reading it would take seconds
    with pytest.raises(ModelFileError) as refused:
        read_model_info(path)
    assert f"is refused: it is {MAX_MODEL_BYTES + 1:,} bytes, more than the {MAX_MODEL_BYTES:,} bytes" in str(
        refused.value
    )
    # Well above what the exporter writes: the bundled 2x640 int8 (5.9 MB) and an fp32 2x1024 LSTM with the
    # bundled configuration (12,952,916 parameters of 4 bytes).
    fp32_2x1024 = 12_952_916 * 4
    assert 4 * fp32_2x1024 < MAX_MODEL_BYTES
    assert 40 * DEFAULT_MODEL_PATH.stat().st_size < MAX_MODEL_BYTES


def test_the_exporter_refuses_to_write_what_the_bot_would_refuse(tiny_checkpoint):
    from export.pipeline import ExportError, info_from_checkpoints, serialize
    from export.torch_graph import fp32_graph
    from model.checkpoint import load_checkpoint

    net, ckpt = load_checkpoint(tiny_checkpoint)
    graph = fp32_graph(net)
    add_node(graph, oh.make_node("Abs", ["logits"], ["abs_logits"], name="abs"))
    with pytest.raises(ExportError, match=r"breaks the model file's contract.*operator Abs"):
        serialize(graph, info_from_checkpoints([ckpt]))


def with_dynamic_logits_and_vocabulary(model: onnx.ModelProto, vocabulary_change: int) -> None:
    """The logits' width computed at run time (a Reshape to [batch, seq, -1]), so no fixed dimension tells it,
    and a vocabulary one character shorter or longer than the graph's."""
    for node in model.graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "width_unknown"))
    model.graph.node.extend(
        [
            oh.make_node("Shape", ["tokens"], ["tokens_shape"]),
            oh.make_node("Concat", ["tokens_shape", "width_unknown"], ["logits_shape"], axis=0),
            oh.make_node("Reshape", ["logits_raw", "logits_shape"], ["logits"]),
        ]
    )
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "vocab"
    props = {prop.key: prop for prop in model.metadata_props}
    vocab = json.loads(props["vocab"].value)
    vocab = vocab[:-1] if vocabulary_change < 0 else [*vocab, "☺"]
    config = json.loads(props["model_config"].value) | {"vocab_size": len(vocab)}
    props["vocab"].value, props["model_config"].value = json.dumps(vocab), json.dumps(config)


@pytest.mark.parametrize("vocabulary_change", [-1, 1])
def test_logits_wider_or_narrower_than_the_vocabulary_are_refused_at_start(tmp_path, tiny_onnx, vocabulary_change):
    model = onnx.load(tiny_onnx)
    width = model.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    with_dynamic_logits_and_vocabulary(model, vocabulary_change)
    path = save(model, tmp_path / "edited.onnx")
    read_model_info(path)  # nothing fixed in the graph disagrees: only a real step tells
    with pytest.raises(ModelFileError) as refused:
        ModelRunner(path, "cpu", threads=1)
    message = str(refused.value)
    assert "metadata does not match its graph: one step writes logits of shape " in message, message
    assert f"[1, 1, {width}]" in message and f"[1, 1, {width + vocabulary_change}]" in message, message


def test_the_lowest_temperature_still_writes_text_and_lower_ones_are_refused(engine):
    from model.sampling import TEMPERATURE_MIN

    for temperature in (1e-320, 1e-38, TEMPERATURE_MIN / 2):
        with pytest.raises(InvalidSampling, match=f"temperature must be from {TEMPERATURE_MIN:g} to 2"):
            SamplingParams(temperature=temperature)
    # The floor still writes words through the chunk graph, with the bot's settings and without.
    for sampling in (
        SamplingParams(temperature=TEMPERATURE_MIN),
        BOT_SAMPLING.with_options(temperature=TEMPERATURE_MIN),
    ):
        text = engine.generate("We will", length=60, seed=1, sampling=sampling)
        assert len(text.split()) >= 8, text
