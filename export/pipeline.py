"""`python -m export CHECKPOINT... -o model.onnx`: build, verify, then write one self-contained file.

Several checkpoints make an ensemble (model.ensemble): one file whose logits are the log of the
networks' mean probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bot.inference.modelcheck import MAX_MODEL_BYTES, contract_problem
from bot.inference.modelfile import (
    FP16_WEIGHTS,
    INT8_UNSIGNED_WEIGHTS,
    INT8_WEIGHTS,
    MIN_P_FLOOR_KEY,
    MIN_P_FLOOR_MAX,
    VOICE_DESCRIPTION_KEY,
    VOICE_NAME_KEY,
    WEIGHT_STORAGE_KEY,
    MetadataError,
    ModelInfo,
    check_voice,
)
from export.int8_lstm import build_int8_lstm
from export.torch_graph import fp16_graph, fp16_weights_graph, fp32_graph
from export.verify import SAMPLE_TEXT, Verification, verify
from model.checkpoint import Checkpoint
from model.cli import UsageError, check_output_file
from model.ensemble import Ensemble, add_checkpoints_argument, load_models
from model.model import CharRNN
from model.prepare import read_utf8

MIN_CORPUS_CHARS = 200
EXPORTER_VERSION = "speechbot-export/1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a checkpoint to one .onnx file (graph, weights and metadata), verified against "
        "PyTorch before it is written. `python -m export evaluate MODEL.onnx --text FILE` scores a model.",
    )
    add_checkpoints_argument(p, "checkpoint written by `python -m model train`", "checkpoints")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="file to write")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="int8 weights for CPU (LSTM models)")
    precision.add_argument("--fp16", action="store_true", help="fp16 for the CUDA provider only")
    precision.add_argument(
        "--fp16-weights",
        action="store_true",
        help="fp32 arithmetic with the recurrent weights stored as fp16: about half of fp32's size, any provider",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="text for the corpus inputs of the check and for the bits/char change (e.g. the validation text); "
        "an ensemble's val_bpc metadata is its bits/char on this text",
    )
    add_voice_arguments(p, "the file's name, made typeable")
    return p


def add_voice_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument(
        "--voice-name",
        metavar="NAME",
        help=f"what users type after /voice to pick this model when the bot serves several (default: {default_name})",
    )
    parser.add_argument("--voice-description", metavar="TEXT", help="one line that /voice shows beside the name")
    parser.add_argument(
        "--min-p-floor",
        type=float,
        metavar="P",
        help=f"the least min-p the bot samples this model with at high temperatures, 0 to {MIN_P_FLOOR_MAX:g}: for a "
        "network that writes too few real words at temperature 2 (docs/voices.md; default: "
        f"{'unchanged' if default_name == 'unchanged' else 'none, the bot schedule alone'})",
    )


def voice_props(name: str | None, description: str | None, min_p_floor: float | None = None) -> dict[str, str]:
    """The metadata that describes a voice (nothing for what is None), checked as the bot checks it when it
    loads the file: a UsageError that says what is valid otherwise."""
    given = {VOICE_NAME_KEY: name, VOICE_DESCRIPTION_KEY: description, MIN_P_FLOOR_KEY: min_p_floor}
    props = {key: str(value) for key, value in given.items() if value is not None}
    try:
        check_voice(props.get(VOICE_NAME_KEY), props.get(VOICE_DESCRIPTION_KEY, ""), props.get(MIN_P_FLOOR_KEY))
    except MetadataError as error:
        flag = next(flag for key, flag in VOICE_FLAGS.items() if key in str(error))
        raise UsageError(f"{flag}: {str(error).removeprefix('its ')}") from None
    return props


# The flag that sets each voice metadata key, to name it in an error.
VOICE_FLAGS = {
    VOICE_NAME_KEY: "--voice-name",
    VOICE_DESCRIPTION_KEY: "--voice-description",
    MIN_P_FLOOR_KEY: "--min-p-floor",
}


class ExportError(ValueError):
    """A graph the exporter built but must not write: the bot would refuse to load it."""


@dataclass
class ExportResult:
    path: Path
    precision: str
    size_bytes: int
    check: Verification | None


def build_graph(net: CharRNN | Ensemble, precision: str) -> onnx.ModelProto:
    if precision == "int8":
        if not net.is_lstm:
            raise UsageError(f"--int8 supports LSTM models; this one is a {net.config.model_type}, export it as fp32")
        members = net.members if isinstance(net, Ensemble) else [net]
        weights = [{name: t.detach().cpu().numpy() for name, t in m.state_dict().items()} for m in members]
        config = net.config
        return build_int8_lstm(weights, config.num_layers, config.rnn_size, config.vocab_size)
    graph = fp32_graph(net)
    if precision == FP16_WEIGHTS:
        return fp16_weights_graph(graph)
    return fp16_graph(graph) if precision == "fp16" else graph


def serialize(model: onnx.ModelProto, info: ModelInfo) -> bytes:
    """The file's bytes, checked against the model file's contract that the bot enforces when it loads it."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, info.to_props())
    model.producer_name = "speechbot"
    onnx.checker.check_model(model, full_check=True)
    # The bot refuses what the contract does not allow (bot.inference.modelcheck); failing here instead
    # means a change to the exporter that needs a new operator is caught when the file is made, not served.
    if problem := contract_problem(model, info.precision):
        raise ExportError(f"the exported graph breaks the model file's contract, so nothing was written: {problem}")
    # Serialising the whole proto ourselves keeps every weight inside the one file (no external data).
    data = model.SerializeToString()
    if len(data) > MAX_MODEL_BYTES:
        raise ExportError(
            f"the exported model is {len(data) / 2**20:,.0f} MiB, and the bot loads at most "
            f"{MAX_MODEL_BYTES / 2**20:,.0f} MiB (MAX_MODEL_BYTES); nothing was written"
        )
    return data


