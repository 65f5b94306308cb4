"""The graph that writes a chunk of characters in one onnxruntime call: sample, step, sample, step...

Built at load time from a model file's contract graph (tokens, state) -> (logits, state), so a file
keeps one contract. Inputs: each row's next-character `logits` [batch, vocab], the recurrent state,
its `temperature` [batch], `top_k` [batch] (0: no limit) and `uniforms` [batch, chunk], one per
character. A Loop runs `chunk` times: draw a token from the logits by inverse-CDF sampling with the
row's own uniform, then step the network on it. Outputs: `tokens` [batch, chunk], the `next_logits`
after the last token, and the new state, so that the next chunk carries on where this one stopped.

Why in the graph: stepping one character per call cost ~60 µs of Python per step (feeds, sampling
in numpy, bookkeeping) on top of a ~55 µs graph for one stream, and Python holds the GIL, so engine
lanes on other cores waited for each other. Each row's sampling reads only its own logits and
uniform, so a seed gives the same text alone or in any batch.

An int8 file (export.int8_lstm) already steps in a Loop, so its Loop body gets the sampler in place
of reading the next token; any other graph (the LSTM/GRU/RNN nodes traced from PyTorch) becomes the
body of a new Loop, stepping a sequence of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from bot.modelfile import INT8_LOGITS_BATCH_FIRST, INT8_LOOP, INT8_READ_TOKEN, state_names

_CONSTANTS = {
    "sampler_axis1": np.array([1], np.int64),
    "sampler_axis2": np.array([2], np.int64),
    "sampler_one": np.array([1], np.int64),
    "sampler_zero": np.array([0], np.int64),
    "sampler_minus_inf": np.array(-np.inf, np.float32),
    "sampler_one_f": np.array(1.0, np.float32),
    "sampler_keep_going": np.array(True),
}


class ChunkGraphError(ValueError):
    """A contract graph this module cannot turn into a chunk graph."""


def _info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem_type, shape)


def _settings_nodes(top_k: bool) -> list[onnx.NodeProto]:
    """Outer-graph nodes: the rows' settings in the shapes the sampler reads at every step."""
    n = oh.make_node
    nodes = [
        n("Unsqueeze", ["temperature", "sampler_axis1"], ["sampler_temperature"]),
        # The sampler's threshold is 1 - u, in (0, 1]: above 0, so a token of probability 0 is never
        # drawn (a threshold of 0 would pick the first token whatever its probability).
        n("Sub", ["sampler_one_f", "uniforms"], ["sampler_from_top"]),
        # [chunk, batch, 1]: step t's uniforms are then one Gather, already a column.
        n("Transpose", ["sampler_from_top"], ["sampler_uniforms_by_step0"], perm=[1, 0]),
        n("Unsqueeze", ["sampler_uniforms_by_step0", "sampler_axis2"], ["sampler_uniforms_by_step"]),
        # The Loop runs once per uniform.
        n("Shape", ["uniforms"], ["sampler_uniforms_shape"]),
        n("Gather", ["sampler_uniforms_shape", "sampler_axis1"], ["sampler_chunk_1d"], axis=0),
        n("Squeeze", ["sampler_chunk_1d"], ["sampler_chunk"]),
    ]
    if top_k:
        nodes += [
            # TopK takes one k for the whole batch: the largest asked for (at least 1).
            n("ReduceMax", ["top_k"], ["sampler_max_k0"], keepdims=1),
            n("Max", ["sampler_max_k0", "sampler_one"], ["sampler_max_k"]),
            n("Sub", ["top_k", "sampler_one"], ["sampler_k_minus_1"]),
            n("Max", ["sampler_k_minus_1", "sampler_zero"], ["sampler_kth_index0"]),
            n("Unsqueeze", ["sampler_kth_index0", "sampler_axis1"], ["sampler_kth_index"]),
            n("Equal", ["top_k", "sampler_zero"], ["sampler_unlimited0"]),
            n("Unsqueeze", ["sampler_unlimited0", "sampler_axis1"], ["sampler_unlimited"]),
        ]
    return nodes


