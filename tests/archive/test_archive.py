"""zim.archive's link and calls inside a running zim Reactor, against a real PostgreSQL."""
from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import postgres_servers
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import after, run_in_loop
from zim._core import Reactor
from zim.archive.link import PgLink
from zim.archive.schema import SCHEMA_VERSION, migrate, migrate_on_link, schema_version
from zim.archive.store import Archive
from zim.ids import EPOCH_MS, TIME_SHIFT, Snowflake
from zim.pending import Pending
from zim.storage.store import MemoryStore
from zim.testing.ports import free_loopback_port

pytestmark = requires_postgres
postgres_server = postgres_servers.postgres_server

QUICK = {"first_backoff": 0.02, "max_backoff": 0.2}
_ids = Snowflake(7)
_names = itertools.count()


@pytest.fixture(scope="module")
def dsn(postgres_server) -> str:
    """One migrated database for the module (tests keep to conversations of their own)."""
    found = postgres_server.create_database("archive")
    migrate(found)
    return found


def in_loop(dsn: str, script_of, timeout: float = 20.0, **options) -> list[float]:
    """Run ``script_of(archive)`` (a run_in_loop script) on a new reactor with a
    link to ``dsn``, once the link is up; returns the loop's heartbeats."""
    reactor = Reactor(65536, lambda *packet: None)
    link = PgLink(reactor, dsn, **{**QUICK, **options})
    archive = Archive(link)

    def script():
        yield lambda: link.state == "up"
        yield from script_of(archive)

    try:
        return run_in_loop(reactor, script(), timeout)
    finally:
        link.close()


def settled(*pendings: Pending):
    return lambda: all(p.outcome is not None for p in pendings)


def message(seq: int, **extra) -> dict:
    return {"id": str(_ids.next()), "seq": seq, "content": f"m{seq}", **extra}


def test_the_same_batch_twice_stores_each_message_once(dsn, postgres_server):
    room = f"room{next(_names)}"
    batch = [("channel", room, message(seq)) for seq in range(1, 51)]
    outcomes = {}

    def script(archive):
        first, again = archive.archive_messages(batch), archive.archive_messages(batch)
        yield settled(first, again)
        outcomes["writes"] = (first.outcome, again.outcome)
        seq = archive.highest_seq("channel", room)
        yield settled(seq)
        outcomes["seq"] = seq.outcome

    in_loop(dsn, script)
    assert outcomes["writes"] == ((True, 50), (True, 0))
    assert outcomes["seq"] == (True, 50)
    assert postgres_server.execute(f"SELECT count(*), count(DISTINCT id) FROM messages WHERE conversation = "
                                   f"'c:{room}'", "archive") == [("50", "50")]


@settings(max_examples=30, deadline=None)
@given(count=st.integers(0, 25),
       pages=st.lists(st.tuples(st.none() | st.integers(-2, 30), st.integers(-1, 12)), min_size=1, max_size=6))
def test_paging_is_store_history_paging(dsn, count, pages):
    memory = MemoryStore()
    low, high = sorted((next(_names) + 1, next(_names) + 1))
    memory.create_user(low, "a")
    memory.create_user(high, "b")
    for number in range(count):
        memory.append_user_message(high, low, {"id": str(_ids.next()), "content": f"m{number}"})
    stored = memory.history("user", (low, high), None, count)[0]
    results = []

    def script(archive):
        if stored:
            write = archive.archive_messages([("user", (high, low), dict(item)) for item in stored])
            yield settled(write)
            assert write.outcome == (True, count)
        reads = [archive.history("user", (low, high), before, limit) for before, limit in pages]
        yield settled(*reads)
        results.extend(read.outcome for read in reads)

    in_loop(dsn, script)
    for (before, limit), outcome in zip(pages, results):
        assert outcome == (True, memory.history("user", (low, high), before, limit)), (before, limit)



