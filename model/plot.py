"""`python -m model plot RUN_DIR`: PNG charts of a run's metrics.jsonl (written at the end of training too)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

from model.cli import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model plot", description="Write PNG plots of a training run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a training run")
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Training records and validation records, deduplicated by iteration (a resumed run may repeat)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl; is it the --out folder of `python -m model train`?")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            (val if "val_loss" in record else train)[record["iter"]] = record
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def train_bpc(record: dict) -> float:
    """A training record's loss in bits per character, the unit of every table, plot and progress bar
    (metrics.jsonl written before train_bpc existed holds the loss in nats only)."""
    return record["train_bpc"] if "train_bpc" in record else record["train_loss"] / math.log(2)


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    written = []

    def save(fig: plt.Figure, name: str) -> None:
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    iters = [r["iter"] for r in train]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(iters, [train_bpc(r) for r in train], label="train", lw=1)
    if val:
        ax.plot([r["iter"] for r in val], [r["val_bpc"] for r in val], "o-", label="validation", ms=3)
    ax.set(xlabel="iteration", ylabel="bits per character", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(iters, [r["lr"] for r in train])
    axes[0].set(xlabel="iteration", ylabel="learning rate", title="Learning rate", yscale="log")
    axes[1].plot(iters, [r["grad_norm"] for r in train], lw=0.8)
    axes[1].set(xlabel="iteration", ylabel="gradient norm (before clipping)", title="Gradient norm", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    save(fig, "lr_gradnorm.png")

    if train and train[0].get("update_ratio"):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in train[0]["update_ratio"]:
            ax.plot(iters, [r["update_ratio"].get(name, float("nan")) for r in train], label=name, lw=0.8)
        ax.set(
            xlabel="iteration", ylabel="|update| / |weights|", title="Update-to-parameter ratio per layer", yscale="log"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "update_ratio.png")
    return written


def main(args: argparse.Namespace) -> None:
    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
