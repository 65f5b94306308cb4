"""`python -m export voice MODEL.onnx --voice-name NAME`: name and describe the voice of an exported model file.

Rewrites the file's metadata only, graph and weights untouched, so a model exported before it was meant as
a voice, or two files that would share a name, can be served side by side (docs/voices.md). The file is
read and checked as the bot reads it (bot.inference.runner.read_model_info) and written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from bot.inference.modelfile import MIN_P_FLOOR_KEY, VOICE_NAME_KEY, voice_name_from_file
from bot.inference.runner import read_model_info
from export.pipeline import add_voice_arguments, voice_props, write_atomically
from model.cli import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export voice",
        description="Name and describe the voice of an exported model file (its metadata only). "
        "`python -m export voice MODEL.onnx` alone shows them.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="a file written by `python -m export`")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="write the renamed model here (default: over MODEL.onnx)")
    add_voice_arguments(p, "unchanged")
    return p


def rename_voice(
    path: Path, output: Path, name: str | None, description: str | None, min_p_floor: float | None = None
) -> None:
    props = voice_props(name, description, min_p_floor)
    data, _ = read_model_info(path)  # a ModelFileError unless the bot would serve it
    model = onnx.load_model_from_string(data)
    kept = {prop.key: prop.value for prop in model.metadata_props} | props
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, kept)
    write_atomically(output, model.SerializeToString())


def main(args: argparse.Namespace) -> None:
    path = Path(args.model)
    if args.voice_name is None and args.voice_description is None and args.min_p_floor is None:
        _, info = read_model_info(path)
        name = info.voice_name or f"{voice_name_from_file(path)} (from the file's name: it has no {VOICE_NAME_KEY})"
        floor = f"{info.min_p_floor:g}" if MIN_P_FLOOR_KEY in info.extra else "(none: the bot's schedule alone)"
        print(f"voice: {name}\ndescription: {info.voice_description or '(none)'}\nmin-p floor: {floor}")
        return
    output = Path(args.output) if args.output else path
    if args.output:
        check_output_file(output, "--output", [path])
    rename_voice(path, output, args.voice_name, args.voice_description, args.min_p_floor)
    _, info = read_model_info(output)
    name = info.voice_name or voice_name_from_file(output)
    print(f"wrote {output}: voice {name}, {info.voice_description or 'no description'}")
