"""The int8 graph's weight layout: which one this CPU multiplies exactly and fastest, and the lossless
conversion between the two. Torch-free (onnx graph surgery).

export.int8_lstm's matmuls (com.microsoft `MatMulIntegerToFloat`) multiply uint8 activations (zero point
128) by weights quantized to -127..127 per output column. A file stores those weights in one of two
layouts, which hold the same numbers:

- "int8": int8 weights, no zero point, so onnxruntime runs U8S8 kernels. On x86 CPUs with AVX512-VNNI,
  AVX-VNNI or AMX they multiply with VPDPBUSD or TDPBUSD, which add the products in int32: exact, and
  onnxruntime's fastest integer kernels there. Without VNNI (AVX2, or AVX512 without VNNI) its kernels
  multiply with VPMADDUBSW, which adds two uint8 × int8 products into an int16 that saturates
  (255 · 127 · 2 > 32767): several percent off the largest output (docs/export.md).
- "uint8": each weight plus 128 as uint8 with zero point 128, so onnxruntime runs U8U8 kernels, which
  subtract the zero point and multiply int16 pairs into int32: exact on every CPU, slower than U8S8 where
  both are exact, and onnxruntime 1.32 has no AVX512-VNNI or AMX kernel for them (docs/speed.md).

The runner (bot.inference.runner) serves each CPU the layout it multiplies exactly at its best speed
(choose_layout from the CPU's flags), converting the file's graph in memory when it stores the other one
(to_layout). Both layouts being exact where they are chosen, a seed writes the same text on every CPU.
`python -m export.requantize` writes a converted file with the same function.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bot.inference.api import INT8_WEIGHT_CHOICES
from bot.inference.modelfile import INT8_UNSIGNED_WEIGHTS, INT8_WEIGHT_ZERO, INT8_WEIGHT_ZERO_NAME, INT8_WEIGHTS

log = logging.getLogger(__name__)

INT8, UINT8 = "int8", "uint8"
# What each layout is called in logs and messages: the weights' type and onnxruntime's kernel family.
DESCRIPTIONS = {INT8: "int8 weights (U8S8)", UINT8: "uint8 weights with zero point 128 (U8U8)"}
# The instructions with which onnxruntime's U8S8 kernels add the products in int32, each with the /proc/cpuinfo
# flags its kernel needs (onnxruntime's MLAS platform.cpp picks AVX512-VNNI only with AVX512 F/BW/DQ/VL).
VNNI_FLAGS = {
    "avx512_vnni": frozenset({"avx512_vnni", "avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "avx_vnni": frozenset({"avx_vnni", "avx2"}),
    "amx_int8": frozenset({"amx_int8", "amx_tile"}),
}
CPUINFO = Path("/proc/cpuinfo")
# MatMulIntegerToFloat's inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias.
_B, _B_ZERO = 1, 5
_WEIGHT_TYPES = {INT8: TensorProto.INT8, UINT8: TensorProto.UINT8}


class Int8WeightsError(ValueError):
    """A graph whose weights cannot be converted (not export.int8_lstm's), or a layout that does not exist."""


@dataclass(frozen=True)
class LayoutChoice:
    """The layout to serve, and why (for the log)."""

    layout: str
    reason: str


def choose_layout(flags: frozenset[str] | None) -> LayoutChoice:
    """The layout whose matmuls are exact and fastest on a CPU with these /proc/cpuinfo flags (None:
    unknown, as on other systems than Linux or other CPUs than x86): int8 where U8S8 runs on VNNI or AMX,
    else uint8, which is exact on every CPU."""
    if flags is None:
        return LayoutChoice(UINT8, "this CPU's instruction sets are unknown here, and uint8 weights are exact on any")
    for name, needed in VNNI_FLAGS.items():
        if needed <= flags:
            return LayoutChoice(INT8, f"this CPU has {name}, on which int8 weights are exact and fastest")
    return LayoutChoice(
        UINT8, f"this CPU has none of {', '.join(VNNI_FLAGS)}, without which int8 weights' matmuls saturate"
    )


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags from Linux's /proc/cpuinfo (its first `flags` line, x86 only), or None where
    there is none to read."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with cpuinfo.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


@functools.cache
def serving_layout(asked: str) -> str:
    """The layout to serve int8 files in: `asked` ("int8" or "uint8"), or "auto": choose_layout for this CPU.
    Logged once per process (every lane's runner asks)."""
    if asked not in INT8_WEIGHT_CHOICES:
        raise Int8WeightsError(f"int8 weights must be one of {', '.join(INT8_WEIGHT_CHOICES)}, not {asked!r}")
    choice = choose_layout(cpu_flags())
    if asked == "auto":
        log.info("int8 models run with %s: %s", DESCRIPTIONS[choice.layout], choice.reason)
        return choice.layout
    # The operator's choice wins; the log says what the automatic choice would have been, and why.
    level = logging.WARNING if (asked, choice.layout) == (INT8, UINT8) else logging.INFO
    log.log(
        level,
        "int8 models run with %s, as asked; auto would choose %s: %s",
        DESCRIPTIONS[asked],
        choice.layout,
        choice.reason,
    )
    return asked


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its subgraphs (the int8 matmuls are in a Loop body)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _weights_of(graph: onnx.GraphProto, layout: str) -> tuple[list[onnx.NodeProto], set[str]]:
    """The int8 matmuls and the names of their weight initializers, all of `layout`, read by nothing else;
    an Int8WeightsError naming the first thing that is not as export.int8_lstm writes it."""
    if any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
        # The exporter writes one self-contained file; weights elsewhere are not its own.
        raise Int8WeightsError("it keeps weights in another file (external data); export writes one file")
    initializers = {t.name: t for t in graph.initializer}
    matmuls = [node for node in _nodes(graph) if node.op_type == "MatMulIntegerToFloat"]
    if not matmuls:
        raise Int8WeightsError("it has no MatMulIntegerToFloat node, so it is not an export.int8_lstm file")
    weights = set()
    for node in matmuls:
        name = node.name or node.output[0]
        weight = initializers.get(node.input[_B])
        if weight is None or weight.data_type not in _WEIGHT_TYPES.values():
            raise Int8WeightsError(f"matmul {name!r} does not read an int8 or uint8 weight initializer")
        if weight.data_type != _WEIGHT_TYPES[layout]:
            raise Int8WeightsError(f"matmul {name!r} reads {_layout_of(weight)} weights, the others {layout}")
        zero = node.input[_B_ZERO] if len(node.input) > _B_ZERO else ""
        if layout == INT8 and zero:
            raise Int8WeightsError(f"matmul {name!r} has int8 weights and a weight zero point")
        if layout == UINT8 and zero != INT8_WEIGHT_ZERO_NAME:
            raise Int8WeightsError(f"matmul {name!r} does not read the weight zero point {INT8_WEIGHT_ZERO_NAME!r}")
        weights.add(node.input[_B])
    readers = [node for node in _nodes(graph) if weights & set(node.input) and node.op_type != "MatMulIntegerToFloat"]
    if readers:
        raise Int8WeightsError(
            f"its weights are also read by a {readers[0].op_type} node; not an export.int8_lstm file"
        )
    return matmuls, weights


def _layout_of(weight: onnx.TensorProto) -> str:
    return INT8 if weight.data_type == TensorProto.INT8 else UINT8


def stored_layout(model: onnx.ModelProto) -> str:
    """The layout of the int8 graph's weights as the graph holds them (whatever its metadata say)."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in _nodes(model.graph):
        if node.op_type == "MatMulIntegerToFloat" and node.input[_B] in initializers:
            return _layout_of(initializers[node.input[_B]])
    raise Int8WeightsError("it has no MatMulIntegerToFloat node reading a weight initializer")


def to_layout(model: onnx.ModelProto, layout: str) -> onnx.ModelProto:
    """A copy of an int8 graph with its weights in `layout`: the same numbers, so the matmuls' exact results
    are the same (int8 w <-> uint8 w + 128 with zero point INT8_WEIGHT_ZERO), and its metadata saying so.
    Everything else is kept as it is. An Int8WeightsError if the graph already has that layout or is not
    export.int8_lstm's."""
    if layout not in _WEIGHT_TYPES:
        raise Int8WeightsError(f"the layout must be {INT8} or {UINT8}, not {layout!r}")
    source = UINT8 if layout == INT8 else INT8
    if stored_layout(model) == layout:
        already = "unsigned (uint8, zero point 128)" if layout == UINT8 else "int8 (no zero point)"
        raise Int8WeightsError(f"its weights are already {already}; nothing to do")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    matmuls, weights = _weights_of(graph, source)
    initializers = {t.name: t for t in graph.initializer}
    shift = INT8_WEIGHT_ZERO if layout == UINT8 else -INT8_WEIGHT_ZERO
    for name in sorted(weights):
        values = numpy_helper.to_array(initializers[name]).astype(np.int16) + shift
        initializers[name].CopyFrom(numpy_helper.from_array(values.astype(np.dtype(layout)), name))
    if layout == UINT8:
        if INT8_WEIGHT_ZERO_NAME in initializers:
            raise Int8WeightsError(f"it already has a {INT8_WEIGHT_ZERO_NAME!r} initializer")
        graph.initializer.append(numpy_helper.from_array(np.array(INT8_WEIGHT_ZERO, np.uint8), INT8_WEIGHT_ZERO_NAME))
    else:
        zero = (
            numpy_helper.to_array(initializers[INT8_WEIGHT_ZERO_NAME])
            if INT8_WEIGHT_ZERO_NAME in initializers
            else None
        )
        if zero is None or zero.shape != () or int(zero) != INT8_WEIGHT_ZERO:
            raise Int8WeightsError(f"its weight zero point is not the scalar {INT8_WEIGHT_ZERO}")
    for node in matmuls:
        inputs = list(node.input)
        inputs += [""] * (_B_ZERO + 1 - len(inputs))  # b_zero_point may have been left off the end
        # An int8 file keeps the empty slot, as export.int8_lstm wrote such files.
        inputs[_B_ZERO] = INT8_WEIGHT_ZERO_NAME if layout == UINT8 else ""
        node.input[:] = inputs
    if layout == INT8 and not any(INT8_WEIGHT_ZERO_NAME in node.input for node in _nodes(graph)):
        kept = [t for t in graph.initializer if t.name != INT8_WEIGHT_ZERO_NAME]  # onnxruntime warns of unused ones
        del graph.initializer[:]
        graph.initializer.extend(kept)
    props = {p.key: p.value for p in model.metadata_props}
    props.pop(INT8_WEIGHTS, None)
    onnx.helper.set_model_props(new, props | ({INT8_WEIGHTS: INT8_UNSIGNED_WEIGHTS} if layout == UINT8 else {}))
    return new
