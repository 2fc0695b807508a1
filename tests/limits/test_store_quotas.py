"""Issue 14: nothing one user does hurts another, here through two store quotas.

- A user's mailbox holds at most ``--max-mailbox`` unacknowledged direct
  messages of at most ``--max-mailbox-bytes`` (each counted as its JSON as
  stored, seq included). A DM past it is answered ``mailbox_full`` and nothing
  of it is stored: not in the pair's history, not in the mailbox, and no seq is
  taken. Nothing accepted is ever dropped; acks free room.
- A user may have created at most ``--max-channels-per-user`` channels; a
  subscribe that would create one more is answered ``too_many_channels``;
  joining an existing channel is never refused.

Both hold with the SQLite store (counts kept in the database: they survive a
restart and a writer restart) and on nodes sharing a Redis (one server and a
3-master cluster), and in MemoryStore.

Here in the stores themselves (Quotas, MemoryStore, SQLiteStore, the writer,
DurableStore, a database of schema version 3); with servers in
test_store_quotas_servers.py; on nodes and in the Redis scripts in
test_store_quotas_redis.py. What they share: tests/limits/quota_helpers.py.
"""
from __future__ import annotations

import random
import sqlite3

import orjson
import pytest

from tests.limits.quota_helpers import BIG, message, stored_size
from tests.support.servers import durable_store_on_a_test_link
from tests.protocol.test_tokens_lifetime import OLD_SCHEMA
from zim.client import take_tcp_packet

from zim.storage.store import (
    DEFAULT_MAX_CHANNELS_PER_USER, DEFAULT_MAX_MAILBOX, DEFAULT_MAX_MAILBOX_BYTES, NO_QUOTAS, MemoryStore,
    Quotas, StoreRefusal,
)


# ------------------------------------------------------------------ Quotas


def test_quotas_defaults_and_checks():
    quotas = Quotas()
    assert (quotas.max_mailbox, quotas.max_mailbox_bytes, quotas.max_channels_per_user) == \
        (DEFAULT_MAX_MAILBOX, DEFAULT_MAX_MAILBOX_BYTES, DEFAULT_MAX_CHANNELS_PER_USER) == (10_000, 64 << 20, 1_000)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            Quotas(max_mailbox=bad)
    assert quotas.mailbox_refusal(9_999, 0, 100) is None
    assert quotas.mailbox_refusal(10_000, 0, 100).code == "mailbox_full"
    assert quotas.mailbox_refusal(0, (64 << 20) - 100, 100) is None
    assert quotas.mailbox_refusal(0, (64 << 20) - 100, 101).code == "mailbox_full"
    assert quotas.channels_refusal(999) is None and quotas.channels_refusal(1000).code == "too_many_channels"
    assert NO_QUOTAS.mailbox_refusal(10**9, 10**12, 10**9) is None and NO_QUOTAS.channels_refusal(10**9) is None
    refusal = StoreRefusal("mailbox_full", "full")
    assert (refusal.code, refusal.message) == ("mailbox_full", "full")


# ------------------------------------------------------------------ MemoryStore


def memory_store(quotas: Quotas) -> MemoryStore:
    store = MemoryStore()
    store.set_quotas(quotas)
    for user in (1, 2, 3):
        store.create_user(user, f"u{user}")
    return store


def test_memory_store_refuses_a_dm_to_a_full_mailbox_and_stores_nothing():
    store = memory_store(Quotas(max_mailbox=3, max_mailbox_bytes=0))
    assert [store.append_user_message(1, 2, message(i)) for i in range(3)] == [1, 2, 3]
    refused = message(3)
    with pytest.raises(StoreRefusal) as caught:
        store.append_user_message(1, 2, refused)
    assert caught.value.code == "mailbox_full"
    assert refused == message(3)                        # the caller's dict as it was
    assert [m["seq"] for m in store.history("user", (1, 2), None, 100)[0]] == [1, 2, 3]
    assert [m["id"] for m in store.mailbox_pull(2, 100)] == [message(i)["id"] for i in range(3)]
    # the other way round is another mailbox; so is anyone else's
    assert store.append_user_message(2, 1, message(10)) == 4
    assert store.append_user_message(1, 3, message(11)) == 1
    with pytest.raises(StoreRefusal):
        store.append_user_message(3, 2, message(12))   # full for every sender
    # acks free room; unknown ids free nothing
    store.mailbox_ack(2, [message(0)["id"], "nope", 7])
    assert store.append_user_message(1, 2, message(13)) == 5   # no seq was taken by the refusals
    with pytest.raises(StoreRefusal):
        store.append_user_message(1, 2, message(14))
    assert store.mailbox_usage(2)[0] == 3


