"""Training, resuming, sampling and evaluation of tiny models on tiny corpora."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.__main__ import main as model_main
from model.checkpoint import Checkpoint, load_checkpoint
from model.dataset import load_dataset
from model.dynamic import DYNAMIC_DECAY, DYNAMIC_LR, DYNAMIC_SEGMENT
from model.evaluate import char_nats, dynamic_char_nats, evaluate_ids, gradient_rms
from model.model import CharRNN, ModelConfig
from model.novel import copied_share
from model.plot import read_metrics
from model.sample import sample_text
from model.sampling import TEMPERATURE_MIN
from model.text import CleaningOptions, Vocab
from model.train import cpu_has_native_bf16

torch.set_num_threads(1)

TINY = [
    "--rnn-size",
    "24",
    "--num-layers",
    "2",
    "--wordvec-size",
    "8",
    "--batch-size",
    "4",
    "--seq-length",
    "16",
    "--print-every",
    "1",
    "--eval-every",
    "10",
    "--sample-every",
    "0",
    "--no-tensorboard",
    "--no-plots",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text("We will make America great again. Believe me. " * 60, encoding="utf-8")
    model_main(
        ["prepare", "--input", str(corpus), "--out", str(root / "ds"), "--batch-size", "4", "--seq-length", "16"]
    )
    return root / "ds"


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir)[0]]


def test_tiny_model_overfits_repetitive_corpus(tiny_data, tmp_path):
    out = tmp_path / "run"
    model_main(
        [
            "train",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--max-iters",
            "150",
            "--dropout",
            "0",
            "--weight-drop",
            "0",
            "--learning-rate",
            "0.01",
            "--lr-schedule",
            "constant",
            *TINY,
        ]
    )
    losses = train_losses(out)
    vocab_size = len(load_dataset(tiny_data).vocab)
    assert losses[0] > 0.8 * math.log(vocab_size)  # an untrained model is near-uniform
    # A 47-character sentence repeated: the model should become nearly certain of every character.
    assert sum(losses[-10:]) / 10 < 0.3
    net, ckpt = load_checkpoint(out / "last.pt")
    vocab = Vocab(ckpt.vocab)
    text = sample_text(net, vocab, CleaningOptions(), length=47, start_text="We will make", argmax=True)
    assert "America great again" in text


def test_weight_drop_masks_recurrent_matrices_in_training_only():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, rnn_size=48, num_layers=2, wordvec_size=8, weight_drop=0.5)
    net, plain = CharRNN(config), CharRNN(ModelConfig(**{**config.to_dict(), "weight_drop": 0.0}))
    plain.load_state_dict(net.state_dict())
    tokens = torch.randint(0, 20, (3, 16))
    logits, _ = net(tokens)
    logits.sum().backward()
    for layer in range(2):
        recurrent, inputs = net.rnn.get_parameter(f"weight_hh_l{layer}"), net.rnn.get_parameter(f"weight_ih_l{layer}")
        # A dropped weight gets no gradient; input weights are never dropped.
        assert 0.4 < (recurrent.grad == 0).float().mean() < 0.6
        assert (inputs.grad == 0).float().mean() < 0.05
    assert not torch.allclose(net(tokens)[0], logits)  # a fresh mask each forward pass
    net.eval(), plain.eval()
    assert torch.equal(net(tokens)[0], plain(tokens)[0])  # evaluation uses the whole weights
    with pytest.raises(ValueError, match="weight-drop must be in"):
        ModelConfig(vocab_size=20, weight_drop=1.0)


def test_embedding_and_input_dropout_share_masks_as_awd_lstm_does():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, rnn_size=16, num_layers=2, wordvec_size=32, embed_drop=0.5, input_drop=0.5)
    net, plain = CharRNN(config), CharRNN(ModelConfig(**{**config.to_dict(), "embed_drop": 0.0, "input_drop": 0.0}))
    plain.load_state_dict(net.state_dict())
    tokens = torch.randint(0, 20, (6, 40))
    net.config.input_drop = 0.0
    dropped_rows = (net._embed(tokens) == 0).all(dim=2)
    # Embedding dropout removes whole characters: every occurrence of a character in the batch alike.
    for char in tokens.unique():
        assert dropped_rows[tokens == char].unique().numel() == 1
    assert 0 < dropped_rows.float().mean() < 1
    net.config.embed_drop, net.config.input_drop = 0.0, 0.5
    zeros = net._embed(tokens) == 0
    # Input dropout is locked: one mask per stream, the same at every time step, and streams differ.
    assert torch.equal(zeros, zeros[:, :1, :].expand_as(zeros))
    assert not torch.equal(zeros[0, 0], zeros[1, 0]) and 0.3 < zeros.float().mean() < 0.7
    net.config.embed_drop = 0.5
    net.eval(), plain.eval()
    assert torch.equal(net(tokens)[0], plain(tokens)[0])  # evaluation uses the whole embedding
    for name in ("embed-drop", "input-drop"):
        with pytest.raises(ValueError, match=f"{name} must be in"):
            ModelConfig(vocab_size=20, **{name.replace("-", "_"): 1.0})


def test_resume_gives_the_same_losses_as_uninterrupted_training(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--dropout", "0.2", "--weight-drop", "0.3", "--checkpoint-every", "12", *TINY]
    model_main(["train", "--out", str(tmp_path / "straight"), "--max-iters", "24", *common])
    model_main(["train", "--out", str(tmp_path / "split"), "--max-iters", "12", *common])
    model_main(
        [
            "train",
            "--out",
            str(tmp_path / "split"),
            "--max-iters",
            "24",
            "--resume",
            str(tmp_path / "split" / "last.pt"),
            *common,
        ]
    )
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert len(straight) == len(resumed) == 24
    assert max(abs(a - b) for a, b in zip(straight, resumed, strict=True)) < 1e-5
    # Killed after iteration 18 and resumed from the checkpoint at 12: iterations 13-18 are logged once.
    killed = tmp_path / "killed"
    model_main(["train", "--out", str(killed), "--max-iters", "24", *common])
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["iter"] > 18)
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:cut]))
    checkpoint = next(killed.glob("ckpt_iter12_*.pt"))
    model_main(["train", "--out", str(killed), "--max-iters", "24", "--resume", str(checkpoint), *common])
    train, val = read_metrics(killed)
    # Validated every 10 iterations, at the end, and at each checkpoint (12), whose name carries that val.
    assert [r["iter"] for r in train] == list(range(1, 25)) and [r["iter"] for r in val] == [10, 12, 20, 24]
    assert max(abs(a - b) for a, b in zip(straight, train_losses(killed), strict=True)) < 1e-5
    # Checkpoint names carry the validation loss of their own iteration, as char-rnn's do.
    val_at_12 = next(r["val_bpc"] for r in val if r["iter"] == 12)
    assert (tmp_path / "split" / f"ckpt_iter12_val{val_at_12:.4f}.pt").is_file()


# A run whose recipe differs from the defaults everywhere a resume could lose it (issue 24).
OWN_RECIPE = ["--model-type", "gru", "--batch-size", "8", "--lr-schedule", "constant", "--learning-rate", "0.01"]
OWN_RECIPE += ["--max-iters", "12", "--checkpoint-every", "6", "--eval-every", "4", "--seed", "7"]


def test_resume_restores_the_runs_own_settings(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    model_main(["train", "--data", str(tiny_data), "--out", str(run), *TINY, *OWN_RECIPE])
    straight, config = train_losses(run), json.loads((run / "config.json").read_text())
    # Only --resume: batch 8, GRU, constant lr, 12 iterations, its folder and dataset all come from the run.
    capsys.readouterr()
    model_main(["train", "--resume", str(next(run.glob("ckpt_iter6_*.pt")))])
    assert "resuming" in capsys.readouterr().out
    assert len(train_losses(run)) == 12
    assert max(abs(a - b) for a, b in zip(straight, train_losses(run), strict=True)) < 1e-5
    resumed = json.loads((run / "config.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "resume"} == {k: v for k, v in config.items() if k != "resume"}
    ckpt = Checkpoint.load(run / "last.pt")
    assert (ckpt.iteration, ckpt.model_config["model_type"], ckpt.train_config["batch_size"]) == (12, "gru", 8)


def test_resume_allows_run_length_and_reporting_changes_and_refuses_the_rest(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    model_main(["train", "--data", str(tiny_data), "--out", str(run), *TINY, *OWN_RECIPE])
    last = str(run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # Flags that change the recipe, on the command line or in --config, are refused in one line.
    err = run_cli_error(["train", "--resume", last, "--batch-size", "4", "--max-iters", "20"], capsys)
    assert err.startswith("error: --batch-size 4 (the run's: 8): a run resumed from") and err.count("\n") == 1
    assert "only --max-iters, --max-epochs, --eval-every" in err and "--init-from" in err
    config = tmp_path / "recipe.toml"
    config.write_text('lr-schedule = "cosine"\nlearning-rate = 0.002\n', encoding="utf-8")
    err = run_cli_error(["train", "--resume", last, "--config", str(config)], capsys)
    assert "--learning-rate 0.002 (the run's: 0.01); --lr-schedule cosine (the run's: constant)" in err
    # The same values as the run's are no change at all (the README repeats --data and --out).
    err = run_cli_error(
        ["train", "--resume", last, "--data", str(tiny_data), "--out", str(run), "--batch-size", "8"], capsys
    )
    assert "is at iteration 12 and its run ends at iteration 12: nothing to train" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # Run length and reporting may change, and the banner says so.
    model_main(["train", "--resume", last, "--max-iters", "16", "--eval-every", "8"])
    banner = capsys.readouterr().out
    assert "resuming" in banner and "changed: --eval-every 4 -> 8, --max-iters 12 -> 16" in banner
    _, val = read_metrics(run)
    assert [r["iter"] for r in val] == [4, 6, 8, 12, 16]
    # --max-epochs alone sets the length in epochs, for a run started with --max-iters too.
    per_epoch = (len(load_dataset(tiny_data).splits["train"]) - 1) // 8 // 16
    model_main(["train", "--resume", last, "--max-epochs", str(18 / per_epoch)])
    assert "--max-iters 16 -> 0" in capsys.readouterr().out
    assert Checkpoint.load(run / "last.pt").iteration == 18


def test_resume_never_writes_into_another_runs_folder(tiny_data, tmp_path, capsys):
    ours, theirs = tmp_path / "lstm", tmp_path / "gru"
    model_main(["train", "--data", str(tiny_data), "--out", str(ours), "--max-iters", "6", *TINY])
    model_main(["train", "--data", str(tiny_data), "--out", str(theirs), *TINY, *OWN_RECIPE])
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()}
    argv = ["train", "--resume", str(ours / "last.pt"), "--max-iters", "9"]
    capsys.readouterr()
    err = run_cli_error([*argv, "--out", str(theirs)], capsys)
    assert f"--out {theirs} holds another training run" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()} == before
    err = run_cli_error([*argv, "--out", str(theirs), "--overwrite"], capsys)
    assert "give --resume (continue a run) or --overwrite (replace it with a new one), not both" in err
    # Another dataset is another run, not this one continued.
    other = tmp_path / "other"
    # The same characters (so the same vocabulary) in another order.
    (tmp_path / "other.txt").write_text("Believe me. We will make America great again. " * 60, encoding="utf-8")
    model_main(["prepare", "--input", str(tmp_path / "other.txt"), "--out", str(other), "--batch-size", "4"])
    err = run_cli_error([*argv, "--data", str(other)], capsys)
    assert f"--data {other} holds other text than the run resumed from" in err
    # A new folder is a branch of the run: it goes on from the checkpoint there.
    model_main([*argv, "--out", str(tmp_path / "branch")])
    assert Checkpoint.load(tmp_path / "branch" / "last.pt").iteration == 9
    assert "learning rate" not in capsys.readouterr().out  # still warming up: the length does not move it
    # A cosine schedule decays over the whole run, so a new length moves the rate, and the banner says so.
    cosine = tmp_path / "cosine"
    model_main(
        ["train", "--data", str(tiny_data), "--out", str(cosine), *TINY, "--max-iters", "6", "--warmup-iters", "2"]
    )
    capsys.readouterr()
    model_main(["train", "--resume", str(cosine / "last.pt"), "--max-iters", "10"])
    banner = capsys.readouterr().out
    # At iteration 6 of 6 the cosine was at its floor (5% of 2e-3); at 6 of 10 it is halfway down.
    assert "the learning rate is 1.05e-03 now, where the run as it was would have had 1.00e-04" in banner


ROOT = Path(__file__).resolve().parents[1]
# Runs that would go on for hours: only a signal ends them. A constant rate, so that a run of any length
# takes the same steps as the interrupted one.
ENDLESS = ["--max-iters", "1000000", "--checkpoint-every", "1000000", "--lr-schedule", "constant"]


def start_training(tiny_data: Path, out: Path, *flags: str) -> subprocess.Popen:
    """`python -m model train` as a user runs it, in its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "model", "train", "--data", str(tiny_data), "--out", str(out), *TINY, *flags]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the training process never got there"
        time.sleep(0.02)


