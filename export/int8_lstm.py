"""An int8 LSTM graph built by hand: one Loop over the sequence whose body is a fused, quantized LSTM step.

Why not onnxruntime's `quantize_dynamic`: its DynamicQuantizeLSTM picks one activation scale for the
whole batch, so a request's output depends on the requests batched with it, and the same seed would
give different text alone and in a batch. Here every LSTM input is a hidden state h = o * tanh(c),
which lies in (-1, 1), so activations are quantized with the fixed scale 1/127 (uint8, zero point 128)
and a row's result never depends on its batch mates. Weights are quantized symmetrically per output
column to -127..127 and stored as uint8 with zero point 128 (U8U8).

Why uint8 weights: with int8 weights (U8S8), onnxruntime's x86 kernels for CPUs without VNNI (AVX2, and
AVX512 without VNNI) multiply with VPMADDUBSW, which adds two uint8 × int8 products into an int16 that
saturates (255 · 127 · 2 > 32767): the tests' tiny model lost 0.073 bits/char to int8 on an AVX2 AMD EPYC,
0.0013 with uint8 weights (docs/export.md, bench/int8_exactness.py). onnxruntime's U8U8 kernels subtract
the weights' zero point and multiply int16 pairs into int32 (VPMADDWD), so every integer matmul is exact
on every CPU; the sums stay far inside int32 (1280 · 255 · 255 < 2^31). Where U8S8 is exact and faster
(CPUs with VNNI or AMX), the runner converts the graph to int8 weights in memory, without loss
(bot/inference/int8_weights.py), so the file's layout decides nothing about speed or results. Files
written before this change keep int8 weights, and the metadata key INT8_WEIGHTS tells the two apart
(bot/inference/modelfile.py).
The quantized h is carried from step to step next to the float state, so each h is quantized once.

Other savings: the embedding and layer 0's input weights and biases fold into a [vocab, H] table per
gate (a Gather instead of a matmul), and each layer's input and recurrent weights are one matmul per
gate.

An ensemble (model.ensemble) is several such networks in the one Loop body, member k owning state
layers k·L to k·L + L - 1 (a narrower member reads the first columns of its layers and pads its
new state back to the widest member's size); the step's logits are then the log of the members' mean
probabilities.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from bot.inference.modelfile import (
    INT8_LOGITS_BATCH_FIRST,
    INT8_LOOP,
    INT8_READ_TOKEN,
    INT8_WEIGHT_ZERO,
    INT8_WEIGHT_ZERO_NAME,
)

OPSET = 17


GATES = "ifgo"  # PyTorch's order of the four gates in its LSTM weights and biases
# Zero points of the quantized activations and weights: both uint8, so onnxruntime's matmul is U8U8.
ACT_ZERO = 128
WEIGHT_ZERO = INT8_WEIGHT_ZERO


def _gates(weights: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch's stacked [4H, ...] gate weights or biases, one entry per gate."""
    return dict(zip(GATES, np.split(weights, 4, axis=0), strict=True))


