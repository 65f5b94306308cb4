"""The classic baselines of bench/quality.py: Kneser-Ney, unigram, conditional compression, the by-case split."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from bench import quality
from bench.baselines import KneserNey, compressors, conditional_bits, ppmd, shouted_mask, unigram_bits
from model.checkpoint import load_checkpoint
from model.dataset import load_dataset
from model.dynamic import DYNAMIC_LR
from model.evaluate import dynamic_char_nats, evaluate_ids, gradient_rms
from model.prepare import prepare
from model.text import CleaningOptions

PHRASES = ["we will win. ", "make it great. ", "believe me, folks. ", "so much winning. ", "the wall! "]


def speech(words: int, seed: int) -> str:
    """Text with real structure: known phrases in a random order."""
    rng = np.random.default_rng(seed)
    return "".join(PHRASES[i] for i in rng.integers(len(PHRASES), size=words))


def encode(text: str, alphabet: str) -> np.ndarray:
    return np.array([alphabet.index(ch) for ch in text], dtype=np.int64)


def test_kneser_ney_is_a_distribution_at_every_context_and_order() -> None:
    text = speech(300, seed=1)
    alphabet = "".join(sorted(set(text))) + "XYZ"  # characters never seen in training get mass too
    kn = KneserNey(encode(text, alphabet), len(alphabet), max_order=8)
    contexts = ["", "w", "we will", "believe me, fo", "XYXY", "XYZ", "so much winning. the wall! "]
    for order in (1, 2, 4, 8):
        for context in contexts:
            probs = kn.distribution(encode(context, alphabet), order)
            assert probs.shape == (len(alphabet),)
            assert (probs > 0).all()
            assert probs.sum() == pytest.approx(1.0, abs=1e-9), (order, context)


def test_kneser_ney_bits_agree_with_its_distribution() -> None:
    text = speech(200, seed=2)
    alphabet = "".join(sorted(set(text)))
    kn = KneserNey(encode(text[:2000], alphabet), len(alphabet), max_order=6)
    ids = encode(text[2000:2100], alphabet)
    bits = kn.bits(ids, order=6)
    assert bits.shape == (len(ids) - 1,)
    for t in (1, 3, 5, 40, 99):
        expected = -math.log2(kn.distribution(ids[:t], order=6)[ids[t]])
        assert bits[t - 1] == pytest.approx(expected, rel=1e-12)


def test_kneser_ney_beats_unigram_on_repetitive_text() -> None:
    train, held_out = speech(400, seed=3), speech(60, seed=4)
    alphabet = "".join(sorted(set(train + held_out)))
    train_ids, held_ids = encode(train, alphabet), encode(held_out, alphabet)
    kn = KneserNey(train_ids, len(alphabet), max_order=6)
    kn_bpc = kn.bits(held_ids, order=6).mean()
    unigram_bpc = unigram_bits(train_ids, held_ids[1:], len(alphabet)).mean()
    assert kn_bpc < 0.5 * unigram_bpc
    # Order 1 is unigram frequencies, so the gain comes from the context.
    assert kn.bits(held_ids, order=1).mean() == pytest.approx(unigram_bpc, abs=0.05)


def test_unigram_bits_are_the_add_one_cross_entropy() -> None:
    train, held_out, vocab_size = "aaaabbbcc\n", "abcabcaad", 5  # d and one more symbol are unseen in train
    alphabet = "\nabcd"
    counts = Counter(train)
    expected = -sum(math.log2((counts[ch] + 1) / (len(train) + vocab_size)) for ch in held_out) / len(held_out)
    bits = unigram_bits(encode(train, alphabet), encode(held_out, alphabet), vocab_size)
    assert bits.mean() == pytest.approx(expected, rel=1e-12)


def test_conditional_compression_charges_little_for_text_already_in_train() -> None:
    rng = np.random.default_rng(5)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    train = "".join(rng.choice(letters, size=20_000)).encode()
    repeated = train[5_000:9_000]
    fresh = "".join(rng.choice(letters, size=4_000)).encode()
    for name, compress in {**compressors(), "PPMd order 4": ppmd(4, mem_size=16 << 20)}.items():
        seen = conditional_bits(compress, train, repeated, len(repeated))
        unseen = conditional_bits(compress, train, fresh, len(fresh))
        assert unseen > 4.0, name  # 29 equally likely symbols cost about log2(29) = 4.9 bits
        # bzip2's block sort only pairs each context with its repeat, which about halves the cost.
        assert seen < (0.75 if name.startswith("bzip2") else 0.25) * unseen, (name, seen, unseen)


def test_shouted_mask_marks_whole_lines_typed_in_capitals() -> None:
    text = "We win.\nTHIS IS A SHOUTED LINE, FOLKS!\nUSA is great, folks.\n"
    mask = shouted_mask(text)
    assert mask.shape == (len(text),)
    first, second, _ = text.split("\n", 2)
    assert not mask[: len(first) + 1].any()
    assert mask[len(first) + 1 : len(first) + len(second) + 2].all()
    assert not mask[len(first) + len(second) + 2 :].any()


def test_quality_script_reports_both_modes(tmp_path) -> None:
    shouted = "WE WILL WIN. MAKE IT GREAT. BELIEVE ME, FOLKS. SO MUCH WINNING.\n" * 12
    raw = tmp_path / "speeches.txt"
    raw.write_text("\ufeff" + speech(1000, seed=6).replace(". ", ".\r\n") + shouted, encoding="utf-8")
    data_dir = tmp_path / "data"
    prepare([raw], data_dir, CleaningOptions(), batch_size=2, seq_length=16)
    out_json, out_md = tmp_path / "quality.json", tmp_path / "quality.md"
    args = ["--data", str(data_dir), "--source", str(raw), "--text", str(raw), "--max-order", "5"]
    args += ["--ppmd-orders", "3,5", "--json", str(out_json), "--markdown", str(out_md)]
    quality.main(args)
    results = json.loads(out_json.read_text())
    cleaned, raw_text = results["corpora"]
    assert [c["mode"] for c in results["corpora"]] == ["data", "text"]
    for corpus in results["corpora"]:
        names = {row["name"] for row in corpus["rows"]}
        assert {"unigram (add-one)", "PPMd order 3", "PPMd order 5", "xz -9e", "zstd -22"} <= names
        assert sorted(corpus["kn_val_by_order"]) == ["2", "3", "4", "5"]
        assert corpus["test_shouted_share"] > 0.3
    # Sentence-cased in the dataset, the shouted lines are ordinary text; raw, they are capitals
    # that the static models never saw in training.
    kn_cleaned, kn_raw = (next(row for row in c["rows"] if row["name"].startswith("KN")) for c in (cleaned, raw_text))
    assert kn_raw["test_shouted"] > 2 * kn_raw["test_rest"]
    assert kn_cleaned["test_shouted"] < 0.5 * kn_raw["test_shouted"]
    page = out_md.read_text()
    assert "| Model | Kind | Val BPC | Test BPC |" in page
    assert "Best baseline on val" in page


def test_quality_script_rejects_a_source_the_dataset_was_not_made_from(tmp_path) -> None:
    raw, other = tmp_path / "speeches.txt", tmp_path / "other.txt"
    raw.write_text(speech(300, seed=7), encoding="utf-8")
    other.write_text(speech(300, seed=8), encoding="utf-8")
    prepare([raw], tmp_path / "data", CleaningOptions(), batch_size=2, seq_length=16)
    with pytest.raises(quality.UsageError, match="not the file"):
        quality.main(["--data", str(tmp_path / "data"), "--source", str(other)])


def test_quality_script_scores_the_checkpoint_and_its_onnx_export_like_the_evaluators(
    tmp_path, tiny_dir, tiny_checkpoint, tiny_onnx
) -> None:
    data_dir = tmp_path / "data"
    prepare([tiny_dir / "corpus.txt"], data_dir, CleaningOptions(), batch_size=2, seq_length=16)
    out_json = tmp_path / "quality.json"
    args = ["--data", str(data_dir), "--checkpoint", str(tiny_checkpoint), "--onnx", str(tiny_onnx)]
    page = tmp_path / "q.md"
    args += ["--max-order", "3", "--ppmd-orders", "3", "--json", str(out_json), "--markdown", str(page)]
    quality.main([*args, "--dynamic"])
    corpus = json.loads(out_json.read_text())["corpora"][0]
    rows = {row["name"]: row for row in corpus["rows"]}
    net, _ = load_checkpoint(tiny_checkpoint)
    splits = load_dataset(data_dir).splits
    rms = gradient_rms(net, splits["train"])
    for split in ("val", "test"):
        expected = evaluate_ids(net, splits[split])[0] / math.log(2)
        assert rows["LSTM (this model)"][split] == pytest.approx(expected, rel=1e-6)
        assert rows[f"LSTM, ONNX fp32 ({tiny_onnx.name})"][split] == pytest.approx(expected, abs=1e-4)
        # --dynamic scores with the settings `python -m model evaluate --dynamic` uses.
        dynamic = dynamic_char_nats(net, splits[split], rms, DYNAMIC_LR).mean().item() / math.log(2)
        assert rows["LSTM, dynamic evaluation"][split] == pytest.approx(dynamic, rel=1e-6)
    assert rows["LSTM, dynamic evaluation"]["kind"] == "adaptive"
    assert corpus["dynamic_evaluation"]["lr"] == DYNAMIC_LR
    assert "With dynamic evaluation" in corpus["verdict"]
    # The page shows the network static and adaptive, next to the compressors, with the step it used.
    table = page.read_text()
    assert "| LSTM (this model) | model |" in table and "| LSTM, dynamic evaluation | adaptive |" in table
    assert "| PPMd order 3 | adaptive |" in table and f"step {DYNAMIC_LR:g} of each weight's gradient RMS" in table
    # An ONNX file cannot learn from the text: asked for without a checkpoint, the bench says what to give.
    with pytest.raises(quality.UsageError, match="give --checkpoint and --data"):
        quality.main(["--data", str(data_dir), "--onnx", str(tiny_onnx), "--dynamic"])


def test_quality_script_names_a_bad_onnx_file(tmp_path) -> None:
    raw = tmp_path / "speeches.txt"
    raw.write_text(speech(300, seed=9), encoding="utf-8")
    prepare([raw], tmp_path / "data", CleaningOptions(), batch_size=2, seq_length=16)
    with pytest.raises(quality.UsageError, match="not a readable ONNX model"):
        quality.main(["--data", str(tmp_path / "data"), "--onnx", str(raw)])


def test_quality_script_gives_baselines_the_train_only_text_and_meets_models_on_the_same_held_out_text(
    tmp_path, tiny_dir, tiny_onnx
) -> None:
    shouted = "WE WILL WIN. MAKE IT GREAT. BELIEVE ME, FOLKS.\n" * 12
    raw, extra = tmp_path / "speeches.txt", tmp_path / "rallies.txt"
    raw.write_text(speech(800, seed=10).replace(". ", ".\n") + shouted, encoding="utf-8")
    # The extra text holds a character ("~") that the held-out text lacks, so the datasets' ids differ.
    extra.write_text(speech(3000, seed=11) + "~", encoding="utf-8")
    alone, both = tmp_path / "alone", tmp_path / "both"
    prepare([raw], alone, CleaningOptions(), batch_size=2, seq_length=16)
    prepare([raw], both, CleaningOptions(), batch_size=2, seq_length=16, train_only=[extra])
    out_json = tmp_path / "quality.json"
    args = ["--data", str(both), str(alone), "--source", str(raw), "--onnx", str(tiny_onnx)]
    args += ["--text", str(raw), "--text-train-only", str(extra), "--max-order", "4", "--ppmd-orders", "3"]
    page = tmp_path / "q.md"
    page.write_text("old tables\n\n## Text statistics\n\nwritten by bench/text_stats.py\n", encoding="utf-8")
    quality.main([*args, "--json", str(out_json), "--markdown", str(page)])
    assert "old tables" not in page.read_text() and page.read_text().endswith("written by bench/text_stats.py\n")
    corpora = json.loads(out_json.read_text())["corpora"]
    assert [c["mode"] for c in corpora] == ["data", "data", "text"]
    assert "train + rallies.txt" in corpora[0]["label"] and "train + rallies.txt" not in corpora[1]["label"]
    assert "train + rallies.txt" in corpora[2]["label"]
    assert corpora[0]["chars"]["val"] == corpora[1]["chars"]["val"]
    assert corpora[0]["chars"]["train"] > 3 * corpora[1]["chars"]["train"]
    kn = [next(r for r in c["rows"] if r["name"].startswith("KN")) for c in corpora[:2]]
    assert kn[0]["val"] != kn[1]["val"]  # the baselines were fit on different training text
    assert load_dataset(both).vocab.chars != load_dataset(alone).vocab.chars
    # One model, re-encoded into its own vocabulary on each: the same held-out text gets the same score.
    onnx_rows = [next(r for r in c["rows"] if r["name"].startswith("LSTM, ONNX")) for c in corpora[:2]]
    assert onnx_rows[0]["val"] == pytest.approx(onnx_rows[1]["val"], abs=1e-9)
    assert onnx_rows[0]["test"] == pytest.approx(onnx_rows[1]["test"], abs=1e-9)
    assert corpora[0]["test_shouted_share"] > 0.2
