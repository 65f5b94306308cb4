"""The chat store and the inbox on real SQLite files and a real PostgreSQL server: migrations, defaults,
the daily guard, the shared cooldown, group migration, and taking over what a crashed process left."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta

import pytest
from sqlalchemy import event, inspect, text

from db.database import DatabaseConfigError, create_db_engine, migrate
from db.inbox import ANSWERED, CLAIMED, QUEUED, SENDING, Inbox, daily_key, update_key
from db.store import ChatStore
from tests.support.databases import new_postgres_database

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
HEAD = "0005"  # the newest migration


def open_store(url: str) -> ChatStore:
    engine = create_db_engine(url)
    migrate(engine)
    return ChatStore(engine, default_temperature=0.8, default_length=300)


@pytest.fixture
def stores(database_url):
    """Opens stores on the test's database (each its own engine, like separate processes); closes them after."""
    opened = []

    def open_one() -> ChatStore:
        opened.append(open_store(database_url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def revision(engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()


def test_migration_creates_folder_table_and_wal(tmp_path):
    path = tmp_path / "nested" / "bot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate(engine)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upgrade_from_empty(database_url):
    engine = create_db_engine(database_url)
    migrate(engine)
    migrate(engine)  # a second start finds nothing to do
    assert {"chats", "inbox"} <= set(inspect(engine).get_table_names())
    assert "speech_ready_at" in {column["name"] for column in inspect(engine).get_columns("chats")}
    assert revision(engine) == HEAD
    engine.dispose()


def test_upgrade_from_the_previous_revision_keeps_the_rows(database_url):
    engine = create_db_engine(database_url)
    migrate(engine, "0001")
    assert "inbox" not in inspect(engine).get_table_names()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO chats (id, type, temperature, length, time_zone, schedule_enabled, last_daily_post,"
                " created_at, updated_at) VALUES (-100123, 'group', 1.1, 222, 'Asia/Tokyo', :on, :day, :now, :now)"
            ),
            {"on": True, "day": date(2026, 2, 28), "now": NOW},
        )
    migrate(engine)
    assert revision(engine) == HEAD
    store = ChatStore(engine, 0.8, 300)
    settings = asyncio.run(store.find(-100123))
    assert (settings.temperature, settings.length, settings.time_zone) == (1.1, 222, "Asia/Tokyo")
    assert (settings.schedule_enabled, settings.last_daily_post) == (True, date(2026, 2, 28))
    assert (settings.chatter_rate, settings.quiet_until, settings.speeches_total, settings.chatter_today) == (
        None,
        None,
        0,
        0,
    ), "chatter off, not quiet, nothing counted"
    store.close()


async def test_replicas_migrating_at_once_both_start(database_url):
    engines = [create_db_engine(database_url) for _ in range(3)]
    await asyncio.gather(*(asyncio.to_thread(migrate, engine) for engine in engines))
    assert {revision(engine) for engine in engines} == {HEAD}
    for engine in engines:
        engine.dispose()


async def test_new_chat_gets_defaults_and_changes_survive_reopen(stores):
    store = stores()
    settings = await store.get(42, "private")
    assert (settings.temperature, settings.length, settings.schedule_enabled) == (0.8, 300, False)
    await store.update(42, temperature=1.3, length=120, daily_time=time(7, 30), time_zone="Europe/Berlin")
    store.close()

    settings = await stores().find(42)
    assert (settings.temperature, settings.length) == (1.3, 120)
    assert (settings.daily_time, settings.time_zone) == (time(7, 30), "Europe/Berlin")


async def test_daily_claim_is_won_once_per_day_and_only_when_enabled(stores):
    store = stores()
    await store.get(-5, "group")
    assert not await store.claim_daily_post(-5, date(2026, 3, 1), owner=1), "no schedule yet"
    await store.update(-5, daily_time=time(9, 0), schedule_enabled=True)
    assert await store.claim_daily_post(-5, date(2026, 3, 1), owner=1)
    assert not await store.claim_daily_post(-5, date(2026, 3, 1), owner=1)
    assert not await stores().claim_daily_post(-5, date(2026, 3, 1), owner=2), "from another process"
    assert not await store.claim_daily_post(-5, date(2026, 2, 28), owner=1), "a day already passed"
    assert await store.claim_daily_post(-5, date(2026, 3, 2), owner=1)
    assert [chat.id for chat in await store.scheduled()] == [-5]


async def test_racing_processes_claim_a_day_once_and_share_the_cooldown(stores):
    replicas = [stores() for _ in range(4)]
    await replicas[0].get(-6, "group")
    await replicas[0].update(-6, daily_time=time(9, 0), schedule_enabled=True)
    claims = await asyncio.gather(
        *(store.claim_daily_post(-6, date(2026, 3, 1), owner=i) for i, store in enumerate(replicas))
    )
    assert sorted(claims) == [False, False, False, True]

    cooldown = timedelta(seconds=10)
    starts = await asyncio.gather(*(store.start_speech(7, "private", NOW, cooldown) for store in replicas))
    waits = [ready_at for _settings, ready_at in starts]
    assert waits.count(None) == 1, "one replica starts the speech"
    assert [ready_at for ready_at in waits if ready_at is not None] == [NOW + cooldown] * 3
    assert (await replicas[1].start_speech(7, "private", NOW + cooldown, cooldown))[1] is None, "cooldown over"


async def test_cancelled_cooldown_lets_the_next_speech_start(stores):
    store = stores()
    cooldown = timedelta(seconds=10)
    assert (await store.start_speech(7, "private", NOW, cooldown))[1] is None
    await store.cancel_cooldown(7, NOW + cooldown)
    assert (await store.start_speech(7, "private", NOW, cooldown))[1] is None
    assert (await store.start_speech(7, "private", NOW, cooldown))[1] == NOW + cooldown


async def test_speeches_are_counted_per_utc_day_and_in_all(stores):
    store = stores()
    cooldown = timedelta(seconds=10)
    await store.start_speech(7, "private", NOW, cooldown)
    await store.start_speech(7, "private", NOW + cooldown, cooldown)
    await store.start_speech(7, "private", NOW + cooldown, cooldown)  # refused: cooling down, not counted
    settings = await store.find(7)
    assert (settings.speeches_total, settings.speeches_on(NOW.date())) == (2, 2)
    await store.cancel_cooldown(7, NOW + 2 * cooldown)  # the second one was never made
    settings = await store.find(7)
    assert (settings.speeches_total, settings.speeches_on(NOW.date())) == (1, 1)
    await store.update(7, daily_time=time(9, 0), schedule_enabled=True)
    tomorrow = NOW + timedelta(days=1)
    assert await store.claim_daily_post(7, tomorrow.date(), owner=1, now=tomorrow)
    settings = await store.find(7)
    assert (settings.speeches_total, settings.speeches_on(tomorrow.date()), settings.speeches_on(NOW.date())) == (
        2,
        1,
        0,
    ), "a daily post counts, and a new day starts from one"


async def test_an_interjection_is_claimed_only_when_chatter_quiet_gap_cap_and_cooldown_allow(stores):
    store, gap, cooldown = stores(), timedelta(minutes=5), timedelta(seconds=30)

    async def claim(at: datetime, cap: int = 3) -> bool:
        return await store.claim_interjection(-7, at, gap, cap, cooldown) is not None

    assert not await claim(NOW), "no row: chatter was never set"
    await store.get(-7, "group")
    assert not await claim(NOW), "chatter off"
    await store.update(-7, chatter_rate=0.25, quiet_until=NOW + timedelta(hours=1))
    assert not await claim(NOW), "quiet"
    assert await claim(NOW + timedelta(hours=1)), "quiet is over"
    start = NOW + timedelta(hours=1)
    assert not await claim(start + gap - timedelta(seconds=1)), "within the gap"
    assert await claim(start + gap)
    await store.start_speech(-7, "group", start + 3 * gap, cooldown)
    assert not await claim(start + 3 * gap + timedelta(seconds=1)), "a speech's cooldown runs"
    assert await claim(start + 3 * gap + cooldown)
    assert not await claim(start + 5 * gap), "three today: the cap"
    next_day = datetime.combine(NOW.date() + timedelta(days=1), time(0, 0), UTC)
    assert await claim(next_day), "a new UTC day"
    settings = await store.find(-7)
    assert (settings.chatter_day, settings.chatter_today, settings.chatter_last_at) == (next_day.date(), 1, next_day)
    assert (settings.speeches_total, settings.speeches_on(next_day.date())) == (5, 1), "interjections are speeches"
    soon = next_day + timedelta(seconds=1)
    assert (await store.start_speech(-7, "group", soon, cooldown))[1] == next_day + cooldown, "and start the cooldown"


async def test_racing_replicas_start_one_interjection(stores):
    replicas = [stores() for _ in range(4)]
    await replicas[0].get(-9, "group")
    await replicas[0].update(-9, chatter_rate=0.5)
    claims = await asyncio.gather(
        *(store.claim_interjection(-9, NOW, timedelta(minutes=5), 20, timedelta(0)) for store in replicas)
    )
    assert sum(claim is not None for claim in claims) == 1


async def test_migrate_chat_moves_settings_to_the_supergroup(stores):
    store = stores()
    await store.get(-100, "group")
    await store.update(-100, temperature=0.4, daily_time=time(8, 0), schedule_enabled=True)
    await store.get(-1000000000100, "supergroup")  # the supergroup spoke before the migration arrived
    moved = await store.migrate_chat(-100, -1000000000100)
    assert (moved.id, moved.type, moved.temperature, moved.schedule_enabled) == (
        -1000000000100,
        "supergroup",
        0.4,
        True,
    )
    assert await store.find(-100) is None
    assert await store.migrate_chat(-100, -1000000000100) is None, "a second notice is harmless"


async def test_inbox_hands_what_a_gone_process_left_to_the_next(stores):
    crashed_store, next_store = stores(), stores()
    crashed, survivor = Inbox(crashed_store.database, owner=11), Inbox(next_store.database, owner=22)
    message = {"update_id": 5, "message": {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"}}}
    assert await crashed.claim_update(5, 7, message, NOW)
    assert not await survivor.claim_update(5, 7, message, NOW), "a copy of the same update is not handled twice"
    assert await crashed.claim_update(6, 7, message | {"update_id": 6}, NOW)
    await crashed.mark(update_key(6), ANSWERED, NOW)
    await crashed_store.get(-8, "group")
    await crashed_store.update(-8, daily_time=time(9, 0), schedule_enabled=True)
    assert await crashed_store.claim_daily_post(-8, date(2026, 3, 1), owner=11, now=NOW)
    await crashed_store.get(-9, "group")
    await crashed_store.update(-9, daily_time=time(9, 0), schedule_enabled=True)
    assert await crashed_store.claim_daily_post(-9, date(2026, 3, 1), owner=11, now=NOW)
    await crashed.mark(daily_key(-9, date(2026, 3, 1)), SENDING, NOW)
    crashed_store.close()  # kill -9: its connections are gone, nothing else happens

    await survivor.open()  # only a process marked alive judges others gone (PostgreSQL; nothing on SQLite)
    taken = {entry.key: entry for entry in await survivor.take_over(NOW)}
    assert set(taken) == {update_key(5), daily_key(-8, date(2026, 3, 1))}, "answered and sending ones are not"
    assert (taken[update_key(5)].state, taken[update_key(5)].payload) == (QUEUED, message)
    assert taken[daily_key(-8, date(2026, 3, 1))].state == CLAIMED
    assert taken[update_key(5)].received_at == NOW
    assert await survivor.claim_update(5, 7, message, NOW), "the replayed copy is handled"
    assert not await survivor.claim_update(5, 7, message, NOW), "once"
    assert await survivor.take_over(NOW) == [], "nothing is left for a third process"
    assert await survivor.forget_answered(NOW + timedelta(seconds=1)) == 2
    survivor.close()


def stored_payloads(store: ChatStore) -> dict[str, str | None]:
    with store.database.engine.connect() as connection:
        return dict(connection.execute(text("SELECT key, payload FROM inbox")).all())


async def test_an_answered_update_keeps_its_key_and_not_what_the_user_sent(stores):
    store = stores()
    inbox = Inbox(store.database, owner=11)
    alice = {"id": 7, "is_bot": False, "first_name": "Alice", "username": "alice_w"}
    message = {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"}, "from": alice, "text": "/speech Hi"}
    assert await inbox.claim_update(5, 7, {"update_id": 5, "message": message}, NOW)
    assert await inbox.claim_update(6, 7, {"update_id": 6, "message": message}, NOW)
    await inbox.mark(update_key(5), ANSWERED, NOW)
    payloads = stored_payloads(store)
    assert payloads[update_key(5)] is None, "answered: nothing of the user's message is kept"
    assert "alice_w" in payloads[update_key(6)], "still open: kept, to be handled again after a crash"
    assert not await inbox.claim_update(5, 7, {"update_id": 5, "message": message}, NOW), "a repeat is refused"
    assert await inbox.forget_answered(NOW + timedelta(seconds=1)) == 1


def test_the_upgrade_drops_what_answered_entries_kept_before(database_url):
    engine = create_db_engine(database_url)
    migrate(engine, "0002")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO inbox (key, chat_id, owner, state, received_at, answered_at, payload)"
                " VALUES (:key, 7, 1, :state, :now, :answered, :payload)"
            ),
            [
                {"key": "update:1", "state": "answered", "now": NOW, "answered": NOW, "payload": '{"text": "hi"}'},
                {"key": "update:2", "state": "handling", "now": NOW, "answered": None, "payload": '{"text": "yo"}'},
            ],
        )
    migrate(engine)
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT key, payload FROM inbox")).all())
    assert rows == {"update:1": None, "update:2": '{"text": "yo"}'}, "an open entry keeps its update"
    engine.dispose()


async def test_forget_deletes_a_chats_settings_and_inbox_entries_and_nothing_else(stores):
    store = stores()
    inbox = Inbox(store.database, owner=11)
    for chat_id, update_id in ((-8, 1), (-9, 3)):
        await store.get(chat_id, "group")
        await store.update(chat_id, temperature=1.2, daily_time=time(9, 0), schedule_enabled=True)
        assert await store.claim_daily_post(chat_id, date(2026, 3, 1), owner=11, now=NOW)
        assert await inbox.claim_update(update_id, chat_id, {"update_id": update_id}, NOW)
        assert await inbox.claim_update(update_id + 1, chat_id, {"update_id": update_id + 1}, NOW)
        await inbox.mark(update_key(update_id), ANSWERED, NOW)

    forgotten = await store.forget(-8)
    assert forgotten and forgotten.settings.temperature == 1.2 and forgotten.inbox_entries == 3
    assert await store.find(-8) is None
    assert set(stored_payloads(store)) == {update_key(3), update_key(4), daily_key(-9, date(2026, 3, 1))}
    assert (await store.find(-9)).temperature == 1.2
    assert [chat.id for chat in await store.scheduled()] == [-9]
    assert not await store.forget(-8), "nothing left to forget"
    assert (await store.get(-8, "group")).temperature == 0.8, "a chat that speaks again starts with the defaults"


@contextlib.asynccontextmanager
async def two_live_processes(url: str) -> AsyncIterator[tuple[Inbox, Inbox]]:
    """The inboxes of two processes on one PostgreSQL database, each marked alive; the first claims update 9."""
    stores = [open_store(url), open_store(url)]
    inboxes = [Inbox(store.database) for store in stores]
    try:
        for inbox in inboxes:
            await inbox.open()
        assert await inboxes[0].claim_update(9, 7, {"update_id": 9}, NOW)
        yield inboxes[0], inboxes[1]
    finally:
        for inbox in inboxes:
            inbox.close()
        for store in stores:
            store.close()


async def test_postgresql_tells_a_live_process_from_a_gone_one(postgres_server):
    async with two_live_processes(new_postgres_database(postgres_server)) as (first, second):
        assert await second.take_over(NOW) == [], "the first process is alive: its work is not taken"
        first.close()  # what the server sees when the process dies: its session closes
        assert [entry.key for entry in await second.take_over(NOW)] == [update_key(9)]


@pytest.mark.parametrize(
    ("url", "expected"),
    [("not a url", "is not a database URL"), ("nosuchdb://x/y", "needs a driver")],
)
def test_bad_database_url_is_explained(url, expected):
    with pytest.raises(DatabaseConfigError, match=expected):
        create_db_engine(url)


@pytest.mark.parametrize("existing", [False, True], ids=["new file", "stored file"])
def test_a_full_disk_at_start_is_reported_as_full_not_as_damage(tmp_path, existing):
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    if existing:
        old = create_db_engine(url)
        migrate(old, "0001")  # so the start has migrations left to write
        old.dispose()
    engine = create_db_engine(url)

    # SQLite's own SQLITE_FULL ("database or disk is full"), as from a full disk: the file may not grow.
    @event.listens_for(engine, "connect")
    def no_room_to_grow(dbapi_connection, _record) -> None:
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count={max(pages, 1)}")

    with pytest.raises(DatabaseConfigError) as raised:
        migrate(engine)
    message = str(raised.value)
    assert "(database or disk is full); the disk it is on is full; free some space there" in message, message
    assert "backup" not in message and "new file" not in message
    engine.dispose()


def test_processes_opening_a_new_sqlite_file_at_once_all_switch_it_to_wal(tmp_path):
    # SQLite answers "database is locked" without waiting to a connection that switches a new file to WAL
    # while another does: 8 of 100 rounds failed so before db.database retried the switch.
    for round_number in range(20):
        url = f"sqlite:///{tmp_path / f'round{round_number}.db'}"
        engines = [create_db_engine(url) for _ in range(3)]
        errors: list[Exception] = []

        def migrate_or_record(engine, errors: list[Exception] = errors) -> None:
            try:
                migrate(engine)
            except Exception as error:
                errors.append(error)

        threads = [threading.Thread(target=migrate_or_record, args=(engine,)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for engine in engines:
            engine.dispose()
        assert errors == [], f"round {round_number}"


async def test_an_update_recorded_on_arrival_is_owed_until_answered_or_dropped(stores):
    crashed_store, next_store = stores(), stores()
    crashed, survivor = Inbox(crashed_store.database, owner=11), Inbox(next_store.database, owner=22)
    update = {"update_id": 5, "message": {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"}}}
    for update_id in (5, 6, 7):
        assert await crashed.record_received(update_id, 7, update | {"update_id": update_id}, NOW)
    assert not await crashed.record_received(5, 7, update, NOW), "a copy sent again is recorded once"
    assert not await crashed.claim_update(5, 7, update, NOW), "and not answered by its copy: the first one is"
    assert not await survivor.claim_update(5, 7, update, NOW), "another process's"
    await crashed.drop_unclaimed(6)  # handled without a reply: nothing owed
    assert set(stored_payloads(crashed_store)) == {update_key(5), update_key(7)}
    assert await crashed.hand_over(update_key(5))
    crashed_store.close()  # killed while the reply of 5 was on its way and 7 waited for its turn

    await survivor.open()
    taken = {entry.key: entry for entry in await survivor.take_over(NOW)}
    assert set(taken) == {update_key(5), update_key(7)}, "a reply on its way is made again: at least once"
    assert {entry.state for entry in taken.values()} == {QUEUED}
    assert await survivor.claim_update(7, 7, update | {"update_id": 7}, NOW)
    survivor.close()


async def test_a_reply_is_sent_only_by_the_process_whose_entry_it_still_is(postgres_server):
    async with two_live_processes(new_postgres_database(postgres_server)) as (first, second):
        first.close()  # its liveness lock is lost while it still works on the update (a dropped connection)
        assert [entry.key for entry in await second.take_over(NOW)] == [update_key(9)]
        assert not await first.hand_over(update_key(9)), "taken over: the other process answers it"
        assert await second.claim_update(9, 7, {"update_id": 9}, NOW)
        assert await second.hand_over(update_key(9))
        assert await first.hand_over(update_key(10)), "never recorded (the database was down): nobody else has it"


async def test_after_a_server_restart_processes_take_their_locks_back_before_judging_others(
    restartable_postgres, monkeypatch
):
    monkeypatch.setattr("db.inbox.TAKEOVER_GRACE_SECONDS", 1.0)
    async with two_live_processes(new_postgres_database(restartable_postgres.url)) as (first, second):
        restartable_postgres.restart()  # every session's locks are gone, the first's included
        assert await second.take_over(NOW) == [], "its own lock gone or just taken back: it cannot tell who is alive"
        async with asyncio.timeout(30):
            while None in (*first.liveness(), *second.liveness()):  # each holds it again, having lost it
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the grace
        assert await second.take_over(NOW) == [], "the first took its lock back: alive"
        assert await first.hand_over(update_key(9))

        first.close()  # now it is gone
        assert [entry.key for entry in await second.take_over(NOW)] == [update_key(9)]
