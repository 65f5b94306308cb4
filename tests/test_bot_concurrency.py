"""Many chats at once, over the real HTTP stack and engine: in order within a chat, side by side across
chats, and "busy" at once when the engine's queue is full. Nothing here is timed; the load itself is
measured by bench/bot_load.py."""

from __future__ import annotations

import asyncio
import sqlite3

from bot_harness import ALICE, BOB, TOKEN, Clock, bot_config, group_chat, private_chat, running_bot
from telegram_emulator import Call, TelegramEmulator

from bot.core.speechbot import ENGINE_BUSY_REPLY
from bot.inference.engine import GenerationEngine
from bot.telegram import app as telegram_app
from bot.telegram.app import UPDATES_BEYOND_ENGINE

ALICE_CHAT, BOB_CHAT = private_chat(ALICE), private_chat(BOB)


class HoldingEmulator(TelegramEmulator):
    """Holds the first `method` call to one chat (whose text starts with `text`) until released: a
    request that stays on the wire as long as the test needs, without timing anything."""

    def __init__(self, method: str, chat_id: int, text: str = ""):
        super().__init__(TOKEN)
        self.held = (method, chat_id, text)
        self.release = asyncio.Event()
        self._holding = True

    async def _answer(self, method: str, params: dict):
        held_method, held_chat_id, held_text = self.held
        if (
            self._holding
            and method == held_method
            and int(params["chat_id"]) == held_chat_id
            and str(params.get("text", "")).startswith(held_text)
        ):
            self._holding = False
            await self.release.wait()
        return await super()._answer(method, params)


class GateEmulator(TelegramEmulator):
    """Holds every sendMessage until the gate opens, and notes the most held at once."""

    def __init__(self):
        super().__init__(TOKEN)
        self.gate = asyncio.Event()
        self.held = self.most_held = 0

    async def _answer(self, method: str, params: dict):
        if method == "sendMessage":
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            try:
                await self.gate.wait()
            finally:
                self.held -= 1
        return await super()._answer(method, params)


def to_chat(chat: dict, succeeded: bool = True):
    def matches(call: Call) -> bool:
        return (
            call.method == "sendMessage"
            and int(call.params["chat_id"]) == chat["id"]
            and (call.status == 200 or not succeeded)
        )

    return matches


async def test_one_chat_in_order_while_other_chats_go_on(engine, tmp_path):
    async with HoldingEmulator("sendMessage", ALICE_CHAT["id"], "We will") as emulator:
        config = bot_config(emulator, tmp_path / "bot.db")
        # A long read timeout, so the held reply is not retried while the test looks.
        async with running_bot(emulator, engine, config, Clock(), read_timeout=30.0):
            emulator.send_text(ALICE_CHAT, ALICE, "/speech We will")
            emulator.send_text(ALICE_CHAT, ALICE, "/help")
            emulator.send_text(BOB_CHAT, BOB, "/help")

            await emulator.wait_for(to_chat(ALICE_CHAT, succeeded=False))  # Alice's speech, now held
            await emulator.wait_for(to_chat(BOB_CHAT))  # Bob is answered meanwhile ...
            alice_calls = [call for call in emulator.calls if to_chat(ALICE_CHAT, succeeded=False)(call)]
            assert [call.status for call in alice_calls] == [None], "... and Alice's /help waits for her speech"

            emulator.release.set()
            await emulator.wait_for(lambda call: len(emulator.sent(chat_id=ALICE_CHAT["id"])) == 2)
            speech, help_text = (call.params["text"] for call in emulator.sent(chat_id=ALICE_CHAT["id"]))
            assert speech.startswith("We will")
            assert help_text.startswith("Commands:")


async def test_the_typing_action_never_holds_up_the_speech(engine, tmp_path):
    group = group_chat(-6001)  # private chats show drafts instead (tests/test_bot_interactive.py)
    async with HoldingEmulator("sendChatAction", group["id"]) as emulator:
        config = bot_config(emulator, tmp_path / "bot.db")
        async with running_bot(emulator, engine, config, Clock(), read_timeout=30.0):
            assert (await emulator.ask(group, ALICE, "/speech We will")).startswith("We will")
            actions = [call for call in emulator.calls if call.method == "sendChatAction"]
            assert [call.status for call in actions] == [None], "the speech came while typing was still on the wire"
            emulator.release.set()


