"""Bad input to `python -m model` and `python -m export`: one line and exit code 2, no code run from a
checkpoint, no work destroyed; and the typed training config those checks live in."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bot.inference.runner import ModelRunner, read_model_info
from export.__main__ import main as export_main
from export.evaluate import onnx_char_nats
from model.__main__ import main as model_main
from model.checkpoint import CHECKPOINT_FORMAT, Checkpoint
from model.config import TrainConfig
from model.dataset import load_dataset
from model.plot import read_metrics
from model.train import build_parser
from tests.support.tiny_model import TINY_CORPUS, prepare_tiny

torch.set_num_threads(1)

TINY = ["--rnn-size", "16", "--wordvec-size", "8", "--batch-size", "4", "--seq-length", "16", "--eval-every", "5"]
TINY += ["--warmup-iters", "2", "--sample-every", "0", "--no-tensorboard", "--no-plots", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("inputs"), batch_size=4)


@pytest.fixture(scope="module")
def trained_run(dataset) -> Path:
    out = dataset.parent / "run"
    model_main(["train", "--data", str(dataset), "--out", str(out), "--max-iters", "10", *TINY])
    return out


def one_line_error(capsys, run, argv) -> str:
    """Run a CLI that must refuse argv: exit code 2 and exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


class Touch:
    """A pickled object whose unpickling runs a shell command, as a malicious checkpoint's would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_runs_no_code_anywhere(tmp_path, dataset, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:  # torch.save's format, with the payload inside the dict
        torch.save({"format": CHECKPOINT_FORMAT, "model": Touch(marker)}, f)
    pickle.loads(pickle.dumps(Touch(tmp_path / "control")))  # the payload is live: it does create a file
    assert (tmp_path / "control").exists()
    for run, argv in [
        (model_main, ["sample", "--checkpoint", str(evil)]),
        (model_main, ["evaluate", "--checkpoint", str(evil), "--split", "val", "--data", str(dataset)]),
        (model_main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r1"), "--resume", str(evil)]),
        (model_main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r2"), "--init-from", str(evil)]),
        (export_main, [str(evil), "-o", str(tmp_path / "evil.onnx")]),
    ]:
        err = one_line_error(capsys, run, argv)
        assert "it would import posix.system" in err or "it would import os.system" in err
        assert not marker.exists()


def legacy_copy(path: Path, to: Path) -> Path:
    """The checkpoint as the code before the Checkpoint type wrote it: numpy's RNG state as a numpy array,
    the flags under train_args, no dataset field (what /work/main/runs/*.pt of that time hold)."""
    data = torch.load(path, weights_only=True)
    kind, keys, pos, has_gauss, cached = data["rng"]["numpy"]
    data["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    data["train_args"] = {**data.pop("train_config"), "func": None}
    del data["dataset"]
    torch.save(data, to)
    return to


def test_checkpoints_written_before_the_type_still_load_and_resume(trained_run, dataset, tmp_path):
    legacy = legacy_copy(trained_run / "last.pt", tmp_path / "legacy.pt")
    with pytest.raises(pickle.UnpicklingError):  # numpy arrays need the allow-list
        torch.load(legacy, weights_only=True)
    ckpt = Checkpoint.load(legacy)
    assert ckpt.iteration == 10 and ckpt.train_config["data"] == str(dataset)
    common = ["--data", str(dataset), "--max-iters", "14", "--print-every", "1", *TINY]
    model_main(["train", "--out", str(tmp_path / "from-legacy"), "--resume", str(legacy), *common])
    model_main(["train", "--out", str(tmp_path / "from-new"), "--resume", str(trained_run / "last.pt"), *common])
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / run)[0]] for run in ("from-legacy", "from-new")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_a_directory_or_damaged_file_as_checkpoint_is_named_as_such(tmp_path, capsys):
    assert "is a directory" in one_line_error(capsys, model_main, ["sample", "--checkpoint", str(tmp_path)])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    err = one_line_error(capsys, model_main, ["sample", "--checkpoint", str(tmp_path / "junk.pt")])
    assert "not a PyTorch file" in err and "weights_only" not in err


BAD_TRAIN_FLAGS = [
    (["--rnn-size", "0"], "--rnn-size must be at least 1"),
    (["--rnn-size", "-8"], "--rnn-size must be at least 1"),
    (["--num-layers", "0"], "--num-layers must be at least 1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--weight-drop", "-0.1"], "--weight-drop must be in [0, 1)"),
    (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
    (["--max-iters", "-5"], "--max-iters must be at least 0"),
    (["--sample-every", "5", "--sample-temperature", "1e-320"], "--sample-temperature must be from 0.001 to 2"),
    (["--sample-every", "5", "--sample-length", "1000000000"], "--sample-length must be a number of characters"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN_FLAGS)
def test_bad_training_flags_are_refused_before_any_work(flags, message, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(capsys, model_main, ["train", "--data", str(dataset), "--out", str(out), *TINY, *flags])
    assert message in err
    assert not out.exists()  # refused at the start, not after iterations of work


def test_output_folders_that_cannot_be_written(dataset, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    corpus = dataset.parent / "corpus.txt"
    for command in (["train", "--data", str(dataset), *TINY], ["prepare", "--input", str(corpus)]):
        assert "is a file, not a folder" in one_line_error(capsys, model_main, [*command, "--out", str(a_file)])
        # /proc takes no new folders, even for root, as a read-only mount would not.
        assert "cannot be written" in one_line_error(capsys, model_main, [*command, "--out", "/proc/speechbot-run"])
    argv = ["prepare", "--input", str(corpus), "--out", str(tmp_path / "d"), "--batch-size", "-5"]
    err = one_line_error(capsys, model_main, argv)
    assert "--batch-size must be at least 1" in err
    err = one_line_error(capsys, model_main, ["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "d")])
    assert "is a directory" in err


BAD_CONFIGS = [
    ("bad.toml", "batch-size = [1, 2]\n", "batch-size must be one value, not a list"),
    ("bad.toml", "[rnn-size]\nvalue = 8\n", "rnn-size must be one value, not a table"),
    ("bad.toml", "rnn-size = 4.5\n", "rnn-size must be an integer, not 4.5"),
    ("bad.toml", 'model-type = "transformer"\n', "model-type must be one of lstm, gru, rnn"),
    ("bad.yaml", "rnn_size: true\n", "rnn-size must be an integer, not true"),
    ("bad.json", '{"amp": "yes"}', "amp must be true or false"),
]


@pytest.mark.parametrize("name,text,message", BAD_CONFIGS)
def test_config_files_hold_the_flags_types(name, text, message, dataset, tmp_path, capsys):
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    argv = ["train", "--config", str(config), "--data", str(dataset), "--out", str(tmp_path / "run")]
    err = one_line_error(capsys, model_main, argv)
    assert message in err and str(config) in err


def test_checked_in_configs_are_valid(tmp_path):
    configs = sorted(Path("configs").glob("*.toml"))
    sweeps = {"lr-sweep.toml", "lr-sweep-tiny.toml"}
    assert {p.name for p in configs} >= {"bundled.toml", "default.toml", "tiny.toml", *sweeps}
    from model.cli import from_namespace, parse_with_config
    from model.sweep import base_config, candidates
    from model.sweep import build_parser as sweep_parser

    for path in configs:
        parser = sweep_parser() if path.name in sweeps else build_parser()
        args = parse_with_config(parser, ["--config", str(path), "--data", str(tmp_path)])
        if path.name not in sweeps:
            from_namespace(TrainConfig, args)
    # The smoke run of the README, and the quick sweep that trains its network.
    tiny = from_namespace(TrainConfig, parse_with_config(build_parser(), ["--config", "configs/tiny.toml"]))
    assert (tiny.rnn_size, tiny.optimizer, tiny.max_iters, tiny.sample_every) == (128, "rmsprop", 400, 100)
    args = parse_with_config(sweep_parser(), ["--config", "configs/lr-sweep-tiny.toml"])
    assert len(candidates(args)) == 8
    shared = base_config(args)
    assert (shared.rnn_size, shared.dropout, shared.max_iters, shared.data) == (128, 0.0, 300, "data/speeches")
    bundled = parse_with_config(build_parser(), ["--config", "configs/bundled.toml"])
    assert (bundled.rnn_size, bundled.dropout, bundled.weight_drop, bundled.max_epochs) == (640, 0.3, 0.2, 10)
    assert bundled.data == "data/both" and bundled.threads == 1 and bundled.checkpoint_every == 250
    # The defaults of the dataclass are those of the default run's file.
    default = parse_with_config(build_parser(), ["--config", "configs/default.toml"])
    assert from_namespace(TrainConfig, default) == TrainConfig(data="data/speeches", out="runs/default")


def test_help_lists_every_config_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        model_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "hidden units per layer (default: 640)" in text and "--no-amp" in text


def test_an_existing_run_is_never_replaced_without_overwrite(trained_run, dataset, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    argv = ["train", "--data", str(dataset), "--out", str(trained_run), "--max-iters", "3", *TINY]
    assert "holds a training run" in one_line_error(capsys, model_main, argv)
    err = one_line_error(capsys, model_main, [*argv, "--init-from", str(trained_run / "last.pt")])
    assert "holds a training run" in err
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == before
    # Fine-tuning into a new folder, or an explicit --overwrite of a copy, are fine.
    tuned = tmp_path / "tuned"
    model_main([*argv[:4], str(tuned), "--max-iters", "3", *TINY, "--init-from", str(trained_run / "last.pt")])
    assert (tuned / "last.pt").is_file()
    (tuned / "ckpt_iter99_val9.0000.pt").write_bytes(b"stale")
    model_main([*argv[:4], str(tuned), "--max-iters", "3", *TINY, "--overwrite"])
    assert [p.name.split("_val")[0] for p in tuned.glob("ckpt_*")] == ["ckpt_iter3"]


def test_advice_to_continue_a_run_names_a_checkpoint_that_exists(trained_run, dataset, tmp_path, capsys):
    argv = ["train", "--data", str(dataset), *TINY, "--max-iters", "3"]
    # A run stopped before its first save (Ctrl-C did that before last.pt was saved on signals).
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", stopped / "metrics.jsonl")
    err = one_line_error(capsys, model_main, [*argv, "--out", str(stopped)])
    assert "it has no checkpoint to continue from" in err and "--resume" not in err and "--overwrite" in err
    # Without last.pt the newest numbered checkpoint is the one to continue from, and the advice works.
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "last.pt").unlink()
    shutil.copy(next(copy.glob("ckpt_iter10_*.pt")), copy / "ckpt_iter2_val9.9999.pt")
    err = one_line_error(capsys, model_main, [*argv, "--out", str(copy)])
    advised = err.split("`python -m model train --resume ")[1].split("`")[0]
    assert Path(advised) == next(copy.glob("ckpt_iter10_*.pt"))
    model_main(["train", "--resume", advised, "--max-iters", "12"])
    assert Checkpoint.load(copy / "last.pt").iteration == 12


def test_a_damaged_dataset_file_is_named_in_one_line(dataset, tmp_path, capsys):
    damaged = tmp_path / "ds"
    shutil.copytree(dataset, damaged)
    whole = (dataset / "train.npy").read_bytes()
    argv = ["train", "--data", str(damaged), "--out", str(tmp_path / "run"), *TINY]
    for cut in (len(whole) - 7, 40, 0):  # cut in the ids, in the header, nothing left
        (damaged / "train.npy").write_bytes(whole[:cut])
        err = one_line_error(capsys, model_main, argv)
        assert f"{damaged / 'train.npy'} is damaged" in err and "prepare the dataset again" in err
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_is_named_in_one_line(dataset, tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes("# Réglages\nrnn-size = 16\n".encode("latin-1"))
    for command in (["train", "--data", str(dataset)], ["lr-sweep", "--data", str(dataset)]):
        err = one_line_error(capsys, model_main, [*command, "--config", str(config)])
        assert f"config file {config} is not UTF-8: byte 0xe9 at offset 3 is invalid" in err


def test_sampling_length_has_a_ceiling(trained_run, capsys):
    argv = ["sample", "--checkpoint", str(trained_run / "last.pt"), "--length", "1000000000"]
    assert "--length must be a number of characters from 1 to 100,000" in one_line_error(capsys, model_main, argv)


def test_prepare_writes_the_split_texts(dataset):
    loaded = load_dataset(dataset)
    for split, ids in loaded.splits.items():
        assert (dataset / f"{split}.txt").read_text(encoding="utf-8") == loaded.vocab.decode(ids.tolist())
    assert len((dataset / "val.txt").read_text(encoding="utf-8")) == loaded.meta["split_sizes"]["val"]


def test_a_dataset_prepared_with_another_vocabulary_fine_tunes_a_model_of_it(trained_run, dataset, tmp_path, capsys):
    # Text with fewer characters than the model's corpus, and two it never saw (é folds to e, ✓ is dropped).
    other = tmp_path / "other.txt"
    other.write_text("We are going to win. We will win so much, café ✓ believe me.\n" * 12, encoding="utf-8")
    own, borrowed = tmp_path / "own", tmp_path / "borrowed"
    small = ["--batch-size", "4"]
    model_main(["prepare", "--input", str(other), "--out", str(own), *small])
    argv = ["train", "--out", str(tmp_path / "tuned"), "--max-iters", "3", *TINY]
    argv += ["--init-from", str(trained_run / "last.pt")]
    assert "different vocabulary" in one_line_error(capsys, model_main, [*argv, "--data", str(own)])
    model_main(["prepare", "--input", str(other), "--vocab-from", str(dataset), "--out", str(borrowed), *small])
    tuned_on, model_of = load_dataset(borrowed), load_dataset(dataset)
    assert tuned_on.vocab.chars == model_of.vocab.chars
    text = "".join((borrowed / f"{split}.txt").read_text(encoding="utf-8") for split in ("train", "val", "test"))
    assert "cafe  believe" in text and "✓" not in text and "é" not in text
    assert sum(tuned_on.meta["split_sizes"].values()) == len(text)
    model_main([*argv, "--data", str(borrowed)])
    tuned = Checkpoint.load(tmp_path / "tuned" / "last.pt")
    assert tuned.vocab == model_of.vocab.chars and tuned.dataset_sha256 == tuned_on.sha256
    # The exported model names both texts the network learned from, the first one first.
    export_main([str(tmp_path / "tuned" / "last.pt"), "-o", str(tmp_path / "tuned.onnx")])
    assert read_model_info(tmp_path / "tuned.onnx")[1].corpus_sha256 == [*model_of.sha256, *tuned_on.sha256]
    missing = ["prepare", "--input", str(other), "--vocab-from", str(tmp_path), "--out", str(tmp_path / "x")]
    assert "is not a prepared dataset" in one_line_error(capsys, model_main, missing)


def test_progress_is_labelled_and_checkpoints_carry_their_own_val(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(out), *TINY, "--max-iters", "12", "--checkpoint-every", "4"]
    model_main([*argv, "--warmup-iters", "100", "--progress"])
    err = capsys.readouterr().err
    assert "warning: --warmup-iters 100 is not shorter than the run (12 iterations)" in err
    _, val = read_metrics(out)
    assert [r["iter"] for r in val] == [4, 5, 8, 10, 12]
    final = val[-1]["val_bpc"]
    last_bar = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "bits/char: train " in last_bar and f"val {final:.3f} (iter 12)" in last_bar
    for r in val:
        if r["iter"] % 4 == 0:
            path = out / f"ckpt_iter{r['iter']}_val{r['val_bpc']:.4f}.pt"
            assert Checkpoint.load(path).val_bpc == r["val_bpc"]
    assert json.loads((out / "config.json").read_text())["warmup_iters"] == 100


def test_export_refuses_to_write_over_inputs_and_leaves_no_temporary_file(tiny_checkpoint, tmp_path, capsys):
    victim = tmp_path / "victim.pt"
    victim.write_bytes(tiny_checkpoint.read_bytes())
    err = one_line_error(capsys, export_main, [str(victim), "-o", str(victim)])
    assert "is also an input" in err and victim.read_bytes() == tiny_checkpoint.read_bytes()
    text = tmp_path / "val.txt"
    text.write_text(TINY_CORPUS, encoding="utf-8")
    assert "is also an input" in one_line_error(
        capsys, export_main, [str(victim), "-o", str(text), "--text", str(text)]
    )
    folder = tmp_path / "models"
    folder.mkdir()
    assert "is a directory" in one_line_error(capsys, export_main, [str(victim), "-o", str(folder)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "val.txt", "victim.pt"]


def test_export_evaluate_in_many_streams_scores_as_one_stream(tiny_onnx, capsys):
    runner = ModelRunner(tiny_onnx, "cpu")
    ids, _ = runner.info.text_ids(TINY_CORPUS * 6)
    one = onnx_char_nats(runner.session, runner.info, ids, seq_length=100)
    # A burn-in as long as the text: every stream reads from the start, so each character's score is exact.
    whole = onnx_char_nats(runner.session, runner.info, ids, seq_length=100, streams=7, burn_in=len(ids))
    assert whole.shape == one.shape and np.abs(whole - one).max() < 1e-5
    many = onnx_char_nats(runner.session, runner.info, ids, seq_length=100, streams=8, burn_in=200)
    assert many.shape == one.shape and abs(many.mean() - one.mean()) / math.log(2) < 1e-4
    assert not np.array_equal(many, one)  # the streams really started afresh
    # Three sessions side by side (lanes), each with its share of the streams, score as one session does.
    lanes = [runner.session] + [ModelRunner(tiny_onnx, "cpu").session for _ in range(2)]
    shared = onnx_char_nats(lanes, runner.info, ids, seq_length=100, streams=8, burn_in=200)
    assert shared.shape == many.shape and np.abs(shared - many).max() < 1e-6


def test_export_evaluate_checks_its_numbers(tiny_onnx, tiny_dir, capsys):
    text = str(tiny_dir / "corpus.txt")
    for flag in ("--lanes", "--streams", "--seq-length"):
        err = one_line_error(capsys, export_main, ["evaluate", str(tiny_onnx), "--text", text, flag, "0"])
        assert f"{flag} must be a positive number, not 0" in err
    export_main(["evaluate", str(tiny_onnx), "--text", text, "--lanes", "3", "--streams", "8", "--no-progress"])
    assert "bits/char" in capsys.readouterr().out


def test_export_evaluate_names_a_directory_as_such(tiny_dir, tiny_onnx, capsys):
    err = one_line_error(capsys, export_main, ["evaluate", str(tiny_dir), "--text", str(tiny_dir / "corpus.txt")])
    assert f"model file {tiny_dir} is a directory" in err
    assert "is a directory" in one_line_error(
        capsys, export_main, ["evaluate", str(tiny_onnx), "--text", str(tiny_dir)]
    )


def test_export_evaluate_shows_progress(tiny_dir, tiny_onnx, capsys):
    export_main(["evaluate", str(tiny_onnx), "--text", str(tiny_dir / "corpus.txt"), "--seq-length", "64"])
    captured = capsys.readouterr()
    assert "scoring" in captured.err and "chunk" in captured.err and "bits/char" in captured.out