def test_big_batches_streamed_four_at_a_time_all_commit(dsn, postgres_server):
    """Batches of 1,000 messages, four on the wire at once, each commit sending
    the next from its callback (as a writer will): more than the socket buffers
    hold either way, so libpq reads answers while it sends; none may be left in
    its buffer without a wake-up to come (it would stall until the reply timeout,
    10 s, past this test's limit)."""
    room = f"room{next(_names)}"
    batches = [[("channel", room, message(1000 * number + offset, content="x" * 200)) for offset in range(1, 1001)]
               for number in range(16)]
    outcomes = []

    def script(archive):
        queue = iter(batches)

        def committed(_first, _second, ok, value) -> None:
            outcomes.append((ok, value))
            following = next(queue, None)
            if following is not None:
                archive.archive_messages(following).wait(committed, None, None)

        for batch in itertools.islice(queue, 4):
            archive.archive_messages(batch).wait(committed, None, None)
        yield lambda: len(outcomes) == len(batches)

    in_loop(dsn, script, timeout=8.0)
    assert outcomes == [(True, 1000)] * len(batches)
    assert postgres_server.execute(f"SELECT count(*) FROM messages WHERE conversation = 'c:{room}'",
                                   "archive") == [("16000",)]

def test_users_memberships_and_seq_counters_are_read_back(dsn):
    user = (1 << 64) - 1 - next(_names)       # the largest ids fit (numeric(20))
    outcomes = {}

    def script(archive):
        writes = [archive.save_user(user, "ann", 3), archive.save_user(user, "anna", 1),
                  archive.save_membership("r1", user, True), archive.save_membership("r2", user, False),
                  archive.save_membership("r2", user, True), archive.save_membership("r3", user, True),
                  archive.remove_membership("r3", user)]
        yield settled(*writes)
        assert all(write.outcome == (True, None) for write in writes)
        reads = [archive.user(user), archive.user(user - 1_000_000), archive.memberships_of(user),
                 archive.highest_seq("user", (user, 5))]
        yield settled(*reads)
        outcomes["reads"] = [read.outcome[1] for read in reads]

    in_loop(dsn, script)
    # the name follows the last write, the token epoch never goes back
    assert outcomes["reads"] == [("anna", 3), None, [("r1", True), ("r2", True)], 0]


def test_bad_input_is_refused_before_it_is_sent(dsn):
    def script(archive):
        with pytest.raises(ValueError, match="no seq"):
            archive.archive_messages([("channel", "x", {"id": "1"})])
        with pytest.raises(ValueError, match="decimal Snowflake"):
            archive.archive_messages([("channel", "x", {"id": "abc", "seq": 1})])
        with pytest.raises(ValueError, match="63-bit"):
            archive.archive_messages([("channel", "x", {"id": str(1 << 63), "seq": 1})])
        refused = archive.link.transaction([("SELECT 1/0", ()), ("SELECT 1", ())])
        fine = archive.link.transaction([("SELECT 2", ())])
        yield settled(refused, fine)
        assert refused.outcome == (False, "division by zero")
        assert fine.outcome == (True, [[(b"2",)]])      # the link goes on after a refusal

    in_loop(dsn, script)


def test_an_unreachable_archive_fails_calls_with_the_reason():
    reactor = Reactor(65536, lambda *packet: None)
    with pytest.raises(ValueError, match="bad PostgreSQL DSN"):
        PgLink(reactor, "host=127.0.0.1 port")
    link = PgLink(reactor, f"postgresql://zim@127.0.0.1:{free_loopback_port()}/postgres", **QUICK)
    seen = []

    def script():
        yield lambda: link.state == "down"
        seen.append(link.transaction([("SELECT 1", ())]).outcome)
        yield lambda: link.failures >= 3        # it keeps trying, backing off

    try:
        run_in_loop(reactor, script(), 10.0)
    finally:
        link.close()
    assert seen[0][0] is False and "Connection refused" in seen[0][1], seen