async def test_a_full_engine_queue_answers_busy_at_once(emulator, model_path, tmp_path):
    # Room for one speech being written and one waiting: with Alice's long speech under way, Bob's
    # waits and Carol's is one too many.
    small = GenerationEngine(model_path, providers="cpu", threads=1, max_batch=1, max_queue=1)
    carol = {"id": 333, "is_bot": False, "first_name": "Carol"}
    carol_chat = private_chat(carol)
    try:
        async with running_bot(emulator, small, bot_config(emulator, tmp_path / "bot.db"), Clock()) as application:
            assert application.update_processor.max_concurrent_updates == small.capacity + UPDATES_BEYOND_ENGINE
            await emulator.ask(ALICE_CHAT, ALICE, "/length 1000")
            emulator.send_text(ALICE_CHAT, ALICE, "/speech")
            while small.peak_batch == 0:  # until Alice's speech has left the queue for the batch
                await asyncio.sleep(0.01)
            emulator.send_text(BOB_CHAT, BOB, "/speech")
            emulator.send_text(carol_chat, carol, "/speech")
            await emulator.wait_for(lambda call: len(emulator.sent()) == 4, timeout=60)
    finally:
        small.close()
    speeches = emulator.sent()[1:]  # after the answer to /length
    replies = {int(call.params["chat_id"]): call.params["text"] for call in speeches}
    assert len(replies.pop(ALICE_CHAT["id"])) > 500
    assert sorted(text == ENGINE_BUSY_REPLY for text in replies.values()) == [False, True], (
        "of Bob and Carol, one waited in the queue and one was told the engine is busy"
    )
    order = [int(call.params["chat_id"]) for call in speeches]
    busy_chat = next(chat for chat, text in replies.items() if text == ENGINE_BUSY_REPLY)
    assert order.index(busy_chat) < order.index(ALICE_CHAT["id"]), "busy is answered at once, not after the speech"


async def test_requests_beyond_the_in_flight_cap_wait_their_turn_and_all_arrive(engine, tmp_path, monkeypatch):
    # httpcore's pool work grows with the square of its connections, so the bot keeps the wire to a cap
    # (4 here) and queues the rest itself.
    monkeypatch.setattr(telegram_app, "HTTP_IN_FLIGHT_MAX", 4)
    users = [{"id": 7000 + i, "is_bot": False, "first_name": f"User{i}"} for i in range(10)]
    async with GateEmulator() as emulator:
        config = bot_config(emulator, tmp_path / "bot.db")
        async with running_bot(emulator, engine, config, Clock(), read_timeout=30.0):
            for user in users:
                emulator.send_text(private_chat(user), user, "/help")
            while emulator.held < 4:
                await asyncio.sleep(0.01)
            await emulator.settle()  # time enough for a fifth to arrive, were it let through
            assert emulator.held == 4
            emulator.gate.set()
            await emulator.wait_for(lambda call: len(emulator.sent()) == len(users))
    assert emulator.most_held == 4
    assert sorted(int(call.params["chat_id"]) for call in emulator.sent()) == [user["id"] for user in users]


async def test_busy_is_answered_without_the_database(emulator, model_path, tmp_path):
    """With the engine's queue full, "busy" comes at once even while another process holds the database's
    write lock: it needs no database (a crowd of a thousand chats used to wait seconds on the writes that
    started and cancelled each refused chat's cooldown)."""
    small = GenerationEngine(model_path, providers="cpu", threads=1, max_batch=1, max_queue=1)
    try:
        running = small.stream("", length=20_000, seed=0)
        next(running)  # in the batch, for seconds
        waiting = small.stream("", length=5, seed=1)  # and one in the queue: full
        async with running_bot(emulator, small, bot_config(emulator, tmp_path / "bot.db"), Clock()):
            assert small.full
            locker = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")  # the write lock, held until ROLLBACK below
            try:
                assert await emulator.ask(ALICE_CHAT, ALICE, "/speech") == ENGINE_BUSY_REPLY
            finally:
                locker.execute("ROLLBACK")
                locker.close()
        running.close()
        waiting.close()
    finally:
        small.close()
