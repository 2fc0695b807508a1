"""Issue 14's store quotas on servers with the SQLite store: a full mailbox
(count and bytes) refuses DMs and drops nothing, also within a batch and after a
restart of the server or of its writer; too many channels.

The quotas themselves are described in tests/limits/test_store_quotas.py.
"""
from __future__ import annotations

import signal
import threading
import time

import psutil

from tests.limits.quota_helpers import (
    BIG, check_channel_quota, check_mailbox_full, dm, login, pair_history, pipelined, pull_all, stored_size,
)
from tests.support.client import ZimClient, error_code, unique


# ------------------------------------------------------------------ servers (SQLite)


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
