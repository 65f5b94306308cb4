"""`python -m model average`: the mean of several checkpoints' weights, scored on val, usable everywhere a
trained checkpoint is; inputs of different runs refused in one line."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from bot.inference.runner import ModelRunner
from export.pipeline import export_checkpoint
from model.__main__ import main as model_main
from model.checkpoint import Checkpoint
from model.dataset import load_dataset
from model.evaluate import evaluate_ids
from model.model import nats_to_bits
from tests.support.tiny_model import TINY_CORPUS, prepare_tiny, train_tiny
from tests.test_model_inputs import TINY, one_line_error

ITERATIONS = (40, 60, 80)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny(tmp_path_factory.mktemp("average"), batch_size=2)


@pytest.fixture(scope="module")
def run(dataset) -> Path:
    """A run folder as training leaves it: one network (same seed) saved at three iterations, each recording
    its dataset, and last.pt (the newest again)."""
    folder = dataset.parent / "run"
    for iterations in ITERATIONS:
        ckpt = Checkpoint.load(train_tiny(dataset.parent / "trained.pt", iterations=iterations))
        ckpt.dataset = str(dataset.resolve())
        ckpt.save(folder / f"ckpt_iter{iterations}_val{ckpt.val_bpc:.4f}.pt")
    shutil.copy(max(folder.glob("ckpt_iter80_*.pt")), folder / "last.pt")
    return folder


def numbered(run: Path) -> list[Path]:
    return [next(run.glob(f"ckpt_iter{iterations}_*.pt")) for iterations in ITERATIONS]


def test_the_average_is_the_mean_of_the_weights_and_its_val_is_measured(run, dataset, tmp_path, capsys):
    inputs = numbered(run)
    out = tmp_path / "average.pt"
    # Given in any order (they are taken by iteration); the dataset comes from the checkpoints.
    model_main(["average", *map(str, reversed(inputs)), "-o", str(out)])
    printed = capsys.readouterr().out
    ckpts = [Checkpoint.load(path) for path in inputs]
    averaged = Checkpoint.load(out)
    assert averaged.model.keys() == ckpts[0].model.keys()
    for name, tensor in averaged.model.items():
        mean = torch.stack([ckpt.model[name].double() for ckpt in ckpts]).mean(dim=0)
        # Within float32's rounding of the exact mean.
        assert tensor.dtype == torch.float32 and torch.allclose(tensor.double(), mean, rtol=1e-7, atol=0), name
    # The weights really moved between the inputs, so the mean is none of them.
    assert not torch.equal(averaged.model["decoder.weight"], ckpts[-1].model["decoder.weight"])
    val_ids = load_dataset(dataset).splits["val"]
    assert averaged.val_bpc == nats_to_bits(evaluate_ids(averaged.build_model(), val_ids)[0])
    assert averaged.val_bpc not in [ckpt.val_bpc for ckpt in ckpts]
    assert averaged.iteration == 80 and averaged.dataset == str(dataset.resolve())
    assert [entry["iteration"] for entry in averaged.averaged_from] == list(ITERATIONS)
    assert averaged.optimizer is None and averaged.rng is None
    # The table: each input's stored and measured val, and the average's.
    for path, ckpt in zip(inputs, ckpts, strict=True):
        row = next(line for line in printed.splitlines() if line.startswith(str(path)))
        measured = nats_to_bits(evaluate_ids(ckpt.build_model(), val_ids)[0])
        assert row.split()[1:] == [str(ckpt.iteration), f"{ckpt.val_bpc:.4f}", f"{measured:.4f}"]
    assert f"average -> {out}  " in printed and printed.count(f"{averaged.val_bpc:.4f}") == 2  # row and verdict
    # `evaluate` (no --data: the average records its dataset) scores what was stored.
    model_main(["evaluate", "--checkpoint", str(out), "--split", "val"])
    reported = float(capsys.readouterr().out.split(" bits/char")[0].rsplit(" ", 1)[1])
    assert reported == pytest.approx(averaged.val_bpc, abs=5e-5)
    model_main(["sample", "--checkpoint", str(out), "--length", "30", "--seed", "1"])
    assert len(capsys.readouterr().out.strip()) >= 30
    exported = export_checkpoint(out, tmp_path / "average.onnx").path
    assert ModelRunner(exported, "cpu").info.val_bpc == pytest.approx(averaged.val_bpc)


def test_last_n_of_a_run_are_its_newest_numbered_checkpoints(run, dataset, tmp_path, capsys):
    out = tmp_path / "last2.pt"
    model_main(["average", "--run", str(run), "--last", "2", "-o", str(out), "--data", str(dataset)])
    averaged = Checkpoint.load(out)
    assert [entry["path"] for entry in averaged.averaged_from] == [str(p.resolve()) for p in numbered(run)[1:]]
    assert "the average is " in capsys.readouterr().out
    model_main(["average", "--run", str(run), "--last", "3", "-o", str(out), "--no-score-inputs"])
    printed = capsys.readouterr().out
    assert len(Checkpoint.load(out).averaged_from) == 3 and "the average is" not in printed


def edited_copy(source: Path, target: Path, **changes) -> Path:
    dataclasses.replace(Checkpoint.load(source), **changes).save(target)
    return target


def test_checkpoints_of_different_runs_are_refused_naming_the_file_and_the_field(run, tmp_path, capsys):
    first, second, _ = numbered(run)
    ckpt = Checkpoint.load(first)
    gru = train_tiny(tmp_path / "gru.pt", model_type="gru", iterations=2)
    other_text = train_tiny(tmp_path / "other-text.pt", text=TINY_CORPUS + "And more.\n", iterations=2)
    cleaning = edited_copy(second, tmp_path / "cleaning.pt", cleaning={**ckpt.cleaning, "lowercase": True})
    vocab = edited_copy(second, tmp_path / "vocab.pt", vocab=ckpt.vocab[::-1])
    out = tmp_path / "never.pt"
    for path, field in [
        (gru, "model config (model_type gru vs lstm)"),
        (other_text, "dataset sha256"),
        (cleaning, "cleaning (lowercase True vs"),
        (vocab, "vocab"),
    ]:
        err = one_line_error(capsys, model_main, ["average", str(first), str(path), "-o", str(out)])
        assert f"{path} has a different {field}" in err and "only checkpoints of one run" in err
    assert not out.exists()


def test_bad_inputs_get_one_line(run, dataset, tmp_path, capsys):
    first, second, _ = numbered(run)
    out = str(tmp_path / "never.pt")
    cases = [
        (["average", str(first), "-o", out], "give at least two checkpoints to average, not 1"),
        (["average", str(first), str(first), "-o", out], f"checkpoint {first} is given twice"),
        (["average", str(first), str(second), "-o", str(second)], f"output {second} is also an input"),
        (["average", str(first), str(tmp_path / "x.pt"), "-o", out], "does not exist"),
        (["average", str(first), str(second), "-o", str(run / "last.pt")], "has a name training uses"),
        (["average", str(first), str(second), "-o", str(tmp_path / "ckpt_iter9_val1.pt")], "name training uses"),
        (["average", "--run", str(run), "--last", "4", "-o", out], "holds 3 ckpt_iterN_val*.pt checkpoints"),
        (["average", "--run", str(run), "--last", "1", "-o", out], "--last must be at least 2"),
        (["average", "--run", str(run), str(first), "-o", out], "not both"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, model_main, argv)
    # No dataset recorded and no --data; --data of other text.
    unrecorded = [edited_copy(path, tmp_path / path.name, dataset=None) for path in (first, second)]
    err = one_line_error(capsys, model_main, ["average", *map(str, unrecorded), "-o", out])
    assert "does not record its dataset; give --data DIR" in err
    (tmp_path / "other.txt").write_text(TINY_CORPUS.replace("wall", "fence"), encoding="utf-8")
    other = tmp_path / "other"
    model_main(["prepare", "--input", str(tmp_path / "other.txt"), "--out", str(other), "--batch-size", "2"])
    argv = ["average", str(first), str(second), "-o", out, "--data", str(other)]
    assert "was not prepared from the text the checkpoints were trained on" in one_line_error(capsys, model_main, argv)
    assert not Path(out).exists()


def test_an_average_cannot_be_resumed_but_starts_a_new_run(run, dataset, tmp_path, capsys):
    out = tmp_path / "average.pt"
    model_main(["average", "--run", str(run), "--last", "2", "-o", str(out), "--no-score-inputs"])
    err = one_line_error(capsys, model_main, ["train", "--resume", str(out)])
    assert f"{out} holds weights only" in err and "--init-from" in err
    tuned = tmp_path / "tuned"
    argv = ["train", "--data", str(dataset), "--out", str(tuned), "--init-from", str(out), "--max-iters", "2"]
    model_main([*argv, *TINY])
    assert Checkpoint.load(tuned / "last.pt").iteration == 2


def test_a_checkpoint_written_before_averaging_existed_still_loads(run, tmp_path):
    # Checkpoints saved before the averaged_from field have no such key; they must load as they always did.
    raw = torch.load(numbered(run)[0], weights_only=False)
    del raw["averaged_from"]
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    assert Checkpoint.load(old).averaged_from == []