def test_memory_store_counts_bytes_as_stored_and_a_dm_to_oneself_counts_against_oneself():
    first = message(1, BIG)
    size = stored_size(dict(first, seq=1))
    store = memory_store(Quotas(max_mailbox=0, max_mailbox_bytes=2 * size + 200))
    store.append_user_message(1, 1, first)
    store.append_user_message(2, 1, message(2, BIG))
    assert store.mailbox_usage(1) == (2, stored_size(store.mailbox_pull(1, 10)[0]) +
                                      stored_size(store.mailbox_pull(1, 10)[1]))
    with pytest.raises(StoreRefusal) as caught:
        store.append_user_message(1, 1, message(3, BIG))
    assert "bytes" in caught.value.message
    small = message(4, "")                   # a small one still fits the bytes left
    store.append_user_message(1, 1, small)
    assert store.history("user", (1, 1), None, 10)[0][-1]["seq"] == 2
    store.mailbox_ack(1, [m["id"] for m in store.mailbox_pull(1, 10)])
    assert store.mailbox_usage(1) == (0, 0)
    store.append_user_message(1, 1, message(5, BIG))


def test_memory_store_channel_quota_counts_creations_only():
    store = memory_store(Quotas(max_channels_per_user=2))
    store.subscribe("a", 1, True)
    store.subscribe("b", 1, False)
    store.subscribe("a", 1, False)                       # a push flag change creates nothing
    with pytest.raises(StoreRefusal) as caught:
        store.subscribe("c", 1, True)
    assert caught.value.code == "too_many_channels"
    assert not store.channel_exists("c") and store.user_channels(1) == [("a", False), ("b", False)]
    store.subscribe("c", 2, True)                        # someone else may create it
    store.subscribe("c", 1, True)                        # and then anyone joins it
    assert store.channels_created(1) == 2 and store.channels_created(2) == 1
    store.unsubscribe("a", 1)                            # channels stay: still counted
    with pytest.raises(StoreRefusal):
        store.subscribe("d", 1, True)
    # a creation undone (a failed write) counts no more
    store.subscribe("e", 2, True)
    store.unsubscribe("e", 2)
    store.drop_channel("e")
    assert store.channels_created(2) == 1
    # channels loaded without a creator count for nobody
    store.add_channel("old")
    store.add_channel("mine", creator=3)
    assert store.channels_created(3) == 1
    off = memory_store(NO_QUOTAS)
    for number in range(50):
        off.subscribe(f"ch{number}", 1, True)


# ------------------------------------------------------------------ SQLite, writer, DurableStore


def sqlite_store(path, quotas: Quotas):
    from zim.storage.sqlite import SQLiteStore

    store = SQLiteStore(str(path))
    store.set_quotas(quotas)
    return store


