"""What a model file may be and hold, checked before onnxruntime sees it (docs/export.md, "The model file's contract").

A model file reads nothing but itself. ONNX lets a tensor keep its data in another file (`data_location`
EXTERNAL, `location`); onnxruntime, given a model as bytes, resolves a relative location against the
process's working directory, so a crafted file could load the bot's `.env` as a decoder bias and leak
it through the text it writes. `python -m export` never writes external data, so any is refused, in
every place a tensor can sit: initializers, sparse initializers, node attributes (`Constant`), the
subgraphs of control-flow nodes, functions.

Beyond that, a file may use only the operators the exporter writes (EXPORTER_OPS), control flow only as
the int8 exporter's one `Loop` over the sequence, and at most MAX_MODEL_BYTES. The file itself must be
a regular file: a FIFO or a device is refused before it is opened for reading, so it cannot block or
stream without end.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, Message

from bot.inference.modelfile import ModelFileError

# The bundled int8 2x640 model is 5.9 MB and an fp32 2x1024 LSTM about 52 MB; four times that leaves room
# for ensembles and wider networks while refusing a file that would fill the bot's memory (it keeps the
# file's bytes and builds chunk graphs from them).
MAX_MODEL_BYTES = 256 * 2**20

# Every operator `python -m export` writes, found in its files: fp32 and fp16 LSTM, GRU and RNN graphs
# traced from PyTorch (export/torch_graph.py; fp16 adds Cast) and the hand-built int8 LSTM
# (export/int8_lstm.py), each alone and as an ensemble (LogSoftmax, ReduceLogSumExp, Pad, ...).
# export/pipeline.py checks every file against this before writing it, so the set cannot fall behind
# the exporter unnoticed.
# fmt: off
_TRACED_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "GRU", "Gather", "Identity", "LSTM", "LogSoftmax",
    "MatMul", "Pad", "RNN", "ReduceLogSumExp", "Reshape", "Slice", "Squeeze", "Sub", "Transpose", "Unsqueeze",
})
_INT8_OPS = frozenset({
    "Add", "Concat", "Gather", "Identity", "LogSoftmax", "Loop", "Mul", "Pad", "QuantizeLinear", "ReduceLogSumExp",
    "Shape", "Sigmoid", "Slice", "Split", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})
# fmt: on
EXPORTER_OPS = {"": _TRACED_OPS | _INT8_OPS, "com.microsoft": frozenset({"MatMulIntegerToFloat"})}
# The one control-flow operator in an exporter's file: the int8 graph's Loop over the sequence, directly
# in the main graph (its body holds no control flow).
LOOP_PRECISIONS = ("int8",)

_FILE_KINDS = {
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}
_SHOWN_PATH_CHARS = 120


def _shown(path: Path) -> str:
    """The path for a message: whole, unless it is so long that it would bury the message."""
    text = str(path)
    return text if len(text) <= _SHOWN_PATH_CHARS else f"{text[:_SHOWN_PATH_CHARS]}… ({len(text):,} characters)"


def _os_error(path: Path, error: OSError) -> ModelFileError:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOENT:
        return ModelFileError(
            f"model file {path} does not exist; export one with `python -m export CHECKPOINT -o {path}`"
        )
    if error.errno == errno.ENAMETOOLONG:
        return ModelFileError(
            f"model file path {_shown(path)} is too long for this system ({reason}); give a shorter one"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return ModelFileError(f"model file {path} cannot be read ({reason}); let the bot's user read it")
    return ModelFileError(f"model file {_shown(path)} cannot be read ({reason})")


def _not_regular(path: Path, mode: int) -> ModelFileError | None:
    if stat.S_ISDIR(mode):
        return ModelFileError(f"model file {path} is a directory; give the .onnx file inside it")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS.items() if test(mode)), "not a file")
        return ModelFileError(
            f"model file {path} is not a regular file ({kind}); give an .onnx file written by `python -m export`"
        )
    return None


def _too_big(path: Path, size: int) -> ModelFileError | None:
    if size > MAX_MODEL_BYTES:
        return ModelFileError(
            f"model file {path} is refused: it is {size:,} bytes, more than the {MAX_MODEL_BYTES:,} bytes "
            f"({MAX_MODEL_BYTES // 2**20} MiB) a model file may be"
        )
    return None


def read_model_bytes(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_MODEL_BYTES, or a ModelFileError saying what `path` is instead."""
    try:
        # stat before open: opening a FIFO for reading blocks until a writer comes, and a device may stream forever.
        if error := _not_regular(path, os.stat(path).st_mode):
            raise error
        # O_NONBLOCK: should the path have become a FIFO since, opening it returns at once instead of waiting.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            found = os.fstat(file.fileno())
            # Checked again on what was opened, in case the path changed in between.
            if error := _not_regular(path, found.st_mode) or _too_big(path, found.st_size):
                raise error
            # One byte more than allowed: a file that grew since, or one whose size stat cannot tell (/proc).
            data = file.read(MAX_MODEL_BYTES + 1)
    except OSError as error:
        raise _os_error(path, error) from None
    if error := _too_big(path, len(data)):
        raise error
    if not data:
        raise ModelFileError(f"model file {path} is empty")
    return data


