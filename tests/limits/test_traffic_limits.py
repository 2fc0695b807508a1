"""Traffic control: send rate limits, the output cap for slow consumers, the
channel push policy, and the flags that set them.

Every test runs a real server with the flags under test; the numbers asserted
come from what the clients see (responses, pushes, history) and from the
server's process tree (psutil).
"""
from __future__ import annotations

import math
import socket
import threading
import time

import psutil
import pytest

from zim import App
from zim.limits import SendLimits, TokenBuckets
from tests.support.client import TcpClient, error_code, unique

SEND_USER, SUBSCRIBE, SEND_CHANNEL, HISTORY, HEARTBEAT = 2, 3, 4, 5, 9
PUSH_CHANNEL = 102
NO_LIMITS = ("--user-rate", "0", "--channel-rate", "0")


def member(srv, channel: str, push: bool | None = None) -> TcpClient:
    client = srv.tcp_client(timeout=20)
    client.login(unique("m"))
    body: dict = {"name": channel}
    if push is not None:
        body["push"] = push
    client.ok(SUBSCRIBE, body)
    return client


def pipelined(client: TcpClient, requests: list[tuple[int, dict]]) -> tuple[list[dict], float]:
    """Send every request before reading any answer; the answers in order and the
    seconds from the first send to the last answer."""
    start = time.monotonic()
    seqs = [client.send(action, body) for action, body in requests]
    answers = [client.wait_response(seq, timeout=20)[2] for seq in seqs]
    return answers, time.monotonic() - start


def most_accepted(rate: float, seconds: float) -> int:
    """What a bucket of ``rate`` (burst one second's worth) can accept in ``seconds``."""
    return math.floor(max(1.0, rate) + rate * seconds) + 1


def history_seqs(client: TcpClient, channel: str) -> list[int]:
    """Every seq in the channel's history, oldest first (paged)."""
    seqs: list[int] = []
    before = None
    while True:
        body: dict = {"channel": channel, "limit": 100}
        if before is not None:
            body["beforeSeq"] = before
        page = client.ok(HISTORY, body)
        seqs[:0] = [msg["seq"] for msg in page["messages"]]
        if not page["hasMore"]:
            return seqs
        before = page["messages"][0]["seq"]


# ------------------------------------------------------------ channel rate


@pytest.mark.parametrize("workers", ["1", "2"])
def test_channel_burst_is_cut_to_the_rate_then_recovers(start_server, workers):
    srv = start_server(flags=("--workers", workers, "--channel-rate", "40", "--user-rate", "0"))
    channel = unique("burst")
    sender, reader = member(srv, channel), member(srv, channel)

    answers, seconds = pipelined(sender, [(SEND_CHANNEL, {"channel": channel, "content": f"m{i}"})
                                          for i in range(300)])
    codes = [error_code(answer) for answer in answers]
    assert set(codes) <= {None, "rate_limited"}, codes
    accepted = [answer for answer, code in zip(answers, codes) if code is None]
    # the burst (40) passes, plus what refilled while the 300 were being answered
    assert 40 <= len(accepted) <= most_accepted(40, seconds), (len(accepted), seconds)
    assert codes[:40] == [None] * 40            # the first 40 find a full bucket
    assert [a["seq"] for a in accepted] == list(range(1, len(accepted) + 1))     # no gaps
    # refused sends were not stored, nor pushed
    assert history_seqs(sender, channel) == list(range(1, len(accepted) + 1))
    pushes = reader.recv_pushes(len(accepted), timeout=10)
    assert [body["seq"] for _, body in pushes] == list(range(1, len(accepted) + 1))
    reader.assert_no_push(0.2)

    # the limit is per channel: another channel is not held back meanwhile
    other = unique("other")
    sender.ok(SUBSCRIBE, {"name": other})
    sender.ok(SEND_CHANNEL, {"channel": other, "content": "elsewhere"})

    # a second later the bucket is full again: a whole burst is accepted
    time.sleep(1.1)
    answers, _ = pipelined(sender, [(SEND_CHANNEL, {"channel": channel, "content": f"again{i}"})
                                    for i in range(40)])
    assert [error_code(answer) for answer in answers] == [None] * 40
    first = len(accepted) + 1
    assert [a["seq"] for a in answers] == list(range(first, first + 40))


