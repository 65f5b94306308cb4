"""`python -m model average`: one checkpoint whose weights are the mean of several checkpoints of one run.

Late in a run whose learning rate decays, consecutive checkpoints sit around the same minimum, each
displaced by the last steps' noise; the mean of their weights is nearer its centre and often scores a
little better on held-out text than any of them (checkpoint averaging as in AWD-LSTM, Polyak averaging,
the averaging step of SWA). Unlike an ensemble (model.ensemble), the result is one network of the
same size, so it costs nothing more to serve. The mean of networks from different runs is no network
at all, hence the checks that the inputs share their network, vocabulary, cleaning and data; the
average's val bits/char is measured, never copied, and shown next to the inputs' own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.checkpoint import Checkpoint, CheckpointError, check_same_fields
from model.cli import UsageError, check_input_file, check_output_file, command_parser
from model.dataset import load_dataset
from model.evaluate import checkpoint_dataset, evaluate_ids
from model.model import nats_to_bits
from model.train import CKPT_ITER, numbered_checkpoints

# What must agree for the mean of the weights to be a network of the same run.
SAME_RUN_FIELDS = ("model_config", "vocab", "unknown_policy", "cleaning", "dataset_sha256", "earlier_sha256")
SAME_RUN = "only checkpoints of one run (one network, one dataset) are averaged"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m model average",
        "Write one checkpoint whose weights are the mean of several checkpoints of the same run (e.g. its "
        "last few), with its val bits/char measured on the run's dataset and shown next to the inputs'.",
    )
    p.add_argument("checkpoints", nargs="*", default=[], metavar="CKPT", help="checkpoints to average (two or more)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="checkpoint to write (a new file)")
    p.add_argument("--run", metavar="DIR", help="with --last: a run folder to take checkpoints from instead of CKPT")
    p.add_argument("--last", type=int, metavar="N", help="with --run: its N latest ckpt_iterN_val*.pt, by iteration")
    p.add_argument(
        "--data", metavar="DIR", help="prepared dataset whose val split is scored (default: the one the inputs record)"
    )
    p.add_argument(
        "--score-inputs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score each input on val the same way, for the comparison (off: their stored val only)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for scoring")
    return p


def input_paths(args: argparse.Namespace) -> list[Path]:
    """The checkpoints to average: the CKPT arguments, or the --last N numbered ones of --run."""
    if args.run is not None or args.last is not None:
        if args.checkpoints or args.run is None or args.last is None:
            raise UsageError("give checkpoints as CKPT arguments, or --run DIR with --last N, not both")
        if args.last < 2:
            raise UsageError(f"--last must be at least 2 (checkpoints to average), not {args.last}")
        run = Path(args.run)
        if not run.is_dir():
            raise UsageError(f"--run {run} is not a folder")
        numbered = numbered_checkpoints(run)
        if len(numbered) < args.last:
            raise UsageError(f"--run {run} holds {len(numbered)} ckpt_iterN_val*.pt checkpoints; --last {args.last}")
        return numbered[-args.last :]
    if len(args.checkpoints) < 2:
        raise UsageError(f"give at least two checkpoints to average, not {len(args.checkpoints)}")
    paths = [check_input_file(path, "checkpoint") for path in args.checkpoints]
    for k, path in enumerate(paths):
        if any(path.samefile(earlier) for earlier in paths[:k]):
            raise UsageError(f"checkpoint {path} is given twice; give each checkpoint once")
    return paths


def average_weights(paths: list[Path], ckpts: list[Checkpoint]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' weights (in float64, stored in each tensor's own dtype); a tensor that is
    not floating point (none in a CharRNN: a counter) is the last checkpoint's."""
    shapes = {name: tensor.shape for name, tensor in ckpts[0].model.items()}
    for path, ckpt in zip(paths[1:], ckpts[1:], strict=True):
        if {name: tensor.shape for name, tensor in ckpt.model.items()} != shapes:
            raise CheckpointError(f"{path} holds other weights (names or shapes) than {paths[0]}; {SAME_RUN}")
    return {
        name: torch.stack([ckpt.model[name].double() for ckpt in ckpts]).mean(dim=0).to(tensor.dtype)
        if tensor.is_floating_point()
        else ckpts[-1].model[name].clone()
        for name, tensor in ckpts[0].model.items()
    }