def _sampling_nodes(iteration: str, logits: str, token: str, top_k: bool) -> list[onnx.NodeProto]:
    """Loop-body nodes that draw `token` [batch] from `logits` [batch, vocab]: softmax at the row's
    temperature (cut to its top k), then the first token whose cumulative probability reaches 1 - u,
    u being the row's uniform for the step. Few nodes on purpose: each costs ~1 µs
    per step at batch 1."""
    n = oh.make_node
    nodes = [
        n("Gather", ["sampler_uniforms_by_step", iteration], ["sampler_uniform"], axis=0),
        n("Div", [logits, "sampler_temperature"], ["sampler_scores"]),
    ]
    scores = "sampler_scores"
    if top_k:
        scores = "sampler_kept"
        nodes += [
            n("TopK", ["sampler_scores", "sampler_max_k"], ["sampler_top", "sampler_top_index"], axis=1),
            n("GatherElements", ["sampler_top", "sampler_kth_index"], ["sampler_kth"], axis=1),
            n("Where", ["sampler_unlimited", "sampler_minus_inf", "sampler_kth"], ["sampler_floor"]),
            n("Less", ["sampler_scores", "sampler_floor"], ["sampler_cut"]),
            n("Where", ["sampler_cut", "sampler_minus_inf", "sampler_scores"], [scores]),
        ]
    return [
        *nodes,
        n("Softmax", [scores], ["sampler_probabilities"], axis=1),
        n("CumSum", ["sampler_probabilities", "sampler_axis1"], ["sampler_cdf"]),
        # The first index where the cdf reaches the threshold is where min(cdf, threshold) first peaks.
        # The cdf's total is 1 give or take rounding; a threshold above it peaks where the cdf does,
        # at the last token of nonzero probability.
        n("Min", ["sampler_cdf", "sampler_uniform"], ["sampler_capped"]),
        n("ArgMax", ["sampler_capped"], [token], axis=1, keepdims=0),
    ]


def _outer_inputs(vocab_size: int, state: list[onnx.ValueInfoProto]) -> list[onnx.ValueInfoProto]:
    return [
        _info("logits", TensorProto.FLOAT, ["batch", vocab_size]),
        *state,
        _info("temperature", TensorProto.FLOAT, ["batch"]),
        _info("top_k", TensorProto.INT64, ["batch"]),
        _info("uniforms", TensorProto.FLOAT, ["batch", "chunk"]),
    ]


def _outer_outputs(vocab_size: int, state: list[onnx.ValueInfoProto]) -> list[onnx.ValueInfoProto]:
    return [
        _info("tokens", TensorProto.INT64, ["batch", "chunk"]),
        _info("next_logits", TensorProto.FLOAT, ["batch", vocab_size]),
        *state,
    ]


def _constants() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(value, name) for name, value in _CONSTANTS.items()]


def _int8_node(
    nodes: Sequence[onnx.NodeProto], name: str, fits: Callable[[onnx.NodeProto], bool], what: str
) -> onnx.NodeProto:
    """The node that export.int8_lstm named `name`, or in a file written before it named them (the bundled
    model), the one node that fits; a ChunkGraphError if that is not exactly one node that fits."""
    found = [node for node in nodes if node.name == name] or [node for node in nodes if fits(node)]
    if len(found) != 1 or not fits(found[0]):
        raise ChunkGraphError(f"not an int8 LSTM graph: it has no single {what}")
    return found[0]