def corpus_ids(text_path: str | None, info: ModelInfo) -> np.ndarray:
    text = read_utf8(Path(text_path))[0] if text_path else SAMPLE_TEXT
    ids, _ = info.text_ids(text)
    if len(ids) < MIN_CORPUS_CHARS:
        ids = np.resize(ids, MIN_CORPUS_CHARS) if len(ids) else np.zeros(MIN_CORPUS_CHARS, np.int64)
    return ids


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def info_from_checkpoints(ckpts: list[Checkpoint], precision: str = "fp32") -> ModelInfo:
    """Metadata for one checkpoint's network, or for the ensemble of several (model.ensemble).

    An ensemble's val_bpc is unknown here (each checkpoint knows only its own); the exporter fills it in.
    """
    ckpt = ckpts[0]
    config = dict(ckpt.model_config)
    if len(ckpts) > 1:
        # The state is as wide as the widest member (model.ensemble pads the others).
        sizes = [c.model_config["rnn_size"] for c in ckpts]
        config |= {"rnn_size": max(sizes), "members": len(ckpts), "member_sizes": sizes}
    return ModelInfo(
        vocab=list(ckpt.vocab),
        cleaning=dict(ckpt.cleaning),
        unknown_policy=ckpt.unknown_policy,
        model_config=config,
        corpus_sha256=ckpt.corpora_sha256,
        val_bpc=ckpt.val_bpc if len(ckpts) == 1 else None,
        exporter_version=EXPORTER_VERSION,
        # fp16-weights is an fp32 file (fp32 arithmetic, any provider) whose weights are stored as fp16.
        precision="fp32" if precision == FP16_WEIGHTS else precision,
        # export.int8_lstm stores its weights unsigned; files without this key predate that.
        extra={INT8_WEIGHTS: INT8_UNSIGNED_WEIGHTS}
        if precision == "int8"
        else {WEIGHT_STORAGE_KEY: "fp16"}
        if precision == FP16_WEIGHTS
        else {},
    )


def export_checkpoint(
    checkpoints: str | Path | Sequence[str | Path],
    output: str | Path,
    precision: str = "fp32",
    text: str | None = None,
    voice_name: str | None = None,
    voice_description: str | None = None,
    min_p_floor: float | None = None,
):
    paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
    # Checked before the minutes of building and verifying, and never over an input.
    output = check_output_file(output, "output", [*paths, *([text] if text else [])])
    voice = voice_props(voice_name, voice_description, min_p_floor)  # checked before the minutes of work below
    net, ckpts = load_models(paths)
    info = info_from_checkpoints(ckpts, precision)
    info = dataclasses.replace(info, extra=info.extra | voice)
    graph = build_graph(net, precision)
    data = serialize(graph, info)
    check = None
    if precision != "fp16":
        check = verify(net, data, info, corpus_ids(text, info), ["CPUExecutionProvider"])
    elif "CUDAExecutionProvider" in ort.get_available_providers():
        check = verify(net.cuda().float(), data, info, corpus_ids(text, info), ["CUDAExecutionProvider"])
    if len(ckpts) > 1 and text and check is not None:
        # No checkpoint knows the ensemble's bits per character; the check just measured them on --text.
        data = serialize(graph, dataclasses.replace(info, val_bpc=check.torch_bpc))
    write_atomically(output, data)
    return ExportResult(output, precision, len(data), check)


def main(args: argparse.Namespace) -> None:
    precision = "int8" if args.int8 else "fp16" if args.fp16 else FP16_WEIGHTS if args.fp16_weights else "fp32"
    result = export_checkpoint(
        args.checkpoints, args.output, precision, args.text, args.voice_name, args.voice_description, args.min_p_floor
    )
    print(f"wrote {result.path} ({result.precision}, {result.size_bytes / 1e6:.2f} MB, one file)")
    if result.check is None:
        print("not verified: fp16 runs on the CUDA provider only and none is available here")
        return
    check = result.check
    print(f"max |logit difference| vs PyTorch: {check.max_logit_diff:.3g}")
    source = args.text or "built-in sample text"
    print(
        f"bits/char on {source}: PyTorch {check.torch_bpc:.4f}, ONNX {check.onnx_bpc:.4f} "
        f"(change {check.bpc_change:+.5f})"
    )
