"""The fp32 graph traced from PyTorch (one ONNX LSTM/GRU/RNN node per layer), its fp16 conversion, and the
fp32 graph with its recurrent weights stored as fp16."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from bot.inference.modelfile import state_names
from model.ensemble import Ensemble
from model.model import CharRNN

OPSET = 17
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


class _ContractWrapper(nn.Module):
    """Explicit state tensors in and out, with the names of the ONNX contract."""

    def __init__(self, net: CharRNN | Ensemble) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        logits, new_state = self.net(tokens, tuple(state) if self.net.is_lstm else state[0])
        return (logits, *new_state) if self.net.is_lstm else (logits, new_state)


def fp32_graph(net: CharRNN | Ensemble) -> onnx.ModelProto:
    # The dynamo exporter froze the sequence length of nn.LSTM here; the TorchScript one keeps it dynamic.
    state_in, state_out = state_names(net.is_lstm)
    state = net.initial_state(1)
    example = (torch.zeros(1, 3, dtype=torch.long), *(state if net.is_lstm else (state,)))
    dynamic = {"tokens": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dynamic |= {name: {1: "batch"} for name in state_in + state_out}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer warns about nn.LSTM's shape checks and batch sizes; the verification checks the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ContractWrapper(net).eval(),
            example,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["tokens", *state_in],
            output_names=["logits", *state_out],
            dynamic_axes=dynamic,
        )
    return onnx.load_from_string(buffer.getvalue())


def fp16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and arithmetic in fp16, inputs and outputs still fp32 so callers need not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    converted.topological_sort()  # the converter appends its input casts at the end of the node list
    return converted.model


def fp16_weights_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 graph with each LSTM/GRU/RNN node's weight matrices (W, R) stored as fp16 and cast back
    to fp32 by a Cast node: half the file, fp32 arithmetic, so every provider runs it (the CPU provider
    has no fp16 recurrent kernels). onnxruntime folds the casts of constants when it opens the file, so
    the recurrent nodes see fp32 initializers, as in the fp32 graph. Biases and the rest stay fp32.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weights = {name for node in graph.node if node.op_type in RECURRENT_OPS for name in node.input[1:3]}
    casts = []
    for name in sorted(weights & initializers.keys()):
        tensor = initializers[name]
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{name}_fp16")
        tensor.CopyFrom(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [name], to=onnx.TensorProto.FLOAT))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model
