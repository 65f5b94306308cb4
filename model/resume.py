"""`train --resume CKPT`: the resumed run's settings come from the checkpoint, not from today's defaults.

A run is its network and its recipe (batch, sequence length, optimiser, schedule, seed, ...); continuing
it exactly means every one of those comes back from the checkpoint's `train_config`. The user may still
change what only decides how long the run goes on, how often it reports and saves, and where it runs
(`CHANGEABLE_ON_RESUME`); each such change is logged. Any other setting chosen on the command line or in
--config that differs from the run's is refused in one line: silently training another recipe under the
old run's name is what the issue tracker saw (a batch-8 run resumed at batch 32 crashed; a 60-iteration
run became 12 epochs; a constant learning rate became the cosine default).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from model.checkpoint import Checkpoint
from model.cli import UsageError
from model.config import TrainConfig, flag
from model.dataset import load_dataset
from model.evaluate import checkpoint_dataset

# Settings a resumed run may change. None of them changes what a training step computes.
CHANGEABLE_ON_RESUME = (
    "max_iters",
    "max_epochs",
    "eval_every",
    "checkpoint_every",
    "save_every_minutes",
    "print_every",
    "sample_every",
    "sample_length",
    "sample_temperature",
    "tensorboard",
    "plots",
    "progress",
    "device",
    "threads",
)
# The network's shape and regularisation: the checkpoint's model_config holds them for certain, where the
# train_config of a checkpoint from an older version may lack some.
MODEL_FIELDS = ("model_type", "rnn_size", "num_layers", "wordvec_size", "dropout", "weight_drop")
# Settings of one command rather than of the run: resolved below, never compared with the run's.
COMMAND_ONLY = ("resume", "overwrite", "init_from", "reset_iterations", "data", "out")


def default(name: str) -> Any:
    return TrainConfig.__dataclass_fields__[name].default


def chosen_settings(config: TrainConfig, given: Collection[str] | None) -> set[str]:
    """What the user chose: `given` (flags on the command line or in --config); for code that builds a
    TrainConfig itself (given None), every field set away from its default."""
    if given is not None:
        return set(given) & set(config.to_dict())
    return {name for name, value in config.to_dict().items() if value != default(name)}


def saved_settings(source: Checkpoint) -> dict[str, Any]:
    """The run's settings as its checkpoint recorded them; a field an older checkpoint lacks takes today's
    default (and keys TrainConfig no longer has, such as argparse's `func`, are dropped)."""
    saved = {name: default(name) for name in TrainConfig.__dataclass_fields__}
    saved.update({k: v for k, v in source.train_config.items() if k in saved})
    saved.update({k: source.model_config[k] for k in MODEL_FIELDS if k in source.model_config})
    return saved


def resumed_config(
    config: TrainConfig, given: Collection[str] | None, source: Checkpoint
) -> tuple[TrainConfig, list[str]]:
    """The settings of the run that `config.resume` continues, and one note per allowed change.

    Raises UsageError naming every chosen setting that differs from the run's and may not change.
    """
    if source.optimizer is None or source.rng is None:
        raise UsageError(
            f"{config.resume} holds weights only (no optimizer or RNG state: an averaged or recovered checkpoint) "
            "and no run goes on from it; start a new run from its weights with --init-from"
        )
    chosen = chosen_settings(config, given)
    saved = saved_settings(source)
    changes, refused = [], []
    for name in sorted(chosen - set(COMMAND_ONLY)):
        new, old = getattr(config, name), saved[name]
        if new == old:
            continue
        if name in CHANGEABLE_ON_RESUME:
            changes.append(f"{flag(name)} {old} -> {new}")
        else:
            refused.append(f"{flag(name)} {new} (the run's: {old})")
    if refused:
        allowed = ", ".join(flag(name) for name in CHANGEABLE_ON_RESUME)
        raise UsageError(
            f"{'; '.join(refused)}: a run resumed from {config.resume} keeps the settings it was trained with "
            f"(only {allowed} may change); drop the flag, or start a new run from its weights with --init-from"
        )
    settings = {name: getattr(config, name) if name in chosen else value for name, value in saved.items()}
    # --max-epochs alone sets the run's length in epochs, also for a run that was started with --max-iters.
    if "max_epochs" in chosen and "max_iters" not in chosen and saved["max_iters"]:
        settings["max_iters"] = 0
        changes.append(f"{flag('max_iters')} {saved['max_iters']} -> 0 (--max-epochs sets the length)")
    settings.update(
        resume=config.resume,
        overwrite=False,
        init_from=None,  # a fine-tuned run started from those weights; it goes on from its own now
        reset_iterations=default("reset_iterations"),
        # The checkpoint's own folder unless the user names another (model.train.prepare_run_folder checks it).
        out=config.out if "out" in chosen else str(Path(config.resume).parent),
        data=resumed_data(config, "data" in chosen, source),
    )
    return TrainConfig(**settings), changes


def resumed_data(config: TrainConfig, data_given: bool, source: Checkpoint) -> str:
    """The run's dataset folder: the one the checkpoint records, or --data when that holds the very same
    data (a moved folder); other data would be a new run, not this one continued."""
    if not data_given:
        remedy = "give --data DIR with the dataset it was trained on"
        return checkpoint_dataset(source, config.resume, remedy)
    if source.dataset_sha256 and load_dataset(config.data).sha256 != source.dataset_sha256:
        raise UsageError(
            f"--data {config.data} holds other text than the run resumed from {config.resume} was trained on; "
            "a resumed run goes on with its own data: drop --data, or fine-tune on new data with --init-from"
        )
    return config.data
