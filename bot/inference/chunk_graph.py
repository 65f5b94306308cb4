"""The graph that writes a chunk of characters in one onnxruntime call: sample, step, sample, step...

Built at load time from a model file's contract graph (tokens, state) -> (logits, state), so a file
keeps one contract. Inputs: each row's next-character `logits` [batch, vocab], the recurrent state,
its `temperature` [batch], the settings of the sampler's optional steps (FEATURES: `top_k`, `top_p`,
`min_p`, and for the repetition penalty `repetition_penalty`, `repeat_ngram` and the loop-carried
`history` and `matches` [batch, window]) and `uniforms` [batch, chunk], one per character. A Loop
runs `chunk` times: draw a token from the logits as model.sampling specifies, by inverse-CDF sampling
with the row's own uniform, then step the network on it. Outputs: `tokens` [batch, chunk], the
`next_logits` after the last token, the new state (and `next_history`, `next_matches`), so that the
next chunk carries on where this one stopped. A row whose optional setting is off (top_k 0, top_p 1,
min_p 0, penalty 0) draws exactly as in a graph without that step, so a batch can use the graph that
its rows need together (docs/engine.md).

Why in the graph: stepping one character per call cost ~60 µs of Python per step (feeds, sampling
in numpy, bookkeeping) on top of a ~55 µs graph for one stream, and Python holds the GIL, so engine
lanes on other cores waited for each other. Each row's sampling reads only its own logits and
uniform, so a seed gives the same text alone or in any batch.

An int8 file (export.int8_lstm) already steps in a Loop, so its Loop body gets the sampler in place
of reading the next token; any other graph (the LSTM/GRU/RNN nodes traced from PyTorch) becomes the
body of a new Loop, stepping a sequence of one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from bot.inference.modelfile import INT8_LOGITS_BATCH_FIRST, INT8_LOOP, INT8_READ_TOKEN, state_names
from model.sampling import REPEAT_NGRAM_MAX

_CONSTANTS = {
    "sampler_axis1": np.array([1], np.int64),
    "sampler_axis2": np.array([2], np.int64),
    "sampler_one": np.array([1], np.int64),
    "sampler_zero": np.array([0], np.int64),
    "sampler_minus_inf": np.array(-np.inf, np.float32),
    "sampler_plus_inf": np.array(np.inf, np.float32),
    "sampler_one_f": np.array(1.0, np.float32),
    "sampler_keep_going": np.array(True),
    "sampler_int_max": np.array([np.iinfo(np.int64).max], np.int64),
    "sampler_minus_one": np.array([-1], np.int64),
    "sampler_zero_i": np.array(0, np.int32),
    "sampler_one_i": np.array(1, np.int32),
    "sampler_match_cap": np.array(REPEAT_NGRAM_MAX - 1, np.int32),
}
# The sampler's optional steps (model.sampling says what they do). A graph without a feature has neither
# its nodes nor its inputs, so plain sampling costs nothing for them.
FEATURES = ("top_k", "top_p", "min_p", "repetition")


@dataclass(frozen=True)
class SamplerInput:
    """One per-row setting the chunk graph takes as an input [batch]: named as the SamplingParams field it
    carries, of `dtype`, needed by `feature` (None: always), which a batch needs when `is_on` says some row
    uses it."""

    name: str
    dtype: type[np.generic]
    feature: str | None = None
    is_on: Callable[[np.ndarray], bool] | None = None


# The one table of the sampler's settings: the engine builds its rows from it, the runner picks the graph's
# features by it, and the graph declares its inputs from it.
SAMPLER_INPUTS = (
    SamplerInput("temperature", np.float32),
    SamplerInput("top_k", np.int64, "top_k", lambda k: bool(k.any())),
    SamplerInput("top_p", np.float32, "top_p", lambda p: bool((p < 1).any())),
    SamplerInput("min_p", np.float32, "min_p", lambda p: bool((p > 0).any())),
    SamplerInput("repetition_penalty", np.float32, "repetition", lambda penalty: bool((penalty > 0).any())),
    SamplerInput("repeat_ngram", np.int64, "repetition"),
)


def features_used(rows: Mapping[str, np.ndarray]) -> frozenset[str]:
    """The optional steps a batch needs: those whose switching input some row turns on."""
    return frozenset(
        i.feature for i in SAMPLER_INPUTS if i.is_on is not None and i.name in rows and i.is_on(rows[i.name])
    )


class ChunkGraphError(ValueError):
    """A contract graph this module cannot turn into a chunk graph."""


def _info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem_type, shape)


def _settings_nodes(features: frozenset[str], vocab_size: int) -> list[onnx.NodeProto]:
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
    if "top_k" in features:
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
    if "min_p" in features:
        # log(0) = -inf: a row with min_p 0 keeps everything, exactly.
        nodes += [
            n("Log", ["min_p"], ["sampler_log_min_p0"]),
            n("Unsqueeze", ["sampler_log_min_p0", "sampler_axis1"], ["sampler_log_min_p"]),
        ]
    if "top_p" in features:
        nodes += [
            n("Unsqueeze", ["top_p", "sampler_axis1"], ["sampler_top_p"]),
            # Rows with top_p 1 skip the cut, so rounding in the cumulative sum cannot drop a character.
            n("GreaterOrEqual", ["sampler_top_p", "sampler_one_f"], ["sampler_whole"]),
            n("Shape", ["logits"], ["sampler_logits_shape"]),
            n("Gather", ["sampler_logits_shape", "sampler_axis1"], ["sampler_vocab"], axis=0),
        ]
    if "repetition" in features:
        nodes += [
            n("Unsqueeze", ["repetition_penalty", "sampler_axis1"], ["sampler_penalty"]),
            n("Sub", ["repeat_ngram", "sampler_one"], ["sampler_needed0"]),
            n("Unsqueeze", ["sampler_needed0", "sampler_axis1"], ["sampler_needed1"]),
            # History and match lengths are int32: half the memory traffic of int64 per step.
            n("Cast", ["sampler_needed1"], ["sampler_needed"], to=TensorProto.INT32),
            # Scratch shapes: [batch, vocab + 1] flags (the last column takes the pad) and [batch, window - 1].
            n("Shape", ["history"], ["sampler_history_shape"]),
            n("Slice", ["sampler_history_shape", "sampler_zero", "sampler_one"], ["sampler_batch"]),
            n("Concat", ["sampler_batch", "sampler_vocab_plus_one"], ["sampler_flags_shape"], axis=0),
            n("ConstantOfShape", ["sampler_flags_shape"], ["sampler_no_flags"], value=_float(0.0)),
            n("Sub", ["sampler_history_shape", "sampler_last_axis_one"], ["sampler_following_shape"]),
            n("ConstantOfShape", ["sampler_following_shape"], ["sampler_ones_following"], value=_float(1.0)),
            n("Concat", ["sampler_batch", "sampler_one"], ["sampler_column_shape"], axis=0),
            n("ConstantOfShape", ["sampler_column_shape"], ["sampler_zero_column"], value=_int32(0)),
        ]
    return nodes


def _float(value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], np.float32))


def _int32(value: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], np.int32))


def _sampling_nodes(
    iteration: str, logits: str, token: str, features: frozenset[str], history: tuple[str, str] = ("", "")
) -> list[onnx.NodeProto]:
    """Loop-body nodes that draw `token` [batch] from `logits` [batch, vocab]: model.sampling's steps
    (repetition penalty, top-k, min-p, top-p, temperature), then the first token whose cumulative
    probability reaches 1 - u, u being the row's uniform for the step. With repetition, `history` names
    the body's carried history and match lengths; they come out as history_out and matches_out.
    Few nodes on purpose: each costs ~1 µs per step at batch 1."""
    n = oh.make_node
    nodes = [n("Gather", ["sampler_uniforms_by_step", iteration], ["sampler_uniform"], axis=0)]
    scores = logits
    if "repetition" in features:
        history_in, matches_in = history
        nodes += [
            n("Slice", [history_in, "sampler_one", "sampler_int_max", "sampler_axis1"], ["sampler_following"]),
            n("Slice", [matches_in, "sampler_zero", "sampler_minus_one", "sampler_axis1"], ["sampler_matched"]),
            # The character after a place whose text shares repeat_ngram - 1 characters with the end repeats.
            n("GreaterOrEqual", ["sampler_matched", "sampler_needed"], ["sampler_hit"]),
            n("Where", ["sampler_hit", "sampler_following", "sampler_vocab_i"], ["sampler_repeating"]),
            # Duplicate indices all write 1, so their order cannot matter.
            n(
                "ScatterElements",
                ["sampler_no_flags", "sampler_repeating", "sampler_ones_following"],
                ["sampler_flags"],
                axis=1,
            ),
            n("Slice", ["sampler_flags", "sampler_zero", "sampler_vocab_1d", "sampler_axis1"], ["sampler_repeated"]),
            n("Mul", ["sampler_repeated", "sampler_penalty"], ["sampler_penalties"]),
            n("Sub", [scores, "sampler_penalties"], ["sampler_penalised"]),
        ]
        scores = "sampler_penalised"
    if "top_k" in features:
        nodes += [
            n("TopK", [scores, "sampler_max_k"], ["sampler_top", "sampler_top_index"], axis=1),
            n("GatherElements", ["sampler_top", "sampler_kth_index"], ["sampler_kth"], axis=1),
            n("Where", ["sampler_unlimited", "sampler_minus_inf", "sampler_kth"], ["sampler_floor"]),
            n("Less", [scores, "sampler_floor"], ["sampler_cut"]),
            n("Where", ["sampler_cut", "sampler_minus_inf", scores], ["sampler_kept"]),
        ]
        scores = "sampler_kept"
    if "min_p" in features:
        # p >= min_p * p_max  <=>  score >= max score + log(min_p)
        nodes += [
            n("ReduceMax", [scores], ["sampler_best"], axes=[1], keepdims=1),
            n("Add", ["sampler_best", "sampler_log_min_p"], ["sampler_min_p_floor"]),
            n("Less", [scores, "sampler_min_p_floor"], ["sampler_below_min_p"]),
            n("Where", ["sampler_below_min_p", "sampler_minus_inf", scores], ["sampler_min_p_kept"]),
        ]
        scores = "sampler_min_p_kept"
    if "top_p" in features:
        nodes += [
            n("TopK", [scores, "sampler_vocab"], ["sampler_sorted", "sampler_sorted_index"], axis=1),
            n("Softmax", ["sampler_sorted"], ["sampler_sorted_p"], axis=1),
            n("CumSum", ["sampler_sorted_p", "sampler_axis1"], ["sampler_sorted_cdf"]),
            n("Sub", ["sampler_sorted_cdf", "sampler_sorted_p"], ["sampler_likelier"]),
            # The likeliest character always stays: the mass before it is 0 < top_p.
            n("Less", ["sampler_likelier", "sampler_top_p"], ["sampler_in_nucleus"]),
            n("Where", ["sampler_in_nucleus", "sampler_sorted", "sampler_plus_inf"], ["sampler_nucleus"]),
            n("ReduceMin", ["sampler_nucleus"], ["sampler_nucleus_floor0"], axes=[1], keepdims=1),
            n("Where", ["sampler_whole", "sampler_minus_inf", "sampler_nucleus_floor0"], ["sampler_nucleus_floor"]),
            n("Less", [scores, "sampler_nucleus_floor"], ["sampler_outside"]),
            n("Where", ["sampler_outside", "sampler_minus_inf", scores], ["sampler_top_p_kept"]),
        ]
        scores = "sampler_top_p_kept"
    nodes += [
        n("Div", [scores, "sampler_temperature"], ["sampler_scores"]),
        n("Softmax", ["sampler_scores"], ["sampler_probabilities"], axis=1),
        n("CumSum", ["sampler_probabilities", "sampler_axis1"], ["sampler_cdf"]),
        # The first index where the cdf reaches the threshold is where min(cdf, threshold) first peaks.
        # The cdf's total is 1 give or take rounding; a threshold above it peaks where the cdf does,
        # at the last token of nonzero probability.
        n("Min", ["sampler_cdf", "sampler_uniform"], ["sampler_capped"]),
        n("ArgMax", ["sampler_capped"], [token], axis=1, keepdims=0),
    ]
    if "repetition" in features:
        # model.sampling.repetition_step
        nodes += [
            n("Unsqueeze", [token, "sampler_axis1"], ["sampler_token_column64"]),
            n("Cast", ["sampler_token_column64"], ["sampler_token_column"], to=TensorProto.INT32),
            n("Equal", ["sampler_following", "sampler_token_column"], ["sampler_same"]),
            n("Add", ["sampler_matched", "sampler_one_i"], ["sampler_grown0"]),
            n("Min", ["sampler_grown0", "sampler_match_cap"], ["sampler_grown"]),
            n("Where", ["sampler_same", "sampler_grown", "sampler_zero_i"], ["sampler_matches_head"]),
            n("Concat", ["sampler_matches_head", "sampler_zero_column"], ["matches_out"], axis=1),
            n("Concat", ["sampler_following", "sampler_token_column"], ["history_out"], axis=1),
        ]
    return nodes


def _vocab_constants(vocab_size: int) -> dict[str, np.ndarray]:
    return {
        "sampler_vocab_i": np.array(vocab_size, np.int32),
        "sampler_vocab_1d": np.array([vocab_size], np.int64),
        "sampler_vocab_plus_one": np.array([vocab_size + 1], np.int64),
        "sampler_last_axis_one": np.array([0, 1], np.int64),
    }


_HISTORY_IN = ("history_in", "matches_in")


def _outer_history(features: frozenset[str], history: str, matches: str) -> list[str]:
    return [history, matches] if "repetition" in features else []


def _carried(features: frozenset[str]) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The Loop body's extra carried inputs and outputs: the repetition history, when it is used."""
    if "repetition" not in features:
        return [], []
    shape = ["batch", "window"]
    return (
        [_info("history_in", TensorProto.INT32, shape), _info("matches_in", TensorProto.INT32, shape)],
        [_info("history_out", TensorProto.INT32, shape), _info("matches_out", TensorProto.INT32, shape)],
    )


