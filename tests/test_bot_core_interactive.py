"""The core's side of the interactive features: choices under a speech, /speech in reply, inline batches
(superseded queries cancelled in the engine, the per-user limit), streaming to a typing indicator."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from bot.core.bounds import INLINE_LENGTH, INLINE_RATE_BURST, INLINE_STYLES, PROMPT_MAX
from bot.core.commands import ArgumentError
from bot.core.speech import STALE_CHOICE, Speech, parse_choice, speech_choices
from bot.core.speechbot import NO_TEXT_TO_CONTINUE
from bot.inference.ending import ELLIPSIS
from bot.inference.engine import GenerationEngine
from model.sampling import TEMPERATURE_MAX, TEMPERATURE_MIN
from tests.test_bot_core import PRIVATE, make_bot


class RecordingEngine:
    """The real engine, noting the prompts it was asked for and those whose generation was cancelled."""

    def __init__(self, engine):
        self.engine = engine
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def agenerate(self, prompt: str = "", length: int = 500, **ask) -> str:
        self.started.append(prompt)
        try:
            return await self.engine.agenerate(prompt, length, **ask)
        except asyncio.CancelledError:
            self.cancelled.append(prompt)
            raise

    def astream(self, prompt: str = "", length: int = 500, **ask):
        return self.engine.astream(prompt, length, **ask)

    @property
    def full(self) -> bool:
        return self.engine.full


async def started(recorder: RecordingEngine, count: int) -> None:
    while len(recorder.started) < count:
        await asyncio.sleep(0.001)


async def cancelled(recorder: RecordingEngine, count: int) -> None:
    while len(recorder.cancelled) < count:
        await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("temperature", "offered"),
    [
        (0.001, [("Another", 0.001), ("Wilder", 0.201)]),  # as calm as it gets: no Calmer
        (0.1, [("Another", 0.1), ("Calmer", 0.001), ("Wilder", 0.3)]),  # a step would pass the lowest
        (0.3, [("Another", 0.3), ("Calmer", 0.1), ("Wilder", 0.5)]),  # one step, not half
        (0.8, [("Another", 0.8), ("Calmer", 0.6), ("Wilder", 1.0)]),
        (1.9, [("Another", 1.9), ("Calmer", 1.7), ("Wilder", 2.0)]),
        (2.0, [("Another", 2.0), ("Calmer", 1.8)]),  # as wild as it gets: no Wilder
    ],
)
def test_choices_move_one_step_within_the_bounds_and_only_where_they_change_something(temperature, offered):
    choices = speech_choices(temperature)
    assert [(choice.label, choice.temperature) for choice in choices] == offered
    assert len({choice.temperature for choice in choices}) == len(choices), "no two buttons do the same"
    for choice in choices:
        assert TEMPERATURE_MIN <= choice.temperature <= TEMPERATURE_MAX
        assert len(choice.data.encode()) <= 64
        assert parse_choice(choice.data) == choice.temperature


@pytest.mark.parametrize(
    "data", ["speech:0", "speech:1e-320", "speech:2.5", "speech:inf", "speech:-1", "speech", "other:1", ""]
)
def test_anything_else_is_a_stale_choice(data):
    with pytest.raises(ArgumentError, match=STALE_CHOICE):
        parse_choice(data)


async def test_a_choice_is_a_speech_at_its_temperature_and_changes_no_setting(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    speech = await bot.choice(PRIVATE, "speech:1.4")
    assert isinstance(speech, Speech) and speech.temperature == 1.4
    assert await bot.choice(PRIVATE, "speech:7") == STALE_CHOICE
    assert (await bot.store.get(PRIVATE.id, "private")).temperature == 0.8


async def test_speech_in_reply_continues_the_message_or_explains(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    assert (await bot.reply_speech(PRIVATE, "0.6", "We will build")).startswith("We will build")
    assert (await bot.reply_speech(PRIVATE, "0.6 Our jobs", "We will build")).startswith("Our jobs"), "own words win"
    assert await bot.reply_speech(PRIVATE, "", None) == NO_TEXT_TO_CONTINUE
    assert await bot.reply_speech(PRIVATE, "", "   ") == NO_TEXT_TO_CONTINUE
    assert "out of range" in await bot.reply_speech(PRIVATE, "9", "We will")
    # A long message is continued from its end instead of being refused.
    long = await bot.reply_speech(PRIVATE, "", "word " * 1000 + "We will")
    assert isinstance(long, Speech) and long.startswith(("word " * 1000 + "We will")[-PROMPT_MAX:].strip())


async def test_a_failing_database_on_a_button_or_a_reply_is_answered_not_raised(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    with sqlite3.connect(tmp_path / "bot.db") as db:
        db.execute("ALTER TABLE chats RENAME TO chats_elsewhere")
    for reply in (await bot.choice(PRIVATE, "speech:0.9"), await bot.reply_speech(PRIVATE, "", "We will build")):
        assert reply.startswith("My settings database cannot be used right now (no such table: chats)")


async def test_inline_speeches_are_short_and_end_as_speeches_end(tmp_path, engine):
    speeches = await make_bot(tmp_path, engine).inline_speeches(1, "  We will ")
    assert [(s.style, s.temperature) for s in speeches] == list(INLINE_STYLES)
    for speech in speeches:
        # At a sentence end, or at a word with an ellipsis where none is near (bot/inference/ending.py).
        assert speech.text.startswith("We will") and speech.text.endswith((".", "!", "?", ELLIPSIS))
        assert len(speech.text) <= len("We will") + INLINE_LENGTH


async def test_a_newer_inline_query_cancels_the_older_one_in_the_engine(tmp_path, engine):
    recorder = RecordingEngine(engine)
    bot = make_bot(tmp_path, recorder)
    older = asyncio.create_task(bot.inline_speeches(1, "We"))
    other_user = asyncio.create_task(bot.inline_speeches(2, "Our"))
    await started(recorder, 6)
    newer = await bot.inline_speeches(1, "We will")
    assert await older is None
    assert recorder.cancelled == ["We"] * 3, "all three of the older batch, nothing else"
    assert [s.text.startswith("We will") for s in newer] == [True] * 3
    assert len(await other_user) == 3


async def test_over_the_per_user_limit_a_query_waits_and_a_newer_one_replaces_it(tmp_path, engine):
    recorder = RecordingEngine(engine)
    bot = make_bot(tmp_path, recorder)
    limit = bot.inline._limit(1)
    for _ in range(INLINE_RATE_BURST):  # a burst of queries just used up the user's allowance
        await limit.acquire()
    waiting = asyncio.create_task(bot.inline_speeches(1, "Our jobs"))
    await asyncio.sleep(0.01)
    assert not recorder.started, "over the limit: it waits instead of filling the engine's queue"
    newest = await bot.inline_speeches(1, "Our jobs are")
    assert await waiting is None and recorder.started == ["Our jobs are"] * 3
    assert newest[0].text.startswith("Our jobs are")
    assert len(await bot.inline_speeches(2, "We")) == 3, "another user has an allowance of their own"


async def test_a_typing_indicator_that_yields_a_callback_is_streamed_the_speech_so_far(tmp_path, engine):
    bot = make_bot(tmp_path, engine)
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def streaming():
        yield seen.append

    # Long enough to hold a sentence end before the target: the engine streams only text sure to stay
    # (tests/test_bot_interactive.py, DRAFTED_LENGTH).
    await bot.handle_text(PRIVATE, "/length 600")
    speech = await bot.handle_text(PRIVATE, "/speech 0.9 We will", show_typing=streaming)
    assert len(seen) > 1 and seen[-1] == speech
    assert all(speech.startswith(text) and text.startswith("We will") for text in seen)


async def test_inline_speeches_when_the_engine_is_full_are_empty_and_cancel_what_was_queued(tmp_path, tiny_onnx):
    with GenerationEngine(tiny_onnx, providers="cpu", threads=1, max_batch=1, max_queue=2) as small:
        running = small.stream("", length=20_000, seed=0)
        next(running)  # the worker holds this one; the queue has room for two of the three
        recorder = RecordingEngine(small)
        assert await make_bot(tmp_path, recorder).inline_speeches(1, "We") == []
        await asyncio.wait_for(cancelled(recorder, 2), 10)
        assert recorder.cancelled == ["We", "We"], "the two that fitted in the queue are not left to run"
        running.close()
