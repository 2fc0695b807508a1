"""Merged channel pushes (103, ``--push-window-ms`` / ``--push-max``) on real servers.

A slice opens with a channel's first message after a quiet period and ends a
window later; every member connection then gets one 103 with the slice's newest
``push-max`` messages and ``skipped`` counting the older ones, except that a
connection never gets its own messages back. Windows here are long (the machine
is shared and slow): a burst sent at once must fit in one, and nothing is
asserted about how soon a batch arrives beyond "not before the window".
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.server.test_workers import workers_of
from tests.support.client import ZimClient, error_code, unique

WINDOW_MS = 1500            # long enough for a pipelined burst to land in one slice
BATCH_TIMEOUT = 10.0        # how long a batch may take to arrive


def merging(window_ms: int = WINDOW_MS, push_max: int = 20, workers: str = "1") -> list[str]:
    # --channel-rate 0: bursts here exceed the default rate limit on purpose
    return ["--push-window-ms", str(window_ms), "--push-max", str(push_max), "--workers", workers,
            "--channel-rate", "0"]


def member(srv, channel: str, kind: str = "tcp", push: bool = True, name: str = "m") -> ZimClient:
    client = srv.client(kind)
    client.login(unique(name))
    client.ok(3, {"name": channel, "push": push})
    return client


def send_all(sender: ZimClient, channel: str, contents: list[str]) -> list[int]:
    """Pipeline the sends, then their responses; the seqs given."""
    requests = [sender.send(4, {"channel": channel, "content": content}) for content in contents]
    results = [sender.wait_response(request, BATCH_TIMEOUT)[2] for request in requests]
    assert all(error_code(result) is None for result in results), results
    return [result["seq"] for result in results]


def batch(client: ZimClient, channel: str | None = None) -> dict:
    """The next push, which must be a 103 (of ``channel`` if given)."""
    action, body = client.recv_push(BATCH_TIMEOUT)
    assert action == 103, f"expected a 103 batch, got {action}: {body}"
    assert set(body) == {"channel", "messages", "skipped"}, body
    if channel is not None:
        assert body["channel"] == channel
    return body


def contents(body: dict) -> list[str]:
    return [message["content"] for message in body["messages"]]


def seqs(body: dict) -> list[int]:
    return [message["seq"] for message in body["messages"]]


# ------------------------------------------------------------------ one slice


@pytest.mark.parametrize("workers", ["1", "2"])
def test_burst_is_one_batch_per_connection(start_server, workers):
    srv = start_server(merging(push_max=3, workers=workers))
    channel = unique("burst")
    sender = member(srv, channel, name="sender")
    sender_phone = srv.ws_client()
    sender_phone.login(sender.name, token=sender.token)
    reader = member(srv, channel, kind="ws", name="reader")
    reader_tcp = srv.tcp_client()
    reader_tcp.login(reader.name, token=reader.token)

    started = time.monotonic()
    sent = send_all(sender, channel, [f"b{i}" for i in range(5)])
    assert sent == [1, 2, 3, 4, 5]
    # every other connection, the sender's own other device included, gets one 103
    for device in (reader, reader_tcp, sender_phone):
        body = batch(device, channel)
        assert seqs(body) == [3, 4, 5] and contents(body) == ["b2", "b3", "b4"]
        assert body["skipped"] == 2
        assert body["messages"][0]["sender"] == {"id": sender.user_id, "name": sender.name}
    # the first message was held for the whole window (the slice opened after the send)
    assert time.monotonic() - started >= WINDOW_MS / 1000
    for device in (reader, reader_tcp, sender_phone):
        device.assert_no_push(0.3)
    sender.assert_no_push(0.3)


def test_skipped_counts_every_older_message(start_server):
    srv = start_server(merging(window_ms=3000, push_max=20))
    channel = unique("many")
    sender = member(srv, channel, name="sender")
    reader = member(srv, channel, name="reader")
    send_all(sender, channel, [f"m{i}" for i in range(1, 51)])
    body = batch(reader, channel)
    assert seqs(body) == list(range(31, 51))
    assert contents(body) == [f"m{i}" for i in range(31, 51)]
    assert body["skipped"] == 30
    reader.assert_no_push(0.3)
    # what was skipped is in history, right before the batch's first seq
    page = reader.ok(5, {"channel": channel, "beforeSeq": 31, "limit": 100})
    assert [m["seq"] for m in page["messages"]] == list(range(1, 31))


def test_batch_stays_under_one_mebibyte(start_server):
    """Large messages: older ones are skipped even below push-max so the packet stays < 1 MiB."""
    srv = start_server(merging(window_ms=3000, push_max=50) + ["--max-packet", str(512 * 1024)])
    channel = unique("big")
    sender = member(srv, channel, name="sender")
    reader = member(srv, channel, name="reader")
    send_all(sender, channel, [f"{i:03d}" + "x" * 200_000 for i in range(8)])
    body = batch(reader, channel)
    kept = len(body["messages"])
    assert 1 <= kept < 8 and body["skipped"] == 8 - kept
    assert seqs(body) == list(range(9 - kept, 9))      # the newest, in order
    assert len(json.dumps(body, separators=(",", ":")).encode()) < 1 << 20
    reader.assert_no_push(0.3)


# ------------------------------------------------------------------ senders


def clients_on_one_worker(srv, count: int, candidates: int) -> list[ZimClient]:
    """``count`` logged-in TCP clients that landed on the same worker."""
    clients = [srv.tcp_client() for _ in range(candidates)]
    for client in clients:
        client.login(unique("u"))
    by_worker: dict[int, list[ZimClient]] = {}
    for client, worker in zip(clients, workers_of(srv, clients)):
        by_worker.setdefault(worker, []).append(client)
    largest = max(by_worker.values(), key=len)
    assert len(largest) >= count
    return largest[:count]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_two_senders_each_get_the_others_messages_only(start_server, workers):
    srv = start_server(merging(window_ms=3000, push_max=3, workers=workers))
    channel = unique("pair")
    if workers == "1":
        alice, bob, carol = (member(srv, channel, name=name) for name in ("alice", "bob", "carol"))
    else:
        # on the same worker, where leaving out several senders is the Python path
        alice, bob, carol = clients_on_one_worker(srv, 3, candidates=7)
        for client in (alice, bob, carol):
            client.ok(3, {"name": channel})
    # one after the other, so the seqs are known: a1=1 b1=2 a2=3 b2=4 a3=5
    for client, content in ((alice, "a1"), (bob, "b1"), (alice, "a2"), (bob, "b2"), (alice, "a3")):
        client.ok(4, {"channel": channel, "content": content})
    everything = batch(carol, channel)
    assert contents(everything) == ["a2", "b2", "a3"] and everything["skipped"] == 2
    to_alice = batch(alice, channel)
    assert contents(to_alice) == ["b2"] and to_alice["skipped"] == 1          # b1 left out
    to_bob = batch(bob, channel)
    assert contents(to_bob) == ["a2", "a3"] and to_bob["skipped"] == 1        # a1 left out
    for client in (alice, bob, carol):
        client.assert_no_push(0.3)
    # the senders are members as before: the next slice reaches them as usual
    carol.ok(4, {"channel": channel, "content": "c1"})
    for client in (alice, bob):
        body = batch(client, channel)
        assert contents(body) == ["c1"] and body["skipped"] == 0
    carol.assert_no_push(0.3)


def test_many_large_senders_on_one_worker(start_server):
    """Five senders of ~490 KB messages on one worker: their own batches together are
    larger than a router-to-worker packet may be, so they go down in several."""
    srv = start_server(merging(window_ms=4000, push_max=20, workers="2") + ["--max-packet", str(1 << 20)])
    channel = unique("heavy")
    *senders, reader = clients_on_one_worker(srv, 6, candidates=11)
    for client in (*senders, reader):
        client.ok(3, {"name": channel})
    for number, sender in enumerate(senders, 1):
        sender.ok(4, {"channel": channel, "content": f"{number}" + "x" * 490_000}, timeout=BATCH_TIMEOUT)
    everything = batch(reader, channel)     # two fit in 1 MiB
    assert seqs(everything) == [4, 5] and everything["skipped"] == 3
    for number, sender in enumerate(senders, 1):
        body = batch(sender, channel)
        others = [seq for seq in (4, 5) if seq != number]
        assert seqs(body) == others and body["skipped"] == 5 - 1 - len(others), number
    # the worker and its link are fine: the next slice reaches everyone
    reader.ok(4, {"channel": channel, "content": "small"})
    for sender in senders:
        assert contents(batch(sender, channel)) == ["small"]


def test_sender_whose_messages_were_all_skipped_is_told_how_many(start_server):
    srv = start_server(merging(window_ms=3000, push_max=2))
    channel = unique("crowded")
    alice, bob = member(srv, channel, name="alice"), member(srv, channel, name="bob")
    alice.ok(4, {"channel": channel, "content": "a1"})
    send_all(bob, channel, ["b1", "b2"])
    # bob's batch would hold only his own messages: it is empty, with a1 counted
    to_bob = batch(bob, channel)
    assert to_bob["messages"] == [] and to_bob["skipped"] == 1
    to_alice = batch(alice, channel)
    assert contents(to_alice) == ["b1", "b2"] and to_alice["skipped"] == 0


# ------------------------------------------------------------------ who gets what


@pytest.mark.parametrize("workers", ["1", "2"])
def test_members_without_push_get_nothing(start_server, workers):
    srv = start_server(merging(workers=workers))
    channel = unique("quiet")
    reader = member(srv, channel, name="reader")
    silent = member(srv, channel, push=False, name="silent")
    talker = member(srv, channel, name="talker")
    silent.ok(4, {"channel": channel, "content": "from silent"})   # a sender without push, too
    talker.ok(4, {"channel": channel, "content": "from talker"})
    assert contents(batch(reader, channel)) == ["from silent", "from talker"]
    assert contents(batch(talker, channel)) == ["from silent"]
    silent.assert_no_push(0.5)


def test_channels_get_separate_batches(start_server):
    srv = start_server(merging())
    red, blue = unique("red"), unique("blue")
    sender = member(srv, red, name="sender")
    sender.ok(3, {"name": blue})
    reader = member(srv, red, name="reader")
    reader.ok(3, {"name": blue})
    for i in range(3):
        send_all(sender, red, [f"r{i}"])
        send_all(sender, blue, [f"b{i}"])
    batches = {body["channel"]: body for body in (batch(reader), batch(reader))}
    assert set(batches) == {red, blue}
    assert contents(batches[red]) == ["r0", "r1", "r2"] and batches[red]["skipped"] == 0
    assert contents(batches[blue]) == ["b0", "b1", "b2"] and batches[blue]["skipped"] == 0
    reader.assert_no_push(0.3)


def test_quiet_period_starts_a_new_slice(start_server):
    window_ms = 500
    srv = start_server(merging(window_ms=window_ms, push_max=5))
    channel = unique("slices")
    sender = member(srv, channel, name="sender")
    reader = member(srv, channel, name="reader")
    send_all(sender, channel, ["one", "two"])
    assert contents(batch(reader, channel)) == ["one", "two"]
    time.sleep(window_ms / 1000 + 0.5)
    send_all(sender, channel, ["three"])
    later = batch(reader, channel)
    assert contents(later) == ["three"] and seqs(later) == [3] and later["skipped"] == 0
    reader.assert_no_push(0.3)


def test_window_zero_pushes_each_message(start_server):
    srv = start_server(["--push-window-ms", "0", "--push-max", "3", "--workers", "1"])
    channel = unique("plain")
    sender = member(srv, channel, name="sender")
    reader = member(srv, channel, name="reader")
    send_all(sender, channel, [f"p{i}" for i in range(5)])
    pushes = reader.recv_pushes(5, BATCH_TIMEOUT)
    assert [action for action, _ in pushes] == [102] * 5
    assert [body["content"] for _, body in pushes] == [f"p{i}" for i in range(5)]
    reader.assert_no_push()
    sender.assert_no_push()


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("flags", [
    ["--push-window-ms", "-1"], ["--push-window-ms", "60001"], ["--push-window-ms", "soon"],
    ["--push-max", "0"], ["--push-max", "1001"], ["--push-max", "-5"],
])
def test_bad_push_flags_are_refused(tmp_path, zim_env, flags):
    result = subprocess.run([sys.executable, "-m", "zim", "--data", str(tmp_path), *flags],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path, env=zim_env)
    assert result.returncode == 2, result.stderr
    assert flags[0] in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("settings, message", [
    ({"push_window_ms": -1}, "push_window_ms must be between 0"),
    ({"push_window_ms": 100, "push_max": 0}, "push_max must be between 1"),
    ({"push_window_ms": 2.5}, "push_window_ms must be an integer"),
])
def test_bad_push_settings_raise_before_starting(tmp_path, settings, message):
    from zim.app import App

    with pytest.raises(ValueError, match=message):
        App().run(tcp=None, ws=None, data=str(tmp_path), **settings)
    assert not (tmp_path / "zim.db").exists()       # nothing was opened


@pytest.mark.parametrize("workers", ["1", "2"])
def test_open_slices_are_pushed_when_the_server_stops(start_server, workers):
    """SIGTERM in the middle of a long window: the members get the slice's 103 before
    their connections close (with workers too, which must not stop before it reaches them)."""
    srv = start_server(merging(window_ms=30_000, workers=workers))
    channel = unique("stopping")
    sender = member(srv, channel, name="sender")
    readers = [member(srv, channel, kind) for kind in ("tcp", "ws", "tcp")]
    send_all(sender, channel, ["last", "words"])
    srv.signal_and_check()
    for reader in readers:
        assert contents(batch(reader, channel)) == ["last", "words"]
