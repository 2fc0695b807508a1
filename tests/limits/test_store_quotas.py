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
"""
from __future__ import annotations

import random
import signal
import sqlite3
import struct
import threading
import time

import orjson
import psutil
import pytest

from tests.support.servers import durable_store_on_a_test_link
from tests.support.node_servers import Backend, backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.protocol.test_tokens_lifetime import OLD_SCHEMA
from tests.support.client import ZimClient, error_code, unique

from zim.storage.store import (
    DEFAULT_MAX_CHANNELS_PER_USER, DEFAULT_MAX_MAILBOX, DEFAULT_MAX_MAILBOX_BYTES, NO_QUOTAS, MemoryStore,
    Quotas, StoreRefusal,
)

BIG = "x" * 1000


def message(number: int, content: str = "hi", sender: int = 1) -> dict:
    """A direct message shaped as zim.im makes it (seq 0 until stored)."""
    return {"id": str(10**15 + number), "seq": 0, "content": content,
            "sender": {"id": str(sender), "name": "alice"}, "createdAt": 1_700_000_000_000 + number}


def stored_size(msg: dict) -> int:
    """What the mailbox quota counts for a message: its JSON as stored."""
    return len(orjson.dumps(msg))


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
        statuses = [struct.unpack(">H", answer[6:8])[0] for answer in answers]
        assert statuses == [OK] * 5 + [LIMIT, OK, OK, OK]
        assert orjson.loads(answers[5][8:])["code"] == "mailbox_full"
        assert [orjson.loads(answer[8:]) for answer in answers[6:8]] == [1, 2]
        assert [m["seq"] for m in orjson.loads(answers[8][8:])[0]] == [1, 2]
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
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    # the server's store: channels without a creator count for nobody
    durable = DurableStore(str(tmp_path))
    durable.set_quotas(Quotas(max_channels_per_user=1))
    assert durable.meta.channels_created(1) == 0 and durable.meta.channels_created((1 << 64) - 5) == 1
    durable.close()


# ------------------------------------------------------------------ servers (SQLite)


def login(srv, name: str | None = None, token: str | None = None, timeout: float = 10.0) -> ZimClient:
    client = srv.tcp_client(timeout=timeout)
    client.login(name or unique("u"), token=token)
    return client


def dm(sender: ZimClient, receiver: ZimClient, content: str = "hi") -> dict:
    return sender.call(2, {"receiverId": receiver.user_id, "content": content})


def pipelined(client: ZimClient, requests: list[tuple[int, dict]], timeout: float = 30.0) -> list[dict]:
    """Send every request at once, then read every answer (in request order)."""
    seqs = [client.send(action, body) for action, body in requests]
    return [client.wait_response(seq, timeout=timeout)[2] for seq in seqs]


def pull_all(client: ZimClient) -> list[dict]:
    page = client.ok(7, {"limit": 100})
    assert page["hasMore"] is False
    return page["messages"]


def pair_history(client: ZimClient, other: ZimClient) -> list[dict]:
    page = client.ok(5, {"userId": other.user_id, "limit": 100})
    assert page["hasMore"] is False
    return page["messages"]


def check_mailbox_full(srv, other_srv=None, max_mailbox: int = 5) -> None:
    """Fill a mailbox of ``max_mailbox``; the next DM is refused and nothing of it
    stored; the receiver finds exactly what was accepted; acks free room; seq has
    no hole. ``other_srv``: the receiver reads there (another node)."""
    other_srv = other_srv or srv
    alice, bob, carol = login(srv, "alice"), login(other_srv, "bob"), login(srv, "carol")
    sent = [alice.ok(2, {"receiverId": bob.user_id, "content": f"m{i}"}) for i in range(max_mailbox)]
    assert [answer["seq"] for answer in sent] == list(range(1, max_mailbox + 1))
    pushed = bob.recv_pushes(max_mailbox, timeout=10)   # (pushes cross nodes in their own time)
    assert [body["id"] for _, body in pushed] == [answer["id"] for answer in sent]
    for sender in (alice, carol, alice):
        result = dm(sender, bob, "one too many")
        assert error_code(result) == "mailbox_full", result
        assert "mailbox" in result["error"]["message"]
    bob.assert_no_push(0.3)                            # nothing of it pushed
    # the receiver logs in again (its mailbox is pushed at login) and pulls: exactly those
    again = login(other_srv, "bob", token=bob.token)
    again.sync()
    at_login = [body for action, body in again.pushes if action == 101]
    assert [m["id"] for m in at_login] == [answer["id"] for answer in sent]
    box = pull_all(again)
    assert [m["id"] for m in box] == [answer["id"] for answer in sent]
    assert [m["content"] for m in box] == [f"m{i}" for i in range(max_mailbox)]
    assert pull_all(carol) == []                        # carol's own mailbox: nothing bounced there
    # acks free room: two acked, two more accepted, then full again
    again.ok(8, {"ids": [box[0]["id"], box[1]["id"]]})
    more = [alice.ok(2, {"receiverId": bob.user_id, "content": f"more{i}"}) for i in range(2)]
    assert [answer["seq"] for answer in more] == [max_mailbox + 1, max_mailbox + 2]   # no seq was taken
    assert error_code(dm(carol, bob)) == "mailbox_full"
    assert [m["id"] for m in pull_all(again)] == [m["id"] for m in box[2:]] + [a["id"] for a in more]
    history = pair_history(alice, bob)
    assert [m["seq"] for m in history] == list(range(1, max_mailbox + 3))
    assert all(m["content"] != "one too many" for m in history)
    assert pair_history(carol, bob) == []
    # a DM to oneself counts against oneself
    for number in range(max_mailbox):
        carol.ok(2, {"receiverId": carol.user_id, "content": f"self{number}"})
    assert error_code(dm(carol, carol)) == "mailbox_full"
    assert [m["seq"] for m in pair_history(carol, carol)] == list(range(1, max_mailbox + 1))


def test_a_full_mailbox_refuses_dms_and_drops_nothing(start_server):
    srv = start_server(flags=("--workers", "2", "--max-mailbox", "5"))
    check_mailbox_full(srv)


def test_the_mailbox_bytes_limit(start_server):
    limit = 5000
    srv = start_server(flags=("--workers", "2", "--max-mailbox", "0", "--max-mailbox-bytes", str(limit)))
    alice, bob = login(srv), login(srv)
    for _ in range(4):
        alice.ok(2, {"receiverId": bob.user_id, "content": BIG})       # about 1.2 kB each as stored
    assert error_code(dm(alice, bob, BIG)) == "mailbox_full"
    small = 0
    while True:                                                         # small ones fit the bytes left
        result = dm(alice, bob, "s")
        if error_code(result) is not None:
            assert error_code(result) == "mailbox_full"
            break
        small += 1
        assert small < 100
    box = pull_all(bob)
    used = sum(stored_size(m) for m in box)
    assert len(box) == 4 + small and small >= 1
    assert used <= limit < used + stored_size(box[-1]) + 1
    assert [m["seq"] for m in pair_history(bob, alice)] == list(range(1, 5 + small))
    bob.ok(8, {"ids": [box[0]["id"]]})                                  # room for one big one again
    assert dm(alice, bob, BIG)["seq"] == 5 + small


def test_a_refused_dm_does_not_fail_the_others_of_its_batch(start_server):
    """Pairs pipelining DMs while a sender pipelines DMs to a full mailbox: the
    writer commits them in shared batches; only the full mailbox's are refused."""
    srv = start_server(flags=("--workers", "2", "--max-mailbox", "3"))
    target, spammer = login(srv), login(srv)
    for number in range(3):
        spammer.ok(2, {"receiverId": target.user_id, "content": f"fill{number}"})
    pairs = [(login(srv), login(srv)) for _ in range(4)]
    results: dict[int, list[dict]] = {}

    def run(index: int, sender: ZimClient, receiver: ZimClient) -> None:
        requests = [(2, {"receiverId": receiver.user_id, "content": f"c{n}"}) for n in range(3)]
        results[index] = pipelined(sender, requests)

    rounds = 3
    for _ in range(rounds):
        threads = [threading.Thread(target=run, args=(index, *pair)) for index, pair in enumerate(pairs)]
        threads.append(threading.Thread(target=run, args=(len(pairs), spammer, target)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for index in range(len(pairs)):
            assert [error_code(result) for result in results[index]] == [None] * 3, results[index]
        assert [error_code(result) for result in results[len(pairs)]] == ["mailbox_full"] * 3
        for index, (sender, receiver) in enumerate(pairs):      # (their mailboxes hold 3 too)
            box = pull_all(receiver)
            assert [m["id"] for m in box] == [result["id"] for result in results[index]]
            receiver.ok(8, {"ids": [m["id"] for m in box]})
    for sender, receiver in pairs:
        assert [m["seq"] for m in pair_history(sender, receiver)] == list(range(1, 3 * rounds + 1))
    assert [m["content"] for m in pull_all(target)] == ["fill0", "fill1", "fill2"]
    assert "Traceback" not in srv.stderr() and "writer process ended" not in srv.stderr()


def writer_process(srv) -> psutil.Process:
    for child in psutil.Process(srv.proc.pid).children(recursive=True):
        if "zim.storage.writer" in child.cmdline():
            return child
    raise AssertionError("no writer process")


def test_the_mailbox_quota_survives_a_restart_and_a_writer_restart(start_server, tmp_path):
    flags = ("--workers", "2", "--max-mailbox", "3")
    data = tmp_path / "data"
    srv = start_server(flags=flags, data_dir=data)
    alice, bob = login(srv, "alice"), login(srv, "bob")
    for number in range(3):
        alice.ok(2, {"receiverId": bob.user_id, "content": f"m{number}"})
    assert error_code(dm(alice, bob)) == "mailbox_full"
    # the writer restarted (killed): the new one has the quota too
    writer = writer_process(srv)
    writer.send_signal(signal.SIGKILL)
    writer.wait(5)
    deadline = time.monotonic() + 15
    while True:
        result = dm(alice, bob)
        if error_code(result) != "internal":
            break
        assert time.monotonic() < deadline, "the writer did not come back"
        time.sleep(0.1)
    assert error_code(result) == "mailbox_full"
    srv.stop()
    srv = start_server(flags=flags, data_dir=data)
    alice, bob = login(srv, "alice", alice.token), login(srv, "bob", bob.token)
    assert error_code(dm(alice, bob)) == "mailbox_full"
    box = pull_all(bob)
    assert [m["content"] for m in box] == ["m0", "m1", "m2"]
    bob.ok(8, {"ids": [box[0]["id"]]})
    assert dm(alice, bob)["seq"] == 4
    assert error_code(dm(alice, bob)) == "mailbox_full"
    srv.stop()
    # a larger limit after a restart: the count stays, the limit is the new one
    srv = start_server(flags=("--workers", "1", "--max-mailbox", "4"), data_dir=data)
    alice, bob = login(srv, "alice", alice.token), login(srv, "bob", bob.token)
    assert dm(alice, bob)["seq"] == 5
    assert error_code(dm(alice, bob)) == "mailbox_full"
    assert [m["seq"] for m in pull_all(bob)] == [2, 3, 4, 5]


def check_channel_quota(srv, other_srv=None, limit: int = 3) -> tuple[ZimClient, ZimClient, list[str]]:
    """``limit`` channels created, the next refused and not created; joining an
    existing one is fine; someone else may create the refused name; a pipelined
    pair of subscribes to one new channel creates nothing past the limit."""
    other_srv = other_srv or srv
    alice, bob = login(srv, "alice"), login(other_srv, "bob")
    names = [unique("ch") for _ in range(limit + 3)]
    for name in names[:limit]:
        alice.ok(3, {"name": name})
    refused = alice.call(3, {"name": names[limit]})
    assert error_code(refused) == "too_many_channels", refused
    assert "channels" in refused["error"]["message"]
    assert alice.error(4, {"channel": names[limit], "content": "x"}) == "not_found"     # nothing stored
    assert [error_code(r) for r in pipelined(alice, [(3, {"name": names[limit + 1]})] * 2)] \
        == ["too_many_channels"] * 2
    assert bob.error(4, {"channel": names[limit + 1], "content": "x"}) == "not_found"
    alice.ok(3, {"name": names[0], "push": False})          # a flag change on her own channel
    alice.ok(6, {"name": names[1]})                         # leaving does not give a creation back
    assert alice.error(3, {"name": names[limit + 2]}) == "too_many_channels"
    # another user may still create channels, the refused name too; then anyone joins it
    bob.ok(3, {"name": names[limit]})
    alice.ok(3, {"name": names[limit]})
    sent = bob.ok(4, {"channel": names[limit], "content": "hello"})
    assert sent["seq"] == 1
    alice.ok(3, {"name": names[1]})                         # joining her own again: it exists
    return alice, bob, names


def test_too_many_channels(start_server, tmp_path):
    flags = ("--workers", "2", "--max-channels-per-user", "3")
    data = tmp_path / "data"
    srv = start_server(flags=flags, data_dir=data)
    alice, bob, names = check_channel_quota(srv)
    for name in names[4:6]:
        bob.ok(3, {"name": name})                           # bob has created 3: his own limit
    assert bob.error(3, {"name": unique("ch")}) == "too_many_channels"
    srv.stop()
    srv = start_server(flags=flags, data_dir=data)          # the creators are stored
    alice, bob = login(srv, "alice", alice.token), login(srv, "bob", bob.token)
    assert alice.error(3, {"name": unique("ch")}) == "too_many_channels"
    assert bob.error(3, {"name": unique("ch")}) == "too_many_channels"
    for name in names[:6]:
        alice.ok(3, {"name": name})                         # all exist: joining is fine
    carol = login(srv)
    carol.ok(3, {"name": unique("ch")})


# ------------------------------------------------------------------ nodes (Redis)


QUOTA_NODE_FLAGS = ("--workers", "2", "--channel-rate", "0", "--max-mailbox", "5", "--max-channels-per-user", "3")


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend(request) -> Backend:
    yield from backend_fixture(request.param)


@pytest.fixture(scope="module")
def quota_nodes(backend, start_module_server):
    """Nodes A and B, two workers each, with the quotas, on the module's Redis."""
    return [start_module_server([*QUOTA_NODE_FLAGS, "--redis", backend.url]) for _ in range(2)]


@requires_redis_server
def test_nodes_a_full_mailbox_refuses_dms_and_drops_nothing(quota_nodes):
    check_mailbox_full(quota_nodes[0], quota_nodes[1])


@requires_redis_server
def test_nodes_too_many_channels_also_after_a_node_restart(quota_nodes, backend, start_server):
    a, b = quota_nodes
    alice, bob, names = check_channel_quota(a, b)
    # a node started afresh (an empty cache) counts from Redis
    fresh = start_server(flags=(*QUOTA_NODE_FLAGS, "--redis", backend.url))
    alice = login(fresh, "alice", alice.token)
    assert alice.error(3, {"name": unique("ch")}) == "too_many_channels"
    for name in names[:4]:
        alice.ok(3, {"name": name})                           # existing: joined, also uncached
    # the mailbox counts are Redis's too
    carol, dave = login(fresh), login(a)
    for number in range(5):
        carol.ok(2, {"receiverId": dave.user_id, "content": f"m{number}"})
    assert error_code(dm(login(b), dave)) == "mailbox_full"
    fresh.stop()


# ------------------------------------------------------------------ the Redis scripts


@pytest.fixture(scope="module")
def redis_client():
    from tests.support.clusters import local_redis

    with local_redis() as client:
        yield client


def fresh_user() -> int:
    return random.getrandbits(40) + 1


@requires_redis_server
def test_redis_mailbox_holds_count_bytes_exactly_and_expire(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import FULL_BY_BYTES, FULL_BY_COUNT, HELD, execute

    client = redis_client
    receiver = fresh_user()
    keys = schema.user_keys(receiver)
    now = int(time.time() * 1000)

    def hold(msg: dict, max_count: int = 3, max_bytes: int = 0, at: int = now) -> tuple[int, str]:
        size = schema.hold_size(msg)
        name = schema.hold_of(msg, size)
        return execute(client, schema.mailbox_hold_command(receiver, name, size, at, max_count, max_bytes)), name

    msgs = [message(i) for i in range(4)]
    holds = []
    for msg in msgs[:3]:
        reply, name = hold(msg)
        assert reply == HELD
        holds.append(name)
    assert hold(msgs[3])[0] == FULL_BY_COUNT                 # three held: full, by count
    for number, (msg, name) in enumerate(zip(msgs[:3], holds)):
        execute(client, schema.mailbox_add_command(receiver, dict(msg, seq=number + 1), name))
    copies = [orjson.dumps(dict(msg, seq=number + 1)) for number, msg in enumerate(msgs[:3])]
    assert int(client.get(keys.bytes)) == sum(map(len, copies))     # exact once added
    assert client.zcard(keys.held) == 0
    assert hold(msgs[3])[0] == FULL_BY_COUNT
    execute(client, schema.mailbox_ack_command(receiver, [msgs[0]["id"], msgs[0]["id"], "nope"]))
    assert int(client.get(keys.bytes)) == len(copies[1]) + len(copies[2])
    # by bytes: what is there plus the hold's upper bound
    used = len(copies[1]) + len(copies[2])
    assert hold(msgs[3], 0, used + schema.hold_size(msgs[3]) - 1)[0] == FULL_BY_BYTES
    reply, name = hold(msgs[3], 0, used + schema.hold_size(msgs[3]))
    assert reply == HELD
    # a send that failed gives its room back; a hold whose send never ended expires
    execute(client, schema.mailbox_release_command(receiver, name))
    execute(client, schema.mailbox_release_command(receiver, name))     # twice: no harm
    assert int(client.get(keys.bytes)) == used
    assert hold(msgs[3])[0] == HELD
    assert hold(message(9), 3, 0)[0] == FULL_BY_COUNT
    later = now + schema.HOLD_MS + 1
    assert hold(message(9), 3, 0, at=later)[0] == HELD       # the stale hold went first
    assert client.zcard(keys.held) == 1 and int(client.get(keys.bytes)) == used + schema.hold_size(message(9))
    # everything acked, the holds gone: nothing is left behind
    client.delete(keys.held)
    execute(client, schema.mailbox_ack_command(receiver, [msgs[1]["id"], msgs[2]["id"]]))
    assert client.exists(keys.box, keys.mail, keys.bytes) == 0


@requires_redis_server
def test_redis_a_mailbox_from_before_the_quota_is_counted_once(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import HELD, execute

    client = redis_client
    receiver = fresh_user()
    keys = schema.user_keys(receiver)
    copies = {}
    for number in range(3):       # as an older zim stored them: no bytes counter
        msg = dict(message(number, BIG), seq=number + 1)
        copies[msg["id"]] = orjson.dumps(msg)
        client.hset(keys.mail, msg["id"], copies[msg["id"]])
        client.zadd(keys.box, {msg["id"]: number + 1})
    total = sum(map(len, copies.values()))
    size = schema.hold_size(message(5))
    reply = execute(client, schema.mailbox_hold_command(receiver, schema.hold_of(message(5), size), size,
                                                        int(time.time() * 1000), 0, total + size))
    assert reply == HELD and int(client.get(keys.bytes)) == total + size


@requires_redis_server
def test_redis_channel_claims(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import CLAIM_REFUSED, CLAIMED, CLAIMED_BEFORE, execute

    client = redis_client
    user = fresh_user()
    assert execute(client, schema.channel_claim_command(user, "a", 2)) == CLAIMED
    assert execute(client, schema.channel_claim_command(user, "a", 2)) == CLAIMED_BEFORE   # a retry
    assert execute(client, schema.channel_claim_command(user, "b", 2)) == CLAIMED
    assert execute(client, schema.channel_claim_command(user, "c", 2)) == CLAIM_REFUSED
    assert execute(client, schema.channel_claim_command(user, "c", 0)) == CLAIMED          # 0: no limit
    channel = unique("made")
    assert execute(client, schema.channel_join_command(channel, user, True)) == 0
    assert not client.exists(schema.channel_keys(channel).seq)
    assert execute(client, schema.channel_create_command(channel, user, True)) == 1
    assert execute(client, schema.channel_create_command(channel, user + 1, False)) == 0
    assert execute(client, schema.channel_join_command(channel, user + 2, True)) == 1
    assert client.hgetall(schema.channel_keys(channel).members) == {
        str(user).encode(): b"1", str(user + 1).encode(): b"0", str(user + 2).encode(): b"1"}
