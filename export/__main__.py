"""Command line: `python -m export CHECKPOINT -o model.onnx [--int8|--fp16|--fp16-weights]`,
`python -m export evaluate`, `python -m export recover` and `python -m export voice`."""

from __future__ import annotations

import sys

from model.cli import fail

SUBCOMMANDS = ("evaluate", "recover", "voice")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["evaluate"]:
            from export import evaluate as command
        elif argv[:1] == ["recover"]:
            from export import recover as command
        elif argv[:1] == ["voice"]:
            from export import voice as command
        else:
            from export import pipeline as command
        command.main(command.build_parser().parse_args(argv[1:] if argv[:1] in ([c] for c in SUBCOMMANDS) else argv))
    except (ValueError, OSError) as exc:  # every error of bad input derives from these
        fail(str(exc))


if __name__ == "__main__":
    main()
