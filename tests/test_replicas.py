"""Replicas on one PostgreSQL database: two bot processes, each fed by its own emulator as a reverse proxy in
front of two webhook replicas would split the updates (shared settings, cooldown, one daily post; a restart
of the server in the middle of a reply); and two real webhook replicas behind a real nginx, fed through it by
the emulator as Telegram feeds a webhook, with one of them killed, or PostgreSQL restarted, in the middle
of a burst of requests (docs/operations.md, "Two replicas behind a reverse proxy").

Where a test kills a replica, it does so while the replica's replies are held on the wire, unconfirmed: a
kill in the instant after Telegram accepted a reply and before the inbox recorded it repeats that reply (the
window docs/operations.md names), and the test makes the moment certain, as tests/test_crash_recovery.py does.
"""

from __future__ import annotations

from sqlalchemy import select, text

from db.database import create_db_engine
from db.inbox import ADVISORY_LOCK_CLASS, update_key
from db.models import InboxEntry
from tests.support.bot_harness import ALICE, BOB, TOKEN, private_chat
from tests.support.bot_process import killable_bot
from tests.support.databases import new_postgres_database
from tests.support.replicas import all_answered, answers, burst, replicas_behind_nginx, users
from tests.support.telegram_emulator import TelegramEmulator
from tests.test_crash_recovery import SLOW, open_entries, posts, schedule_a_missed_post, until

SWEEP = 1  # INBOX_SWEEP_SECONDS in these tests: a dead replica's requests are looked for every second
# Replies each replica sends before the emulator starts holding its replies on the wire.
ANSWERED_BEFORE_HOLD = 10
BURST_CHATS = 50  # each sends /speech twice: once before the kill or restart, once right after it
FAST = {"INBOX_SWEEP_SECONDS": str(SWEEP), "TELEGRAM_MESSAGES_PER_SECOND": "1000"}
# The bound on answering what a killed replica left: the sweep interval, then generation of those requests on a
# loaded two-core machine. Far less than the default sweep interval of a minute.
AFTER_KILL = SWEEP + 30


def liveness_locks(database_url: str) -> int:
    """How many bot processes hold their liveness lock on this database now."""
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        count = connection.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = CAST(:kind AS oid)"
                " AND objsubid = 2 AND granted AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            ),
            {"kind": ADVISORY_LOCK_CLASS},
        ).scalar_one()
    engine.dispose()
    return count


def held(emulator: TelegramEmulator) -> set[int]:
    """The messages whose reply the emulator is holding on the wire (or held), by message id."""
    return {call.params["reply_parameters"]["message_id"] for call in emulator.calls if call.failure == "hold"}


def answered_keys(database_url: str) -> set[str]:
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        keys = set(connection.execute(select(InboxEntry.key).where(InboxEntry.answered_at.is_not(None))).scalars())
    engine.dispose()
    return keys


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


async def test_a_postgresql_restart_neither_repeats_a_reply_in_flight_nor_leaves_a_replica_unmarked(
    restartable_postgres, tmp_path
):
    """A restart of the server drops every session's advisory lock. Each replica takes its own back, and
    neither takes the other's request in flight for a dead process's: one /help, one reply."""
    database_url = new_postgres_database(restartable_postgres.url)
    alice = private_chat(ALICE)
    async with (
        TelegramEmulator(TOKEN) as one,
        TelegramEmulator(TOKEN, first_update_id=1_000_000) as two,
        killable_bot(one, database_url, tmp_path, name="one", **FAST),
        killable_bot(two, database_url, tmp_path, name="two", **FAST),
    ):
        await until(lambda: liveness_locks(database_url) == 2)
        one.inject("sendMessage", "hold", chat_id=alice["id"])
        request = one.send_text(alice, ALICE, "/help")
        await one.wait_for(lambda call: call.failure == "hold", timeout=SLOW)  # the reply is on the wire

        restartable_postgres.restart()
        one.release()  # soon: a reply held past the client's read timeout would be sent again
        await until(lambda: liveness_locks(database_url) == 2, timeout=SLOW)  # both marked alive again
        await until(lambda: open_entries(database_url) == [], timeout=SLOW)

        replies = [call for call in one.sent("sendMessage", alice["id"]) if call.params.get("reply_parameters")]
        assert [call.params["reply_parameters"]["message_id"] for call in replies] == [request["message_id"]]
        assert two.sent("sendMessage", alice["id"]) == [], "the other replica did not answer it again"


