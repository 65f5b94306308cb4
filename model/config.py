"""`TrainConfig`: every setting of a training run, in one typed place.

The `python -m model train` flags, their help and defaults, and the keys a `--config` file may hold
are all generated from this dataclass (model.cli.dataclass_parser), and every value is checked here,
once, before any work starts. Flag names follow torch-rnn's, dashed. docs/training.md lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.cli import UsageError, option
from model.model import INIT_SCHEMES, REGULARISERS, RNN_TYPES, ModelConfig
from model.sample import validate_sampling
from model.sampling import TEMPERATURE_RANGE
from model.schedule import SCHEDULES, parse_piecewise

OPTIMIZERS = ("adam", "rmsprop", "sgd")
DATA, MODEL, OPTIM, RUN, DEVICE = "data and output", "model", "optimisation", "checkpoints and logging", "device"


@dataclass
class TrainConfig:
    data: str = option(
        None, "dataset made by `python -m model prepare` (with --resume: the run's own)", DATA, metavar="DIR"
    )
    out: str = option(
        "runs/run", "run folder: checkpoints, logs, plots (with --resume: the checkpoint's folder)", DATA, metavar="DIR"
    )
    overwrite: bool = option(False, "start a new run in an --out folder that holds one (its files are replaced)", DATA)
    model_type: str = option("lstm", "recurrent cell", MODEL, choices=tuple(RNN_TYPES))
    rnn_size: int = option(640, "hidden units per layer", MODEL)
    num_layers: int = option(2, "recurrent layers", MODEL)
    wordvec_size: int = option(64, "character embedding size", MODEL)
    dropout: float = option(0.4, "dropout between layers and before the decoder, in [0, 1)", MODEL)
    weight_drop: float = option(0.3, "DropConnect on the recurrent matrices while training, in [0, 1)", MODEL)
    embed_drop: float = option(
        0.0, "embedding dropout while training: whole characters' vectors dropped per batch, in [0, 1)", MODEL
    )
    input_drop: float = option(
        0.0, "variational dropout on the embedded input while training (one mask per stream), in [0, 1)", MODEL
    )
    init: str = option("default", "weight initialisation", MODEL, choices=INIT_SCHEMES)
    init_std: float = option(0.05, "standard deviation for --init normal", MODEL)
    batch_size: int = option(32, "parallel streams per batch", OPTIM)
    seq_length: int = option(128, "characters per stream per batch (BPTT length)", OPTIM)
    optimizer: str = option("adam", "optimiser", OPTIM, choices=OPTIMIZERS)
    learning_rate: float = option(2e-3, "base learning rate", OPTIM)
    momentum: float = option(0.9, "momentum for sgd", OPTIM)
    weight_decay: float = option(0.0, "L2 weight decay (decoupled for adam)", OPTIM)
    lr_schedule: str = option("cosine", "learning-rate schedule", OPTIM, choices=SCHEDULES)
    lr_decay_every: float = option(5.0, "step schedule: epochs between decays", OPTIM)
    lr_decay_factor: float = option(0.5, "step schedule: factor per decay", OPTIM)
    lr_steps: str = option("0:0.1,4000:0.01,8000:0.002", "piecewise schedule: iteration:lr pairs", OPTIM)
    warmup_iters: int = option(100, "cosine schedule: linear warmup iterations", OPTIM)
    min_lr_frac: float = option(0.05, "cosine schedule: final lr as a share of base", OPTIM)
    grad_clip: float = option(5.0, "clip the gradient norm to this (0: off)", OPTIM)
    max_epochs: float = option(12.0, "stop after this many epochs", OPTIM)
    max_iters: int = option(0, "stop after this many iterations (0: use --max-epochs)", OPTIM)
    eval_every: int = option(200, "validate every N iterations (and at every checkpoint)", RUN)
    checkpoint_every: int = option(1000, "save a checkpoint every N iterations", RUN)
    save_every_minutes: float = option(
        5.0, "also save last.pt after this many minutes of training since the last save (0: never)", RUN
    )
    print_every: int = option(10, "log metrics every N iterations", RUN)
    sample_every: int = option(500, "print a sample every N iterations (0: never)", RUN)
    sample_length: int = option(200, "characters per printed sample", RUN)
    sample_temperature: float = option(0.9, f"temperature of printed samples, {TEMPERATURE_RANGE}", RUN)
    init_from: str | None = option(None, "fine-tune from this checkpoint's weights", RUN, metavar="CKPT")
    reset_iterations: bool = option(True, "with --init-from: start counting iterations from 0", RUN)
    resume: str | None = option(
        None,
        "continue exactly where this checkpoint stopped, with its run's settings (docs/training.md, Resuming a run)",
        RUN,
        metavar="CKPT",
    )
    tensorboard: bool = option(True, "write TensorBoard event files to OUT/tb", RUN)
    plots: bool = option(True, "write PNG plots at the end", RUN)
    progress: bool = option(True, "show a progress bar", RUN)
    device: str = option("auto", "auto picks CUDA if present", DEVICE, choices=("auto", "cpu", "cuda"))
    amp: bool = option(
        True,
        "mixed precision: fp16 autocast on CUDA, bf16 autocast on CPUs that multiply bf16 natively "
        "(AMX or AVX512-BF16); --no-amp trains in fp32 everywhere",
        DEVICE,
    )
    threads: int = option(0, "CPU threads for torch (0: torch's default)", DEVICE)
    seed: int = option(1337, "random seed (model init, dropout, samples)", DEVICE)

    def __post_init__(self) -> None:
        # A resumed run finds its dataset in the checkpoint (model.resume).
        if not self.data and not self.resume:
            raise UsageError("--data DIR is required: a dataset made by `python -m model prepare`")
        at_least = {
            "rnn_size": 1,
            "num_layers": 1,
            "wordvec_size": 1,
            "batch_size": 1,
            "seq_length": 1,
            "print_every": 1,
            "eval_every": 1,
            "checkpoint_every": 1,
            "max_iters": 0,
            "warmup_iters": 0,
            "sample_every": 0,
            "threads": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise UsageError(f"{flag(name)} must be at least {low}, not {getattr(self, name)}")
        in_range = {  # name: (low, high, whether high itself is allowed)
            **dict.fromkeys(REGULARISERS, (0.0, 1.0, False)),
            "min_lr_frac": (0.0, 1.0, True),
            "lr_decay_factor": (0.0, 1.0, True),
            "momentum": (0.0, 1.0, False),
        }
        for name, (low, high, closed) in in_range.items():
            value = getattr(self, name)
            if not (low <= value <= high if closed else low <= value < high):
                raise UsageError(f"{flag(name)} must be in [{low:g}, {high:g}{']' if closed else ')'}, not {value}")
        for name in ("learning_rate", "init_std", "max_epochs", "lr_decay_every"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UsageError(f"{flag(name)} must be a positive number, not {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "save_every_minutes"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UsageError(f"{flag(name)} must be 0 or a positive number, not {getattr(self, name)}")
        if self.lr_schedule == "piecewise":
            parse_piecewise(self.lr_steps)
        if self.sample_every:
            validate_sampling(self.sample_length, self.sample_temperature, 0, "--sample-")
        if self.resume and self.init_from:
            raise UsageError("give --resume (continue a run) or --init-from (fine-tune from its weights), not both")
        if self.resume and self.overwrite:
            raise UsageError("give --resume (continue a run) or --overwrite (replace it with a new one), not both")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The network these settings describe, for a vocabulary of vocab_size characters."""
        return ModelConfig(
            vocab_size=vocab_size,
            model_type=self.model_type,
            rnn_size=self.rnn_size,
            num_layers=self.num_layers,
            wordvec_size=self.wordvec_size,
            dropout=self.dropout,
            weight_drop=self.weight_drop,
            embed_drop=self.embed_drop,
            input_drop=self.input_drop,
        )

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