def scoring_dataset(data: str | None, newest_path: Path, newest: Checkpoint) -> str:
    """--data, checked to hold the inputs' text, or the dataset folder the newest input records."""
    if data is None:
        return checkpoint_dataset(newest, str(newest_path), "give --data DIR")
    dataset = load_dataset(data)
    if newest.dataset_sha256 and dataset.sha256 != newest.dataset_sha256:
        raise UsageError(f"--data {data} was not prepared from the text the checkpoints were trained on (sha256)")
    if dataset.vocab.chars != newest.vocab:
        raise UsageError(f"--data {data} has a different vocabulary from the checkpoints")
    return data


def val_bpc(ckpt: Checkpoint, val_ids, device: str) -> float:
    """Bits/char on the val split as `python -m model evaluate` scores it: one stream, full left context."""
    return nats_to_bits(evaluate_ids(ckpt.build_model(device), val_ids, device=device)[0])


def main(args: argparse.Namespace) -> None:
    paths = input_paths(args)
    output = check_output_file(args.output, "output", paths)
    if output.name in ("last.pt", "best.pt") or CKPT_ITER.match(output.name):
        # Training writes, resumes from and picks (--last) files of these names: a mean of weights among them
        # would replace a resumable checkpoint or be taken for one of the run's own.
        raise UsageError(f"output {output} has a name training uses for its checkpoints; give another, e.g. average.pt")
    ckpts = [Checkpoint.load(path) for path in paths]
    check_same_fields(paths, ckpts, SAME_RUN_FIELDS, SAME_RUN)
    # Oldest first, by the iteration each records: the table reads in the run's order, and the newest is last.
    order = sorted(range(len(paths)), key=lambda k: ckpts[k].iteration)
    paths, ckpts = [paths[k] for k in order], [ckpts[k] for k in order]
    newest = ckpts[-1]
    data_dir = scoring_dataset(args.data, paths[-1], newest)
    val_ids = load_dataset(data_dir).splits["val"]
    averaged = Checkpoint(
        model_config=newest.model_config,
        model=average_weights(paths, ckpts),
        vocab=newest.vocab,
        unknown_policy=newest.unknown_policy,
        cleaning=newest.cleaning,
        dataset_sha256=newest.dataset_sha256,
        earlier_sha256=newest.earlier_sha256,
        dataset=str(Path(data_dir).resolve()),
        # The run's position and settings are the newest input's; the optimizer and RNG states are left
        # out: no run goes on from a mean of weights (train --init-from starts one from it).
        iteration=newest.iteration,
        epoch=newest.epoch,
        elapsed=newest.elapsed,
        train_config=newest.train_config,
        averaged_from=[
            {"path": str(path.resolve()), "iteration": ckpt.iteration, "val_bpc": ckpt.val_bpc}
            for path, ckpt in zip(paths, ckpts, strict=True)
        ],
    )
    averaged.val_bpc = val_bpc(averaged, val_ids, args.device)
    averaged.save(output)
    scored = [val_bpc(ckpt, val_ids, args.device) if args.score_inputs else None for ckpt in ckpts]
    print(comparison_table(paths, ckpts, scored, output, averaged))
    print(
        f"stored: measured during training (--batch-size streams); val: {data_dir} val split, one stream, "
        "as `python -m model evaluate` scores it"
    )
    if args.score_inputs:
        best = min(scored)
        verdict = "better" if averaged.val_bpc < best else "no better"
        print(f"the average is {verdict} than the best input: {averaged.val_bpc:.4f} vs {best:.4f} bits/char")
    print(f"wrote {output}")


def comparison_table(
    paths: list[Path], ckpts: list[Checkpoint], scored: list[float | None], output: Path, averaged: Checkpoint
) -> str:
    """One row per input (iteration, stored val, val scored here) and one for the average."""

    def bits(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [
        (str(path), str(ckpt.iteration), bits(ckpt.val_bpc), bits(val))
        for path, ckpt, val in zip(paths, ckpts, scored, strict=True)
    ]
    rows.append((f"average -> {output}", str(averaged.iteration), "-", bits(averaged.val_bpc)))
    header = ("checkpoint", "iteration", "stored val", "val bits/char")
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        # The names left-aligned, the numbers right-aligned.
        numbers = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join([row[0].ljust(widths[0]), *numbers])

    return "\n".join(line(row) for row in [header, *rows])