def test_sqlite_store_keeps_the_counts_through_batches_acks_and_reopening(tmp_path):
    path = tmp_path / "zim.db"
    quotas = Quotas(max_mailbox=3, max_mailbox_bytes=0)
    store = sqlite_store(path, quotas)
    for user in (1, 2):
        store.create_user(user, f"u{user}")
    store.begin_batch()
    seqs = [store.append_user_message(1, 2, message(i)) for i in range(3)]
    with pytest.raises(StoreRefusal):
        store.append_user_message(1, 2, message(3))        # refused inside the batch, which goes on
    assert store.append_user_message(2, 1, message(4)) == 4
    store.commit_batch()
    assert seqs == [1, 2, 3]
    assert [m["seq"] for m in store.history("user", (1, 2), None, 100)[0]] == [1, 2, 3, 4]
    pulled = store.mailbox_pull(2, 100)
    assert store.mailbox_usage(2) == (3, sum(stored_size(m) for m in pulled))
    store.close()
    store = sqlite_store(path, quotas)                    # counted in the database
    with pytest.raises(StoreRefusal):
        store.append_user_message(1, 2, message(5))
    store.mailbox_ack(2, [pulled[0]["id"], pulled[0]["id"], "nope"])
    assert store.mailbox_usage(2) == (2, sum(stored_size(m) for m in pulled[1:]))
    assert store.append_user_message(1, 2, message(6)) == 5
    # a rolled-back batch takes its counts with it
    store.mailbox_ack(2, [pulled[1]["id"]])
    store.begin_batch()
    store.append_user_message(1, 2, message(7))
    store.rollback_batch()
    usage = store.mailbox_usage(2)
    assert usage[0] == 2
    store.close()
    conn = sqlite3.connect(str(path))
    assert conn.execute("SELECT mailbox_count, mailbox_bytes FROM users WHERE id = 2").fetchone() == usage
    assert conn.execute("SELECT count(*), sum(size) FROM mailbox WHERE user_id = 2").fetchone() == usage
    conn.close()


def test_sqlite_matches_memory_under_quotas(tmp_path):
    """Random DMs, self-DMs, acks and batches: both stores refuse the same
    calls and count the same messages and bytes."""
    quotas = Quotas(max_mailbox=6, max_mailbox_bytes=3000, max_channels_per_user=0)
    memory, db = memory_store(quotas), sqlite_store(tmp_path / "zim.db", quotas)
    for user in (1, 2, 3):
        db.create_user(user, f"u{user}")
    rng = random.Random(14)
    number = 0
    for step in range(600):
        if step % 50 == 0:
            db.begin_batch()
        roll = rng.random()
        if roll < 0.7:
            number += 1
            sender, receiver = rng.choice((1, 2, 3)), rng.choice((1, 2, 3))
            content = "y" * rng.choice((0, 10, 200, 900))
            outcomes = []
            for store in (memory, db):
                try:
                    outcomes.append(store.append_user_message(sender, receiver, message(number, content, sender)))
                except StoreRefusal as refusal:
                    outcomes.append(refusal.code)
            assert outcomes[0] == outcomes[1], (step, outcomes)
        else:
            user = rng.choice((1, 2, 3))
            box = memory.mailbox_pull(user, 100)
            ids = [m["id"] for m in rng.sample(box, min(len(box), rng.randint(0, 3)))]
            for store in (memory, db):
                store.mailbox_ack(user, ids)
        if step % 50 == 49:
            db.commit_batch()
        for user in (1, 2, 3):
            assert memory.mailbox_usage(user) == db.mailbox_usage(user)
    db.close()


def test_writer_answers_limit_for_the_refused_operation_alone(tmp_path):
    """A refused DM in a batch is answered LIMIT with the client's error; the
    other operations of the batch, before and after it, are stored."""
    from zim.storage.retention import Retention
    from zim.storage.writer import LIMIT, OK, OP_CREATE_USER, OP_HISTORY, OP_USER_MESSAGE, Writer

    store = sqlite_store(tmp_path / "zim.db", Quotas(max_mailbox=2))
    try:
        writer = Writer(store, Retention())
        ops = [(OP_CREATE_USER, orjson.dumps([user, f"u{user}"])) for user in (1, 2, 3)]
        ops += [(OP_USER_MESSAGE, orjson.dumps([1, 2, message(i)])) for i in range(3)]   # the third: full
        ops += [(OP_USER_MESSAGE, orjson.dumps([3, 1, message(10 + i, sender=3)])) for i in range(2)]
        ops += [(OP_HISTORY, orjson.dumps(["user", [1, 2], None, 100]))]
        answers = writer.apply(ops)
        packets = [take_tcp_packet(bytearray(answer)) for answer in answers]
        statuses = [seq for _, seq, _ in packets]
        assert statuses == [OK] * 5 + [LIMIT, OK, OK, OK]
        assert orjson.loads(packets[5][2])["code"] == "mailbox_full"
        assert [orjson.loads(body) for _, _, body in packets[6:8]] == [1, 2]
        assert [m["seq"] for m in orjson.loads(packets[8][2])[0]] == [1, 2]
        assert not writer.failed
    finally:
        store.close()


