"""Dynamic evaluation's settings and its --dynamic / --dynamic-lr flags, shared by `python -m model evaluate`
and bench.quality; free of torch, so the quality bench imports torch only when it scores a checkpoint."""

from __future__ import annotations

import argparse

from model.cli import UsageError

# Dynamic evaluation settings (`--dynamic`): the step size was chosen for the bundled model on a prefix
# of data/both's val split, decay and segment earlier for the speeches-only model (docs/default-model.md);
# the gradient statistics come from the end of the training split.
DYNAMIC_LR = 1e-3
DYNAMIC_DECAY = 0.03
DYNAMIC_SEGMENT = 50
DYNAMIC_STATS_CHARS = 20_000


def add_dynamic_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--dynamic and --dynamic-lr, the same in `python -m model evaluate` and bench.quality."""
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help=f"{what} (Krause et al. 2018): the network learns from the text as it reads it, as compressors do; "
        f"step size {DYNAMIC_LR:g} (chosen on val), decay {DYNAMIC_DECAY:g}, {DYNAMIC_SEGMENT}-character segments; "
        "the dataset's training split gives the gradient statistics",
    )
    parser.add_argument(
        "--dynamic-lr",
        type=float,
        help=f"dynamic evaluation's step size, in units of each weight's training-gradient RMS; giving it turns "
        f"dynamic evaluation on (0: off unless --dynamic; --dynamic alone: {DYNAMIC_LR:g})",
    )


def dynamic_lr(args: argparse.Namespace) -> float:
    """The dynamic evaluation step size that --dynamic and --dynamic-lr ask for; 0 means static."""
    if args.dynamic_lr is None:
        return DYNAMIC_LR if args.dynamic else 0.0
    if args.dynamic_lr < 0 or (args.dynamic and args.dynamic_lr == 0):
        raise UsageError(f"--dynamic-lr must be above 0 (--dynamic alone uses {DYNAMIC_LR:g}), not {args.dynamic_lr:g}")
    return args.dynamic_lr
