"""Corpus cleaning rules, the vocabulary and dataset preparation (torch-free parts of model/)."""

import json

import numpy as np
import pytest

from model.__main__ import main as model_main
from model.dataset import load_dataset, split_sizes
from model.text import CleaningOptions, Vocab, clean_text, is_shouted, normalize_prompt, prompt_tokens

OFF = CleaningOptions(
    remove_headers=False,
    remove_stage_directions=False,
    normalize_typography=False,
    collapse_whitespace=False,
    caps_policy="keep",
)


def with_only(**on) -> CleaningOptions:
    return CleaningOptions(**{**OFF.to_dict(), **on})


def test_bom_and_crlf_always_normalised():
    assert clean_text("\ufeffHello\r\nworld\r\n", OFF) == "Hello\nworld\n"


def test_removes_speech_headers_only_when_asked():
    raw = "SPEECH 12\nWe will win.\nSPEECH 3:\nSo much winning.\n"
    assert "SPEECH" not in clean_text(raw, with_only(remove_headers=True))
    assert clean_text(raw, OFF).count("SPEECH") == 2
    # A sentence that merely mentions a speech stays.
    assert "SPEECH 12 was long" in clean_text("SPEECH 12 was long\n", with_only(remove_headers=True))


def test_removes_stage_directions():
    raw = "Thank you. (APPLAUSE) We love Iowa. [ CHEERING ] Right? [Audience response inaudible]\n"
    cleaned = clean_text(raw, with_only(remove_stage_directions=True, collapse_whitespace=True))
    assert cleaned == "Thank you. We love Iowa. Right?\n"


def test_normalises_typography_to_keyboard_characters():
    raw = "It\u2019s \u201cgreat\u201d\u2026 \u2014 believe me\n"
    assert clean_text(raw, with_only(normalize_typography=True)) == 'It\'s "great"...  -  believe me\n'


def test_collapses_whitespace_and_blank_lines():
    raw = "A   lot  of\n\n\n\n\npeople.   \n"
    assert clean_text(raw, with_only(collapse_whitespace=True)) == "A lot of\n\npeople.\n"


def test_lowercase():
    assert clean_text("We Will WIN\n", with_only(lowercase=True)) == "we will win\n"


def test_all_caps_policies():
    shouted = "WE ARE GOING TO WIN IN INDIANA. I LOVE YOU."
    normal = "I love the people of Indiana, they are great."
    raw = f"{normal}\n{shouted}\n"
    assert is_shouted(shouted) and not is_shouted(normal) and not is_shouted("USA! USA!")
    assert clean_text(raw, with_only(caps_policy="keep")) == raw
    assert clean_text(raw, with_only(caps_policy="lower")).split("\n")[1] == shouted.lower()
    assert clean_text(raw, with_only(caps_policy="drop")) == f"{normal}\n"
    # Sentence case restores sentence starts, the pronoun I, and names learnt from the normal text.
    assert clean_text(raw, with_only(caps_policy="sentence")).split("\n")[1] == (
        "We are going to win in Indiana. I love you."
    )


def test_prompt_normalisation_keeps_user_text():
    options = CleaningOptions()
    assert normalize_prompt("We\u2019ll  build (a wall)", options) == "We'll build (a wall)"


@pytest.mark.parametrize(
    ("prompt", "read", "separator"),
    [
        ("We will", "We will", ""),
        ("We will ", "We will ", ""),
        ("café", "cafe", ""),  # folded to letters the model knows: it may go on with the word
        ("Tremendous 😀", "Tremendous", " "),  # the model goes on after the visible word, after a space
        ("Tremendous😀", "Tremendous", " "),
        ("Tremendous ❤️", "Tremendous", " "),  # a variation selector is unknown too
        ("Tremendous привет", "Tremendous", " "),  # each letter a space, then all of them trimmed
        ("привет  world", " world", ""),  # the spaces the letters became are one, as in the training text
        ("We will\n😀", "We will", "\n"),
        ("😀", "", "\n"),  # nothing visible: the continuation starts on a line of its own
        ("😀 ", " ", ""),  # the prompt ends in a space the model reads: no separator needed
    ],
)
def test_a_prompt_ending_where_the_model_cannot_see_gets_a_separator(prompt, read, separator):
    vocab = Vocab.from_text("Tremendous wilcafeW.\n")
    ids, sep = prompt_tokens(prompt, vocab, CleaningOptions())
    assert (vocab.decode(ids), sep) == (read, separator)


def test_vocab_round_trip_and_unknown_policies():
    vocab = Vocab.from_text("abc e\n")
    assert vocab.decode(vocab.encode("a cab\n")) == "a cab\n"
    assert Vocab.from_meta(json.loads(json.dumps(vocab.to_meta()))).chars == vocab.chars
    # "nearest": é folds to e; f has no ASCII fold in the vocabulary, so the letter becomes a space.
    assert vocab.decode(vocab.encode("café")) == "ca e"
    assert vocab.count_unknown("café") == 2
    assert vocab.decode(vocab.encode("a!b")) == "ab"  # punctuation outside the vocabulary is skipped


