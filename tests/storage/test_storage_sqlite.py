"""SQLiteStore: the same behaviour as MemoryStore (run on both), a random-op
comparison of the two, durability across close and SIGKILL, and refusal of
corrupt, unwritable or newer databases."""
from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zim.storage.sqlite import SCHEMA_VERSION, SQLiteStore
from zim.storage.store import MAX_USER_ID, MemoryStore, Store

from tests.support import REPO_ROOT


def message(text: str, message_id: int) -> dict:
    return {"id": str(message_id), "seq": 0, "content": text,
            "sender": {"id": "1", "name": "a"}, "createdAt": 1764300000000 + message_id}


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    made = MemoryStore() if request.param == "memory" else SQLiteStore(str(tmp_path / "zim.db"))
    yield made
    made.close()


# ------------------------------------------------------------------ same behaviour


def test_is_a_store(store):
    assert isinstance(store, Store)


def test_users(store):
    assert not store.user_exists(7) and store.user_name(7) is None
    store.create_user(7, "alice")
    assert store.user_exists(7) and store.user_name(7) == "alice"
    store.set_user_name(7, "名字😀")
    assert store.user_name(7) == "名字😀"
    store.set_user_name(7, "alice")
    assert store.user_name(7) == "alice"
    with pytest.raises(ValueError):
        store.create_user(7, "again")
    with pytest.raises(KeyError):
        store.set_user_name(8, "nobody")
    with pytest.raises(ValueError):
        store.create_user(0, "zero")
    with pytest.raises(ValueError):
        store.create_user(MAX_USER_ID + 1, "too big")
    with pytest.raises(ValueError):
        store.create_user(9, "x" * 70000)
    for big in (MAX_USER_ID, 1 << 63, (1 << 63) - 1):          # the whole unsigned range
        store.create_user(big, f"u{big}")
    assert store.user_name(MAX_USER_ID) == f"u{MAX_USER_ID}"
    assert store.user_name(1 << 63) == f"u{1 << 63}"
    assert not store.user_exists(MAX_USER_ID - 1) and not store.user_exists(8)
    store.create_user(3, "")                                      # older id, empty name
    assert store.user_name(3) == ""


def test_channels_and_membership(store):
    assert not store.channel_exists("room")
    assert store.membership("room", 1) is None
    assert store.unsubscribe("room", 1) is False
    store.subscribe("room", 1, True)
    assert store.channel_exists("room")
    assert store.membership("room", 1) is True and store.membership("room", 2) is None
    store.subscribe("room", 1, True)                       # idempotent
    assert store.user_channels(1) == [("room", True)]
    store.subscribe("room", 1, False)                      # updates push
    assert store.membership("room", 1) is False
    store.subscribe("quiet", 1, False)
    assert store.user_channels(1) == [("room", False), ("quiet", False)]
    store.subscribe("room", 1, True)                       # keeps its place
    assert store.user_channels(1) == [("room", True), ("quiet", False)]
    assert store.unsubscribe("room", 2) is False
    assert store.unsubscribe("room", 1) is True
    assert store.unsubscribe("room", 1) is False
    assert store.membership("room", 1) is None
    assert store.channel_exists("room"), "a channel outlives its members"
    assert store.user_channels(1) == [("quiet", False)]
    store.subscribe("room", 1, True)                       # rejoining: last
    assert store.user_channels(1) == [("quiet", False), ("room", True)]
    assert store.user_channels(99) == []
    store.subscribe("room", MAX_USER_ID, True)
    assert store.membership("room", MAX_USER_ID) is True
    assert store.user_channels(MAX_USER_ID) == [("room", True)]


def test_channel_seq_gap_free_and_history(store):
    store.subscribe("a", 1, True)
    store.subscribe("b", 1, True)
    with pytest.raises(KeyError):
        store.append_channel_message("nope", message("x", 1))
    msgs = [message(f"a{i}", 100 + i) for i in range(1, 31)]
    seqs = [store.append_channel_message("a", m) for m in msgs]
    assert seqs == list(range(1, 31))
    assert [m["seq"] for m in msgs] == seqs                # the store sets the seq
    assert store.append_channel_message("b", message("b1", 200)) == 1
    messages, has_more = store.history("channel", "a", None, 100)
    assert messages == msgs and not has_more               # equal dicts back
    assert [m["content"] for m in messages] == [f"a{i}" for i in range(1, 31)]
    assert not store.channel_exists("c:a") and store.history("channel", "c:a", None, 5) == ([], False)