def worker_pid(srv, client: TcpClient) -> int:
    """The pid of the process holding the server side of ``client``'s connection."""
    address = client.sock.getsockname()
    root = psutil.Process(srv.proc.pid)
    for proc in (root, *root.children()):
        if any(conn.raddr == address for conn in proc.net_connections("tcp")):
            return proc.pid
    raise AssertionError(f"no server process holds {address}")


def members_on_every_worker(srv, channel: str, workers: int, per_worker: int = 2) -> list[TcpClient]:
    """Members of ``channel``, ``per_worker`` on each worker (the kernel spreads
    connections over the workers' listeners; keep connecting until it has)."""
    chosen: dict[int, list[TcpClient]] = {}
    deadline = time.monotonic() + 15
    while len(chosen) < workers or min(map(len, chosen.values())) < per_worker:
        assert time.monotonic() < deadline, f"connections reached only {len(chosen)} workers"
        client = srv.tcp_client()
        client.ok(HEARTBEAT)
        group = chosen.setdefault(worker_pid(srv, client), [])
        if len(group) < per_worker:
            group.append(client)
        else:
            client.close()
    clients = [client for group in chosen.values() for client in group]
    for client in clients:
        client.login(unique("m"))
        client.ok(SUBSCRIBE, {"name": channel})
    return clients


@pytest.mark.parametrize("workers", [1, 2])
def test_channel_rate_is_shared_by_all_senders(start_server, workers):
    """The channel's bucket counts every member's sends, not each sender's, on
    whichever worker each sender is (the handlers, and the buckets, are in one process)."""
    srv = start_server(flags=("--workers", str(workers), "--channel-rate", "20", "--user-rate", "0"))
    channel = unique("shared")
    senders = members_on_every_worker(srv, channel, workers)
    start = time.monotonic()
    seqs = [(sender, sender.send(SEND_CHANNEL, {"channel": channel, "content": "x"}))
            for _ in range(20) for sender in senders]
    codes = [error_code(sender.wait_response(seq, timeout=20)[2]) for sender, seq in seqs]
    seconds = time.monotonic() - start
    assert set(codes) <= {None, "rate_limited"}
    assert 20 <= codes.count(None) <= most_accepted(20, seconds), (codes.count(None), seconds)
    assert len(history_seqs(senders[0], channel)) == codes.count(None)


def test_default_channel_rate_is_40(start_server):
    srv = start_server()
    channel = unique("default")
    sender = member(srv, channel)
    answers, seconds = pipelined(sender, [(SEND_CHANNEL, {"channel": channel, "content": "x"})
                                          for _ in range(100)])
    accepted = sum(error_code(answer) is None for answer in answers)
    assert 40 <= accepted <= most_accepted(40, seconds), (accepted, seconds)


# ------------------------------------------------------------ user rate


def test_user_rate_counts_private_and_channel_sends_together(start_server):
    srv = start_server(flags=("--user-rate", "10", "--channel-rate", "0"))
    channel = unique("user-rate")
    sender, other = member(srv, channel), member(srv, channel)
    receiver = srv.tcp_client()
    receiver.login(unique("receiver"))
    closed = unique("closed")
    receiver.ok(SUBSCRIBE, {"name": closed})       # a channel the sender is not in
    requests = []
    for i in range(8):
        requests.append((SEND_USER, {"receiverId": receiver.user_id, "content": f"dm{i}"}))
        requests.append((SEND_CHANNEL, {"channel": channel, "content": f"ch{i}"}))
    answers, seconds = pipelined(sender, requests)
    # the bucket is empty now: the action's own rules still come first (not_found,
    # forbidden, bad_request are answered as such), and other actions pass
    assert sender.error(SEND_USER, {"receiverId": "12345", "content": "x"}) == "not_found"
    assert sender.error(SEND_CHANNEL, {"channel": unique("nowhere"), "content": "x"}) == "not_found"
    assert sender.error(SEND_CHANNEL, {"channel": closed, "content": "x"}) == "forbidden"
    assert sender.error(SEND_CHANNEL, {"channel": channel}) == "bad_request"
    sender.ok(HEARTBEAT)
    assert sender.error(SEND_USER, {"receiverId": receiver.user_id, "content": "x"}) == "rate_limited"
    codes = [error_code(answer) for answer in answers]
    assert set(codes) <= {None, "rate_limited"}, codes
    assert codes[:10] == [None] * 10            # the burst: 5 of each kind
    accepted = codes.count(None)
    assert 10 <= accepted <= most_accepted(10, seconds), (accepted, seconds)
    private_ok = sum(code is None for (action, _), code in zip(requests, codes) if action == SEND_USER)
    channel_ok = accepted - private_ok
    assert len(receiver.ok(HISTORY, {"userId": sender.user_id, "limit": 100})["messages"]) == private_ok
    assert history_seqs(sender, channel) == list(range(1, channel_ok + 1))
    assert len(receiver.ok(7, {})["messages"]) == private_ok      # the mailbox too

    # the limit is per user: another member of the same channel still sends
    other.ok(SEND_CHANNEL, {"channel": channel, "content": "mine"})

    time.sleep(1.1)     # refilled
    answers, _ = pipelined(sender, [(SEND_USER, {"receiverId": receiver.user_id, "content": "later"})] * 10)
    assert [error_code(answer) for answer in answers] == [None] * 10


