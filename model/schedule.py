"""Learning-rate schedules as pure functions of the iteration, so resuming needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Callable

from model.cli import UsageError

SCHEDULES = ("step", "piecewise", "cosine", "constant")


def parse_piecewise(spec: str) -> dict[int, float]:
    """'0:0.1,4000:0.01,8000:0.002' -> {0: 0.1, 4000: 0.01, 8000: 0.002} (the DL4J example's map)."""
    steps: dict[int, float] = {}
    try:
        for item in spec.split(","):
            iteration, lr = item.split(":")
            steps[int(iteration)] = float(lr)
    except ValueError as exc:
        raise UsageError(f"--lr-steps must look like '0:0.1,4000:0.01,8000:0.002', not {spec!r}") from exc
    if 0 not in steps or any(lr <= 0 for lr in steps.values()):
        raise UsageError("--lr-steps must start at iteration 0 and have positive learning rates")
    return dict(sorted(steps.items()))


def make_schedule(
    kind: str,
    base_lr: float,
    iters_per_epoch: int,
    total_iters: int,
    decay_every: float = 5,
    decay_factor: float = 0.5,
    steps: str = "",
    warmup_iters: int = 0,
    min_lr_frac: float = 0.1,
) -> Callable[[int], float]:
    """Returns lr(iteration), with iteration counted from 0."""
    if base_lr <= 0:
        raise UsageError(f"--learning-rate must be positive, not {base_lr}")
    if kind == "constant":
        return lambda it: base_lr
    if kind == "step":
        # torch-rnn: multiply by the factor every `decay_every` epochs.
        period = max(1, round(decay_every * iters_per_epoch))
        return lambda it: base_lr * decay_factor ** (it // period)
    if kind == "piecewise":
        table = parse_piecewise(steps)

        def piecewise(it: int) -> float:
            return table[max(k for k in table if k <= it)]

        return piecewise
    if kind == "cosine":
        floor = base_lr * min_lr_frac

        def cosine(it: int) -> float:
            if it < warmup_iters:
                return base_lr * (it + 1) / warmup_iters
            progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
            return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))

        return cosine
    raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")