def quantize_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output column of a [in, out] matrix: -127..127 stored as uint8 plus WEIGHT_ZERO, and the
    columns' scales (see the module docstring for why unsigned)."""
    scale = np.maximum(np.abs(weights).max(axis=0), 1e-12) / 127.0
    signed = np.clip(np.round(weights / scale), -127, 127).astype(np.int16)
    return (signed + WEIGHT_ZERO).astype(np.uint8), scale.astype(np.float32)


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.require(value, requirements="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(oh.make_node(op_type, inputs, outputs, **attrs))
        return outputs[0]

    def quantize(self, h: str, out: str) -> str:
        """uint8 with the fixed scale 1/127 and zero point 128; saturates values outside (-1, 1)."""
        return self.op("QuantizeLinear", [h, "act_scale", "act_zero"], out)

    def int8_matmul(self, x_q: str, weight: str, out: str, bias: str | None = None) -> str:
        """Integer matmul, scaling and bias in one onnxruntime kernel."""
        inputs = [x_q, f"{weight}_q", "act_scale", f"{weight}_scale", "act_zero", INT8_WEIGHT_ZERO_NAME]
        return self.op("MatMulIntegerToFloat", inputs + ([bias] if bias else []), out, domain="com.microsoft")


def _step(b: _Builder, token: str, cs: list[str], hqs: list[str], member: str) -> tuple[str, ...]:
    """One step of every layer of one network: token [B], c and quantized h [B, H] -> logits [B, V],
    new h, c, quantized h. `member` prefixes the network's constants and values.

    Each gate has its own matmul (and layer 0 its own table): onnxruntime's Split copies, which costs
    more than three extra matmul calls at the batch sizes a busy bot runs (docs/speed.md, Generation).
    """
    new_h, new_c, new_hq = [], [], []
    for layer, (c, h_q) in enumerate(zip(cs, hqs, strict=True)):
        p, w = f"{member}l{layer}", f"{member}w{layer}"
        gates = {}
        if layer > 0:
            joined = b.op("Concat", [new_hq[-1], h_q], f"{p}_in", axis=1)
        for gate in GATES:
            if layer == 0:
                projected = b.op("Gather", [f"{member}table0{gate}", token], f"{p}_x{gate}", axis=0)
                recurrent = b.int8_matmul(h_q, f"{w}{gate}", f"{p}_rec{gate}")
                gates[gate] = b.op("Add", [projected, recurrent], f"{p}_pre{gate}")
            else:
                gates[gate] = b.int8_matmul(joined, f"{w}{gate}", f"{p}_pre{gate}", bias=f"{member}b{layer}{gate}")
        i, f, o = (b.op("Sigmoid", [gates[gate]], f"{p}_{gate}") for gate in "ifo")
        candidate = b.op("Tanh", [gates["g"]], f"{p}_cand")
        kept = b.op("Mul", [f, c], f"{p}_kept")
        written = b.op("Mul", [i, candidate], f"{p}_written")
        c_new = b.op("Add", [kept, written], f"{p}_c")
        h_new = b.op("Mul", [o, b.op("Tanh", [c_new], f"{p}_ctanh")], f"{p}_h")
        new_h.append(h_new)
        new_c.append(c_new)
        new_hq.append(b.quantize(h_new, f"{p}_hq"))
    logits = b.int8_matmul(new_hq[-1], f"{member}wd", f"{member}step_logits", bias=f"{member}bd")
    return logits, new_h, new_c, new_hq


def _mix(b: _Builder, member_logits: list[str]) -> str:
    """log(mean_k softmax(logits_k)), row by row: the ensemble's next-character log-probabilities."""
    if len(member_logits) == 1:
        return member_logits[0]
    stacked = b.op(
        "Concat",
        [b.op("Unsqueeze", [b.op("LogSoftmax", [x], f"{x}_lp", axis=1), "axis0"], f"{x}_lp3") for x in member_logits],
        "member_log_probs",
        axis=0,
    )
    total = b.op("ReduceLogSumExp", [stacked], "mixed_sum", axes=[0], keepdims=0)
    return b.op("Sub", [total, "log_members"], "step_logits")


def _weights(b: _Builder, weights: dict[str, np.ndarray], num_layers: int, width: int, member: str) -> None:
    hidden = _hidden_size(weights)
    if hidden < width:  # a narrower ensemble member: the columns of the state that are its own
        b.const(f"{member}size", np.array([hidden], np.int64))
        b.const(f"{member}pad", np.array([0, 0, 0, width - hidden], np.int64))
    embedding = weights["embedding.weight"]
    input0 = _gates(weights["rnn.weight_ih_l0"])
    bias0 = _gates(weights["rnn.bias_ih_l0"] + weights["rnn.bias_hh_l0"])
    for gate in GATES:
        b.const(f"{member}table0{gate}", (embedding @ input0[gate].T + bias0[gate]).astype(np.float32))
    for layer in range(num_layers):
        recurrent = _gates(weights[f"rnn.weight_hh_l{layer}"])
        if layer > 0:
            inputs = _gates(weights[f"rnn.weight_ih_l{layer}"])
            biases = _gates(weights[f"rnn.bias_ih_l{layer}"] + weights[f"rnn.bias_hh_l{layer}"])
        for gate in GATES:
            matrix = recurrent[gate].T
            if layer > 0:
                matrix = np.concatenate([inputs[gate].T, matrix], axis=0)
                b.const(f"{member}b{layer}{gate}", biases[gate].astype(np.float32))
            q, scale = quantize_columns(matrix)
            b.const(f"{member}w{layer}{gate}_q", q)
            b.const(f"{member}w{layer}{gate}_scale", scale)
    q, scale = quantize_columns(weights["decoder.weight"].T)
    b.const(f"{member}wd_q", q)
    b.const(f"{member}wd_scale", scale)
    b.const(f"{member}bd", weights["decoder.bias"].astype(np.float32))


def _hidden_size(weights: dict[str, np.ndarray]) -> int:
    return int(weights["rnn.weight_hh_l0"].shape[1])


def _shared_constants(b: _Builder, members: int) -> None:
    b.const("act_scale", np.array(1 / 127, np.float32))
    b.const("act_zero", np.array(ACT_ZERO, np.uint8))
    b.const(INT8_WEIGHT_ZERO_NAME, np.array(WEIGHT_ZERO, np.uint8))
    b.const("axis0", np.array([0], np.int64))
    b.const("axis1", np.array([1], np.int64))
    b.const("keep_going", np.array(True))
    b.const("log_members", np.array(np.log(members), np.float32))
    b.const("zero1", np.array([0], np.int64))
    b.const("zero_f", np.array(0.0, np.float32))


def _info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem_type, shape)