def _int8_loop(model: onnx.ModelProto, vocab_size: int, top_k: bool) -> onnx.ModelProto:
    """An export.int8_lstm file: its own Loop, reading the sampler's token instead of the input's."""
    graph = model.graph
    loop = _int8_node(graph.node, INT8_LOOP, lambda node: node.op_type == "Loop", "Loop over the sequence")
    body = next(attr.g for attr in loop.attribute if attr.name == "body")
    read_token = _int8_node(
        body.node,
        INT8_READ_TOKEN,
        lambda node: node.op_type == "Gather" and list(node.input) == ["tokens", body.input[0].name],
        "Gather of the step's token in its Loop body",
    )
    # Body outputs: cond, h*, c*, hq*, then the scanned logits; the logits become carried, the token scanned.
    cond_out, *carried_out, step_logits = body.output
    # The condition goes out as it came in, without the Identity node that copied it (~1 µs a step).
    steps = [node for node in body.node if node is not read_token and list(node.output) != [cond_out.name]]
    new_body = oh.make_graph(
        _sampling_nodes(body.input[0].name, "sampler_logits_in", read_token.output[0], top_k) + steps,
        body.name,
        [*body.input, _info("sampler_logits_in", TensorProto.FLOAT, ["batch", vocab_size])],
        [body.input[1], *carried_out, step_logits, _info(read_token.output[0], TensorProto.INT64, ["batch"])],
    )
    *carried_last, scanned_logits = loop.output
    batch_first = _int8_node(
        graph.node,
        INT8_LOGITS_BATCH_FIRST,
        lambda node: node.op_type == "Transpose" and list(node.input) == [scanned_logits],
        "Transpose of the Loop's logits",
    )
    new_loop = oh.make_node(
        "Loop",
        ["sampler_chunk", *loop.input[1:], "logits"],
        [*carried_last, "next_logits", "sampler_tokens_by_step"],
        body=new_body,
    )
    nodes = []
    for node in graph.node:
        if node is loop:
            nodes.append(new_loop)
        elif node is batch_first:
            nodes.append(oh.make_node("Transpose", ["sampler_tokens_by_step"], ["tokens"], perm=[1, 0]))
        else:
            nodes.append(node)
    state = [v for v in graph.input if v.name != "tokens"]
    outputs = [v for v in graph.output if v.name != "logits"]
    outer_outputs = _outer_outputs(vocab_size, outputs)
    new_graph = oh.make_graph(
        _settings_nodes(top_k) + _needed(nodes, [v.name for v in outer_outputs]),
        "speechbot_chunk",
        _outer_inputs(vocab_size, state),
        outer_outputs,
        [*graph.initializer, *_constants()],
    )
    return oh.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _needed(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes that the outputs depend on (the contract's sequence length from its tokens is not)."""
    wanted, kept = set(outputs), []
    for node in reversed(nodes):
        if wanted & set(node.output):
            kept.append(node)
            wanted |= set(node.input)
            for attr in node.attribute:  # a Loop body reads outer values too
                if attr.type == onnx.AttributeProto.GRAPH:
                    wanted |= {x for inner in attr.g.node for x in inner.input}
    return kept[::-1]


def _wrapped(model: onnx.ModelProto, vocab_size: int, is_lstm: bool, top_k: bool) -> onnx.ModelProto:
    """Any other contract graph as the body of a new Loop that steps it on one character at a time."""
    graph = model.graph
    state_in, state_out = state_names(is_lstm)
    # The body must not reuse the outer graph's names: the contract's interface gets its own.
    renamed = {name: f"body_{name}" for name in ["tokens", "logits", *state_in, *state_out]}
    contract_nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(x, x) for x in node.input]
        copy.output[:] = [renamed.get(x, x) for x in node.output]
        contract_nodes.append(copy)
    state_type = {v.name: v for v in graph.input}
    body_state_in = [_info(renamed[name], TensorProto.FLOAT, ["layers", "batch", "hidden"]) for name in state_in]
    body_state_out = [_info(renamed[name], TensorProto.FLOAT, ["layers", "batch", "hidden"]) for name in state_out]
    body = oh.make_graph(
        [
            *_sampling_nodes("sampler_t", "sampler_logits_in", "sampler_token", top_k),
            oh.make_node("Unsqueeze", ["sampler_token", "sampler_axis1"], ["body_tokens"]),
            *contract_nodes,
            oh.make_node("Squeeze", ["body_logits", "sampler_axis1"], ["sampler_logits_out"]),
        ],
        "speechbot_chunk_step",
        [
            _info("sampler_t", TensorProto.INT64, []),
            _info("sampler_cond_in", TensorProto.BOOL, []),
            _info("sampler_logits_in", TensorProto.FLOAT, ["batch", vocab_size]),
            *body_state_in,
        ],
        [
            _info("sampler_cond_in", TensorProto.BOOL, []),  # passed straight on
            _info("sampler_logits_out", TensorProto.FLOAT, ["batch", vocab_size]),
            *body_state_out,
            _info("sampler_token", TensorProto.INT64, ["batch"]),
        ],
    )
    loop = oh.make_node(
        "Loop",
        ["sampler_chunk", "sampler_keep_going", "logits", *state_in],
        ["next_logits", *state_out, "sampler_tokens_by_step"],
        body=body,
    )
    transpose = oh.make_node("Transpose", ["sampler_tokens_by_step"], ["tokens"], perm=[1, 0])
    new_graph = oh.make_graph(
        [*_settings_nodes(top_k), loop, transpose],
        "speechbot_chunk",
        _outer_inputs(vocab_size, [state_type[name] for name in state_in]),
        _outer_outputs(vocab_size, [v for v in graph.output if v.name != "logits"]),
        [*graph.initializer, *_constants()],
    )
    return oh.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def chunk_graph(model: onnx.ModelProto, vocab_size: int, is_lstm: bool, top_k: bool) -> onnx.ModelProto:
    """The chunk graph of a speechbot contract graph (see the module docstring). With top_k False it
    ignores the `top_k` input and samples from the whole vocabulary, with five nodes fewer per step."""
    if any(node.op_type == "Loop" for node in model.graph.node):
        return _int8_loop(model, vocab_size, top_k)
    return _wrapped(model, vocab_size, is_lstm, top_k)