def logged_iterations(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"train_loss"' in line) if path.is_file() else 0


def test_ctrl_c_saves_last_pt_and_the_resume_continues_exactly(tiny_data, tmp_path):
    out = tmp_path / "run"
    process = start_training(tiny_data, out, *ENDLESS)
    wait_for(lambda: logged_iterations(out) >= 3, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    ckpt = Checkpoint.load(out / "last.pt")
    stopped_at = ckpt.iteration
    assert stopped_at == logged_iterations(out) >= 3
    assert err.strip().splitlines()[-1] == (
        f"interrupted by SIGINT at iteration {stopped_at}: saved {out / 'last.pt'}; "
        f"continue with `python -m model train --resume {out / 'last.pt'}`"
    )
    # The advice works, and the resumed run takes the very steps of a run never interrupted.
    model_main(["train", "--resume", str(out / "last.pt"), "--max-iters", str(stopped_at + 5)])
    straight = tmp_path / "straight"
    length = ["--max-iters", str(stopped_at + 5), "--lr-schedule", "constant"]
    model_main(["train", "--data", str(tiny_data), "--out", str(straight), *TINY, *length])
    assert len(train_losses(out)) == len(train_losses(straight)) == stopped_at + 5
    assert max(abs(a - b) for a, b in zip(train_losses(straight), train_losses(out), strict=True)) < 1e-5


def test_last_pt_is_saved_every_few_minutes_and_on_sigterm(tiny_data, tmp_path):
    out = tmp_path / "run"
    process = start_training(tiny_data, out, *ENDLESS, "--save-every-minutes", "0.002")  # every 0.12 s
    wait_for(lambda: (out / "last.pt").is_file(), process)
    periodic = Checkpoint.load(out / "last.pt").iteration
    assert periodic > 0 and not list(out.glob("ckpt_iter*"))  # saved by the clock while it runs on
    wait_for(lambda: logged_iterations(out) > periodic + 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in err
    stopped_at = Checkpoint.load(out / "last.pt").iteration
    assert stopped_at == logged_iterations(out) > periodic
    assert f"interrupted by SIGTERM at iteration {stopped_at}: saved {out / 'last.pt'}" in err
    model_main(["train", "--resume", str(out / "last.pt"), "--max-iters", str(stopped_at + 2)])
    assert [r["iter"] for r in read_metrics(out)[0]] == list(range(1, stopped_at + 3))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    fast = ["--max-iters", "60", "--learning-rate", "0.01"]
    model_main(["train", "--data", str(tiny_data), "--out", str(out), *fast, *TINY])
    return out / "last.pt"


def test_same_seed_same_sample_and_low_temperature_is_argmax(tiny_checkpoint):
    net, ckpt = load_checkpoint(tiny_checkpoint)
    vocab, cleaning = Vocab(ckpt.vocab), CleaningOptions.from_dict(ckpt.cleaning)
    first = sample_text(net, vocab, cleaning, 80, "We", temperature=1.0, seed=7)
    assert first == sample_text(net, vocab, cleaning, 80, "We", temperature=1.0, seed=7)
    assert first != sample_text(net, vocab, cleaning, 80, "We", temperature=1.0, seed=8)
    greedy = sample_text(net, vocab, cleaning, 80, "We", argmax=True)
    assert sample_text(net, vocab, cleaning, 80, "We", temperature=TEMPERATURE_MIN, seed=3) == greedy


def test_evaluate_matches_manual_cross_entropy(tiny_checkpoint, tiny_data):
    net, _ = load_checkpoint(tiny_checkpoint)
    ids = load_dataset(tiny_data).splits["val"][:50]
    nats, count = evaluate_ids(net, ids, streams=1, seq_length=7)
    with torch.no_grad():
        logits, _ = net(torch.tensor(ids[None, :-1], dtype=torch.long))
        manual = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:], dtype=torch.long))
    assert count == 49
    assert abs(nats - manual.item()) < 1e-5