def build_int8_lstm(
    members: list[dict[str, np.ndarray]], num_layers: int, hidden: int, vocab_size: int
) -> onnx.ModelProto:
    """The contract graph (tokens, h0, c0) -> (logits, h, c) from CharRNN state_dicts as numpy arrays:
    one network's, or an ensemble's (its members' states stacked along the layer axis)."""
    layers = range(num_layers * len(members))
    outer = _Builder()
    for k, weights in enumerate(members):
        _weights(outer, weights, num_layers, hidden, f"m{k}_")
    _shared_constants(outer, len(members))

    # The Loop body reads the tokens and weights from the outer scope.
    body = _Builder()
    hs, cs, hqs = [f"h_in{i}" for i in layers], [f"c_in{i}" for i in layers], [f"hq_in{i}" for i in layers]
    token = body.op("Gather", ["tokens", "t"], "token", axis=1, name=INT8_READ_TOKEN)
    member_logits, new_h, new_c, new_hq = [], [], [], []
    for k, weights in enumerate(members):
        m, own = f"m{k}_", slice(k * num_layers, (k + 1) * num_layers)
        narrow = _hidden_size(weights) < hidden
        own_cs, own_hqs = cs[own], hqs[own]
        if narrow:
            own_cs, own_hqs = (
                [body.op("Slice", [x, "zero1", f"{m}size", "axis1"], f"{m}{x}") for x in names]
                for names in (own_cs, own_hqs)
            )
        logits, h, c, h_q = _step(body, token, own_cs, own_hqs, m)
        if narrow:  # pad with what a zero state holds: 0.0 floats, and 0 quantized (the zero point)
            h, c = ([body.op("Pad", [x, f"{m}pad", "zero_f"], f"{x}_wide") for x in names] for names in (h, c))
            h_q = [body.op("Pad", [x, f"{m}pad", "act_zero"], f"{x}_wide") for x in h_q]
        member_logits.append(logits)
        new_h += h
        new_c += c
        new_hq += h_q
    logits = _mix(body, member_logits)
    body.op("Identity", ["cond_in"], "cond_out")
    row = ["batch", hidden]
    body_graph = oh.make_graph(
        body.nodes,
        "lstm_step",
        [_info("t", TensorProto.INT64, []), _info("cond_in", TensorProto.BOOL, [])]
        + [_info(n, TensorProto.FLOAT, row) for n in hs + cs]
        + [_info(n, TensorProto.UINT8, row) for n in hqs],
        [_info("cond_out", TensorProto.BOOL, [])]
        + [_info(n, TensorProto.FLOAT, row) for n in new_h + new_c]
        + [_info(n, TensorProto.UINT8, row) for n in new_hq]
        + [_info(logits, TensorProto.FLOAT, ["batch", vocab_size])],
    )

    seq_len_1d = outer.op("Gather", [outer.op("Shape", ["tokens"], "tokens_shape"), "axis1"], "seq_len_1d", axis=0)
    seq_len = outer.op("Squeeze", [seq_len_1d], "seq_len")
    for name in ("h0", "c0"):
        outer.op("Split", [name], [f"{name}_{i}_3d" for i in layers], axis=0)
        for i in layers:
            outer.op("Squeeze", [f"{name}_{i}_3d", "axis0"], f"{name}_{i}")
    start_hq = [outer.quantize(f"h0_{i}", f"hq0_{i}") for i in layers]
    h_last, c_last = [f"h_last{i}" for i in layers], [f"c_last{i}" for i in layers]
    outer.op(
        "Loop",
        [seq_len, "keep_going", *[f"h0_{i}" for i in layers], *[f"c0_{i}" for i in layers], *start_hq],
        [*h_last, *c_last, *[f"hq_last{i}" for i in layers], "logits_tbv"],
        body=body_graph,
        name=INT8_LOOP,
    )
    outer.op("Transpose", ["logits_tbv"], "logits", perm=[1, 0, 2], name=INT8_LOGITS_BATCH_FIRST)
    for name, parts in (("h", h_last), ("c", c_last)):
        outer.op("Concat", [outer.op("Unsqueeze", [p, "axis0"], f"{p}_3d") for p in parts], name, axis=0)

    state = [len(layers), "batch", hidden]
    graph = oh.make_graph(
        outer.nodes,
        "speechbot_int8_lstm",
        [
            _info("tokens", TensorProto.INT64, ["batch", "seq"]),
            _info("h0", TensorProto.FLOAT, state),
            _info("c0", TensorProto.FLOAT, state),
        ],
        [
            _info("logits", TensorProto.FLOAT, ["batch", "seq", vocab_size]),
            _info("h", TensorProto.FLOAT, state),
            _info("c", TensorProto.FLOAT, state),
        ],
        _used(outer.initializers, outer.nodes + body.nodes),
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET), oh.make_opsetid("com.microsoft", 1)])


def int8_matmul_model(weights: np.ndarray) -> onnx.ModelProto:
    """One quantized matmul of the step alone, built as build_int8_lstm builds them: h [batch, in] (floats in
    (-1, 1)) -> QuantizeLinear -> MatMulIntegerToFloat with `weights` [in, out] quantized per column -> y.
    For checking that onnxruntime computes it exactly on the CPU at hand (tests, bench.int8_exactness)."""
    b = _Builder()
    q, scale = quantize_columns(weights)
    b.const("w_q", q)
    b.const("w_scale", scale)
    _shared_constants(b, 1)
    b.int8_matmul(b.quantize("h", "h_q"), "w", "y")
    graph = oh.make_graph(
        b.nodes,
        "int8_matmul",
        [_info("h", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [_info("y", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        _used(b.initializers, b.nodes),
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET), oh.make_opsetid("com.microsoft", 1)])


def _used(initializers: list[onnx.TensorProto], nodes: list[onnx.NodeProto]) -> list[onnx.TensorProto]:
    """The shared constants a graph reads (a single network needs no ensemble or padding constants);
    onnxruntime warns about each unused one whenever it opens the file."""
    read = {name for node in nodes for name in node.input}
    return [tensor for tensor in initializers if tensor.name in read]