def _is_torch_checkpoint(data: bytes) -> bool:
    """torch.save's zip archive (what `python -m model train` writes): its pickle is `<name>/data.pkl`."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.rpartition("/")[2] == "data.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def parse_model(path: Path, data: bytes) -> onnx.ModelProto:
    """The file's ONNX protobuf, parsed without loading anything it points to."""
    if _is_torch_checkpoint(data):
        raise ModelFileError(
            f"{path} is a training checkpoint, not an ONNX model: export it with "
            f"`python -m export {path} -o model.onnx` and give that file"
        )
    model = onnx.ModelProto()
    try:
        # Plain protobuf parsing: unlike onnx.load(path), it never follows external data.
        model.ParseFromString(data)
    except DecodeError as exc:
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or corrupt?): {exc}") from None
    return model


def _label(message: Message) -> str | None:
    """How a message that holds others is named in an error; None for those not worth naming."""
    if isinstance(message, onnx.GraphProto):
        return f"graph {message.name!r}"
    if isinstance(message, onnx.NodeProto):
        return f"{message.op_type} node {message.name!r}" if message.name else f"a {message.op_type} node"
    if isinstance(message, onnx.FunctionProto):
        return f"function {message.name!r}"
    if isinstance(message, onnx.TrainingInfoProto):
        return "training info"
    return None


def _walk(message: Message, where: tuple[str, ...] = ()) -> Iterator[tuple[Message, tuple[str, ...]]]:
    """Every message inside `message` (itself first), with the labels of the messages that hold it.

    Generic over the protobuf schema, so no place that can hold a tensor or a node is missed. A tensor's
    own fields (its data) are not descended into.
    """
    yield message, where
    if isinstance(message, onnx.TensorProto):
        return
    label = _label(message)
    inner = (*where, label) if label else where
    for field, value in message.ListFields():
        if field.message_type is None:  # numbers, strings, bytes
            continue
        for item in [value] if isinstance(value, Message) else value:
            yield from _walk(item, inner)


def _place(where: tuple[str, ...]) -> str:
    """' (in X > Y)' for something below the main graph; '' for the main graph's own."""
    return f" (in {' > '.join(where[1:])})" if len(where) > 1 else ""


def external_data_problem(model: onnx.ModelProto) -> str | None:
    """The first tensor that keeps its data in another file, described; None if every tensor is in the file."""
    for message, where in _walk(model):
        if isinstance(message, onnx.TensorProto) and (
            message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data)
        ):
            location = next((entry.value for entry in message.external_data if entry.key == "location"), "")
            name = f"tensor {message.name!r}" if message.name else "a tensor"  # a Constant's value has no name
            return (
                f"{name}{_place(where)} keeps its data in another file ({location[:200]!r}); "
                "a model file may read nothing but itself, and `python -m export` writes every weight into it"
            )
    return None


def operator_problem(model: onnx.ModelProto, precision: str) -> str | None:
    """The first node outside the exporter's operators or control flow, described; None if all are the exporter's."""
    for message, where in _walk(model):
        if not isinstance(message, onnx.NodeProto):
            continue
        domain = "" if message.domain == "ai.onnx" else message.domain
        if message.op_type not in EXPORTER_OPS.get(domain, ()):
            shown = f"{domain}.{message.op_type}" if domain else message.op_type
            return (
                f"it uses the operator {shown} (node {message.name!r}{_place(where)}), "
                "which `python -m export` never writes"
            )
        node = f"{message.op_type} node {message.name!r}{_place(where)}"
        # The main graph's nodes are labelled by that graph alone; a body's or function's carry more.
        if message.op_type == "Loop" and (precision not in LOOP_PRECISIONS or len(where) != 1):
            return (
                f"it has control flow ({node}); the exporter's only control flow is the int8 graph's one Loop "
                "over the sequence, in the main graph"
            )
    return None


def contract_problem(model: onnx.ModelProto, precision: str) -> str | None:
    """What breaks the model file's contract (external data first), or None; the exporter checks its files too."""
    return external_data_problem(model) or operator_problem(model, precision)