def test_dynamic_evaluation_learns_from_the_text_it_has_read(tiny_checkpoint, tiny_data):
    net, ckpt = load_checkpoint(tiny_checkpoint)
    before = [p.detach().clone() for p in net.parameters()]
    rms = gradient_rms(net, load_dataset(tiny_data).splits["train"][:400], segment=20)
    assert [r.shape for r in rms] == [p.shape for p in net.parameters()] and all((r >= 0).all() for r in rms)
    # A phrase the tiny model has never seen, said four times: a model that adapts predicts the repeats better.
    ids = np.tile(np.random.default_rng(0).integers(len(ckpt.vocab), size=60), 4)
    static = char_nats(net, ids, seq_length=50)
    unchanged = dynamic_char_nats(net, ids, rms, lr=0.0, decay=0.0)
    assert torch.allclose(unchanged, static, atol=1e-5)  # no step: the static score
    dynamic = dynamic_char_nats(net, ids, rms, lr=0.01, decay=0.0, segment=20)
    assert dynamic.numel() == static.numel() == len(ids) - 1
    assert torch.allclose(dynamic[:20], static[:20], atol=1e-5)  # the first segment is scored before any step
    assert dynamic[-60:].mean() < static[-60:].mean() - 0.5  # the last repeat: far better than static
    # Pulled all the way back after every step (decay 1 on every weight), it cannot learn the phrase.
    held = dynamic_char_nats(net, ids, [torch.ones_like(r) for r in rms], lr=0.01, decay=1.0, segment=20)
    assert torch.allclose(held, static, atol=1e-4)
    # Weights with no gradient on the statistics text (a character it never had) take bounded steps.
    rms[0][1:] = 0.0
    assert torch.isfinite(dynamic_char_nats(net, ids, rms, lr=0.01, segment=20)).all()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # the model is untouched


