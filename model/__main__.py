"""`python -m model <command>`: prepare, train, sample, evaluate, average, novel, lr-sweep, plot."""

from __future__ import annotations

import importlib
import sys

from model.cli import UsageError, fail, parse_with_config

# command -> (module, one-line help); modules are imported lazily so `prepare` starts fast.
COMMANDS = {
    "prepare": ("model.prepare", "clean text files into a dataset"),
    "train": ("model.train", "train a model on a prepared dataset"),
    "sample": ("model.sample", "generate text from a checkpoint"),
    "evaluate": ("model.evaluate", "loss and bits per character on a split or a text file"),
    "average": ("model.average", "one checkpoint whose weights are the mean of several of one run"),
    "novel": ("model.novel", "how much of a sample is copied verbatim from the training text"),
    "lr-sweep": ("model.sweep", "compare learning rates / schedules (the article's experiment)"),
    "plot": ("model.plot", "PNG plots of a run's metrics"),
}


def usage() -> str:
    lines = ["usage: python -m model <command> [flags]   (python -m model <command> --help)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[command][0])
    try:
        args = parse_with_config(module.build_parser(), rest)
        module.main(args)
    except UsageError as exc:  # DatasetError and CheckpointError included
        fail(str(exc))
    except KeyboardInterrupt as exc:
        # Training says what it saved and how to go on (model.train.Interrupted); a plain Ctrl-C, just that.
        print(getattr(exc, "message", "interrupted"), file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 130)) from None


if __name__ == "__main__":
    main()
