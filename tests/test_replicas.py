"""Two bot processes on one PostgreSQL database, each fed by its own emulator as a reverse proxy in front
of two webhook replicas would split the updates: one daily post, shared settings, a shared cooldown."""

from __future__ import annotations

from tests.support.bot_harness import ALICE, BOB, TOKEN, private_chat
from tests.support.bot_process import killable_bot
from tests.support.databases import new_postgres_database
from tests.support.telegram_emulator import TelegramEmulator
from tests.test_crash_recovery import SLOW, posts, schedule_a_missed_post


async def test_two_replicas_share_one_database(postgres_server, tmp_path):
    database_url = new_postgres_database(postgres_server)
    await schedule_a_missed_post(database_url)  # both replicas find it due as they start
    alice, bob = private_chat(ALICE), private_chat(BOB)
    hour = {"COOLDOWN_SECONDS": "3600"}
    async with (
        TelegramEmulator(TOKEN) as one,
        TelegramEmulator(TOKEN, first_update_id=1_000_000) as two,
        killable_bot(one, database_url, tmp_path, name="one", **hour),
        killable_bot(two, database_url, tmp_path, name="two", **hour),
    ):
        assert await one.ask(alice, ALICE, "/temperature 1.9", timeout=SLOW) == "Temperature set to 1.9."
        assert "temperature: 1.9" in await two.ask(alice, ALICE, "/settings", timeout=SLOW), "seen by the other replica"

        speech = await one.ask(bob, BOB, "/speech We will", timeout=SLOW)
        assert speech.startswith("We will")
        assert "One speech at a time, please. Try again in" in await two.ask(bob, BOB, "/speech", timeout=SLOW)

        # Both replicas tried the missed post at start; by now both attempts are over.
        await one.ask(alice, ALICE, "/settings", timeout=SLOW)
        await two.ask(alice, ALICE, "/settings", timeout=SLOW)
        delivered = [call for emulator in (one, two) for call in posts(emulator)]
        assert len(delivered) == 1 and delivered[0].status == 200, "the due post is sent exactly once"
