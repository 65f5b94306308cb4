"""The model shipped in the repository loads, passes its metadata checks and writes a speech."""

import re

import pytest

from bot.config import Config
from bot.core.speech import compose_speech, reply_room
from bot.inference.ending import SENTENCE_END, SLACK
from bot.inference.engine import GenerationEngine
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.inference.runner import read_model_info
from model.sampling import BOT_SAMPLING

SPEECH_LENGTH = 300
# What the bundled model was trained on (../shared/data/README.md): speeches.txt, whose tail is val and test,
# and the 2015-2016 rallies, in train only.
SPEECHES_SHA256 = "3b6362724e391ccb7e2adf790bc51e31e018fde8027fefa005630c76eecce6a2"
RALLIES_SHA256 = "6e8b0727abda59d9f1e54f48231135ea9248ed1a5d5b88acae334f12749ca124"


def test_bundled_model_metadata():
    _, info = read_model_info(DEFAULT_MODEL_PATH)
    assert DEFAULT_MODEL_PATH.stat().st_size <= 25 * 1024 * 1024
    assert info.precision in ("fp32", "int8")
    assert info.corpus_sha256 == [SPEECHES_SHA256, RALLIES_SHA256]
    # The shipped model must be the trained one of docs/default-model.md: 1.34 bits/char on val.
    assert info.val_bpc is not None and info.val_bpc < 1.35
    assert (info.model_config["num_layers"], info.model_config["rnn_size"], info.members) == (2, 640, 1)
    assert {"\n", " ", "a", "A", "."} <= set(info.vocab)


def test_bundled_model_writes_a_300_character_speech():
    with GenerationEngine(DEFAULT_MODEL_PATH, providers="cpu", threads=1) as engine:
        text = engine.generate(
            "We will", length=SPEECH_LENGTH, seed=1, sampling=BOT_SAMPLING.with_options(temperature=0.8)
        )
        again = engine.generate(
            "We will", length=SPEECH_LENGTH, seed=1, sampling=BOT_SAMPLING.with_options(temperature=0.8)
        )
    assert len(text) == SPEECH_LENGTH and text == again
    words = text.split()
    # Fluent English has short words separated by spaces, not a soup of characters.
    assert len(words) > SPEECH_LENGTH / 10
    assert sum(len(w) for w in words) / len(words) < 8


@pytest.mark.parametrize("prompt", ["", "We will"])
def test_bundled_model_speech_with_the_bot_defaults_ends_at_a_sentence(prompt):
    # What the bot sends for /speech in a new chat: its default length and temperature, BOT_SAMPLING.
    with GenerationEngine(DEFAULT_MODEL_PATH, providers="cpu", threads=1) as engine:
        continuation = engine.generate(
            prompt,
            length=Config.default_length,
            sampling=BOT_SAMPLING.with_options(temperature=Config.default_temperature),
            seed=3,
            end_sentence=True,
            max_chars=reply_room(prompt),
        )
    speech = compose_speech(prompt, continuation)
    assert re.search(rf"{SENTENCE_END}$", speech), speech[-80:]
    assert (1 - SLACK) * Config.default_length <= len(continuation) <= (1 + SLACK) * Config.default_length
    assert speech.startswith(prompt)
