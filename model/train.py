"""`python -m model train`: stateful truncated-BPTT training of a CharRNN on a prepared dataset.

A batch is B contiguous streams through the training text; the hidden state carries over from one
batch to the next (detached), as in torch-rnn and char-rnn. Everything needed to continue exactly
where training stopped (model, optimizer, iteration, carried state, RNG, the run's settings) goes into
each checkpoint; `--resume` takes the settings back (model.resume). last.pt is also written every
--save-every-minutes and when SIGINT or SIGTERM stops the loop (`StopSignals`), so an interrupted run
loses minutes at most. Runs under `torchrun` for multi-GPU data-parallel training.

One run is a `Run` (the state object): `setup` builds it from a `TrainConfig`, `train_step` advances it
by one batch, `validate` scores it, `save_checkpoints` writes it; `train` is the loop around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import Checkpoint, rng_state, set_rng_state
from model.cli import UsageError, dataclass_parser, from_namespace, writable_dir
from model.config import TrainConfig
from model.dataset import Dataset, load_dataset
from model.evaluate import evaluate_ids
from model.model import REGULARISERS, CharRNN, State, detach_state, nats_to_bits
from model.resume import resumed_config, saved_settings
from model.sample import sample_text
from model.schedule import make_schedule

# Files that mark a folder as holding a run, so a new run there would replace its work.
RUN_FILES = ("metrics.jsonl", "last.pt", "best.pt", "summary.json")
CKPT_ITER = re.compile(r"ckpt_iter(\d+)_val")


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(
        TrainConfig, "python -m model train", "Train a character-level language model on a prepared dataset."
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), by torch's own capability checks."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type for `device`, or None for plain fp32.

    fp16 on CUDA. bf16 on a CPU whose matrix units take bf16 (AMX, AVX512-BF16), where oneDNN's bf16
    LSTM is much faster than fp32 (docs/training.md, Mixed precision); on other CPUs bf16 would be
    emulated and slower, so they stay in fp32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


class StreamBatcher:
    """Splits a token array into contiguous streams; batch k is columns k*T..(k+1)*T of every stream."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_length: int, rank: int = 0, world: int = 1) -> None:
        streams = batch_size * world
        length = (len(ids) - 1) // streams
        self.batches_per_epoch = length // seq_length
        if self.batches_per_epoch < 1:
            raise UsageError(
                f"the training split ({len(ids):,} characters) is too small for batch size {batch_size} x "
                f"sequence length {seq_length}; lower --batch-size or --seq-length"
            )
        ids = torch.from_numpy(ids.astype(np.int64))
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.x = ids[: streams * length].view(streams, length)[rows]
        self.y = ids[1 : streams * length + 1].view(streams, length)[rows]
        self.seq_length = seq_length

    def batch(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cols = slice(k * self.seq_length, (k + 1) * self.seq_length)
        return self.x[:, cols].to(device, non_blocking=True), self.y[:, cols].to(device, non_blocking=True)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.95, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (optional), written only by rank 0."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_iter: int | None) -> None:
        """resume_iter: continue the log of a run resumed at this iteration (None: a new log).

        A run killed after its last checkpoint logged iterations that the resumed run does again;
        those records are dropped, so every iteration appears once.
        """
        path = out_dir / "metrics.jsonl"
        if resume_iter is not None and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line)["iter"] <= resume_iter]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        self.file = path.open("a" if resume_iter is not None else "w", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            # purge_step hides the events a killed run wrote after resume_iter, as above.
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_iter)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            step = record["iter"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{key}/{sub}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()


def check_vocab(ckpt: Checkpoint, dataset: Dataset, path: str) -> None:
    if ckpt.vocab != dataset.vocab.chars:
        raise UsageError(
            f"{path} was trained on a different vocabulary ({len(ckpt.vocab)} characters) than the dataset "
            f"({len(dataset.vocab)}); prepare the dataset with the same cleaning options and text"
        )


def holds_run(out: Path) -> bool:
    return out.is_dir() and (any((out / name).exists() for name in RUN_FILES) or any(out.glob("ckpt_iter*.pt")))


def numbered_checkpoints(out: Path) -> list[Path]:
    """The run's ckpt_iterN_valV.pt files, by iteration N, oldest first."""
    numbered = [(int(m.group(1)), p) for p in out.glob("ckpt_iter*_val*.pt") if (m := CKPT_ITER.match(p.name))]
    return [path for _, path in sorted(numbered)]


def newest_checkpoint(out: Path) -> Path | None:
    """The checkpoint a run in `out` would continue from: last.pt, else its latest ckpt_iterN (None if it has
    none, as a run stopped before its first save)."""
    if (out / "last.pt").is_file():
        return out / "last.pt"
    numbered = numbered_checkpoints(out)
    return numbered[-1] if numbered else None


def prepare_run_folder(config: TrainConfig) -> Path:
    """The --out folder, refusing one that holds a run unless this run continues it or --overwrite says so."""
    out = Path(config.out)
    if config.resume:
        # Resuming writes checkpoints and metrics as the run's own: only into its folder or an empty one.
        own_folder = Path(config.resume).resolve().parent
        if holds_run(out) and out.resolve() != own_folder:
            raise UsageError(
                f"--out {out} holds another training run, and --resume {config.resume} continues the run in "
                f"{own_folder}; leave --out out (it defaults to the checkpoint's folder) or give a new folder"
            )
    elif holds_run(out):
        if not config.overwrite:
            found = newest_checkpoint(out)
            advice = (
                f"continue it with `python -m model train --resume {found}`"
                if found
                else "it has no checkpoint to continue from (it stopped before its first save)"
            )
            raise UsageError(
                f"--out {out} holds a training run; {advice}, train into a new --out folder (also with "
                "--init-from), or give --overwrite to replace it"
            )
        for stale in [*out.glob("ckpt_iter*.pt"), *(out / name for name in (*RUN_FILES, "samples.jsonl"))]:
            stale.unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    return writable_dir(out, "--out")


@dataclass
class Run:
    """Everything one training run holds; `setup` builds it, the loop advances it, checkpoints save it."""

    config: TrainConfig
    dataset: Dataset
    device: torch.device
    rank: int
    world: int
    net: CharRNN
    model: torch.nn.Module  # net, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    batcher: StreamBatcher
    total_iters: int
    lr_at: Callable[[int], float]
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    out_dir: Path
    log: MetricsLog | None
    iteration: int = 0
    rnn_state: State | None = None
    best_val: float = math.inf
    val_bpc: float | None = None
    val_iter: int | None = None  # the iteration val_bpc was measured at
    elapsed_before: float = 0.0  # seconds of training before a resume
    earlier_sha256: list[str] = field(default_factory=list)  # Checkpoint.earlier_sha256
    resume_note: str | None = None  # printed by the banner
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def per_epoch(self) -> int:
        return self.batcher.batches_per_epoch

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def epoch(self) -> float:
        return round(self.iteration / self.per_epoch, 4)


def build_network(
    config: TrainConfig, dataset: Dataset, device: torch.device, resumed: Checkpoint | None
) -> tuple[CharRNN, Checkpoint | None]:
    """A new network, or the one of --resume (`resumed`) / --init-from, and that checkpoint."""
    if resumed:
        check_vocab(resumed, dataset, config.resume)
        return resumed.build_model(device), resumed
    if not config.init_from:
        net = CharRNN(config.model_config(len(dataset.vocab))).to(device)
        net.init_weights(config.init, config.init_std)
        return net, None
    source = Checkpoint.load(config.init_from, device)
    check_vocab(source, dataset, config.init_from)
    # Fine-tuning may change regularisation.
    return source.build_model(device, **{name: getattr(config, name) for name in REGULARISERS}), source


def setup(config: TrainConfig, given: Collection[str] | None = None) -> Run:
    """The run `config` describes; with --resume, the checkpoint's run, with the changes `given` allows
    (`given`: the settings the user chose, see model.resume.chosen_settings)."""
    resumed, resume_changes = None, []
    if config.resume:
        # Loaded on the CPU: the device, like every other setting, may come from the checkpoint.
        resumed = Checkpoint.load(config.resume)
        config, resume_changes = resumed_config(config, given, resumed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = pick_device(config.device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    dataset = load_dataset(config.data)
    out_dir = prepare_run_folder(config) if rank == 0 else Path(config.out)
    # A different seed per rank, so that dropout masks differ across GPUs (as nanoGPT does).
    seed_everything(config.seed + rank)
    net, source = build_network(config, dataset, device, resumed)
    optimizer = make_optimizer(
        config.optimizer, net.parameters(), config.learning_rate, config.momentum, config.weight_decay
    )
    batcher = StreamBatcher(dataset.splits["train"], config.batch_size, config.seq_length, rank, world)
    per_epoch = batcher.batches_per_epoch
    total_iters, lr_at = run_schedule(config, per_epoch)
    amp_dtype = autocast_dtype(device, config.amp)
    run = Run(
        config=config,
        dataset=dataset,
        device=device,
        rank=rank,
        world=world,
        net=net,
        model=torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net,
        optimizer=optimizer,
        batcher=batcher,
        total_iters=total_iters,
        lr_at=lr_at,
        # bf16 keeps fp32's exponent range, so only fp16 needs its gradients scaled.
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        autocast=torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext(),
        amp_dtype=amp_dtype,
        out_dir=out_dir,
        log=None,
    )
    if resumed:
        if resumed.iteration >= total_iters:
            raise UsageError(
                f"{config.resume} is at iteration {resumed.iteration} and its run ends at iteration {total_iters}: "
                "nothing to train; give --max-iters or --max-epochs beyond it to train on"
            )
        optimizer.load_state_dict(resumed.optimizer)
        run.iteration, run.best_val = resumed.iteration, resumed.best_val_bpc or math.inf
        run.rnn_state = state_to(resumed.rnn_state, device)
        run.elapsed_before = resumed.elapsed
        set_rng_state(resumed.rng)
        run.resume_note = resume_note(run, resumed, resume_changes)
        run.earlier_sha256 = resumed.earlier_sha256
    elif source:
        run.earlier_sha256 = source.corpora_sha256
        if not config.reset_iterations:
            run.iteration = source.iteration
    if run.is_main:
        run.log = MetricsLog(out_dir, config.tensorboard, run.iteration if config.resume else None)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        print_banner(run)
    return run


def run_schedule(config: TrainConfig, per_epoch: int) -> tuple[int, Callable[[int], float]]:
    """The run's length in iterations and its learning rate as a function of the iteration."""
    total_iters = config.max_iters or max(1, math.ceil(config.max_epochs * per_epoch))
    lr_at = make_schedule(
        config.lr_schedule,
        config.learning_rate,
        per_epoch,
        total_iters,
        config.lr_decay_every,
        config.lr_decay_factor,
        config.lr_steps,
        config.warmup_iters,
        config.min_lr_frac,
    )
    return total_iters, lr_at


def state_to(state: State | None, device: torch.device) -> State | None:
    """A carried hidden state (one tensor, or LSTM's pair) on `device`."""
    if state is None:
        return None
    return state.to(device) if isinstance(state, torch.Tensor) else tuple(t.to(device) for t in state)


def resume_note(run: Run, resumed: Checkpoint, changes: list[str]) -> str:
    """What the banner says about a resumed run: where it goes on, and every setting that changed. A new run
    length moves a cosine schedule (it decays over the whole run), so a learning rate that the change moves
    is named too."""
    note = f"resuming {run.config.resume} at iteration {run.iteration} (epoch {run.epoch():.2f})"
    if not changes:
        return note + " with the run's own settings"
    note += f" with the run's settings, changed: {', '.join(changes)}"
    saved = saved_settings(resumed)
    as_it_was = dataclasses.replace(run.config, max_iters=saved["max_iters"], max_epochs=saved["max_epochs"])
    planned, now = run_schedule(as_it_was, run.per_epoch)[1](run.iteration), run.lr_at(run.iteration)
    if not math.isclose(planned, now, rel_tol=1e-6):
        note += f"; the learning rate is {now:.2e} now, where the run as it was would have had {planned:.2e}"
    return note


def print_banner(run: Run) -> None:
    config, model_config = run.config, run.net.config
    if run.resume_note:
        print(run.resume_note)
    print(
        f"{model_config.model_type} {model_config.num_layers}x{model_config.rnn_size}, "
        f"{run.net.num_parameters():,} parameters; {len(run.dataset.splits['train']):,} training characters, "
        f"{run.per_epoch} iterations per epoch, {run.total_iters} iterations on {run.device}"
        + (f" x {run.world} processes" if run.world > 1 else "")
        + (f", {str(run.amp_dtype).removeprefix('torch.')} autocast" if run.amp_dtype else ", fp32")
    )
    if config.lr_schedule == "cosine" and config.warmup_iters >= run.total_iters:
        print(
            f"warning: --warmup-iters {config.warmup_iters} is not shorter than the run ({run.total_iters} "
            f"iterations), so the learning rate never reaches --learning-rate {config.learning_rate:g}",
            file=sys.stderr,
        )


@dataclass
class StepResult:
    loss: float  # nats per character
    lr: float
    grad_norm: float
    update_ratio: dict[str, float] | None  # per weight matrix, on logging steps only


def train_step(run: Run, measure_updates: bool) -> StepResult:
    """One batch forward and backward, one optimiser step; carries the hidden state to the next batch."""
    config, net = run.config, run.net
    position = run.iteration % run.per_epoch
    if position == 0 or run.rnn_state is None:
        run.rnn_state = net.initial_state(config.batch_size, run.device)
    x, y = run.batcher.batch(position, run.device)
    lr = run.lr_at(run.iteration)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    with run.autocast:
        logits, state = run.model(x, run.rnn_state)
        loss = F.cross_entropy(logits.float().view(-1, net.config.vocab_size), y.reshape(-1))
    # Autocast hands the state back in its low precision; carry it in fp32 like the weights.
    run.rnn_state = detach_state(state, torch.float32)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or math.inf)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.dim() > 1} if measure_updates else {}
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.iteration += 1
    params = dict(net.named_parameters())
    ratios = {n: ((params[n].detach() - w).norm() / (w.norm() + 1e-12)).item() for n, w in before.items()}
    return StepResult(loss.item(), lr, float(grad_norm), ratios if measure_updates else None)


def make_checkpoint(run: Run) -> Checkpoint:
    dataset = run.dataset
    return Checkpoint(
        model_config=run.net.config.to_dict(),
        model=run.net.state_dict(),
        vocab=dataset.vocab.chars,
        unknown_policy=dataset.vocab.unknown_policy,
        cleaning=dataset.cleaning.to_dict(),
        dataset_sha256=dataset.sha256,
        earlier_sha256=run.earlier_sha256,
        dataset=str(Path(run.config.data).resolve()),
        val_bpc=run.val_bpc if run.val_iter == run.iteration else None,
        iteration=run.iteration,
        epoch=run.iteration / run.per_epoch,
        best_val_bpc=run.best_val if run.best_val < math.inf else None,
        elapsed=run.elapsed(),
        optimizer=run.optimizer.state_dict(),
        rnn_state=run.rnn_state,
        rng=rng_state(),
        train_config=run.config.to_dict(),
    )


def validate(run: Run) -> float:
    """Val bits/char at this iteration, logged; a new best is saved as best.pt."""
    # In the training precision: bf16 validation is much faster on CPU and moves bits/char only in the fifth
    # decimal (docs/training.md, Mixed precision).
    with run.autocast:
        val_nats, _ = evaluate_ids(
            run.net,
            run.dataset.splits["val"],
            streams=run.config.batch_size,
            seq_length=run.config.seq_length,
            device=run.device,
        )
    run.val_bpc, run.val_iter = nats_to_bits(val_nats), run.iteration
    run.log.write(
        {
            "iter": run.iteration,
            "epoch": run.epoch(),
            "val_loss": val_nats,
            "val_bpc": run.val_bpc,
            "elapsed": run.elapsed(),
        }
    )
    if run.val_bpc < run.best_val:
        run.best_val = run.val_bpc
        make_checkpoint(run).save(run.out_dir / "best.pt")
    return run.val_bpc


def save_checkpoints(run: Run) -> Path:
    """ckpt_iterN_valV.pt (the val of iteration N, as char-rnn names them) and last.pt."""
    if run.val_iter != run.iteration:
        validate(run)
    ckpt = make_checkpoint(run)
    path = run.out_dir / f"ckpt_iter{run.iteration}_val{run.val_bpc:.4f}.pt"
    ckpt.save(path)
    ckpt.save(run.out_dir / "last.pt")
    return path


def print_sample(run: Run, bar: tqdm) -> None:
    config = run.config
    text = sample_text(
        run.net,
        run.dataset.vocab,
        run.dataset.cleaning,
        length=config.sample_length,
        temperature=config.sample_temperature,
        seed=config.seed,
        device=run.device,
    )
    bar.write(f"--- sample at iteration {run.iteration} (temperature {config.sample_temperature}) ---\n{text}\n---")
    with (run.out_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        record = {"iter": run.iteration, "temperature": config.sample_temperature, "text": text}
        f.write(json.dumps(record) + "\n")


def bar_status(run: Run, train_bpc: float | None, lr: float, chars_per_sec: float) -> str:
    """One labelled line: both losses in bits/char, and the iteration the val was measured at."""
    train = f"{train_bpc:.3f}" if train_bpc is not None else "-"
    val = f"{run.val_bpc:.3f} (iter {run.val_iter})" if run.val_bpc is not None else "-"
    return (
        f"epoch {run.epoch():.2f} | bits/char: train {train}, val {val} | lr {lr:.2e} | "
        f"{chars_per_sec / 1000:.1f}k chars/s"
    )


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after last.pt was saved; `python -m model` prints the message and
    exits with the shell's code for the signal (128 + its number)."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, 128 + signal_number


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM only ask the loop to stop after the current step, so that it
    can save last.pt first; a second Ctrl-C stops at once, for when saving is not wanted."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def _handle(self, number: int, frame) -> None:
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number

    def __enter__(self) -> StopSignals:
        # Python lets only the main thread install handlers; training run from another thread keeps the defaults.
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def stop_requested(run: Run, signals: StopSignals) -> bool:
    """Whether to stop now; under torchrun every rank stops at the same iteration, or the others would wait
    forever for a gradient exchange with a rank that left."""
    if run.world == 1:
        return signals.received is not None
    flag = torch.tensor([0 if signals.received is None else 1], device=run.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def save_last(run: Run) -> Path:
    """last.pt alone, without a validation: the periodic and the interrupt save (cheap, and they need not
    wait for a validation pass over the whole val split)."""
    path = run.out_dir / "last.pt"
    make_checkpoint(run).save(path)
    return path


def train(config: TrainConfig, given: Collection[str] | None = None) -> dict:
    """Run training; returns a summary (best val bpc, checkpoint paths, time).

    given: with --resume, the settings the user chose (model.resume.chosen_settings); the rest come from
    the checkpoint. Raises Interrupted after saving last.pt when SIGINT or SIGTERM arrives.
    """
    run = setup(config, given)
    config = run.config  # a resumed run's own settings
    bar = tqdm(
        total=run.total_iters,
        initial=run.iteration,
        disable=not (run.is_main and config.progress),
        dynamic_ncols=True,
        unit="it",
    )
    loss_sum, loss_count, window_start = 0.0, 0, time.perf_counter()
    train_bpc, lr, chars_per_sec = None, config.learning_rate, 0.0
    chars_per_iter = config.batch_size * config.seq_length * run.world
    last_save = time.monotonic()
    with StopSignals() as signals:
        while run.iteration < run.total_iters:
            done = run.iteration + 1
            log_now = run.is_main and (done % config.print_every == 0 or done == run.total_iters)
            step = train_step(run, measure_updates=log_now)
            loss_sum, loss_count, lr = loss_sum + step.loss, loss_count + 1, step.lr
            bar.update(1)
            if log_now:
                chars_per_sec = chars_per_iter * loss_count / (time.perf_counter() - window_start)
                train_bpc = nats_to_bits(loss_sum / loss_count)
                run.log.write(
                    {
                        "iter": done,
                        "epoch": run.epoch(),
                        "train_loss": loss_sum / loss_count,
                        "train_bpc": train_bpc,
                        "lr": step.lr,
                        "grad_norm": step.grad_norm,
                        "chars_per_sec": chars_per_sec,
                        "elapsed": run.elapsed(),
                        "update_ratio": step.update_ratio,
                    }
                )
                loss_sum, loss_count, window_start = 0.0, 0, time.perf_counter()
            if run.is_main:
                if done % config.eval_every == 0 or done == run.total_iters:
                    validate(run)
                if config.sample_every and done % config.sample_every == 0:
                    print_sample(run, bar)
                if done % config.checkpoint_every == 0 or done == run.total_iters:
                    save_checkpoints(run)
                    last_save = time.monotonic()
                elif config.save_every_minutes and time.monotonic() - last_save >= 60 * config.save_every_minutes:
                    save_last(run)
                    last_save = time.monotonic()
                if log_now or run.val_iter == done:
                    bar.set_postfix_str(bar_status(run, train_bpc, lr, chars_per_sec))
            # Checked once the iteration is complete (validated and saved where due), so that the interrupt's
            # last.pt is the same as a regular checkpoint of that iteration.
            if run.iteration < run.total_iters and stop_requested(run, signals):
                bar.close()
                stop(run, signals.received)
    bar.close()
    return finish(run)


def stop(run: Run, signal_number: int | None) -> None:
    """Save last.pt (rank 0) and raise Interrupted: the iteration just finished is the one resumed from."""
    # Under torchrun a rank may learn of the stop from another rank's signal only.
    signal_number = signal_number or signal.SIGTERM
    message = f"interrupted by {signal.Signals(signal_number).name} at iteration {run.iteration}"
    if run.is_main:
        path = save_last(run)
        run.log.close()
        message += f": saved {path}; continue with `python -m model train --resume {path}`"
    if run.world > 1:
        torch.distributed.destroy_process_group()
    raise Interrupted(message, signal_number)


def finish(run: Run) -> dict:
    summary = {
        "iterations": run.total_iters,
        "best_val_bpc": run.best_val if run.best_val < math.inf else None,
        "final_val_bpc": run.val_bpc,
        "elapsed_sec": run.elapsed(),
        "best_checkpoint": str(run.out_dir / "best.pt"),
        "last_checkpoint": str(run.out_dir / "last.pt"),
    }
    if run.is_main:
        run.log.close()
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if run.config.plots:
            from model.plot import plot_run

            plot_run(run.out_dir)
        best = f"{summary['best_val_bpc']:.4f}" if summary["best_val_bpc"] is not None else "-"
        print(f"done: best val {best} bits/char, {summary['elapsed_sec']:.0f} s; checkpoints in {run.out_dir}")
    if run.world > 1:
        torch.distributed.destroy_process_group()
    return summary


def main(args: argparse.Namespace) -> None:
    train(from_namespace(TrainConfig, args), getattr(args, "given", None))