def test_vocab_unknown_policy_space_and_skip():
    assert Vocab.from_text("ab ", "space").decode(Vocab.from_text("ab ", "space").encode("axb")) == "a b"
    assert Vocab.from_text("ab ", "skip").decode(Vocab.from_text("ab ", "skip").encode("axb")) == "ab"
    with pytest.raises(ValueError, match="unknown-character policy must be one of"):
        Vocab.from_text("ab", "guess")


@pytest.mark.parametrize("total", [10, 999, 892_434])
def test_split_sizes_in_file_order(total):
    sizes = split_sizes(total, 0.1, 0.1)
    assert sum(sizes.values()) == total
    assert sizes["val"] == int(total * 0.1) == sizes["test"]


def test_prepare_writes_dataset(tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "SPEECH 1\r\nWe will make it great (APPLAUSE) again.\r\n" * 200
    corpus.write_bytes(b"\xef\xbb\xbf" + text.encode())
    model_main(
        ["prepare", "--input", str(corpus), "--out", str(tmp_path / "ds"), "--batch-size", "2", "--seq-length", "8"]
    )
    ds = load_dataset(tmp_path / "ds")
    decoded = ds.vocab.decode(np.concatenate([ds.splits[s] for s in ("train", "val", "test")]).tolist())
    assert decoded == clean_text(text)
    assert "SPEECH" not in decoded and "APPLAUSE" not in decoded
    assert ds.meta["split_sizes"] == {k: len(v) for k, v in ds.splits.items()}
    assert len(ds.meta["sources"][0]["sha256"]) == 64


def run_cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        model_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_prepare_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert "does not exist" in run_cli_error(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", out], capsys)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"Caf\xe9 and more text")
    err = run_cli_error(["prepare", "--input", str(latin1), "--out", out], capsys)
    assert "not UTF-8" in err and "offset 3" in err

    empty = tmp_path / "empty.txt"
    empty.write_text("SPEECH 1\n(APPLAUSE)\n\n", encoding="utf-8")
    assert "empty after cleaning" in run_cli_error(["prepare", "--input", str(empty), "--out", out], capsys)

    small = tmp_path / "small.txt"
    small.write_text("Make it great again. " * 20, encoding="utf-8")
    err = run_cli_error(["prepare", "--input", str(small), "--out", out], capsys)
    assert "fewer than one batch needs" in err and "--batch-size" in err


def test_unknown_command_and_bad_config(tmp_path, capsys):
    assert "valid commands" in run_cli_error(["bake"], capsys)
    config = tmp_path / "c.toml"
    config.write_text('input = ["x"]\nout = "y"\nbatch_sise = 3\n', encoding="utf-8")
    err = run_cli_error(["prepare", "--input", "x", "--out", "y", "--config", str(config)], capsys)
    assert "unknown settings: batch-sise" in err


def test_prepare_train_only_files_join_train_and_leave_val_test_alone(tmp_path):
    main_text = "".join(f"Speech part {i}: we will win, believe me.\n" for i in range(200))
    extra_text = "Rally words, all for training. " * 100
    main_file, extra_file = tmp_path / "main.txt", tmp_path / "extra.txt"
    main_file.write_text(main_text, encoding="utf-8")
    extra_file.write_text(extra_text, encoding="utf-8")
    common = ["--batch-size", "2", "--seq-length", "8"]
    model_main(["prepare", "--input", str(main_file), "--out", str(tmp_path / "alone"), *common])
    both_argv = ["prepare", "--input", str(main_file), "--train-only", str(extra_file), "--out", str(tmp_path / "both")]
    model_main([*both_argv, *common])
    alone, both = load_dataset(tmp_path / "alone"), load_dataset(tmp_path / "both")
    for split in ("val", "test"):
        assert both.vocab.decode(both.splits[split].tolist()) == alone.vocab.decode(alone.splits[split].tolist())
    train = both.vocab.decode(both.splits["train"].tolist())
    assert clean_text(extra_text).strip() in train
    assert train.startswith(alone.vocab.decode(alone.splits["train"].tolist()))
    assert [s["role"] for s in both.meta["sources"]] == ["train+val+test", "train"]
    assert both.meta["sources"][1]["path"] == "extra.txt" and len(both.meta["sources"][1]["sha256"]) == 64


def test_config_file_supplies_required_flags(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("We will make it great again, folks.\n" * 100, encoding="utf-8")
    config = tmp_path / "prep.toml"
    config.write_text(f'input = ["{corpus}"]\nout = "{tmp_path / "ds"}"\nbatch-size = 2\nseq-length = 8\n')
    model_main(["prepare", "--config", str(config)])
    assert load_dataset(tmp_path / "ds").meta["split_sizes"]["train"] > 0