def test_durable_store_maps_limit_and_refuses_channels_in_memory(tmp_path):
    from zim.storage.writer import FAILED, LIMIT, OK, OP_SUBSCRIBE, OP_USER_MESSAGE

    with durable_store_on_a_test_link(tmp_path) as store:
        store.set_quotas(Quotas(max_channels_per_user=1))
        for user in (1, 2):
            store.meta.create_user(user, f"u{user}")
        sent = store.append_user_message(1, 2, message(1))
        joined = store.subscribe("first", 1, True)
        issued = store.issued
        refused = store.subscribe("second", 1, True)
        # refused at once, in memory: nothing went to the writer
        assert refused.outcome[0] is False and isinstance(refused.outcome[1], StoreRefusal)
        assert refused.outcome[1].code == "too_many_channels" and store.issued == issued
        assert not store.channel_exists("second")
        store.on_link_packet(OP_USER_MESSAGE, LIMIT, orjson.dumps({"code": "mailbox_full", "message": "full"}))
        assert sent.outcome[0] is False and isinstance(sent.outcome[1], StoreRefusal)
        assert (sent.outcome[1].code, sent.outcome[1].message) == ("mailbox_full", "full")
        assert store.undone_upto == 0       # no RESYNC: a limit is no failure
        # a creation whose write fails is undone and counts no more
        store.on_link_packet(OP_SUBSCRIBE, FAILED, b'"disk full"')
        assert joined.outcome[0] is False and not store.channel_exists("first")
        again = store.subscribe("second", 1, True)
        store.on_link_packet(OP_SUBSCRIBE, OK, b"null")
        assert again.outcome == (True, None)
        store.close()


# version 3: version 2's (test_tokens_lifetime) with token epochs
V3_SCHEMA = OLD_SCHEMA.replace("name TEXT NOT NULL);", "name TEXT NOT NULL, token_epoch INTEGER NOT NULL DEFAULT 0);") \
    .replace("user_version = 2", "user_version = 3")


def test_a_version_3_database_gets_its_mailbox_counts_and_channels_without_creators(tmp_path):
    from zim.storage.durable import DurableStore
    from zim.storage.sqlite import SCHEMA_VERSION

    path = tmp_path / "zim.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(V3_SCHEMA)
    conn.executemany("INSERT INTO users(id, name) VALUES (?, ?)", [(1, "a"), (2, "b"), (-5, "big")])
    conn.executemany("INSERT INTO channels(name) VALUES (?)", [("old1",), ("old2",)])
    conn.executemany("INSERT INTO members VALUES (?, ?, 1)", [("old1", 1), ("old2", 1)])
    bodies = []
    for seq in (1, 2, 3):
        body = orjson.dumps(dict(message(seq), seq=seq))
        bodies.append(body)
        conn.execute("INSERT INTO messages VALUES ('u:1:2', ?, ?, ?, NULL)", (seq, str(10**15 + seq), body))
        conn.execute("INSERT INTO mailbox VALUES (?, ?, 'u:1:2', ?)", (2 if seq < 3 else 1, str(10**15 + seq), seq))
    conn.execute("INSERT INTO conversations VALUES ('u:1:2', 3)")
    conn.commit()
    conn.close()
    path.chmod(0o600)
    store = sqlite_store(path, Quotas(max_mailbox=3))
    assert store.mailbox_usage(2) == (2, len(bodies[0]) + len(bodies[1]))
    assert store.mailbox_usage(1) == (1, len(bodies[2]))
    assert store.mailbox_usage((1 << 64) - 5) == (0, 0)
    assert sorted(store.all_channels_with_creators()) == [("old1", None), ("old2", None)]
    store.append_user_message(1, 2, message(4))
    with pytest.raises(StoreRefusal):
        store.append_user_message(1, 2, message(5))
    store.subscribe("new", (1 << 64) - 5, True)
    assert ("new", (1 << 64) - 5) in list(store.all_channels_with_creators())
    store.close()
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # the server's store: channels without a creator count for nobody
    durable = DurableStore(str(tmp_path))
    durable.set_quotas(Quotas(max_channels_per_user=1))
    assert durable.meta.channels_created(1) == 0 and durable.meta.channels_created((1 << 64) - 5) == 1
    durable.close()
