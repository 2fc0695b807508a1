"""``--archive`` on a single server: PostgreSQL behind SQLite (zim.storage.archiver).

Real server processes with a data directory, a real PostgreSQL (one per module,
a database per test); SQLite is read directly to see what pruning left.
"""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
from psycopg import pq

from tests.api.helpers import ApiClient, api_flags, channel_path, wait_for_port
from tests.support import postgres_servers, wait_for
from tests.support.client import unique
from tests.support.postgres_servers import requires_postgres
from tests.support.servers import HOST, free_port, server_env

pytestmark = requires_postgres
postgres_server = postgres_servers.postgres_server

_databases = iter(range(1, 1000))


def new_database(postgres_server) -> tuple[str, str]:
    """(name, DSN) of an empty database."""
    name = f"single{next(_databases)}"
    return name, postgres_server.create_database(name)


def archived(postgres_server, database: str) -> list[tuple[int, str, int]]:
    """Every (id, conversation, seq) in the archive, by id (none before it is migrated)."""
    if not postgres_server.execute("SELECT to_regclass('messages')", database)[0][0]:
        return []
    return [(int(i), c, int(s)) for i, c, s in
            postgres_server.execute("SELECT id, conversation, seq FROM messages ORDER BY id", database)]


def sqlite_seqs(data_dir, conv: str) -> list[int]:
    """The seqs SQLite holds for a conversation (``u:LOW:HIGH`` or ``c:NAME``)."""
    db = sqlite3.connect(f"file:{data_dir / 'zim.db'}?mode=ro", uri=True)
    try:
        return [seq for (seq,) in db.execute("SELECT seq FROM messages WHERE conv = ? ORDER BY seq", (conv,))]
    finally:
        db.close()


def pair_conv(a: str, b: str) -> str:
    low, high = sorted((int(a), int(b)))
    return f"u:{low}:{high}"


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def all_pages(client, limit: int, **conversation) -> list[list[dict]]:
    """Every history page, newest first, paging on with hasMore."""
    pages, before = [], None
    while True:
        query = {**conversation, "limit": limit, **({} if before is None else {"beforeSeq": before})}
        page = client.ok(5, query)
        pages.append(page["messages"])
        if not page["hasMore"]:
            return pages
        assert page["messages"], "hasMore with an empty page"
        before = page["messages"][0]["seq"]


def dm_pair(srv):
    alice, bob = srv.tcp_client(), srv.tcp_client()
    alice.login(unique("alice"))
    bob.login(unique("bob"))
    return alice, bob


def send_dms(alice, bob, count: int, ack: bool = True) -> list[dict]:
    sent = [alice.ok(2, {"receiverId": bob.user_id, "content": f"m{i}"}) for i in range(count)]
    if ack:     # a DM still in a mailbox is never pruned: free them
        bob.recv_pushes(count)
        ids = [m["id"] for m in sent]
        for first in range(0, count, 500):
            bob.ok(8, {"ids": ids[first:first + 500]})
    return sent


def test_dms_and_channel_messages_reach_postgresql_once_with_their_seq(start_server, postgres_server, tmp_path):
    database, dsn = new_database(postgres_server)
    flags, api_port = api_flags(tmp_path)
    srv = start_server(["--workers", "2", "--archive", dsn, "--archive-kinds", "private,channel",
                        "--archive-batch", "7", "--large-channel", "3", *flags])
    alice, bob = dm_pair(srv)
    dms = send_dms(alice, bob, 30, ack=False)
    channel, large = unique("arch"), unique("large")
    for client in (alice, bob):
        client.ok(3, {"name": channel, "push": False})
    carol = srv.tcp_client()
    carol.login(unique("carol"))
    for client in (alice, bob, carol):     # 3 members: large, a kind not archived here
        client.ok(3, {"name": large, "push": False})
    posts = [alice.ok(4, {"channel": channel, "content": f"c{i}"}) for i in range(20)]
    alice.ok(4, {"channel": large, "content": "not archived"})
    expected = sorted([(int(m["id"]), pair_conv(alice.user_id, bob.user_id), m["seq"]) for m in dms] +
                      [(int(m["id"]), f"c:{channel}", m["seq"]) for m in posts])
    assert wait_for(lambda: len(archived(postgres_server, database)) >= len(expected), 15)
    time.sleep(0.3)     # nothing more comes
    assert archived(postgres_server, database) == expected
    counters = dict(postgres_server.execute("SELECT conversation, seq FROM conversations", database))
    assert counters == {pair_conv(alice.user_id, bob.user_id): "30", f"c:{channel}": "20"}
    # the channel deleted and made again: the archive forgets the old one, keeps the new
    wait_for_port(api_port)
    ApiClient(api_port).ok("DELETE", channel_path(channel))
    alice.ok(3, {"name": channel})
    again = [alice.ok(4, {"channel": channel, "content": f"again {i}"}) for i in range(2)]
    expected = [row for row in expected if row[1] != f"c:{channel}"]
    expected = sorted(expected + [(int(m["id"]), f"c:{channel}", m["seq"]) for m in again])
    assert wait_for(lambda: archived(postgres_server, database) == expected, 10), archived(postgres_server, database)
    counters = dict(postgres_server.execute("SELECT conversation, seq FROM conversations", database))
    assert counters[f"c:{channel}"] == "2"


