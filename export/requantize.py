"""`python -m export.requantize OLD.onnx NEW.onnx`: an int8 file of the old layout, with its weights unsigned.

Files that export.int8_lstm wrote before its weights became unsigned store each weight matrix as int8
(-127..127, zero point 0). The bot serves either layout in the one the CPU multiplies exactly and
fastest, converting in memory (bot/inference/int8_weights.py), so a converted file is needed only where
the file itself should say uint8 (a tool of one's own that opens it with onnxruntime on a CPU without
VNNI). This writes one without the checkpoint it came from: each int8 weight w becomes the uint8 w + 128
with zero point 128, the same numbers, so nothing is lost (bot.inference.int8_weights.to_layout). The rest
of the file (graph, float tables, scales, metadata) is kept as it is, and the metadata gain INT8_WEIGHTS
(bot/inference/modelfile.py), which says the file is of the new layout.
"""

from __future__ import annotations

import argparse

import onnx
from google.protobuf.message import DecodeError

from bot.inference.int8_weights import UINT8, Int8WeightsError, to_layout
from bot.inference.modelfile import parse_props
from export.int8_lstm import WEIGHT_ZERO
from export.pipeline import write_atomically
from model.cli import check_input_file, check_output_file, fail


class RequantizeError(ValueError):
    """A file this command cannot convert: not an int8 speechbot file of the old layout."""


def requantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an old-layout int8 model with unsigned weights; a RequantizeError if it is not one."""
    info = parse_props({p.key: p.value for p in model.metadata_props})
    if info.precision != "int8":
        raise RequantizeError(f"it is a {info.precision} model; only int8 files have weights to convert")
    try:
        new = to_layout(model, UINT8)
    except Int8WeightsError as exc:
        raise RequantizeError(str(exc)) from None
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
