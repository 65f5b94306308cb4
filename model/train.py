"""`python -m model train`: stateful truncated-BPTT training of a CharRNN on a prepared dataset.

A batch is B contiguous streams through the training text; the hidden state carries over from one
batch to the next (detached), as in torch-rnn and char-rnn. Everything needed to continue exactly
where training stopped (model, optimizer, iteration, carried state, RNG) goes into each checkpoint.
Runs under `torchrun` for multi-GPU data-parallel training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import build_model, read_checkpoint, save_checkpoint
from model.cli import UsageError
from model.dataset import Dataset, load_dataset
from model.evaluate import evaluate_ids
from model.model import INIT_SCHEMES, RNN_TYPES, CharRNN, ModelConfig, detach_state, nats_to_bits
from model.sample import sample_text
from model.schedule import SCHEDULES, make_schedule

OPTIMIZERS = ("adam", "rmsprop", "sgd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model train",
        description="Train a character-level language model on a prepared dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="TOML/YAML/JSON file with these flags as keys")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, metavar="DIR", help="dataset made by `python -m model prepare`")
    g.add_argument("--out", default="runs/run", metavar="DIR", help="run folder: checkpoints, logs, plots")
    g = p.add_argument_group("model")
    g.add_argument("--model-type", choices=tuple(RNN_TYPES), default="lstm", help="recurrent cell")
    g.add_argument("--rnn-size", type=int, default=640, help="hidden units per layer")
    g.add_argument("--num-layers", type=int, default=2, help="recurrent layers")
    g.add_argument("--wordvec-size", type=int, default=64, help="character embedding size")
    g.add_argument("--dropout", type=float, default=0.4, help="dropout between layers and before the decoder")
    g.add_argument(
        "--weight-drop", type=float, default=0.3, help="DropConnect on the recurrent matrices while training"
    )
    g.add_argument("--init", choices=INIT_SCHEMES, default="default", help="weight initialisation")
    g.add_argument("--init-std", type=float, default=0.05, help="standard deviation for --init normal")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="parallel streams per batch")
    g.add_argument("--seq-length", type=int, default=128, help="characters per stream per batch (BPTT length)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimiser")
    g.add_argument("--learning-rate", type=float, default=2e-3, help="base learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum for sgd")
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (decoupled for adam)")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule")
    g.add_argument("--lr-decay-every", type=float, default=5, help="step schedule: epochs between decays")
    g.add_argument("--lr-decay-factor", type=float, default=0.5, help="step schedule: factor per decay")
    g.add_argument(
        "--lr-steps",
        default="0:0.1,4000:0.01,8000:0.002",
        help="piecewise schedule: iteration:lr pairs (the DL4J example's)",
    )
    g.add_argument("--warmup-iters", type=int, default=100, help="cosine schedule: linear warmup iterations")
    g.add_argument("--min-lr-frac", type=float, default=0.05, help="cosine schedule: final lr as a share of base")
    g.add_argument("--grad-clip", type=float, default=5.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--max-epochs", type=float, default=12, help="stop after this many epochs")
    g.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations (0: use epochs)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--eval-every", type=int, default=200, help="validate every N iterations")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="save a checkpoint every N iterations")
    g.add_argument("--print-every", type=int, default=10, help="log metrics every N iterations")
    g.add_argument("--sample-every", type=int, default=500, help="print a sample every N iterations (0: never)")
    g.add_argument("--sample-length", type=int, default=200, help="characters per printed sample")
    g.add_argument("--sample-temperature", type=float, default=0.9, help="temperature of printed samples")
    g.add_argument("--init-from", metavar="CKPT", help="fine-tune from this checkpoint's weights")
    g.add_argument(
        "--reset-iterations",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --init-from: start counting iterations from 0",
    )
    g.add_argument("--resume", metavar="CKPT", help="continue exactly where this checkpoint stopped")
    g.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write TensorBoard event files to OUT/tb",
    )
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots at the end")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA if present")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision: fp16 autocast on CUDA, bf16 autocast on CPUs that multiply bf16 natively "
        "(AMX or AVX512-BF16); --no-amp trains in fp32 everywhere",
    )
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (model init, dropout, samples)")
    return p


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), by torch's own capability checks."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type for `device`, or None for plain fp32.

    fp16 on CUDA. bf16 on a CPU whose matrix units take bf16 (AMX, AVX512-BF16), where oneDNN's bf16
    LSTM measured 1.7x the fp32 speed for the default 2x640 (docs/bench/train_speed.json); on other
    CPUs bf16 would be emulated and slower, so they stay in fp32.
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weight_names(net: CharRNN) -> list[str]:
    """The weight matrices whose update-to-parameter ratio is charted (biases are left out)."""
    return [name for name, p in net.named_parameters() if p.dim() > 1]


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


def check_vocab(ckpt: dict, dataset: Dataset, path: str) -> None:
    if ckpt["vocab"] != dataset.vocab.chars:
        raise UsageError(
            f"{path} was trained on a different vocabulary ({len(ckpt['vocab'])} characters) than the dataset "
            f"({len(dataset.vocab)}); prepare the dataset with the same cleaning options and text"
        )


def train(args: argparse.Namespace) -> dict:
    """Run training; returns a summary (best val bpc, checkpoint paths, time)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = pick_device(args.device)
    is_main = rank == 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("batch_size", "seq_length", "print_every", "eval_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")

    dataset = load_dataset(args.data)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A different seed per rank, so that dropout masks differ across GPUs (as nanoGPT does).
    seed_everything(args.seed + rank)

    resume = read_checkpoint(args.resume, device) if args.resume else None
    init = read_checkpoint(args.init_from, device) if args.init_from and not resume else None
    if resume or init:
        source = resume or init
        check_vocab(source, dataset, args.resume or args.init_from)
        config_dict = dict(source["model_config"])
        if init:
            # Fine-tuning may change regularisation.
            config_dict.update(dropout=args.dropout, weight_drop=args.weight_drop)
        net = build_model({**source, "model_config": config_dict}, device)
        config = net.config
    else:
        config = ModelConfig(
            vocab_size=len(dataset.vocab),
            model_type=args.model_type,
            rnn_size=args.rnn_size,
            num_layers=args.num_layers,
            wordvec_size=args.wordvec_size,
            dropout=args.dropout,
            weight_drop=args.weight_drop,
        )
        net = CharRNN(config).to(device)
        net.init_weights(args.init, args.init_std)

    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    optimizer = make_optimizer(args.optimizer, net.parameters(), args.learning_rate, args.momentum, args.weight_decay)
    batcher = StreamBatcher(dataset.splits["train"], args.batch_size, args.seq_length, rank, world)
    per_epoch = batcher.batches_per_epoch
    total_iters = args.max_iters or max(1, math.ceil(args.max_epochs * per_epoch))
    lr_at = make_schedule(
        args.lr_schedule,
        args.learning_rate,
        per_epoch,
        total_iters,
        args.lr_decay_every,
        args.lr_decay_factor,
        args.lr_steps,
        args.warmup_iters,
        args.min_lr_frac,
    )

    start_iter, state, best_val, elapsed_before = 0, None, math.inf, 0.0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        start_iter = resume["iteration"]
        state = resume["rnn_state"]
        best_val = resume.get("best_val_bpc") or math.inf
        elapsed_before = resume.get("elapsed", 0.0)
        set_rng_state(resume["rng"])
    elif init and not args.reset_iterations:
        start_iter = init["iteration"]

    amp_dtype = autocast_dtype(device, args.amp)
    # bf16 keeps fp32's exponent range, so only fp16 needs its gradients scaled.
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    names = weight_names(net)
    log = MetricsLog(out_dir, args.tensorboard, start_iter if resume else None) if is_main else None
    if is_main:
        run_config = {k: v for k, v in vars(args).items() if k != "func"}
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")
        print(
            f"{config.model_type} {config.num_layers}x{config.rnn_size}, {net.num_parameters():,} parameters; "
            f"{len(dataset.splits['train']):,} training characters, {per_epoch} iterations per epoch, "
            f"{total_iters} iterations on {device}"
            + (f" x {world} processes" if distributed else "")
            + (f", {str(amp_dtype).removeprefix('torch.')} autocast" if amp_dtype else ", fp32")
        )

    def payload(iteration: int, val_bpc: float | None, elapsed: float) -> dict:
        return {
            "model_config": config.to_dict(),
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "vocab": dataset.vocab.chars,
            "unknown_policy": dataset.vocab.unknown_policy,
            "cleaning": dataset.cleaning.to_dict(),
            "dataset_sha256": dataset.sha256,
            "val_bpc": val_bpc,
            "best_val_bpc": best_val if best_val < math.inf else None,
            "iteration": iteration,
            "epoch": iteration / per_epoch,
            "rnn_state": state,
            "rng": rng_state(),
            "elapsed": elapsed,
            "train_args": {k: v for k, v in vars(args).items() if k != "func"},
        }

    bar = tqdm(
        total=total_iters, initial=start_iter, disable=not (is_main and args.progress), dynamic_ncols=True, unit="it"
    )
    loss_sum, loss_count, window_start = 0.0, 0, time.perf_counter()
    run_start = time.perf_counter()
    val_bpc: float | None = None
    chars_per_iter = args.batch_size * args.seq_length * world
    last_path = out_dir / "last.pt"
    for it in range(start_iter, total_iters):
        position = it % per_epoch
        if position == 0 or state is None:
            state = net.initial_state(args.batch_size, device)
        x, y = batcher.batch(position, device)
        lr = lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with autocast:
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.float().view(-1, config.vocab_size), y.reshape(-1))
        # Autocast hands the state back in its low precision; carry it in fp32 like the weights.
        state = detach_state(state, torch.float32)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
        log_now = is_main and ((it + 1) % args.print_every == 0 or it + 1 == total_iters)
        before = {n: p.detach().clone() for n, p in net.named_parameters() if n in names} if log_now else None
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.item()
        loss_count += 1
        bar.update(1)
        done = it + 1

        if log_now:
            now = time.perf_counter()
            params = dict(net.named_parameters())
            ratios = {n: ((params[n].detach() - w).norm() / (w.norm() + 1e-12)).item() for n, w in before.items()}
            record = {
                "iter": done,
                "epoch": round(done / per_epoch, 4),
                "train_loss": loss_sum / loss_count,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "chars_per_sec": chars_per_iter * loss_count / (now - window_start),
                "elapsed": elapsed_before + now - run_start,
                "update_ratio": ratios,
            }
            log.write(record)
            bar.set_postfix(
                epoch=f"{record['epoch']:.2f}",
                loss=f"{record['train_loss']:.3f}",
                val=f"{val_bpc:.3f}" if val_bpc else "-",
                lr=f"{lr:.2e}",
                cps=f"{record['chars_per_sec'] / 1000:.1f}k",
            )
            loss_sum, loss_count, window_start = 0.0, 0, time.perf_counter()

        if is_main and (done % args.eval_every == 0 or done == total_iters):
            # In the training precision: bf16 validation on CPU measured 2.8x faster (1.7 s against 4.7 s for
            # the default 2x640) and 0.00005 bits/char from fp32's.
            with autocast:
                val_nats, _ = evaluate_ids(
                    net, dataset.splits["val"], streams=args.batch_size, seq_length=args.seq_length, device=device
                )
            val_bpc = nats_to_bits(val_nats)
            log.write(
                {
                    "iter": done,
                    "epoch": round(done / per_epoch, 4),
                    "val_loss": val_nats,
                    "val_bpc": val_bpc,
                    "elapsed": elapsed_before + time.perf_counter() - run_start,
                }
            )
            if val_bpc < best_val:
                best_val = val_bpc
                save_checkpoint(
                    out_dir / "best.pt", payload(done, val_bpc, elapsed_before + time.perf_counter() - run_start)
                )
        if is_main and args.sample_every and done % args.sample_every == 0:
            text = sample_text(
                net,
                dataset.vocab,
                dataset.cleaning,
                length=args.sample_length,
                temperature=args.sample_temperature,
                seed=args.seed,
                device=device,
            )
            bar.write(f"--- sample at iteration {done} (temperature {args.sample_temperature}) ---\n{text}\n---")
            with (out_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"iter": done, "temperature": args.sample_temperature, "text": text}) + "\n")
        if is_main and (done % args.checkpoint_every == 0 or done == total_iters):
            elapsed = elapsed_before + time.perf_counter() - run_start
            data = payload(done, val_bpc, elapsed)
            # The validation loss goes into the name, as char-rnn does.
            name = f"ckpt_iter{done}" + (f"_val{val_bpc:.4f}" if val_bpc is not None else "") + ".pt"
            save_checkpoint(out_dir / name, data)
            save_checkpoint(last_path, data)
    bar.close()

    summary = {
        "iterations": total_iters,
        "best_val_bpc": best_val if best_val < math.inf else None,
        "final_val_bpc": val_bpc,
        "elapsed_sec": elapsed_before + time.perf_counter() - run_start,
        "best_checkpoint": str(out_dir / "best.pt"),
        "last_checkpoint": str(last_path),
    }
    if is_main:
        log.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if args.plots:
            from model.plot import plot_run

            plot_run(out_dir)
        print(
            f"done: best val {summary['best_val_bpc']:.4f} bits/char, {summary['elapsed_sec']:.0f} s; "
            f"checkpoints in {out_dir}"
        )
    if distributed:
        torch.distributed.destroy_process_group()
    return summary


def main(args: argparse.Namespace) -> None:
    train(args)