def _outer_inputs(
    vocab_size: int, state: list[onnx.ValueInfoProto], features: frozenset[str]
) -> list[onnx.ValueInfoProto]:
    settings = [
        _info(i.name, oh.np_dtype_to_tensor_dtype(np.dtype(i.dtype)), ["batch"])
        for i in SAMPLER_INPUTS
        if i.feature is None or i.feature in features
    ]
    return [
        _info("logits", TensorProto.FLOAT, ["batch", vocab_size]),
        *state,
        *settings,
        *(
            [
                _info("history", TensorProto.INT32, ["batch", "window"]),
                _info("matches", TensorProto.INT32, ["batch", "window"]),
            ]
            if "repetition" in features
            else []
        ),
        _info("uniforms", TensorProto.FLOAT, ["batch", "chunk"]),
    ]


def _outer_outputs(
    vocab_size: int, state: list[onnx.ValueInfoProto], features: frozenset[str]
) -> list[onnx.ValueInfoProto]:
    history = [
        _info("next_history", TensorProto.INT32, ["batch", "window"]),
        _info("next_matches", TensorProto.INT32, ["batch", "window"]),
    ]
    return [
        _info("tokens", TensorProto.INT64, ["batch", "chunk"]),
        _info("next_logits", TensorProto.FLOAT, ["batch", vocab_size]),
        *state,
        *(history if "repetition" in features else []),
    ]


