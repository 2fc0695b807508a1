"""The durable store through a real server: kill -9 under load loses nothing that
was acknowledged, retention prunes by TTL and cap, start-up refuses a bad data
directory, a full disk answers ``internal`` (never a false ack) and recovers, and
a writer process that dies is replaced."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest

from tests.support.servers import HOST, free_port, server_env, durable_store_on_a_test_link
from tests.support.client import Closed, error_code, unique

SEND_WINDOW = 16          # requests a sender keeps in flight


def kill_everything(server) -> None:
    """kill -9 of the whole server: supervisor, workers and writer at once."""
    root = psutil.Process(server.proc.pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    server.stopped = True
    server.proc.wait(5)
    psutil.wait_procs(processes, timeout=5)


def writer_process(server) -> psutil.Process:
    root = psutil.Process(server.proc.pid)
    for child in root.children(recursive=True):
        if "zim.storage.writer" in child.cmdline():
            return child
    raise AssertionError("no writer process")


def all_history(client, **where) -> list[dict]:
    """Every message of a conversation, oldest first, paging back with beforeSeq."""
    messages: list[dict] = []
    before = None
    while True:
        query = dict(where, limit=100)
        if before is not None:
            query["beforeSeq"] = before
        page = client.ok(5, query)
        messages[:0] = page["messages"]
        if not page["hasMore"]:
            return messages
        before = page["messages"][0]["seq"]


def drain_mailbox(client) -> list[dict]:
    """Pull and ack the whole mailbox; the pushes at login are pulled again."""
    found = []
    while True:
        batch = client.ok(7, {"limit": 100})["messages"]
        if not batch:
            return found
        found += batch
        client.ok(8, {"ids": [m["id"] for m in batch]})


class Sender(threading.Thread):
    """Sends as fast as it can with SEND_WINDOW requests in flight, alternating a
    direct message and a channel message, until the server dies or ``stop`` is set;
    keeps every acknowledged message."""

    def __init__(self, client, receiver_id: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.receiver_id = receiver_id
        self.channel = channel
        self.stop = threading.Event()
        self.acked_dms: dict[str, int] = {}        # id -> seq
        self.acked_channel: dict[str, int] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        client = self.client
        kinds: dict[int, str] = {}
        count = 0
        try:
            while not self.stop.is_set() or kinds:
                while len(kinds) < SEND_WINDOW and not self.stop.is_set():
                    count += 1
                    if count % 2:
                        seq = client.send(2, {"receiverId": self.receiver_id, "content": f"dm {count}"})
                        kinds[seq] = "dm"
                    else:
                        seq = client.send(4, {"channel": self.channel, "content": f"ch {count}"})
                        kinds[seq] = "channel"
                action, seq, raw = client._recv_packet(time.monotonic() + 10)
                if seq == 0:
                    continue
                body = orjson.loads(raw)
                kind = kinds.pop(seq)
                if "error" in body:
                    self.errors.append(body["error"]["code"])
                    continue
                (self.acked_dms if kind == "dm" else self.acked_channel)[body["id"]] = body["seq"]
        except (Closed, OSError, TimeoutError):
            return              # the server was killed


@pytest.mark.parametrize("workers", ["1", "3"])
def test_kill_9_under_load_loses_nothing_acknowledged(start_server, tmp_path, workers):
    data = tmp_path / "data"
    first = start_server(["--workers", workers, "--channel-rate", "0"], data_dir=data)
    channel = unique("load")
    receivers = []
    for i in range(4):
        receiver = first.tcp_client()
        receiver.login(unique(f"receiver{i}"))
        receivers.append((receiver.user_id, receiver.token, receiver.name))
        receiver.close()                            # offline: everything goes to the mailbox
    senders = []
    for i in range(4):
        client = first.tcp_client()
        client.login(unique(f"sender{i}"))
        client.ok(3, {"name": channel, "push": False})
        senders.append(Sender(client, receivers[i][0], channel))
    for sender in senders:
        sender.start()
    time.sleep(2.0)
    kill_everything(first)
    for sender in senders:
        sender.join(15)
        assert not sender.is_alive()
        assert not sender.errors, sender.errors[:5]
    acked_channel = {k: v for s in senders for k, v in s.acked_channel.items()}
    assert len(acked_channel) > 100, "the senders barely sent anything before the kill"

    second = start_server(["--workers", workers], data_dir=data)
    reader = second.tcp_client()
    reader.login(senders[0].client.name, token=senders[0].client.token)
    # the channel: every acknowledged message, under its seq; seq 1..N with no gap
    stored = all_history(reader, channel=channel)
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    by_id = {m["id"]: m["seq"] for m in stored}
    assert all(by_id.get(k) == v for k, v in acked_channel.items())
    assert reader.ok(4, {"channel": channel, "content": "after"})["seq"] == len(stored) + 1
    for sender, (receiver_id, token, name) in zip(senders, receivers):
        acked = sender.acked_dms
        assert acked
        receiver = second.tcp_client()
        receiver.login(name, token=token)
        # offline delivery: the oldest waiting messages are pushed after the login answer
        pushed = receiver.recv_pushes(min(100, len(acked)))
        assert all(action == 101 for action, _ in pushed)
        assert [m["seq"] for _, m in pushed] == sorted(m["seq"] for _, m in pushed)
        # history of the pair: all acknowledged, gap-free, and seq goes on after it
        pair = all_history(receiver, userId=sender.client.user_id)
        assert [m["seq"] for m in pair] == list(range(1, len(pair) + 1))
        pair_ids = {m["id"]: m["seq"] for m in pair}
        assert all(pair_ids.get(k) == v for k, v in acked.items())
        # the mailbox: every acknowledged message; acking empties it
        mailbox = {m["id"] for m in drain_mailbox(receiver)}
        assert set(acked) <= mailbox
        assert receiver.ok(7)["messages"] == []
        assert receiver.ok(2, {"receiverId": sender.client.user_id, "content": "back"})["seq"] == len(pair) + 1
        receiver.close()
    second.stop()


def test_retention_prunes_by_ttl_and_cap_and_keeps_mailboxes(start_server):
    srv = start_server(["--retain-private", "0:5", "--retain-channel", "2s:0",
                        "--retain-large", "0:3", "--large-channel", "3", "--prune-every", "1"])
    alice, bob, carol = (srv.tcp_client() for _ in range(3))
    for client, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        client.login(unique(name))
    # private, cap 5: bob acks all but the first message, which stays (kept until acked)
    dms = [alice.ok(2, {"receiverId": bob.user_id, "content": f"d{i}"})["id"] for i in range(1, 9)]
    bob.recv_pushes(8)
    bob.ok(8, {"ids": dms[1:]})
    # a small channel (2 members), TTL 2 s
    small = unique("small")
    alice.ok(3, {"name": small})
    bob.ok(3, {"name": small, "push": False})
    for i in range(3):
        alice.ok(4, {"channel": small, "content": f"old {i}"})
    # a large channel (3 members), cap 3
    large = unique("large")
    for client in (alice, bob, carol):
        client.ok(3, {"name": large, "push": False})
    for i in range(1, 6):
        alice.ok(4, {"channel": large, "content": f"l{i}"})

    deadline = time.monotonic() + 15
    while True:
        pair = [m["content"] for m in all_history(alice, userId=bob.user_id)]
        small_left = all_history(alice, channel=small)
        large_left = [m["seq"] for m in all_history(alice, channel=large)]
        if pair == ["d1", "d4", "d5", "d6", "d7", "d8"] and not small_left and large_left == [3, 4, 5]:
            break
        assert time.monotonic() < deadline, (pair, small_left, large_left)
        time.sleep(0.3)
    # the mailbox still holds d1; seq goes on after pruning
    assert [m["content"] for m in bob.ok(7)["messages"]] == ["d1"]
    assert alice.ok(4, {"channel": small, "content": "new"})["seq"] == 4
    assert [m["seq"] for m in all_history(bob, channel=small)] == [4]
    assert alice.ok(2, {"receiverId": bob.user_id, "content": "d9"})["seq"] == 9


def run_server_expecting_failure(data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zim", "--tcp", f"{HOST}:{free_port()}", "--ws", f"{HOST}:{free_port()}",
         "--data", str(data_dir), "--workers", "1", *flags],
        capture_output=True, text=True, timeout=30, env=server_env())


def test_corrupt_database_stops_the_start_with_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "zim.db").write_bytes(b"this is not a database" * 100)
    result = run_server_expecting_failure(data)
    assert result.returncode == 1
    assert "zim.db" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_directory_that_is_a_file_stops_the_start(tmp_path):
    data = tmp_path / "data"
    data.write_text("a file")
    result = run_server_expecting_failure(data)
    assert result.returncode == 1
    assert "data directory" in result.stderr and "Traceback" not in result.stderr


def test_bad_retention_flags_are_refused(tmp_path):
    for flags in (["--retain-private", "30"], ["--retain-channel", "3x:10"], ["--retain-large", "1d:-1"],
                  ["--prune-every", "0"], ["--large-channel", "0"]):
        result = run_server_expecting_failure(tmp_path / "data", *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert flags[0] in result.stderr


def test_ids_move_past_the_newest_stored_even_if_the_clock_is_behind(start_server, tmp_path):
    """A database holding an id from one hour ahead (a clock that later stepped back):
    after a restart every new id is greater."""
    from zim.ids import EPOCH_MS, TIME_SHIFT, wall_clock_ms
    from zim.storage.durable import DB_FILE
    from zim.storage.sqlite import SQLiteStore

    data = tmp_path / "data"
    data.mkdir()
    ahead = (wall_clock_ms() + 3_600_000 - EPOCH_MS) << TIME_SHIFT
    db = SQLiteStore(str(data / DB_FILE))
    db.create_user(1, "past")
    db.subscribe("future", 1, True)
    db.append_channel_message("future", {"id": str(ahead), "seq": 0, "content": "from the future",
                                         "sender": {"id": "1", "name": "past"}, "createdAt": 0})
    db.close()
    srv = start_server(data_dir=data)
    client = srv.tcp_client()
    assert int(client.login(unique("now"))["id"]) > ahead
    client.ok(3, {"name": "future"})
    sent = client.ok(4, {"channel": "future", "content": "now"})
    assert int(sent["id"]) > ahead and sent["seq"] == 2


def test_writer_killed_answers_internal_then_recovers(start_server):
    srv = start_server(allowed_tracebacks=())
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    channel = unique("writer")
    alice.ok(3, {"name": channel})
    first = alice.ok(4, {"channel": channel, "content": "before"})
    writer = writer_process(srv)
    writer.send_signal(signal.SIGSTOP)          # hold it while requests queue up
    seqs = [alice.send(4, {"channel": channel, "content": f"lost {i}"}) for i in range(5)]
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.send_signal(signal.SIGCONT)
    for seq in seqs:
        body = alice.wait_response(seq)[2]
        assert error_code(body) == "internal"
    # a new writer: sends work again, seq without gaps
    deadline = time.monotonic() + 10
    while True:
        response = alice.request(4, {"channel": channel, "content": "after"})[2]
        if "error" not in response:
            break
        assert time.monotonic() < deadline, response
        time.sleep(0.1)
    assert response["seq"] == first["seq"] + 1
    assert [m["content"] for m in all_history(alice, channel=channel)] == ["before", "after"]
    srv.assert_alive()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only): a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_read_only_data_directory_is_a_clear_error_at_start(start_server, small_disk):
    """Root writes anywhere, so "unwritable" is a file system mounted read-only."""
    data = small_disk / "data"
    first = start_server(data_dir=data)           # a real data directory: secret and database
    first.stop()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
    try:
        result = run_server_expecting_failure(data)
        assert result.returncode == 1, result.stderr
        assert "zim.db" in result.stderr and "Traceback" not in result.stderr
        empty = run_server_expecting_failure(small_disk / "elsewhere")
        assert empty.returncode == 1 and "data directory" in empty.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], capture_output=True)


def test_full_disk_at_start_is_a_clear_error(small_disk):
    filler = small_disk / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    result = run_server_expecting_failure(small_disk / "data")
    assert result.returncode == 1, result.stderr
    assert "zim-server:" in result.stderr and "Traceback" not in result.stderr


def test_full_disk_answers_internal_never_a_false_ack_and_recovers(start_server, small_disk):
    data = small_disk / "data"
    srv = start_server(data_dir=data)
    alice = srv.tcp_client()
    alice.login(unique("alice"))
    channel = unique("full")
    alice.ok(3, {"name": channel, "push": False})
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(free - 400_000, 0))
    acked, failed = [], 0
    content = "x" * 30_000
    for i in range(200):
        response = alice.request(4, {"channel": channel, "content": f"{i} {content}"})[2]
        if "error" in response:
            assert error_code(response) == "internal"
            failed += 1
            if failed >= 3:
                break
        else:
            acked.append(response["id"])
    assert failed >= 3, "the disk never filled up"
    filler.unlink()
    deadline = time.monotonic() + 10
    while True:
        response = alice.request(4, {"channel": channel, "content": "room again"})[2]
        if "error" not in response:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stored = all_history(alice, channel=channel)
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    assert [m["id"] for m in stored] == acked + [response["id"]]
    srv.assert_alive()


def test_failed_batch_undoes_memory_changes_newest_first(tmp_path):
    """What the writer answers FAILED is undone in the server's memory, in reverse order,
    and only once: later FAILED answers of the same failure undo nothing more."""
    from zim.storage.writer import FAILED, OK

    with durable_store_on_a_test_link(tmp_path) as store:
        store.meta.create_user(1, "alice")
        kept = store.subscribe("kept", 1, True)
        calls = [store.create_user(2, "bob"), store.subscribe("room", 1, True),
                 store.set_user_name(1, "alice2"), store.subscribe("room", 1, False),
                 store.unsubscribe("kept", 1)]
        assert store.membership("room", 1) is False and store.user_name(1) == "alice2"
        outcomes = []
        for call in [kept, *calls]:
            call.wait(lambda first, second, ok, value: outcomes.append(ok), None, None)
        store.on_link_packet(3, OK, b"null")
        store.on_link_packet(1, FAILED, b'"disk full"')
        # everything from the failed call on is undone
        assert not store.user_exists(2)
        assert not store.channel_exists("room")
        assert store.user_name(1) == "alice"
        assert store.membership("kept", 1) is True
        for op in (3, 2, 3, 4):
            store.on_link_packet(op, FAILED, b'"an earlier write failed"')
        assert outcomes == [True, False, False, False, False, False]
        assert store.membership("kept", 1) is True and not store.channel_exists("room")
        # after the failure, new calls are undone only if they fail themselves
        again = store.subscribe("room", 1, True)
        store.on_link_packet(3, OK, b"null")
        assert again.outcome == (True, None) and store.membership("room", 1) is True