def test_zero_turns_both_limits_off(start_server):
    srv = start_server(flags=NO_LIMITS)
    channel = unique("unlimited")
    sender = member(srv, channel)
    receiver = srv.tcp_client()
    receiver.login(unique("receiver"))
    answers, _ = pipelined(sender, [(SEND_CHANNEL, {"channel": channel, "content": "x"})] * 300
                           + [(SEND_USER, {"receiverId": receiver.user_id, "content": "y"})] * 100)
    assert [error_code(answer) for answer in answers] == [None] * 400
    assert len(history_seqs(sender, channel)) == 300


# ------------------------------------------------------------ push policy


@pytest.mark.parametrize("workers", ["1", "2"])
def test_channel_push_off_makes_members_read_by_history(start_server, workers):
    srv = start_server(flags=("--workers", workers, "--channel-push", "off", *NO_LIMITS))
    channel = unique("quiet")
    sender = member(srv, channel)
    silent = member(srv, channel)                # no "push" field: the policy says off
    pushed = member(srv, channel, push=True)     # asked for pushes explicitly
    for i in range(3):
        sender.ok(SEND_CHANNEL, {"channel": channel, "content": f"m{i}"})
    assert [body["seq"] for _, body in pushed.recv_pushes(3)] == [1, 2, 3]
    silent.assert_no_push(0.3)
    assert history_seqs(silent, channel) == [1, 2, 3]
    # the stored flag is what counts after a new login, too
    again = srv.tcp_client()
    again.login(silent.name, token=silent.token)
    sender.ok(SEND_CHANNEL, {"channel": channel, "content": "after"})
    assert pushed.recv_push()[1]["seq"] == 4
    again.assert_no_push(0.3)
    silent.assert_no_push(0)


def test_channel_push_on_by_default(start_server):
    srv = start_server(flags=NO_LIMITS)
    channel = unique("loud")
    sender, plain = member(srv, channel), member(srv, channel)
    history_only = member(srv, channel, push=False)
    sender.ok(SEND_CHANNEL, {"channel": channel, "content": "hi"})
    action, body = plain.recv_push()
    assert (action, body["content"]) == (PUSH_CHANNEL, "hi")
    history_only.assert_no_push(0.3)


# ------------------------------------------------------------ slow consumers