def test_history_pruned_from_sqlite_is_read_from_postgresql_the_same(start_server, postgres_server):
    database, dsn = new_database(postgres_server)
    srv = start_server(["--workers", "2", "--archive", dsn, "--retain-private", "2s:3", "--prune-every", "1"])
    alice, bob = dm_pair(srv)
    channel = unique("kept")
    alice.ok(3, {"name": channel})
    alice.ok(4, {"channel": channel, "content": "a channel: not archived by default"})
    send_dms(alice, bob, 23)
    conv = pair_conv(alice.user_id, bob.user_id)
    before = {limit: all_pages(alice, limit, userId=bob.user_id) for limit in (5, 100)}
    assert [m["seq"] for page in reversed(before[5]) for m in page] == list(range(1, 24))
    # past the TTL everything archived is pruned; two new ones stay in SQLite
    assert wait_for(lambda: sqlite_seqs(srv.data_dir, conv) == [], 15), sqlite_seqs(srv.data_dir, conv)
    assert len(archived(postgres_server, database)) == 23
    for limit in (5, 100):
        assert all_pages(alice, limit, userId=bob.user_id) == before[limit]
    fresh = send_dms(alice, bob, 2)
    assert [m["seq"] for m in fresh] == [24, 25]
    assert sqlite_seqs(srv.data_dir, conv) == [24, 25]
    whole = [m for page in reversed(all_pages(alice, 4, userId=bob.user_id)) for m in page]
    assert [m["seq"] for m in whole] == list(range(1, 26))
    assert whole[:23] == [m for page in reversed(before[100]) for m in page]
    # a page across the boundary: two from SQLite, three from PostgreSQL
    page = bob.ok(5, {"userId": alice.user_id, "limit": 5})
    assert [m["seq"] for m in page["messages"]] == [21, 22, 23, 24, 25] and page["hasMore"] is True
    # PostgreSQL down: a page it would complete fails; SQLite's own still reads
    postgres_server.kill()
    try:
        assert alice.error(5, {"userId": bob.user_id, "limit": 5}) == "internal"
        page = alice.ok(5, {"userId": bob.user_id, "limit": 2})
        assert [m["seq"] for m in page["messages"]] == [24, 25] and page["hasMore"] is True
    finally:
        postgres_server.start()