def test_history_paging_edges(store):
    assert store.history("channel", "none", None, 20) == ([], False)
    assert store.history("user", (1, 2), None, 20) == ([], False)
    store.subscribe("c", 1, True)
    assert store.history("channel", "c", None, 20) == ([], False)
    assert store.history("channel", "c", 1, 20) == ([], False)
    for i in range(1, 21):
        store.append_channel_message("c", message(str(i), i))

    def seqs(before, limit):
        messages, has_more = store.history("channel", "c", before, limit)
        return [m["seq"] for m in messages], has_more

    assert seqs(None, 20) == (list(range(1, 21)), False)      # exactly limit: nothing older
    assert seqs(None, 19) == (list(range(2, 21)), True)
    assert seqs(None, 100) == (list(range(1, 21)), False)
    assert seqs(None, 1) == ([20], True)
    assert seqs(1, 20) == ([], False)
    assert seqs(2, 20) == ([1], False)
    assert seqs(0, 20) == ([], False)
    assert seqs(-7, 20) == ([], False)
    assert seqs(11, 10) == (list(range(1, 11)), False)        # exactly limit before beforeSeq
    assert seqs(12, 10) == (list(range(2, 12)), True)
    assert seqs(21, 5) == ([16, 17, 18, 19, 20], True)
    assert seqs(10**9, 3) == ([18, 19, 20], True)
    assert seqs(10**30, 3) == ([18, 19, 20], True)            # beyond 64 bits
    assert seqs(None, 10**30) == (list(range(1, 21)), False)
    assert seqs(None, 0) == ([], True)                        # MemoryStore's page() says so
    with pytest.raises(ValueError):
        store.history("group", "x", None, 1)


def test_user_messages_pair_seq_history_and_mailbox(store):
    a, b, c = 10, 20, MAX_USER_ID
    assert store.append_user_message(a, b, message("ab1", 1)) == 1
    assert store.append_user_message(b, a, message("ba2", 2)) == 2
    assert store.append_user_message(a, c, message("ac1", 3)) == 1
    assert store.append_user_message(a, a, message("self", 4)) == 1
    for key in ((a, b), (b, a)):
        messages, has_more = store.history("user", key, None, 20)
        assert [m["content"] for m in messages] == ["ab1", "ba2"] and not has_more
    assert [m["content"] for m in store.history("user", (c, a), None, 20)[0]] == ["ac1"]
    assert store.history("user", (b, c), None, 20) == ([], False)
    assert [m["content"] for m in store.history("user", (a, a), None, 20)[0]] == ["self"]
    assert [m["content"] for m in store.mailbox_pull(b, 100)] == ["ab1"]
    assert [m["content"] for m in store.mailbox_pull(a, 100)] == ["ba2", "self"]
    assert [m["content"] for m in store.mailbox_pull(c, 100)] == ["ac1"]
    assert store.mailbox_pull(c, 100)[0] == {**message("ac1", 3), "seq": 1}


