"""Property: whatever text arrives, the transport-free core answers with a sendable message or deliberately nothing.

Commands with arbitrary arguments, numbers of every spelling, control characters, lone surrogates and
texts around Telegram's 4,096-character limit go to SpeechBot.handle_text, backed by a real SQLite store
and the real engine on the tiny exported model. It must never raise, and each reply must be 1-4096
characters that survive Telegram's whitespace trimming and encode as UTF-8, or None (an unknown
command in a group, which is another bot's business).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.core.bounds import MESSAGE_MAX
from bot.core.commands import COMMANDS, split_command
from bot.core.speechbot import ChatRef, SpeechBot
from bot.core.voices import Voices
from bot.inference.engine import GenerationEngine
from db.database import create_db_engine, migrate
from db.store import ChatStore

CHATS = [ChatRef(1, "private"), ChatRef(-2, "group"), ChatRef(-1000000000003, "supergroup"), ChatRef(0, "console")]

# Any character, plus the awkward ones drawn often: lone surrogates, NUL, escape, zero-width and line
# separators, a byte-order mark, Telegram-trimmed whitespace. Strings are joined lists of them, because
# hypothesis's text() drops surrogates from any alphabet.
awkward = ["\ud800", "\udfff", "\ud83d", "\x00", "\x1b", "\x7f", "\u200b", "\u2028", "\ufeff", "\u3000", "\u00a0"]
any_character = st.one_of(st.characters(), st.sampled_from(awkward))


def strings(max_size: int) -> st.SearchStrategy[str]:
    return st.lists(any_character, max_size=max_size).map("".join)


words = strings(12)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["0", "-0", "nan", "-inf", "1e309", "0,5", ".9", "2.0000001", "٣", "５", "08:30", "25:61"]),
)
commands = st.sampled_from([f"/{name}" for name in COMMANDS] + ["/speech@SpeechTestBot", "/nosuch", "/", "/_"])
command_lines = st.builds(
    lambda command, arguments, separator: separator.join([command, *arguments]),
    commands,
    st.lists(st.one_of(numbers, words, st.sampled_from(["UTC", "Europe/Berlin", "asia/tokyo"])), max_size=3),
    st.sampled_from([" ", "  ", "\n", "\t", "\u00a0"]),
)
# Long texts are built from a repeated piece: drawing 4,096 characters one by one would be slow.
long_texts = st.builds(
    lambda head, piece, count: head + piece * count, st.sampled_from(["", "/speech 1 "]), words, st.integers(0, 4200)
)
texts = st.one_of(command_lines, strings(40), long_texts, numbers)


@pytest.fixture(scope="module")
def core(tmp_path_factory, tiny_onnx):
    db = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('properties') / 'bot.db'}")
    migrate(db)
    engine = GenerationEngine(tiny_onnx, providers="cpu", threads=1)
    # The shortest allowed speeches keep a few hundred examples fast.
    store = ChatStore(db, 0.8, 20)
    yield SpeechBot(store, Voices.of(engine), cooldown_seconds=0)
    engine.close()
    store.close()


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat=st.sampled_from(CHATS), text=texts)
def test_every_text_gets_a_sendable_answer_or_deliberately_none(core, loop, chat, text):
    reply = loop.run_until_complete(core.handle_text(chat, text))
    if reply is None:
        parsed = split_command(text)
        assert parsed is not None and parsed[0] not in COMMANDS and chat.type in ("group", "supergroup")
        return
    assert isinstance(reply, str)
    assert reply.strip() and len(reply) <= MESSAGE_MAX, repr(reply[:200])
    reply.encode("utf-8")  # a lone surrogate here would make the whole sendMessage fail
