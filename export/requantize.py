"""`python -m export.requantize OLD.onnx NEW.onnx`: an int8 file of the old layout, with its weights unsigned.

Files that export.int8_lstm wrote before its weights became unsigned store each weight matrix as int8
(-127..127, zero point 0), so onnxruntime multiplies uint8 activations by int8 weights (U8S8), which
saturates on x86 CPUs without VNNI (the module docstring of export.int8_lstm says why). This rewrites
such a file without the checkpoint it came from: each int8 weight w becomes the uint8 w + 128 with zero
point 128, the same numbers, so nothing is lost, and every `MatMulIntegerToFloat` reads that zero point.
The rest of the file (graph, float tables, scales, metadata) is kept as it is, and the metadata gain
INT8_WEIGHTS (bot/inference/modelfile.py), which says the file is of the new layout.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from bot.inference.modelfile import INT8_UNSIGNED_WEIGHTS, INT8_WEIGHTS, parse_props
from export.int8_lstm import WEIGHT_ZERO
from export.pipeline import write_atomically
from model.cli import check_input_file, check_output_file, fail

WEIGHT_ZERO_NAME = "weight_zero"  # as export.int8_lstm names it
# MatMulIntegerToFloat's inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias
_B, _B_ZERO = 1, 5


class RequantizeError(ValueError):
    """A file this command cannot convert: not an int8 speechbot file of the old layout."""


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its subgraphs (the int8 matmuls are in a Loop body)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)


def requantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an old-layout int8 model with unsigned weights; a RequantizeError if it is not one."""
    props = {p.key: p.value for p in model.metadata_props}
    info = parse_props(props)
    if info.precision != "int8":
        raise RequantizeError(f"it is a {info.precision} model; only int8 files have weights to convert")
    if props.get(INT8_WEIGHTS) == INT8_UNSIGNED_WEIGHTS:
        raise RequantizeError("its weights are already unsigned (uint8, zero point 128); nothing to do")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    initializers = {t.name: t for t in graph.initializer}
    if any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
        # The exporter writes one self-contained file; weights elsewhere are not its own.
        raise RequantizeError("it keeps weights in another file (external data); export writes one file")
    matmuls = [node for node in _nodes(graph) if node.op_type == "MatMulIntegerToFloat"]
    if not matmuls:
        raise RequantizeError("it has no MatMulIntegerToFloat node, so it is not an export.int8_lstm file")
    weights = set()
    for node in matmuls:
        b = node.input[_B]
        if b not in initializers or initializers[b].data_type != TensorProto.INT8:
            raise RequantizeError(f"matmul {node.name or node.output[0]!r} does not read an int8 weight initializer")
        if len(node.input) > _B_ZERO and node.input[_B_ZERO]:
            raise RequantizeError(f"matmul {node.name or node.output[0]!r} already has a weight zero point")
        weights.add(b)
    readers = [node for node in _nodes(graph) if weights & set(node.input) and node.op_type != "MatMulIntegerToFloat"]
    if readers:
        raise RequantizeError(f"its weights are also read by a {readers[0].op_type} node; not an export.int8_lstm file")
    if WEIGHT_ZERO_NAME in initializers:
        raise RequantizeError(f"it already has a {WEIGHT_ZERO_NAME!r} initializer")
    for name in sorted(weights):
        signed = numpy_helper.to_array(initializers[name]).astype(np.int16)
        initializers[name].CopyFrom(numpy_helper.from_array((signed + WEIGHT_ZERO).astype(np.uint8), name))
    graph.initializer.append(numpy_helper.from_array(np.array(WEIGHT_ZERO, np.uint8), WEIGHT_ZERO_NAME))
    for node in matmuls:
        inputs = list(node.input)
        inputs += [""] * (_B_ZERO + 1 - len(inputs))  # b_zero_point may have been left off the end
        inputs[_B_ZERO] = WEIGHT_ZERO_NAME
        node.input[:] = inputs
    onnx.helper.set_model_props(new, props | {INT8_WEIGHTS: INT8_UNSIGNED_WEIGHTS})
    onnx.checker.check_model(new, full_check=True)
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.requantize",
        description="Convert an int8 model file of the old layout (int8 weights) to unsigned weights "
        "(uint8, zero point 128), the same numbers, exact on every CPU.",
    )
    p.add_argument("model", metavar="OLD.onnx", help="int8 file written before the weights became unsigned")
    p.add_argument("output", metavar="NEW.onnx", help="file to write")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        source = check_input_file(args.model, "model")
        output = check_output_file(args.output, "output", [source])
        try:
            model = onnx.load(str(source), load_external_data=False)
        except DecodeError as exc:
            raise RequantizeError(f"it is not an ONNX file ({exc})") from None
        data = requantize(model).SerializeToString()
        write_atomically(output, data)
    except (ValueError, OSError) as exc:
        fail(f"{args.model}: {exc}")
    print(f"wrote {output} ({len(data) / 1e6:.2f} MB): int8 weights stored as uint8 with zero point {WEIGHT_ZERO}")


if __name__ == "__main__":
    main()