def test_evaluate_text_reports_bpc_and_unknown(tiny_checkpoint, tiny_data, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("We will make Zimbabwe great again.", encoding="utf-8")
    model_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--text", str(text)])
    out = capsys.readouterr().out
    assert "bits/char" in out and "outside the vocabulary" in out and "dynamic" not in out
    dynamic = ["--dynamic-lr", "0.001"]
    model_main(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--text", str(text), "--data", str(tiny_data), *dynamic]
    )
    with_data = capsys.readouterr().out
    assert "dynamic evaluation (lr 0.001, decay 0.03, segment 50)" in with_data
    # The checkpoint knows its dataset: --data is not needed, for --dynamic-lr or for --split.
    model_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--text", str(text), *dynamic])
    assert capsys.readouterr().out == with_data
    model_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--split", "val"])
    by_split = capsys.readouterr().out
    model_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--split", "val", "--data", str(tiny_data)])
    assert f"{tiny_data} (val split)" in by_split and by_split == capsys.readouterr().out
    unknown = int(out.split("characters scored, ")[1].split(" outside")[0])
    assert unknown == sum(ch not in "We will make America great again. Believe me." for ch in "Zimbabwe")


def test_evaluate_dynamic_switch_learns_a_repeated_text_with_the_chosen_settings(tiny_checkpoint, tmp_path, capsys):
    # A sentence the tiny model never saw, in its vocabulary, said 30 times: adapting pays on the repeats.
    text = tmp_path / "repeated.txt"
    text.write_text("Wet mice ring a tall crew a leg. " * 30, encoding="utf-8")
    evaluate = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--text", str(text)]

    def bits(out: str) -> float:
        return float(out.split("nats/char, ")[1].split(" bits/char")[0])

    model_main(evaluate)
    static = capsys.readouterr().out
    model_main([*evaluate, "--dynamic"])
    dynamic = capsys.readouterr().out
    assert f"dynamic evaluation (lr {DYNAMIC_LR:g}, decay {DYNAMIC_DECAY:g}, segment {DYNAMIC_SEGMENT})" in dynamic
    assert bits(dynamic) < bits(static) - 0.02
    # --dynamic-lr tunes the step size, and given alone it turns dynamic evaluation on, as before.
    model_main([*evaluate, "--dynamic", "--dynamic-lr", str(DYNAMIC_LR)])
    assert capsys.readouterr().out == dynamic
    model_main([*evaluate, "--dynamic-lr", str(DYNAMIC_LR)])
    assert capsys.readouterr().out == dynamic
    for flags, message in (
        (
            ["--dynamic", "--dynamic-lr", "0"],
            f"--dynamic-lr must be above 0 (--dynamic alone uses {DYNAMIC_LR:g}), not 0",
        ),
        (["--dynamic-lr", "-1"], "--dynamic-lr must be above 0"),
        (["--dynamic", "--checkpoint", str(tiny_checkpoint), str(tiny_checkpoint)], "trains one network"),
    ):
        err = run_cli_error([*evaluate, *flags], capsys)
        assert err.startswith("error:") and message in err


def test_lr_sweep_compares_runs_and_an_interrupted_sweep_keeps_finished_runs(tiny_data, tmp_path, capsys):
    argv = ["lr-sweep", "--data", str(tiny_data), "--out", str(tmp_path), "--learning-rates", "0.05", "0.01"]
    argv += ["--max-iters", "6", "--eval-every", "3", "--", *TINY]
    model_main(argv)
    results = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert [r["name"] for r in results] == ["rmsprop-lr0.05", "rmsprop-lr0.01", "rmsprop-decay"]
    assert all(r["best_val_bpc"] > 0 for r in results) and (tmp_path / "lr_sweep.png").stat().st_size > 0
    # One unit everywhere: the table's train loss is in bits/char like its val, and so is metrics.jsonl's.
    table = capsys.readouterr().out.split("\nrun ")[1]
    assert table.split()[:6] == ["final", "train", "bits/char", "best", "val", "bits/char"]
    for result in results:
        last = read_metrics(tmp_path / result["name"])[0][-1]
        assert last["train_bpc"] == pytest.approx(last["train_loss"] / math.log(2))
        assert result["final_train_bpc"] == last["train_bpc"]
        assert f"{result['name']:<20} {last['train_bpc']:>21.4f}" in table
    # As if the last run had been killed: only it is trained again.
    shutil.rmtree(tmp_path / "rmsprop-decay")
    kept_metrics = (tmp_path / "rmsprop-lr0.05" / "metrics.jsonl").read_bytes()
    model_main(argv)
    out = capsys.readouterr().out
    assert "rmsprop-lr0.05: finished earlier, kept" in out and "=== rmsprop-decay ===" in out
    assert (tmp_path / "rmsprop-lr0.05" / "metrics.jsonl").read_bytes() == kept_metrics
    again = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert again[:2] == results[:2] and again[2]["best_val_bpc"] == pytest.approx(results[2]["best_val_bpc"])


def test_copied_share():
    assert copied_share("abcdef", "xxabcdefxx", 3) == 1.0
    assert copied_share("abcxyz", "abc", 3) == 0.25


def run_cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        model_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_training_and_sampling_bad_inputs(tiny_data, tiny_checkpoint, tmp_path, capsys):
    assert "not a prepared dataset" in run_cli_error(["train", "--data", str(tmp_path), "--out", str(tmp_path)], capsys)
    err = run_cli_error(
        ["train", "--data", str(tiny_data), "--out", str(tmp_path), "--batch-size", "64", "--seq-length", "512"], capsys
    )
    assert "too small" in err
    bad_steps = ["--lr-schedule", "piecewise", "--lr-steps", "0:0.1,abc"]
    err = run_cli_error(["train", "--data", str(tiny_data), "--out", str(tmp_path), *bad_steps, *TINY], capsys)
    assert "--lr-steps must look like" in err
    assert "does not exist" in run_cli_error(["sample", "--checkpoint", str(tmp_path / "x.pt")], capsys)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert "not a readable speechbot checkpoint (not a PyTorch file" in run_cli_error(
        ["sample", "--checkpoint", str(bogus)], capsys
    )
    for temperature in ("0", "1e-320"):
        assert "--temperature must be from 0.001 to 2" in run_cli_error(
            ["sample", "--checkpoint", str(tiny_checkpoint), "--temperature", temperature], capsys
        )


def test_mixed_precision_trains_with_fp32_weights_and_state(tiny_data, tmp_path, capsys):
    """--amp (the default) autocasts to bf16 on a CPU with native bf16 and stays fp32 elsewhere; either way
    the checkpoint holds fp32 weights and an fp32 carried state, and --no-amp is plain fp32."""
    native = cpu_has_native_bf16()
    runs = {}
    for flag in ("--amp", "--no-amp"):
        out = tmp_path / flag
        model_main(["train", "--data", str(tiny_data), "--out", str(out), "--max-iters", "12", flag, *TINY])
        banner = capsys.readouterr().out
        expected = "bfloat16 autocast" if flag == "--amp" and native else ", fp32"
        assert expected in banner.splitlines()[0]
        ckpt = Checkpoint.load(out / "last.pt")
        assert {t.dtype for t in ckpt.model.values()} == {torch.float32}
        assert {t.dtype for t in ckpt.rnn_state} == {torch.float32}
        runs[flag] = train_losses(out)
    assert all(math.isfinite(x) for x in runs["--amp"])
    # Autocast really ran in bf16 where it is on: the losses differ from fp32's, yet only slightly.
    differences = [abs(a - b) for a, b in zip(runs["--amp"], runs["--no-amp"], strict=True)]
    if native:
        assert 0 < max(differences) < 0.05
    else:
        assert max(differences) == 0