def test_mailbox_pull_and_ack(store):
    for i in range(1, 131):
        store.append_user_message(1, 2, message(f"m{i}", i))
    assert store.mailbox_pull(3, 100) == []
    assert store.mailbox_pull(2, 0) == [] and store.mailbox_pull(2, -5) == []
    pulled = store.mailbox_pull(2, 100)
    assert [m["content"] for m in pulled] == [f"m{i}" for i in range(1, 101)]
    assert [m["content"] for m in store.mailbox_pull(2, 5)] == ["m1", "m2", "m3", "m4", "m5"]
    store.mailbox_ack(2, [])
    store.mailbox_ack(1, [m["id"] for m in pulled])          # not the receiver: ignored
    store.mailbox_ack(2, ["nope", "", "9" * 30])              # unknown: ignored
    assert len(store.mailbox_pull(2, 1000)) == 130
    store.mailbox_ack(2, iter(["5", "5", "7"]))               # duplicates fine, any iterable
    assert [m["id"] for m in store.mailbox_pull(2, 6)] == ["1", "2", "3", "4", "6", "8"]
    store.mailbox_ack(2, [m["id"] for m in pulled])
    assert [m["content"] for m in store.mailbox_pull(2, 100)] == [f"m{i}" for i in range(101, 131)]
    store.mailbox_ack(2, [str(i) for i in range(101, 131)])
    assert store.mailbox_pull(2, 100) == []
    store.mailbox_ack(2, ["1"])                               # acking an empty mailbox
    assert len(store.history("user", (1, 2), None, 100)[0]) == 100   # acked: still in history


def test_mailbox_order_is_arrival_not_id(store):
    """Oldest first means the order stored, even when ids do not sort that way."""
    for message_id in (50, 7, 300, 1):
        store.append_user_message(1, 2, message(f"m{message_id}", message_id))
    assert [m["id"] for m in store.mailbox_pull(2, 10)] == ["50", "7", "300", "1"]
    store.mailbox_ack(2, ["7"])
    store.append_user_message(1, 2, message("m2", 2))
    assert [m["id"] for m in store.mailbox_pull(2, 10)] == ["50", "300", "1", "2"]


# ------------------------------------------------------------------ random ops vs MemoryStore

USERS = st.sampled_from([1, 2, 3, MAX_USER_ID])
CHANNELS = st.sampled_from(["r", "s", "ü"])