def tree_rss(root: psutil.Process) -> int:
    """RSS of a process and all its descendants (the server and its writer)."""
    total = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def bytes_until_closed(sock: socket.socket, timeout: float = 20.0) -> int:
    """How many bytes arrive before the server ends the connection (EOF or reset)."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        assert time.monotonic() < deadline, f"the connection stayed open ({total} bytes read)"
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return total
        if not chunk:
            return total
        total += len(chunk)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_non_reading_member_is_cut_at_max_outbuf(start_server, workers):
    """80 MB to a channel with a member that never reads: the server stays bounded,
    cuts that member, and serves a member that reads every message in order."""
    messages, size = 1000, 80_000
    srv = start_server(flags=("--workers", workers, "--max-outbuf", "8MiB", "--max-packet", "131072",
                              *NO_LIMITS))
    channel = unique("flood")
    stalled = member(srv, channel)     # default buffers: the kernel holds a few MB of it
    reader = member(srv, channel)
    sender = member(srv, channel, push=False)
    server = psutil.Process(srv.proc.pid)
    baseline = tree_rss(server)
    peak = baseline
    received: list[int] = []
    failure: list[BaseException] = []

    def read_all() -> None:
        try:
            for _ in range(messages):
                action, body = reader.recv_push(timeout=60)
                assert action == PUSH_CHANNEL and len(body["content"]) == size
                received.append(body["seq"])
        except BaseException as exc:        # reported by the main thread
            failure.append(exc)

    reading = threading.Thread(target=read_all, daemon=True)
    reading.start()
    window = 16
    in_flight: list[int] = []
    content = "z" * size
    for i in range(messages):
        in_flight.append(sender.send(SEND_CHANNEL, {"channel": channel, "content": content}))
        if len(in_flight) >= window:
            assert error_code(sender.wait_response(in_flight.pop(0), timeout=30)[2]) is None
        if i % 50 == 0:
            peak = max(peak, tree_rss(server))
    for seq in in_flight:
        assert error_code(sender.wait_response(seq, timeout=30)[2]) is None
    reading.join(90)
    peak = max(peak, tree_rss(server))
    assert not failure, failure
    assert received == list(range(1, messages + 1))
    growth = peak - baseline
    assert growth < 150 * 2**20, f"server tree RSS grew by {growth / 2**20:.0f} MiB"

    # the stalled member was cut: the server holds no socket to it any more...
    address = stalled.sock.getsockname()
    assert not [conn for proc in (server, *server.children(recursive=True))
                for conn in proc.net_connections("tcp") if conn.raddr == address]
    # ...and what it can still read (the kernel's queues) ends in EOF or a reset,
    # maybe inside a packet, long before the 80 MB sent
    got = bytes_until_closed(stalled.sock)
    assert got < messages * size // 2, got
    srv.assert_alive()
    sender.ok(HEARTBEAT)


# ------------------------------------------------------------ the buckets themselves


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_refill_and_purge():
    clock = Clock()
    limits = SendLimits(user_rate=0, channel_rate=40, clock=clock)
    admitted = sum(limits.refusal("u", "room") is None for _ in range(100))
    assert admitted == 40
    clock.now += 0.5            # half a second: 20 tokens back
    assert sum(limits.refusal("u", "room") is None for _ in range(100)) == 20
    assert len(limits.channels) == 1
    clock.now += 0.99
    limits.purge()
    assert len(limits.channels) == 1            # not quite full yet: kept
    clock.now += 0.02
    limits.purge()
    assert len(limits.channels) == 0            # full again: no state at all
    assert sum(limits.refusal("u", "room") is None for _ in range(100)) == 40


def test_slow_rate_still_allows_one_message():
    clock = Clock()
    buckets = TokenBuckets(0.5)                 # one message every two seconds
    assert buckets.burst == 1
    assert buckets.has_token("k", clock.now)
    buckets.take("k", clock.now)
    assert not buckets.has_token("k", clock.now + 1.9)
    assert buckets.has_token("k", clock.now + 2.0)


def test_refused_send_takes_no_token():
    """A channel that refuses must not use up the sender's own tokens."""
    clock = Clock()
    limits = SendLimits(user_rate=5, channel_rate=1, clock=clock)
    assert limits.refusal("u", "room") is None
    assert "room" in limits.refusal("u", "room")
    for _ in range(4):
        assert limits.refusal("u", None) is None        # the user still had 4 tokens
    assert "per user" in limits.refusal("u", None)


# ------------------------------------------------------------ bad values


@pytest.mark.parametrize("arguments", [
    {"user_rate": -1}, {"channel_rate": float("nan")}, {"channel_rate": float("inf")},
    {"channel_rate": "40"}, {"user_rate": True}, {"user_rate": 1e12},
    {"max_outbuf": 1024}, {"max_outbuf": 2**31}, {"max_outbuf": 8.5 * 2**20},
    {"max_outbuf": 4 * 2**20, "max_packet": 4 * 2**20}, {"channel_push": "off"},
])
def test_app_run_rejects_bad_values(tmp_path, arguments):
    data = tmp_path / "data"
    with pytest.raises(ValueError):
        App().run(tcp="127.0.0.1:0", ws=None, data=str(data), **arguments)
    assert not data.exists()        # refused before anything started
