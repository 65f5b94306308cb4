"""Reproduce the article's experiments from finished runs and write docs/experiments.md with its plots.

    python -m bench.experiments --run runs/default --sweeps runs/lr-sweep-rmsprop runs/lr-sweep-adam \
        --data data/speeches --out docs

- loss curves of the learning-rate sweeps (made by `python -m model lr-sweep`);
- samples at temperatures 0.15, 0.5, 0.9 and 1.0 from checkpoints at several training stages;
- memorisation: the share of a sample's 20-character substrings found verbatim in the training text;
- time to quality: validation bits per character against wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from model.checkpoint import load_checkpoint
from model.dataset import load_dataset
from model.novel import copied_share
from model.plot import read_metrics
from model.sample import sample_text
from model.text import CleaningOptions, Vocab

TEMPERATURES = (0.15, 0.5, 0.9, 1.0)


def stage_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The earliest, a middle and the last periodic checkpoint of a run."""
    found = sorted(
        (int(m.group(1)), p) for p in run.glob("ckpt_iter*.pt") if (m := re.match(r"ckpt_iter(\d+)", p.name))
    )
    if not found:
        raise SystemExit(f"{run} has no ckpt_iter*.pt checkpoints")
    picks = [found[0], found[len(found) // 2], found[-1]]
    return list(dict.fromkeys(picks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the default model's training run folder")
    p.add_argument("--sweeps", nargs="*", default=[], help="lr-sweep output folders")
    p.add_argument("--data", required=True, help="the run's prepared dataset")
    p.add_argument("--out", default="docs", help="where experiments.md and img/ go")
    p.add_argument("--sample-length", type=int, default=300, help="characters per shown sample")
    p.add_argument("--novel-length", type=int, default=3000, help="characters per memorisation sample")
    p.add_argument("--gpu-run", help="optional run folder trained on a GPU, for the time-to-quality plot")
    args = p.parse_args()
    out, img = Path(args.out), Path(args.out) / "img"
    img.mkdir(parents=True, exist_ok=True)
    run = Path(args.run)
    dataset = load_dataset(args.data)
    training_text = dataset.vocab.decode(dataset.splits["train"].tolist())
    lines = [
        "# The article's experiments, reproduced",
        "",
        f"Made by `python -m bench.experiments` from the run in `{run}` (see docs/default-model.md).",
        "",
    ]
    results: dict = {}

    lines += ["## Learning rates and schedules", ""]
    for sweep in map(Path, args.sweeps):
        name = sweep.name
        shutil.copy(sweep / "lr_sweep.png", img / f"{name}.png")
        table = json.loads((sweep / "lr_sweep.json").read_text())
        results[name] = table
        lines += [
            f"### {name}",
            "",
            f"![{name}](img/{name}.png)",
            "",
            "| run | final train bits/char | best val bits/char | seconds |",
            "| --- | --- | --- | --- |",
        ]
        for r in table:
            best = f"{r['best_val_bpc']:.3f}" if r["best_val_bpc"] is not None else "-"
            # Sweeps written before lr_sweep.json held bits/char recorded the train loss in nats.
            train = r["final_train_bpc"] if "final_train_bpc" in r else r["final_train_loss"] / math.log(2)
            lines.append(f"| {r['name']} | {train:.3f} | {best} | {r['seconds']:.0f} |")
        lines.append("")

    lines += [
        "## Samples during training",
        "",
        "The same seed (1) at every stage and temperature; the prompt is empty.",
        "",
    ]
    results["samples"] = []
    for iteration, path in stage_checkpoints(run):
        net, ckpt = load_checkpoint(path)
        vocab, cleaning = Vocab(ckpt.vocab), CleaningOptions.from_dict(ckpt.cleaning)
        lines += [f"### After {iteration} iterations (val {ckpt.val_bpc:.3f} bits/char)", ""]
        for t in TEMPERATURES:
            text = sample_text(net, vocab, cleaning, args.sample_length, temperature=t, seed=1)
            results["samples"].append({"iter": iteration, "temperature": t, "text": text})
            lines += [f"**Temperature {t}**", "", "```", text.strip(), "```", ""]

    lines += [
        "## Memorisation",
        "",
        f"Share of the {args.novel_length:,}-character sample's n-character substrings found verbatim in the "
        "training split (final checkpoint, seed 2).",
        "",
        "| temperature | n=10 | n=20 | n=30 | n=50 |",
        "| --- | --- | --- | --- | --- |",
    ]
    results["memorisation"] = {}
    for t in TEMPERATURES:
        text = sample_text(net, vocab, cleaning, args.novel_length, temperature=t, seed=2)
        shares = {n: copied_share(text, training_text, n) for n in (10, 20, 30, 50)}
        results["memorisation"][t] = shares
        lines.append(f"| {t} | " + " | ".join(f"{s:.1%}" for s in shares.values()) + " |")
    lines.append("")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, folder in (("CPU (2 cores)", run), ("GPU", Path(args.gpu_run) if args.gpu_run else None)):
        if folder:
            _, val = read_metrics(folder)
            ax.plot([r["elapsed"] / 60 for r in val], [r["val_bpc"] for r in val], "o-", ms=3, label=label)
    ax.set(xlabel="wall-clock minutes", ylabel="validation bits per character", title="Time to quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "time_to_quality.png", dpi=110)
    plt.close(fig)
    _, val = read_metrics(run)
    results["time_to_quality"] = [{"minutes": r["elapsed"] / 60, "val_bpc": r["val_bpc"]} for r in val]
    lines += [
        "## Time to quality",
        "",
        "![time to quality](img/time_to_quality.png)",
        "",
        "| minutes | val bits/char |",
        "| --- | --- |",
    ]
    lines += [f"| {r['elapsed'] / 60:.1f} | {r['val_bpc']:.3f} |" for r in val[:: max(1, len(val) // 12)]]
    lines.append("")
    for name in ("loss.png", "lr_gradnorm.png", "update_ratio.png"):
        if (run / name).exists():
            shutil.copy(run / name, img / f"default_{name}")
    lines += [
        "## The default run's charts",
        "",
        "![loss](img/default_loss.png)",
        "",
        "![update ratio](img/default_update_ratio.png)",
        "",
        "![lr and gradient norm](img/default_lr_gradnorm.png)",
        "",
    ]
    (out / "experiments.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "experiments.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'experiments.md'}")


if __name__ == "__main__":
    main()