def _constants(vocab_size: int) -> list[onnx.TensorProto]:
    values = _CONSTANTS | _vocab_constants(vocab_size)
    return [numpy_helper.from_array(value, name) for name, value in values.items()]


def _int8_node(
    nodes: Sequence[onnx.NodeProto], name: str, fits: Callable[[onnx.NodeProto], bool], what: str
) -> onnx.NodeProto:
    """The node that export.int8_lstm named `name`, or in a file written before it named them (the bundled
    model), the one node that fits; a ChunkGraphError if that is not exactly one node that fits."""
    found = [node for node in nodes if node.name == name] or [node for node in nodes if fits(node)]
    if len(found) != 1 or not fits(found[0]):
        raise ChunkGraphError(f"not an int8 LSTM graph: it has no single {what}")
    return found[0]


def _int8_loop(model: onnx.ModelProto, vocab_size: int, features: frozenset[str]) -> onnx.ModelProto:
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
    history_in, history_out = _carried(features)
    sampler = _sampling_nodes(body.input[0].name, "sampler_logits_in", read_token.output[0], features, _HISTORY_IN)
    new_body = oh.make_graph(
        sampler + steps,
        body.name,
        [*body.input, _info("sampler_logits_in", TensorProto.FLOAT, ["batch", vocab_size]), *history_in],
        [
            body.input[1],
            *carried_out,
            step_logits,
            *history_out,
            _info(read_token.output[0], TensorProto.INT64, ["batch"]),
        ],
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
        ["sampler_chunk", *loop.input[1:], "logits", *_outer_history(features, "history", "matches")],
        [
            *carried_last,
            "next_logits",
            *_outer_history(features, "next_history", "next_matches"),
            "sampler_tokens_by_step",
        ],
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
    outer_outputs = _outer_outputs(vocab_size, outputs, features)
    new_graph = oh.make_graph(
        _settings_nodes(features, vocab_size) + _needed(nodes, [v.name for v in outer_outputs]),
        "speechbot_chunk",
        _outer_inputs(vocab_size, state, features),
        outer_outputs,
        [*graph.initializer, *_constants(vocab_size)],
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


def _wrapped(model: onnx.ModelProto, vocab_size: int, is_lstm: bool, features: frozenset[str]) -> onnx.ModelProto:
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
    history_in, history_out = _carried(features)
    body = oh.make_graph(
        [
            *_sampling_nodes("sampler_t", "sampler_logits_in", "sampler_token", features, _HISTORY_IN),
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
            *history_in,
        ],
        [
            _info("sampler_cond_in", TensorProto.BOOL, []),  # passed straight on
            _info("sampler_logits_out", TensorProto.FLOAT, ["batch", vocab_size]),
            *body_state_out,
            *history_out,
            _info("sampler_token", TensorProto.INT64, ["batch"]),
        ],
    )
    loop = oh.make_node(
        "Loop",
        ["sampler_chunk", "sampler_keep_going", "logits", *state_in, *_outer_history(features, "history", "matches")],
        [
            "next_logits",
            *state_out,
            *_outer_history(features, "next_history", "next_matches"),
            "sampler_tokens_by_step",
        ],
        body=body,
    )
    transpose = oh.make_node("Transpose", ["sampler_tokens_by_step"], ["tokens"], perm=[1, 0])
    new_graph = oh.make_graph(
        [*_settings_nodes(features, vocab_size), loop, transpose],
        "speechbot_chunk",
        _outer_inputs(vocab_size, [state_type[name] for name in state_in], features),
        _outer_outputs(vocab_size, [v for v in graph.output if v.name != "logits"], features),
        [*graph.initializer, *_constants(vocab_size)],
    )
    return oh.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def chunk_graph(
    model: onnx.ModelProto, vocab_size: int, is_lstm: bool, features: frozenset[str] = frozenset()
) -> onnx.ModelProto:
    """The chunk graph of a speechbot contract graph (see the module docstring), with the sampler's
    optional steps named in `features` (FEATURES) and their inputs; without any, plain sampling at
    each row's temperature."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown sampler features {sorted(unknown)}; choose from {', '.join(FEATURES)}")
    if any(node.op_type == "Loop" for node in model.graph.node):
        return _int8_loop(model, vocab_size, frozenset(features))
    return _wrapped(model, vocab_size, is_lstm, frozenset(features))
