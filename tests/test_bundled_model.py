"""The model shipped in the repository loads, passes its metadata checks and writes a speech."""

from bot.engine import GenerationEngine
from bot.modelfile import DEFAULT_MODEL_PATH
from bot.runner import read_model_info

SPEECH_LENGTH = 300


def test_bundled_model_metadata():
    _, info = read_model_info(DEFAULT_MODEL_PATH)
    assert DEFAULT_MODEL_PATH.stat().st_size <= 25 * 1024 * 1024
    assert info.precision in ("fp32", "int8")
    assert len(info.corpus_sha256) == 1 and len(info.corpus_sha256[0]) == 64
    # The shipped model must be a trained one, not a placeholder: below 1.6 bits/char on val.
    assert info.val_bpc is not None and info.val_bpc < 1.6
    assert {"\n", " ", "a", "A", "."} <= set(info.vocab)


def test_bundled_model_writes_a_300_character_speech():
    with GenerationEngine(DEFAULT_MODEL_PATH, providers="cpu", threads=1) as engine:
        text = engine.generate("We will", length=SPEECH_LENGTH, temperature=0.8, seed=1)
        again = engine.generate("We will", length=SPEECH_LENGTH, temperature=0.8, seed=1)
    assert len(text) == SPEECH_LENGTH and text == again
    words = text.split()
    # Fluent English has short words separated by spaces, not a soup of characters.
    assert len(words) > SPEECH_LENGTH / 10
    assert sum(len(w) for w in words) / len(words) < 8
