"""`python -m model lr-sweep`: the article's experiment, the same network under several learning rates.

Trains one configuration per learning rate (and one decaying schedule), for the same number of
iterations from the same seed, then writes one PNG comparing the loss curves and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from model import train as train_module
from model.cli import UsageError, command_parser, from_namespace, parse_with_config
from model.config import OPTIMIZERS, TrainConfig
from model.plot import read_metrics, train_bpc
from model.schedule import parse_piecewise


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m model lr-sweep",
        "Train the same network under several learning rates / schedules and compare them. "
        "Any `python -m model train` flag after `--` is passed to every run.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset")
    p.add_argument("--out", default="runs/lr-sweep", metavar="DIR", help="folder for the runs, plot and table")
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=["rmsprop"],
        choices=OPTIMIZERS,
        help="optimisers to sweep (the article used RMSprop)",
    )
    p.add_argument(
        "--learning-rates", type=float, nargs="+", default=[0.1, 0.05, 0.01], help="constant learning rates to compare"
    )
    p.add_argument(
        "--lr-steps",
        default="0:0.1,4000:0.01,8000:0.002",
        help="a decaying piecewise schedule to add ('' for none); its iterations are scaled to "
        "--max-iters as a share of 10000, the DL4J run's length",
    )
    p.add_argument("--max-iters", type=int, default=1000, help="iterations per run")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N iterations")
    p.add_argument(
        "--train-config",
        metavar="FILE",
        help="a `python -m model train` config file (e.g. configs/tiny.toml) whose network and settings every run "
        "shares; flags after `--` win over it, and the sweep's own settings win over both",
    )
    p.add_argument("--replot", action="store_true", help="only redraw the plot of a finished sweep in --out")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="extra flags for every run, after --")
    return p


def scaled_steps(spec: str, max_iters: int) -> str:
    """Rescale a schedule written for a 10,000-iteration run to max_iters iterations."""
    table = parse_piecewise(spec)
    return ",".join(f"{round(it * max_iters / 10000)}:{lr}" for it, lr in table.items())


def candidates(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(run name, the TrainConfig settings that make it) for each run of the sweep."""
    runs = []
    for opt in args.optimizers:
        for lr in args.learning_rates:
            runs.append((f"{opt}-lr{lr:g}", {"optimizer": opt, "learning_rate": lr, "lr_schedule": "constant"}))
        if args.lr_steps:
            steps = scaled_steps(args.lr_steps, args.max_iters)
            runs.append((f"{opt}-decay", {"optimizer": opt, "lr_schedule": "piecewise", "lr_steps": steps}))
    return runs


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The settings every run shares: --train-config, the train flags after `--`, then the sweep's own."""
    extra = [f for f in args.train_flags if f != "--"]
    config_file = ["--config", args.train_config] if args.train_config else []
    try:
        flags = parse_with_config(train_module.build_parser(), [*config_file, "--data", args.data, *extra])
    except SystemExit as exc:
        raise UsageError(f"bad training flags for the sweep: {' '.join(extra)}") from exc
    return dataclasses.replace(
        from_namespace(TrainConfig, flags),
        max_iters=args.max_iters,
        eval_every=args.eval_every,
        checkpoint_every=args.max_iters,
        sample_every=0,
        plots=False,
        tensorboard=False,
        # A run without summary.json was interrupted: it starts again from scratch.
        overwrite=True,
    )


def plot_sweep(out: Path, results: list[dict]) -> None:
    """One PNG with every run's training and validation curves, read back from their metrics."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        train, val = read_metrics(out / result["name"])
        axes[0].plot([r["iter"] for r in train], [train_bpc(r) for r in train], label=result["name"], lw=0.9)
        axes[1].plot([r["iter"] for r in val], [r["val_bpc"] for r in val], "o-", ms=3, label=result["name"])
    # Log scale: a diverging learning rate's early spike would otherwise flatten every other curve.
    axes[0].set(xlabel="iteration", ylabel="train bits per character", title="Training loss", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="bits per character", title="Validation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)
    plt.close(fig)


def sweep_result(out: Path, name: str, summary: dict) -> dict:
    train, _ = read_metrics(out / name)
    return {
        "name": name,
        "final_train_bpc": train_bpc(train[-1]) if train else None,
        "best_val_bpc": summary["best_val_bpc"],
        "final_val_bpc": summary["final_val_bpc"],
        "seconds": summary["elapsed_sec"],
    }


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.replot:
        summary = out / "lr_sweep.json"
        if not summary.is_file():
            raise UsageError(f"{out} holds no finished sweep (no lr_sweep.json)")
        plot_sweep(out, json.loads(summary.read_text(encoding="utf-8")))
        return
    base = base_config(args)
    results = []
    for name, settings in candidates(args):
        finished = out / name / "summary.json"
        if finished.is_file():
            # An interrupted sweep is run again with the same command: runs that finished are kept.
            summary = json.loads(finished.read_text(encoding="utf-8"))
            if summary.get("iterations") == args.max_iters:
                print(f"=== {name}: finished earlier, kept ===")
                results.append(sweep_result(out, name, summary))
                continue
        print(f"=== {name} ===")
        config = dataclasses.replace(base, out=str(out / name), **settings)
        try:
            results.append(sweep_result(out, name, train_module.train(config)))
        except train_module.Interrupted as stopped:
            raise train_module.Interrupted(
                f"{stopped.message} (or run this lr-sweep again: finished runs are kept, {name} starts over)",
                stopped.exit_code - 128,
            ) from None

    (out / "lr_sweep.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_sweep(out, results)
    # Both losses in bits per character, as the progress bar and the plots show them.
    print(f"\n{'run':<20} {'final train bits/char':>21} {'best val bits/char':>18} {'seconds':>8}")
    for r in results:
        best = f"{r['best_val_bpc']:.4f}" if r["best_val_bpc"] is not None else "-"
        print(f"{r['name']:<20} {r['final_train_bpc']:>21.4f} {best:>18} {r['seconds']:>8.0f}")
    print(f"wrote {out / 'lr_sweep.png'} and {out / 'lr_sweep.json'}")