async def test_two_replicas_behind_nginx_answer_every_request_once_when_one_is_killed(
    postgres_server, tiny_int8, tmp_path
):
    """Each of 50 chats sends /speech twice at once, then "a" is killed with replies on the wire and requests
    waiting for their chat's turn, then each chat sends once more (nginx sends those to "b"). Every request
    gets one reply: what "a" had is answered by "b" once its sweep finds "a" gone."""
    database_url = new_postgres_database(postgres_server)
    senders = users(BURST_CHATS)
    async with (
        TelegramEmulator(TOKEN) as emulator,
        replicas_behind_nginx(emulator, database_url, tmp_path, tiny_int8, **FAST) as replicas,
    ):
        emulator.inject("sendMessage", "hold", times=10**6, via="a", skip=ANSWERED_BEFORE_HOLD)
        before = burst(emulator, senders) + burst(emulator, senders)
        await until(lambda: len(held(emulator)) >= 2, timeout=SLOW)
        # Every reply of "a" that Telegram accepted is recorded answered: the kill repeats none of them.
        by_message = {request.message["message_id"]: request for request in before}

        def accepted_from_a() -> set[str]:
            return {
                update_key(by_message[quoted].update_id)
                for quoted, calls in answers(emulator).items()
                for call in calls
                if call.via == "a" and quoted in by_message
            }

        await until(lambda: accepted_from_a() <= answered_keys(database_url))
        await replicas.processes["a"].kill()
        after = burst(emulator, senders)  # a's port now refuses: nginx sends these to b

        requests = before + after
        replies = await all_answered(emulator, requests, timeout=AFTER_KILL)
        counts = {request.update_id: len(replies[request.message["message_id"]]) for request in requests}
        assert set(counts.values()) == {1}, {update_id: n for update_id, n in counts.items() if n != 1}
        taken_over = [replies[quoted][0] for quoted in held(emulator)]
        assert all(call.via == "b" for call in taken_over), "what a held was answered by b"
        await until(lambda: open_entries(database_url) == [])
    log = replicas.processes["b"].log.read_text()
    assert "was being answered when its process died; answering it again" in log


async def test_two_replicas_behind_nginx_answer_every_request_once_across_a_postgresql_restart(
    restartable_postgres, tiny_int8, tmp_path
):
    database_url = new_postgres_database(restartable_postgres.url)
    senders = users(BURST_CHATS)
    async with (
        TelegramEmulator(TOKEN) as emulator,
        replicas_behind_nginx(emulator, database_url, tmp_path, tiny_int8, **FAST),
    ):
        await until(lambda: liveness_locks(database_url) == 2)
        # Replies of "a" wait on the wire across the restart: they were handed over before it, and must be
        # neither made again by "b" (whose sweeps run meanwhile) nor lost.
        emulator.inject("sendMessage", "hold", times=10**6, via="a", skip=ANSWERED_BEFORE_HOLD)
        before = burst(emulator, senders)
        await emulator.wait_for(lambda call: call.via == "a" and call.failure == "hold", timeout=SLOW)
        restartable_postgres.restart()
        emulator.release()  # soon: a reply held past the client's read timeout would be sent again
        after = burst(emulator, senders)
        await until(lambda: liveness_locks(database_url) == 2, timeout=SLOW)  # both marked alive again

        replies = await all_answered(emulator, before + after, timeout=SLOW)
        counts = {request.update_id: len(replies[request.message["message_id"]]) for request in before + after}
        assert set(counts.values()) == {1}, {update_id: n for update_id, n in counts.items() if n != 1}

        # Both replicas work on: a few more requests, spread over both by the proxy, all get speeches.
        more = burst(emulator, users(6, first_id=9000))
        replies = await all_answered(emulator, more, timeout=SLOW)
        served = {replies[request.message["message_id"]][0].via for request in more}
        assert served == {"a", "b"}
        await until(lambda: open_entries(database_url) == [])
