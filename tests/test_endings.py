"""How speeches end: at the sentence end nearest the asked length, between words with an ellipsis when no
sentence ends nearby, within the message limit."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.voices import Voices
from bot.inference.ending import ELLIPSIS, Ending, quote_is_open, settle
from tests.support.scripted_runner import SCRIPT, scripted_engine


@pytest.mark.parametrize("length", [20, 60, 150])
def test_speeches_end_at_a_sentence_near_their_length(engine, length):
    ending = Ending(length, 4096)
    for seed in range(6):
        full = engine.generate("We will", length=ending.to_generate, seed=seed)
        speech = engine.generate("We will", length=length, seed=seed, end_sentence=True)
        assert ending.low <= len(speech) <= ending.high
        if speech.endswith(ELLIPSIS):  # no sentence ended near the length: cut between words
            cut = speech[: -len(ELLIPSIS)]
            assert full.startswith(cut) and not full[len(cut)].isalnum()
        else:
            assert full.startswith(speech) and speech[-1] in ".!?\"”’'" and full[len(speech)].isspace()
        assert "".join(engine.stream("We will", length=length, seed=seed, end_sentence=True)) == speech


def test_ending_picks_the_sentence_end_nearest_the_length():
    engine, _ = scripted_engine(SCRIPT, lanes=1)
    ends = [SCRIPT.index(end) + len(end) for end in ("win.", "me!", "over.”")]
    assert ends == [12, 46, 68]
    with engine:
        for length in (12, 14, 40, 45, 56, 57, 60, 70):
            speech = engine.generate("", length=length, end_sentence=True)
            window = [e for e in ends if Ending(length, 4096).low <= e <= Ending(length, 4096).high]
            assert speech == SCRIPT[: min(window, key=lambda e: (abs(e - length), e))]
        assert engine.generate("", length=68, end_sentence=True).endswith("over.”")


def test_without_a_sentence_end_the_speech_stops_between_words_with_an_ellipsis():
    words = "Then a very long sentence goes on and on, and "
    engine, _ = scripted_engine(words, lanes=1)
    with engine:
        for length in range(20, 60, 3):
            speech = engine.generate("", length=length, end_sentence=True)
            cut = speech[: -len(ELLIPSIS)]
            assert speech.endswith(ELLIPSIS) and (words * 20).startswith(cut)
            assert not (words * 20)[len(cut)].isalnum() and cut[-1].isalpha(), "cut between words, no comma"
            assert Ending(length, 4096).low <= len(speech) <= Ending(length, 4096).high
        # Streaming gives the same text, and nothing it streamed had to be taken back.
        assert "".join(engine.stream("", length=41, end_sentence=True)) == engine.generate("", 41, end_sentence=True)


def test_the_message_limit_is_hit_mid_sentence(tmp_path):
    """/length 3000: the sentence that ends nearest the length ends 3100 characters in. After a short prompt
    that is the speech; after a 1000-character prompt it would pass Telegram's 4096, so the speech stops
    inside the limit between words. The prompt stays as it was sent."""
    from bot.core.bounds import MESSAGE_MAX
    from bot.core.speechbot import ChatRef, SpeechBot
    from db.database import create_db_engine, migrate
    from db.store import ChatStore

    sentence = "We won. " + ("and the wall goes on " * 200)[: 3100 - 8 - 4] + "end. "
    assert sentence.index("end.") + 4 == 3100
    engine, _ = scripted_engine(sentence + "Next. " * 200, lanes=1)
    db = create_db_engine(f"sqlite:///{tmp_path / 'bot.db'}")
    migrate(db)
    bot = SpeechBot(ChatStore(db, 0.8, 3000), Voices.of(engine), cooldown_seconds=0)
    with engine:
        short = asyncio.run(bot.prompt(ChatRef(1, "private"), "We will"))
        assert short == "We will" + sentence[:3100]
        prompt = ("We will build a great wall " * 40)[:999] + "x"
        reply = asyncio.run(bot.prompt(ChatRef(1, "private"), prompt))
        assert reply.startswith(prompt) and len(reply) <= MESSAGE_MAX and reply.endswith(ELLIPSIS)
        continuation = reply[len(prompt) : -len(ELLIPSIS)]
        assert Ending(3000, MESSAGE_MAX - len(prompt)).low <= len(continuation) + 1 <= MESSAGE_MAX - len(prompt)
        assert sentence.startswith(continuation) and sentence[len(continuation)] == " ", "not mid-word"

        # A daily post ends the same way, at the sentence.
        async def daily() -> str:
            return await bot.daily_speech(await bot.store.get(2, "private"))

        assert asyncio.run(daily()) == sentence[:3100]


@pytest.mark.parametrize(
    ("text", "target", "limit", "exhausted", "expected"),
    [
        ("One. Two. Three. ", 9, 100, False, (9, "One. Two.")),  # the end at the target
        ("One. Two three", 20, 100, False, (4, None)),  # not yet: an end nearer 20 may come
        # 2 past the target, as "much." is 2 before it: no end still to come is nearer, so stop generating.
        ("We win, win, win so very much. And", 32, 100, False, (30, "We win, win, win so very much.")),
        ("We win, win, win so very much. An", 32, 100, False, (30, None)),  # one character sooner: not yet
        ("One two three. Four five six seven", 14, 100, False, (14, "One two three.")),  # none after it in the window
        ("One. Two three four five six", 9, 100, False, (4, "One. Two" + ELLIPSIS)),  # "One." is too short
        ("Yes! ", 4, 100, True, (4, "Yes!")),
        ('He said "no." Then', 13, 100, False, (13, 'He said "no."')),  # a closing quote after the end
        ("Oh. Yes. No. ", 9, 7, True, (3, "Oh.")),  # the limit cuts the window
        ("The U.S.A is big and strong ok", 12, 100, True, (0, "The U.S.A is" + ELLIPSIS)),  # no end inside words
        ("Go, go, go, go", 8, 100, True, (0, "Go, go" + ELLIPSIS)),  # no comma before the ellipsis
        ("Supercalifragilistic", 8, 100, True, (0, "Supercali" + ELLIPSIS)),  # one word: its start
    ],
)
def test_settle(text, target, limit, exhausted, expected):
    assert settle(text, Ending(target, limit), exhausted) == expected


@pytest.mark.parametrize(
    ("text", "target", "limit", "quoted", "expected"),
    [
        ('He said "we win. We win big. And', 16, 100, False, (16, 'He said "we win."')),  # closed after its end
        ('He said "we win. We win." And', 24, 100, False, (16, 'He said "we win. We win."')),  # the model closed it
        ("we win. And we win big. And", 7, 100, True, (7, 'we win."')),  # the prompt opened it
        ('He said "we go on and on and on', 20, 100, False, (0, 'He said "we go on and' + ELLIPSIS + '"')),
        ("He said “we win. We win big. And", 16, 100, False, (16, "He said “we win.”")),  # typographic quotes
        # At the limit there is no room for the quote after "win.", so the speech stops at a word before it.
        ('He said "we win. And', 16, 16, False, (0, 'He said "we' + ELLIPSIS + '"')),
    ],
)
def test_a_speech_that_would_end_inside_a_quotation_closes_it(text, target, limit, quoted, expected):
    certain, speech = settle(text, Ending(target, limit, quoted), exhausted=True)
    assert (certain, speech) == expected
    assert not quote_is_open(speech, quoted) and len(speech) <= limit


def test_speeches_and_prompts_that_open_a_quote_have_it_closed():
    script = 'Then he said "we will win. We will build the wall. We will win big. '
    engine, _ = scripted_engine(script, lanes=1)
    with engine:
        for prompt, length in (("", 26), ("", 50), ("", 66), ("He said", 26)):
            speech = engine.generate(prompt, length=length, end_sentence=True)
            assert speech.endswith('."') and (script * 2).startswith(speech[:-1]), speech
            assert Ending(length, 4096).low <= len(speech) <= Ending(length, 4096).high
            # Streamed, nothing is taken back: the quote only comes at the end.
            assert "".join(engine.stream(prompt, length=length, end_sentence=True)) == speech
    # The script's end only puts the quote into the vocabulary: these speeches end long before it.
    engine, _ = scripted_engine('we will win. And we will win again. Then the end of it all. "', lanes=1)
    with engine:
        assert engine.generate('He said "', length=12, end_sentence=True) == 'we will win."'
        assert engine.generate("He said “", length=12, end_sentence=True) == 'we will win."', "read as a straight quote"
        assert engine.generate('He said "no"', length=12, end_sentence=True) == "we will win."


# ---- `python -m model sample`: plain by default, the new settings on request ----