def test_sigkilled_and_restarted_postgres_loses_nothing_and_never_blocks_the_loop(dsn, postgres_server):
    """Batches stream in while PostgreSQL is SIGKILLed, down for 2 s, restarted:
    what was in flight is reported failed, every batch settles (committed, or
    failed and then sent again), each message ends up stored exactly once, and
    the loop keeps beating meanwhile."""
    room = f"room{next(_names)}"
    batches = [[("channel", room, message(10 * number + offset)) for offset in range(1, 11)]
               for number in range(200)]
    committed: set[int] = set()
    pending: dict[int, Pending] = {}
    failures = []

    def script(archive):
        crash = threading.Thread(target=postgres_server.restart, args=(2.0,))
        for number, batch in enumerate(batches):
            if number == 40:
                # in flight when PostgreSQL dies: a slow query, and batch 40 queued behind it
                slow = archive.link.transaction([("SELECT pg_sleep(30)", ())])
                pending[number] = archive.archive_messages(batch)
                crash.start()
            else:
                pending[number] = archive.archive_messages(batch)
            yield after(0.02)
            for done in [n for n, p in pending.items() if p.outcome is not None]:
                ok, value = pending.pop(done).outcome
                if ok:
                    committed.add(done)
                else:
                    failures.append(value)
                    pending[done] = archive.archive_messages(batches[done])    # at least once
        yield lambda: not crash.is_alive() and archive.link.state == "up" and slow.outcome is not None
        assert slow.outcome[0] is False and "archive link lost" in slow.outcome[1], slow.outcome
        while pending:
            yield settled(*pending.values())
            for done in list(pending):
                ok, _ = pending.pop(done).outcome
                if ok:
                    committed.add(done)
                else:
                    pending[done] = archive.archive_messages(batches[done])

    beats = in_loop(dsn, script, timeout=60.0)
    assert failures and all("archive link" in reason for reason in failures), failures[:3]
    assert committed == set(range(len(batches)))
    assert postgres_server.execute(f"SELECT count(*), count(DISTINCT id), max(seq) FROM messages WHERE "
                                   f"conversation = 'c:{room}'", "archive") == [("2000", "2000", "2000")]
    longest = max(later - earlier for earlier, later in zip(beats, beats[1:]))
    assert longest < 1.0, f"the loop stood still {longest:.2f} s while PostgreSQL was down for 2 s"


def test_a_batch_across_months_creates_its_partitions(dsn, postgres_server):
    """One batch from the last millisecond of 2031 and the first of 2032 (months no
    other test writes): both partitions are made in the batch's transaction."""
    december, january = 1956528000000 - 1, 1956528000000       # 2032-01-01T00:00:00Z in ms
    room = f"room{next(_names)}"
    first = [("channel", room, {"id": str((december - EPOCH_MS) << TIME_SHIFT), "seq": 1}),
             ("channel", room, {"id": str((january - EPOCH_MS) << TIME_SHIFT), "seq": 2})]
    outcome = []

    def script(archive):
        write = archive.archive_messages(first)
        yield settled(write)
        outcome.append(write.outcome)

    in_loop(dsn, script)
    assert outcome == [(True, 2)]
    assert postgres_server.execute(f"SELECT tableoid::regclass::text FROM messages WHERE conversation = 'c:{room}' "
                                   f"ORDER BY seq", "archive") == [("messages_2031_12",), ("messages_2032_01",)]


def test_answers_bigger_than_one_read_are_all_read(dsn):
    """Answers of hundreds of thousands of small rows arrive faster than one read
    takes them (libpq reads 16 KiB at a time): the link reads on until the socket
    is empty (its edge-triggered wake-up comes once), or the rest would wait for
    the reply timeout (10 s, past this test's limit)."""
    answers = []

    def script(archive):
        reads = [archive.link.transaction([("SELECT generate_series(1, $1::int)", (rows,))])
                 for rows in (200_000, 50_000, 300_000, 100_000)]
        yield settled(*reads)
        answers.extend(read.outcome for read in reads)

    in_loop(dsn, script, timeout=8.0)
    assert [(ok, len(value[0]), value[0][-1]) for ok, value in answers] == [
        (True, rows, (str(rows).encode(),)) for rows in (200_000, 50_000, 300_000, 100_000)]


def test_migrate_on_link_does_what_migrate_does(postgres_server):
    """What a server runs on its link when PostgreSQL was down at its start: an
    older schema brought up to date keeping its rows, then nothing left to do; a
    newer schema refused."""
    fresh = postgres_server.create_database("migrate_on_link")
    database = fresh.rsplit("/", 1)[1]
    migrate(fresh, target=1)
    postgres_server.execute("INSERT INTO users (id, name) VALUES (7, 'kept')", database)
    outcomes = []

    def run_migration(archive):
        migrated = migrate_on_link(archive.link)
        yield settled(migrated)
        outcomes.append(migrated.outcome)

    in_loop(fresh, run_migration)
    in_loop(fresh, run_migration)
    assert outcomes == [(True, 1), (True, SCHEMA_VERSION)]
    assert schema_version(fresh) == SCHEMA_VERSION
    assert postgres_server.execute("SELECT name FROM users", database) == [("kept",)]
    postgres_server.execute(f"UPDATE zim_schema SET version = {SCHEMA_VERSION + 1}", database)
    in_loop(fresh, run_migration)
    ok, reason = outcomes[-1]
    assert not ok and "newer than this zim" in reason