def test_postgresql_down_keeps_serving_prunes_nothing_unarchived_then_drains(start_server, postgres_server):
    database, dsn = new_database(postgres_server)
    metrics = free_port()
    postgres_server.kill()          # down from the start: the schema is migrated once it is back
    try:
        srv = start_server(["--workers", "1", "--archive", dsn, "--retain-private", "1s:0",
                            "--prune-every", "1", "--metrics", f"{HOST}:{metrics}"])
        alice, bob = dm_pair(srv)
        sent = send_dms(alice, bob, 40)         # acknowledged with PostgreSQL down
        conv = pair_conv(alice.user_id, bob.user_id)
        time.sleep(2.5)                         # past the TTL, and a pruning pass or two
        assert sqlite_seqs(srv.data_dir, conv) == list(range(1, 41))
        assert metric(metrics, "zim_archive_link_up") == 0
        assert metric(metrics, "zim_archive_pending") == 40
        assert metric(metrics, "zim_archive_lag_seconds") >= 1.0    # the oldest was sent 2.5 s ago
    finally:
        postgres_server.start()
    assert wait_for(lambda: len(archived(postgres_server, database)) == 40, 20)
    assert sorted(i for i, _, _ in archived(postgres_server, database)) == sorted(int(m["id"]) for m in sent)
    assert wait_for(lambda: metric(metrics, "zim_archive_pending") == 0, 5)
    assert metric(metrics, "zim_archive_lag_seconds") == 0 and metric(metrics, "zim_archive_link_up") == 1
    assert metric(metrics, "zim_archive_messages_total") == 40
    assert wait_for(lambda: sqlite_seqs(srv.data_dir, conv) == [], 10)     # archived: pruned now
    assert "archive not migrated at start" in srv.stderr() and "archive migrated" in srv.stderr()
    assert "archive link up" in srv.stderr()


def test_kill_9_while_a_batch_is_in_flight_archives_every_message_once(start_server, postgres_server):
    database, dsn = new_database(postgres_server)
    srv = start_server(["--workers", "1", "--archive", dsn, "--archive-batch", "100"])
    alice, bob = dm_pair(srv)
    sent = send_dms(alice, bob, 1, ack=False)
    assert wait_for(lambda: len(archived(postgres_server, database)) == 1, 10)
    # PostgreSQL holds the next batch (a lock on the table) until the server is gone;
    # then it commits it: SQLite never heard, so the restarted server sends it again
    blocker = pq.PGconn.connect(dsn.encode())
    try:
        for sql in (b"BEGIN", b"LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"):
            assert blocker.exec_(sql).status == pq.ExecStatus.COMMAND_OK
        sent += send_dms(alice, bob, 250, ack=False)
        assert wait_for(lambda: len(postgres_server.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'", database)) == 1, 10)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stopped = True
        blocker.exec_(b"COMMIT")
    finally:
        blocker.finish()
    assert wait_for(lambda: len(archived(postgres_server, database)) >= 2, 10)   # the batch went in
    again = start_server(["--workers", "1", "--archive", dsn, "--archive-batch", "100"], data_dir=srv.data_dir)
    conv = pair_conv(alice.user_id, bob.user_id)
    expected = sorted((int(m["id"]), conv, m["seq"]) for m in sent)
    assert wait_for(lambda: len(archived(postgres_server, database)) >= len(expected), 15)
    time.sleep(0.3)
    assert archived(postgres_server, database) == expected
    assert [m["seq"] for m in sent] == list(range(1, 252))
    again.tcp_client().login(unique("after"))


def test_archive_with_the_memory_store_is_refused(postgres_server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "zim", "--store", "memory", "--data", str(tmp_path),
                             "--archive", postgres_server.dsn()], capture_output=True, text=True,
                            timeout=30, env=server_env())
    assert result.returncode == 2 and "--archive needs --store sqlite" in result.stderr


@pytest.fixture(autouse=True)
def _postgres_back_up(postgres_server):
    """A test that failed with PostgreSQL stopped leaves it started for the next."""
    yield
    if postgres_server.process is None or postgres_server.process.poll() is not None:
        postgres_server.start()


def test_a_peek_at_the_archive_queue_is_bounded_by_bytes(tmp_path):
    """The writer's answer stays under the link's packet limit whatever --archive-batch says."""
    from zim.storage.sqlite import PAGE_BYTES, SQLiteStore
    store = SQLiteStore(str(tmp_path / "zim.db"))
    try:
        store.set_archiving(True, False)
        store.create_user(1, "a")
        store.create_user(2, "b")
        for number in range(40):
            store.append_user_message(1, 2, {"id": str(1000 + number), "content": "x" * 60_000})
        rows, pending, _ = store.archive_peek(1000)
        assert pending == 40
        assert 2 <= len(rows) < 40 and sum(len(row[3]["content"]) for row in rows[:-1]) <= PAGE_BYTES
        assert [row[3]["seq"] for row in rows] == list(range(1, len(rows) + 1))
        store.archive_done(rows[-1][0])
        assert store.archive_peek(0)[1] == 40 - len(rows)
    finally:
        store.close()