class CompareStores(RuleBasedStateMachine):
    """Every operation on both stores; every answer must be the same."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "zim.db")
        self.memory = MemoryStore()
        self.sqlite = SQLiteStore(self.path)
        self.next_id = 1
        self.ids: list[str] = []
        self.before_batch: MemoryStore | None = None    # MemoryStore as it was at begin_batch

    def teardown(self):
        self.sqlite.close()
        self.dir.cleanup()

    def both(self, name, *args):
        outcomes = []
        for target in (self.memory, self.sqlite):
            try:
                outcomes.append(("ok", getattr(target, name)(*args)))
            except (KeyError, ValueError) as exc:
                outcomes.append(("raised", type(exc)))
        assert outcomes[0] == outcomes[1], (name, args, outcomes)
        return outcomes[0]

    def new_message(self, text):
        msg = message(text, self.next_id)
        self.ids.append(msg["id"])
        self.next_id += 1
        return msg

    @rule(user=USERS, name=st.text(max_size=5))
    def create_user(self, user, name):
        self.both("create_user", user, name)

    @rule(user=USERS, name=st.text(max_size=5))
    def set_user_name(self, user, name):
        self.both("set_user_name", user, name)

    @rule(channel=CHANNELS, user=USERS, push=st.booleans())
    def subscribe(self, channel, user, push):
        self.both("subscribe", channel, user, push)

    @rule(channel=CHANNELS, user=USERS)
    def unsubscribe(self, channel, user):
        self.both("unsubscribe", channel, user)

    @rule(channel=CHANNELS, text=st.text(max_size=5))
    def append_channel_message(self, channel, text):
        msg = self.new_message(text)
        self.both("append_channel_message", channel, dict(msg) | {"sender": dict(msg["sender"])})
        # (each store gets its own copy: MemoryStore keeps the very dict)

    @rule(sender=USERS, receiver=USERS, text=st.text(max_size=5))
    def append_user_message(self, sender, receiver, text):
        msg = self.new_message(text)
        results = [store.append_user_message(sender, receiver, dict(msg)) for store in (self.memory, self.sqlite)]
        assert results[0] == results[1]

    @rule(channel=CHANNELS, before=st.none() | st.integers(-2, 30), limit=st.integers(0, 25))
    def channel_history(self, channel, before, limit):
        self.both("history", "channel", channel, before, limit)

    @rule(a=USERS, b=USERS, before=st.none() | st.integers(-2, 30), limit=st.integers(0, 25))
    def user_history(self, a, b, before, limit):
        self.both("history", "user", (a, b), before, limit)

    @rule(user=USERS, limit=st.integers(-1, 12))
    def mailbox_pull(self, user, limit):
        self.both("mailbox_pull", user, limit)

    @precondition(lambda self: self.ids)
    @rule(user=USERS, data=st.data())
    def mailbox_ack(self, user, data):
        ids = data.draw(st.lists(st.sampled_from(self.ids + ["nope", ""]), max_size=6))
        self.both("mailbox_ack", user, ids)

    # batches (the writer's group commit): buffered messages, reads inside, rollback
    @precondition(lambda self: self.before_batch is None)
    @rule()
    def begin_batch(self):
        self.sqlite.begin_batch()
        self.before_batch = copy.deepcopy(self.memory)

    @precondition(lambda self: self.before_batch is not None)
    @rule()
    def commit_batch(self):
        self.sqlite.commit_batch()
        self.before_batch = None

    @precondition(lambda self: self.before_batch is not None)
    @rule()
    def rollback_batch(self):
        self.sqlite.rollback_batch()
        self.memory, self.before_batch = self.before_batch, None

    @precondition(lambda self: self.before_batch is None)
    @rule()
    def reopen(self):
        self.sqlite.close()
        self.sqlite = SQLiteStore(self.path)

    @invariant()
    def users_and_channels_agree(self):
        for user in (1, 2, 3, MAX_USER_ID):
            self.both("user_exists", user)
            self.both("user_name", user)
            self.both("user_channels", user)
            for channel in ("r", "s", "ü"):
                self.both("membership", channel, user)
        for channel in ("r", "s", "ü"):
            self.both("channel_exists", channel)


CompareStores.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_sqlite_matches_memory = CompareStores.TestCase


# ------------------------------------------------------------------ durability


def fill(store, count: int, start: int = 1) -> None:
    for i in range(start, start + count):
        store.append_channel_message("room", message(f"c{i}", i))
        store.append_user_message(1, 2, message(f"u{i}", 10_000 + i))


def check_filled(store, count: int) -> list:
    assert store.user_name(1) == "alice" and store.user_name(MAX_USER_ID) == "big"
    assert store.membership("room", 1) is True and store.membership("room", MAX_USER_ID) is False
    channel, has_more = store.history("channel", "room", None, 1000)
    assert [m["seq"] for m in channel] == list(range(1, count + 1)) and not has_more
    assert [m["content"] for m in channel] == [f"c{i}" for i in range(1, count + 1)]
    pair, _ = store.history("user", (2, 1), None, 1000)
    assert [m["seq"] for m in pair] == list(range(1, count + 1))
    return pair


def setup_users(store) -> None:
    store.create_user(1, "alice")
    store.create_user(MAX_USER_ID, "big")
    store.subscribe("room", 1, True)
    store.subscribe("room", MAX_USER_ID, False)


def test_reopen_after_close_keeps_everything_and_seq_continues(tmp_path):
    path = str(tmp_path / "zim.db")
    store = SQLiteStore(path)
    setup_users(store)
    fill(store, 10)
    store.mailbox_ack(2, ["10001", "10002"])
    store.close()
    store.close()                                            # idempotent
    with pytest.raises(RuntimeError):
        store.user_exists(1)

    store = SQLiteStore(path)
    check_filled(store, 10)
    assert [m["id"] for m in store.mailbox_pull(2, 3)] == ["10003", "10004", "10005"]
    fill(store, 5, start=11)
    check_filled(store, 15)
    store.close()


def test_a_version_5_database_is_upgraded_with_the_archive_queue(tmp_path):
    path = str(tmp_path / "zim.db")
    store = SQLiteStore(path)
    setup_users(store)
    fill(store, 10)
    store.close()
    conn = sqlite3.connect(path)      # back to schema version 5: no archive queue
    conn.executescript("DROP TABLE archive_queue; PRAGMA user_version = 5;")
    conn.close()
    store = SQLiteStore(path)
    try:
        check_filled(store, 10)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert conn.execute("SELECT count(*) FROM archive_queue").fetchone() == (0,)
    finally:
        conn.close()


def test_kill_9_after_commit_loses_nothing(tmp_path):
    path = str(tmp_path / "zim.db")
    child = textwrap.dedent(f"""
        import time
        from tests.storage.test_storage_sqlite import fill, setup_users
        from zim.storage.sqlite import SQLiteStore
        store = SQLiteStore({path!r})
        setup_users(store)
        fill(store, 25)
        store.mailbox_ack(2, ["10001"])
        print("committed", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,   # -c: the checkout first
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "committed", proc.stderr.read() if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert os.path.exists(path + "-wal"), "killed: the WAL was not checkpointed away"

    store = SQLiteStore(path)
    check_filled(store, 25)
    assert store.mailbox_pull(2, 1)[0]["id"] == "10002"
    fill(store, 3, start=26)
    check_filled(store, 28)
    store.close()


# ------------------------------------------------------------------ refusing to open


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "zim.db"
    path.write_bytes(os.urandom(4096) + b"garbage" * 100)
    with pytest.raises(RuntimeError, match=str(path).replace("\\", "\\\\")):
        SQLiteStore(str(path))


def test_corrupt_header_of_a_real_database_is_refused(tmp_path):
    path = tmp_path / "zim.db"
    store = SQLiteStore(str(path))
    setup_users(store)
    store.close()
    data = bytearray(path.read_bytes())
    data[:100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="zim.db"):
        SQLiteStore(str(path))


def test_unopenable_path_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-dir"):
        SQLiteStore(str(tmp_path / "no-such-dir" / "zim.db"))
    with pytest.raises(RuntimeError, match=str(tmp_path.name)):
        SQLiteStore(str(tmp_path))                           # a directory


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a read-only file")
def test_read_only_file_is_refused(tmp_path):
    path = tmp_path / "zim.db"
    SQLiteStore(str(path)).close()
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(RuntimeError, match="zim.db"):
            SQLiteStore(str(path))
    finally:
        tmp_path.chmod(0o755)


def test_newer_schema_is_refused_and_settings(tmp_path):
    path = str(tmp_path / "zim.db")
    store = SQLiteStore(path)
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1          # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 0
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteStore(path)


def test_failed_write_rolls_back(tmp_path):
    store = SQLiteStore(str(tmp_path / "zim.db"))
    store.subscribe("room", 1, True)
    assert store.append_channel_message("room", message("one", 1)) == 1
    with pytest.raises(TypeError):
        store.append_channel_message("room", {"id": "2", "seq": 0, "bad": object()})
    assert store.append_channel_message("room", message("two", 3)) == 2   # no gap left
    assert [m["content"] for m in store.history("channel", "room", None, 10)[0]] == ["one", "two"]
    store.close()


def test_wal_stays_bounded_under_steady_writes(tmp_path):
    """The writer's checkpointer lets the WAL start over even while batches keep
    coming (PASSIVE checkpoints alone never finish under steady writes)."""
    import orjson

    from zim.storage.retention import Retention
    from zim.storage.writer import OP_USER_MESSAGE, Checkpointer, Writer

    path = str(tmp_path / "zim.db")
    store = SQLiteStore(path)
    store.checkpoint_automatically(False)
    checkpointer = Checkpointer(path, restart_frames=256)   # 1 MiB, to see it in a short test
    checkpointer.INTERVAL = 0.005
    checkpointer.start()
    writer = Writer(store, Retention())
    content = "x" * 300
    biggest = 0
    for batch in range(300):                    # ~30 MB of messages
        ops = [(OP_USER_MESSAGE, orjson.dumps([1 + i % 8, 100 + i % 8, {
            "id": str(10**15 + batch * 100 + i), "seq": 0, "content": content,
            "sender": {"id": "1", "name": "a"}, "createdAt": 1}])) for i in range(100)]
        answers = writer.apply(ops)
        assert len(answers) == 100
        writer.after_commit(checkpointer)
        biggest = max(biggest, os.path.getsize(path + "-wal"))
    store.close()
    assert biggest < 12 * 1024 * 1024, f"the WAL grew to {biggest} bytes"
