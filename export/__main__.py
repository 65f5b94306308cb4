"""Command line: `python -m export CHECKPOINT -o model.onnx [--int8|--fp16]` and `python -m export evaluate`."""

from __future__ import annotations

import sys

from model.cli import fail


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["evaluate"]:
            from export import evaluate as command
        else:
            from export import pipeline as command
        command.main(command.build_parser().parse_args(argv[1:] if argv[:1] == ["evaluate"] else argv))
    except (ValueError, OSError) as exc:  # every error of bad input derives from these
        fail(str(exc))


if __name__ == "__main__":
    main()
