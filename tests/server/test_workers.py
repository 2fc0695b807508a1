"""Multi-worker mode (``--workers 4``) against real server processes.

Which worker a client landed on is read from the kernel: the client's local port
appears as the remote port of one of the worker processes' sockets (psutil). The
tests check that users on different workers reach each other exactly as on one
worker, that seq stays gap-free under concurrent senders on several workers,
and the process lifecycle: a killed worker is replaced, SIGTERM stops everything
with exit code 0, a SIGKILLed supervisor leaves no orphan worker.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import psutil
import pytest

from tests.support import wait_for
from tests.support.servers import ServerProcess
from tests.support.client import (Closed, RawWs, TcpClient, WsClient, ZimClient, error_code, tcp_packet,
                       unique, ws_frame, ws_message)
from zim.client import split_tcp

WORKERS = 4
WORKER_FLAGS = ("--workers", str(WORKERS), "--channel-rate", "0")     # bursts on purpose
RESTART_TIMEOUT = 5.0       # a killed worker is replaced within this
EXIT_TIMEOUT = 3.0          # workers are gone this long after their supervisor died

Conn = ZimClient | RawWs


# ---------------------------------------------------------------------------
# processes and sockets


def worker_processes(server: ServerProcess) -> list[psutil.Process]:
    """The supervisor's live worker children (zombies not counted)."""
    try:
        children = psutil.Process(server.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "zim.worker" in child.cmdline():
                workers.append(child)
        except psutil.NoSuchProcess:
            continue
    return workers


def gone(process: psutil.Process) -> bool:
    """The process has exited (reaped, or a zombie nobody reaped yet)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def local_port(client: Conn | socket.socket) -> int:
    if isinstance(client, socket.socket):
        return client.getsockname()[1]
    if isinstance(client, (TcpClient, RawWs)):
        return client.sock.getsockname()[1]
    assert isinstance(client, WsClient)
    return client.ws.socket.getsockname()[1]


def port_owners(server: ServerProcess) -> dict[int, int]:
    """Client port -> pid of the worker holding the server side of that connection."""
    owners: dict[int, int] = {}
    server_ports = {server.tcp_port, server.ws_port}
    for worker in worker_processes(server):
        try:
            connections = worker.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            if conn.raddr and conn.laddr.port in server_ports and conn.raddr.ip == server.host:
                owners[conn.raddr.port] = worker.pid
    return owners


def workers_of(server: ServerProcess, clients: Sequence[Conn | socket.socket]) -> list[int]:
    """The worker pid of each client. The clients must have had a round trip (so the
    worker has accepted them)."""
    owners = port_owners(server)
    result = []
    for client in clients:
        port = local_port(client)
        assert port in owners, f"client port {port} is on no worker of {sorted(set(owners.values()))}"
        result.append(owners[port])
    return result


# ---------------------------------------------------------------------------
# pipelined requests over many clients


def call_all(requests: Iterable[tuple[ZimClient, int, dict | None]], timeout: float = 15.0) -> list[dict]:
    """Send every request first, then collect the responses (bodies, in request order)."""
    requests = list(requests)
    seqs = [client.send(action, body) for client, action, body in requests]
    deadline = time.monotonic() + timeout
    results = []
    for (client, action, body), seq in zip(requests, seqs):
        try:
            got_action, _, result = client.wait_response(seq, max(0.05, deadline - time.monotonic()))
        except (TimeoutError, Closed) as exc:
            raise AssertionError(f"no response to action {action} {body!r} on a {client.kind} client "
                                 f"(user {client.user_id}): {exc}") from None
        assert got_action == action, f"response action {got_action} to request action {action}"
        results.append(result)
    return results


def ok_all(requests: Iterable[tuple[ZimClient, int, dict | None]], timeout: float = 15.0) -> list[dict]:
    requests = list(requests)
    results = call_all(requests, timeout)
    for (client, action, body), result in zip(requests, results):
        assert error_code(result) is None, f"action {action} {body!r} (user {client.user_id}) failed: {result}"
    return results


def login_all(clients: Sequence[ZimClient], names: Sequence[str],
              tokens: Sequence[str | None] | None = None) -> None:
    tokens = tokens or [None] * len(clients)
    bodies = [{"name": name} if token is None else {"name": name, "token": token}
              for name, token in zip(names, tokens)]
    results = ok_all((client, 1, body) for client, body in zip(clients, bodies))
    for client, name, result in zip(clients, names, results):
        client.user_id, client.token, client.name = result["id"], result["token"], name


def sync_all(clients: Sequence[ZimClient]) -> None:
    """A heartbeat round trip on every client."""
    ok_all((client, 9, None) for client in clients)


def take_pushes(clients: Sequence[ZimClient], count: int, timeout: float = 15.0) -> list[list[tuple[int, dict]]]:
    """``count`` pushes from every client (one deadline for all)."""
    deadline = time.monotonic() + timeout
    result = []
    for client in clients:
        got = []
        for _ in range(count):
            try:
                got.append(client.recv_push(max(0.05, deadline - time.monotonic())))
            except (TimeoutError, Closed) as exc:
                raise AssertionError(f"{client.kind} client of user {client.user_id} got {len(got)} of "
                                     f"{count} pushes: {got} ({exc})") from None
        result.append(got)
    return result


def assert_no_more_pushes(clients: Sequence[ZimClient], settle: float = 0.3) -> None:
    """Nothing more arrives: a pause for stragglers, a round trip, then no pushes."""
    time.sleep(settle)
    sync_all(clients)
    extra = [(client.kind, client.user_id, client.pushes[:3]) for client in clients if client.pushes]
    assert not extra, f"{len(extra)} clients got unexpected extra pushes, e.g. {extra[:3]}"


def open_client(server: ServerProcess, kind: str) -> ZimClient:
    return server.tcp_client() if kind == "tcp" else server.ws_client()


def spread_clients(server: ServerProcess, count: int, min_workers: int, kinds: Sequence[str] = ("tcp", "ws"),
                   max_tries: int = 48) -> tuple[list[ZimClient], list[int]]:
    """``count`` connected clients (not logged in) spread over at least ``min_workers``
    workers, picked round-robin over the workers from up to ``max_tries`` connections;
    returns them and their worker pids."""
    candidates = [open_client(server, kinds[i % len(kinds)]) for i in range(max_tries)]
    sync_all(candidates)
    by_worker: dict[int, list[ZimClient]] = defaultdict(list)
    for client, pid in zip(candidates, workers_of(server, candidates)):
        by_worker[pid].append(client)
    assert len(by_worker) >= min_workers, \
        f"{max_tries} connections landed on only {len(by_worker)} workers: {Counter(workers_of(server, candidates))}"
    chosen: list[tuple[ZimClient, int]] = []
    while len(chosen) < count and any(by_worker.values()):
        for pid, group in by_worker.items():
            if group and len(chosen) < count:
                chosen.append((group.pop(0), pid))
    for group in by_worker.values():
        for client in group:
            client.close()
    assert len(chosen) == count
    return [c for c, _ in chosen], [pid for _, pid in chosen]


def listening_workers(server: ServerProcess) -> set[int]:
    """Pids of the workers that listen on both server ports."""
    ready = set()
    for worker in worker_processes(server):
        try:
            ports = {c.laddr.port for c in worker.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
        if {server.tcp_port, server.ws_port} <= ports:
            ready.add(worker.pid)
    return ready


def start_workers(factory) -> ServerProcess:
    """A 4-worker server whose every worker listens. (The ports accept as soon as the
    first worker listens; connections made before the others bind all go to it.)"""
    server = factory(flags=WORKER_FLAGS)
    assert wait_for(lambda: len(listening_workers(server)) == WORKERS, 10.0), \
        f"not all {WORKERS} workers listen 10 s after start: {len(worker_processes(server))} workers, " \
        f"{len(listening_workers(server))} listening\n{server.stderr()[-3000:]}"
    return server


@pytest.fixture(scope="module")
def multi(start_module_server) -> ServerProcess:
    """One server with 4 workers shared by the tests that do not kill anything."""
    return start_workers(start_module_server)


@pytest.fixture
def fresh(multi) -> ServerProcess:
    """The shared 4-worker server; this test's clients are closed after it."""
    yield multi
    multi.close_clients()
    multi.assert_alive()


# ---------------------------------------------------------------------------
# 1. 300 users over the workers


USERS = 300


def test_300_users_across_workers(fresh):
    server = fresh
    users = [open_client(server, "tcp" if i % 2 == 0 else "ws") for i in range(USERS)]
    login_all(users, [f"user{i}" for i in range(USERS)])
    worker = dict(zip((u.user_id for u in users), workers_of(server, users)))
    spread = Counter(worker.values())
    assert len(spread) >= 3, f"300 connections landed on only {len(spread)} workers: {spread}"

    # Every user sends one DM to a user on another worker and receives exactly one:
    # sorted by worker, user k writes to user k+shift, where shift >= the largest
    # group keeps both ends on different workers (and shift <= 300 - largest group).
    ordered = sorted(users, key=lambda u: worker[u.user_id])
    shift = max(spread.values())
    assert shift <= USERS - shift, f"one worker holds more than half of the users: {spread}"
    receiver_of = {u.user_id: ordered[(k + shift) % USERS] for k, u in enumerate(ordered)}
    sender_of = {receiver_of[u.user_id].user_id: u for u in users}
    for u in users:
        assert worker[u.user_id] != worker[receiver_of[u.user_id].user_id]
    contents = {u.user_id: f"dm {u.user_id}->{receiver_of[u.user_id].user_id} {'é✓' * (1 + len(u.user_id) % 3)}"
                for u in users}
    sent = ok_all((u, 2, {"receiverId": receiver_of[u.user_id].user_id, "content": contents[u.user_id]})
                  for u in users)
    sent_by = {u.user_id: result for u, result in zip(users, sent)}

    pushes = take_pushes(users, 1)
    for receiver, [(action, message)] in zip(users, pushes):
        sender = sender_of[receiver.user_id]
        response = sent_by[sender.user_id]
        assert action == 101, (receiver.user_id, action, message)
        assert message["id"] == response["id"] and message["seq"] == response["seq"], (message, response)
        assert message["content"] == contents[sender.user_id], message
        assert message["receiverId"] == receiver.user_id, message
        assert message["sender"] == {"id": sender.user_id, "name": sender.name}, message
    assert_no_more_pushes(users)

    # Every user's second device, on another worker than the first: half of the users
    # join the channel before it logs in, the other half after (from the first device).
    channel = unique("all300")
    early, late = users[0::2], users[1::2]
    ok_all((u, 3, {"name": channel}) for u in early)
    devices = second_devices(server, users, worker)
    login_all(devices, [u.name for u in users], [u.token for u in users])
    for u, d in zip(users, devices):
        assert d.user_id == u.user_id, f"resume with the token of {u.user_id} gave {d.user_id}"
    device_worker = dict(zip((d.user_id for d in devices), workers_of(server, devices)))
    for u in users:
        assert device_worker[u.user_id] != worker[u.user_id]

    # the login pushes the unacked mailbox: the one received DM, the same message
    mailbox_pushes = take_pushes(devices, 1)
    for u, [(action, message)] in zip(users, mailbox_pushes):
        assert action == 101 and message["id"] == sent_by[sender_of[u.user_id].user_id]["id"], (u.user_id, message)

    # mailbox and both conversations read the same from both workers
    def reads(conns: Sequence[ZimClient]) -> list[dict]:
        requests = []
        for c in conns:
            requests.append((c, 7, {}))
            requests.append((c, 5, {"userId": receiver_of[c.user_id].user_id, "limit": 100}))
            requests.append((c, 5, {"userId": sender_of[c.user_id].user_id, "limit": 100}))
        return ok_all(requests)

    first_reads, second_reads = reads(users), reads(devices)
    for i, u in enumerate(users):
        mailbox, to_history, from_history = first_reads[3 * i:3 * i + 3]
        assert (mailbox, to_history, from_history) == tuple(second_reads[3 * i:3 * i + 3]), \
            f"user {u.user_id} reads differently on worker {worker[u.user_id]} and " \
            f"{device_worker[u.user_id]}: {first_reads[3 * i:3 * i + 3]} vs {second_reads[3 * i:3 * i + 3]}"
        received = sent_by[sender_of[u.user_id].user_id]
        assert [m["id"] for m in mailbox["messages"]] == [received["id"]], mailbox
        assert received["id"] in [m["id"] for m in from_history["messages"]], from_history
        assert sent_by[u.user_id]["id"] in [m["id"] for m in to_history["messages"]], to_history
    assert_no_more_pushes(users + devices)

    ok_all((u, 3, {"name": channel}) for u in late)
    sender = users[0]
    text = "to all 300 " + "✓" * 10
    result = sender.ok(4, {"channel": channel, "content": text})
    assert result["seq"] == 1, result
    receivers = [c for c in users + devices if c is not sender]
    got = take_pushes(receivers, 1)
    for client, [(action, message)] in zip(receivers, got):
        assert action == 102, (client.kind, client.user_id, action, message)
        assert message["id"] == result["id"] and message["seq"] == 1, message
        assert message["channel"] == channel and message["content"] == text, message
        assert message["sender"] == {"id": sender.user_id, "name": sender.name}, message
    assert_no_more_pushes(users + devices)     # includes: the sending connection got nothing


def second_devices(server: ServerProcess, users: Sequence[ZimClient], worker: dict[str, int],
                   rounds: int = 12) -> list[ZimClient]:
    """For every user a new connection (the other transport) on a worker other than its
    first connection's; connections that land on the same worker are closed and retried."""
    devices: list[ZimClient | None] = [None] * len(users)
    for _ in range(rounds):
        missing = [i for i, d in enumerate(devices) if d is None]
        if not missing:
            break
        tries = [open_client(server, "ws" if users[i].kind == "tcp" else "tcp") for i in missing]
        sync_all(tries)
        for i, client, pid in zip(missing, tries, workers_of(server, tries)):
            if pid != worker[users[i].user_id]:
                devices[i] = client
            else:
                client.close()
    assert all(devices), f"no connection on another worker for {devices.count(None)} users in {rounds} rounds"
    return devices  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# 2. concurrent senders on several workers: one gap-free seq


SENDERS = 8
PER_SENDER = 50
TOTAL = SENDERS * PER_SENDER


def test_concurrent_channel_senders_on_several_workers(fresh):
    server = fresh
    senders, sender_workers = spread_clients(server, SENDERS, min_workers=3)
    listeners, listener_workers = spread_clients(server, 4, min_workers=3, kinds=("ws", "tcp"))
    members = senders + listeners
    login_all(members, [f"s{i}" for i in range(SENDERS)] + [f"l{i}" for i in range(len(listeners))])
    channel = unique("race")
    ok_all((m, 3, {"name": channel}) for m in members)

    start = threading.Barrier(SENDERS, timeout=10)
    outcomes: list[tuple[list[dict], list[tuple[int, dict]]] | BaseException | None] = [None] * SENDERS

    def run(index: int, client: ZimClient) -> None:
        try:
            bodies = [{"channel": channel, "content": f"{index}:{k}"} for k in range(PER_SENDER)]
            seqs = list(range(1, PER_SENDER + 1))
            start.wait()
            if isinstance(client, TcpClient):      # all 50 in one write
                client.send_raw(b"".join(tcp_packet(4, s, b) for s, b in zip(seqs, bodies)))
            else:
                for s, b in zip(seqs, bodies):
                    client.send(4, b, seq=s)
            deadline = time.monotonic() + 20
            responses = []
            for s in seqs:
                action, _, body = client.wait_response(s, max(0.05, deadline - time.monotonic()))
                assert action == 4 and error_code(body) is None, (index, s, body)
                responses.append(body)
            others = TOTAL - PER_SENDER
            while len(client.pushes) < others:
                client._pump(deadline)
            outcomes[index] = (responses, list(client.pushes))
            client.pushes.clear()
        except BaseException as exc:        # reported by the main thread
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a sender thread is stuck"
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            raise AssertionError(f"sender {index} ({senders[index].kind}, worker {sender_workers[index]}) "
                                 f"failed: {outcome!r}") from outcome

    by_seq: dict[int, tuple[str, str]] = {}
    all_seqs = []
    for index, (responses, _) in enumerate(outcomes):       # type: ignore[misc]
        seqs = [r["seq"] for r in responses]
        all_seqs += seqs
        assert seqs == sorted(seqs), f"sender {index}'s messages were stored out of order: {seqs}"
        for k, r in enumerate(responses):
            by_seq[r["seq"]] = (r["id"], f"{index}:{k}")
    duplicates = [s for s, n in Counter(all_seqs).items() if n > 1]
    assert not duplicates, f"seqs given twice: {sorted(duplicates)[:20]}"
    assert sorted(all_seqs) == list(range(1, TOTAL + 1)), \
        f"seqs are not 1..{TOTAL}: missing {sorted(set(range(1, TOTAL + 1)) - set(all_seqs))[:20]}"

    # history, paged from the newest, from a listener on another worker than most senders
    reader = listeners[0]
    history, before = [], None
    for _ in range(TOTAL // 100 + 1):
        query = {"channel": channel, "limit": 100} if before is None else \
            {"channel": channel, "limit": 100, "beforeSeq": before}
        page = reader.ok(5, query)
        history = page["messages"] + history
        if not page["hasMore"]:
            break
        before = page["messages"][0]["seq"]
    assert [m["seq"] for m in history] == list(range(1, TOTAL + 1)), [m["seq"] for m in history][:30]
    for m in history:
        assert (m["id"], m["content"]) == by_seq[m["seq"]], m

    def check_pushes(who: str, pushes: list[tuple[int, dict]], expected: set[int]) -> None:
        assert all(action == 102 for action, _ in pushes), f"{who}: not 102: {pushes[:3]}"
        seqs = [body["seq"] for _, body in pushes]
        assert Counter(seqs) == Counter(expected), \
            f"{who}: {len(seqs)} pushes, missing {sorted(expected - set(seqs))[:10]}, " \
            f"duplicated {[s for s, n in Counter(seqs).items() if n > 1][:10]}"
        assert seqs == sorted(seqs), f"{who}: pushes out of seq order: {seqs[:40]}"
        for _, body in pushes:
            assert (body["id"], body["content"]) == by_seq[body["seq"]], body

    for index, (responses, pushes) in enumerate(outcomes):      # type: ignore[misc]
        own = {r["seq"] for r in responses}
        check_pushes(f"sender {index}", pushes, set(range(1, TOTAL + 1)) - own)
    for index, (listener, pid) in enumerate(zip(listeners, listener_workers)):
        pushes = take_pushes([listener], TOTAL, timeout=10)[0]
        check_pushes(f"listener {index} (worker {pid})", pushes, set(range(1, TOTAL + 1)))
    assert_no_more_pushes(members)


# ---------------------------------------------------------------------------
# 6. pipelined login and requests in one write


def test_login_pipelined_with_requests_in_one_write(fresh):
    server = fresh
    peer = server.tcp_client()
    peer.login("peer")
    channel = unique("pipe")

    def requests() -> list[tuple[int, int, dict]]:
        return [(1, 1, {"name": "piped"}), (3, 2, {"name": channel}),
                (4, 3, {"channel": channel, "content": "first"}),
                (2, 4, {"receiverId": peer.user_id, "content": "hello peer"}),
                (5, 5, {"channel": channel}), (7, 6, {})]

    tcp_socks = [server.raw_tcp() for _ in range(12)]
    ws_socks = [server.raw_ws().handshake() for _ in range(12)]
    for sock in tcp_socks:
        sock.sendall(b"".join(tcp_packet(a, s, b) for a, s, b in requests()))
    for ws in ws_socks:
        ws.send(b"".join(ws_frame(2, ws_message(a, s, b)) for a, s, b in requests()))

    pids = set(workers_of(server, tcp_socks + ws_socks))
    assert len(pids) >= 2, f"24 connections landed on one worker: {pids}"

    def check(name: str, packets: list[tuple[int, int, dict]]) -> None:
        responses = {seq: (action, body) for action, seq, body in packets if seq}
        assert sorted(responses) == [1, 2, 3, 4, 5, 6], f"{name}: responses {packets}"
        for action, seq, body in requests():
            got_action, got = responses[seq]
            assert got_action == action and error_code(got) is None, \
                f"{name}: request action {action} seq {seq} {body} pipelined after the login " \
                f"got action {got_action}: {got}"
        user_id = responses[1][1]["id"]
        assert responses[4][1]["seq"] >= 1
        contents = [(m["sender"]["id"], m["content"]) for m in responses[5][1]["messages"]]
        assert (user_id, "first") in contents, f"{name}: history {responses[5][1]}"

    for i, sock in enumerate(tcp_socks):
        check(f"tcp #{i}", read_tcp_packets(sock, 6))
    for i, ws in enumerate(ws_socks):
        packets: list[tuple[int, int, dict]] = []
        while sum(1 for _, seq, _ in packets if seq) < 6:    # channel pushes (102) may come between
            packets.append(ws.read_packet())
        check(f"ws #{i}", packets)
    pushed = take_pushes([peer], len(tcp_socks + ws_socks))[0]
    assert sorted(body["content"] for _, body in pushed) == ["hello peer"] * 24


def read_tcp_packets(sock: socket.socket, responses: int, timeout: float = 5.0) -> list[tuple[int, int, dict]]:
    """Packets from a raw TCP socket until ``responses`` responses (seq != 0) arrived."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    packets: list[tuple[int, int, dict]] = []
    while sum(1 for _, seq, _ in packets if seq) < responses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; packets so far: {packets}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            raise AssertionError(f"timed out; packets so far: {packets}") from None
        if not chunk:
            raise AssertionError(f"EOF; packets so far: {packets}")
        buf += chunk
        packets += [(action, seq, json.loads(body or b"{}")) for action, seq, body in split_tcp(buf)]
    return packets


# ---------------------------------------------------------------------------
# 3. a worker killed: replaced, the others unaffected, its clients resume


def test_killed_worker_is_replaced_and_clients_resume(start_server):
    server = start_workers(start_server)
    old = {p.pid: p for p in worker_processes(server)}
    assert len(old) == WORKERS
    clients, pids = spread_clients(server, 8, min_workers=3)
    login_all(clients, [f"k{i}" for i in range(len(clients))])
    victim, doomed = clients[0], pids[0]
    others = [(c, p) for c, p in zip(clients, pids) if p != doomed]
    a, a_pid = others[0]
    b = next(c for c, p in others if p != a_pid)

    def dm(sender: ZimClient, receiver: ZimClient, content: str) -> str:
        """A DM that must reach the receiver as one 101 push; returns the message id."""
        result = sender.ok(2, {"receiverId": receiver.user_id, "content": content})
        action, message = receiver.recv_push(3.0)
        assert (action, message["id"], message["content"]) == (101, result["id"], content), (action, message)
        return result["id"]

    def channel_message(sender: ZimClient, receivers: Sequence[ZimClient], content: str) -> None:
        """A channel message that must reach each receiver as one 102 push."""
        result = sender.ok(4, {"channel": room, "content": content})
        for receiver, [(action, message)] in zip(receivers, take_pushes(receivers, 1, timeout=3.0)):
            assert (action, message["id"], message["content"]) == (102, result["id"], content), \
                (receiver.user_id, action, message)

    room = unique("room")
    ok_all((c, 3, {"name": room}) for c in (victim, a, b))
    channel_message(a, [victim, b], "before the kill")
    victim.ok(8, {"ids": [dm(a, victim, "before the kill")]})     # read and acked: not in the mailbox
    os.kill(doomed, signal.SIGKILL)
    killed_at = time.monotonic()
    offline = [a.ok(2, {"receiverId": victim.user_id, "content": "while you were away 1"})]

    # the others keep working while the supervisor replaces the worker
    rounds = 0
    replaced: list[psutil.Process] = []
    while time.monotonic() - killed_at < RESTART_TIMEOUT:
        dm(a, b, f"during {rounds}")
        dm(b, a, f"during back {rounds}")
        rounds += 1
        current = worker_processes(server)
        replaced = [p for p in current if p.pid not in old]
        if len(current) == WORKERS and replaced and replaced[0].pid in listening_workers(server):
            break       # the replacement is up and listening
        time.sleep(0.02)
    current = {p.pid for p in worker_processes(server)}
    assert len(current) == WORKERS and len(replaced) == 1, \
        f"{RESTART_TIMEOUT}s after SIGKILL of worker {doomed}: workers {current} (before: {set(old)})\n" \
        f"{server.stderr()[-3000:]}"
    assert current == (set(old) - {doomed}) | {replaced[0].pid}, (current, set(old), doomed)
    server.assert_alive()

    victim.wait_closed(3.0)     # the victim's connection died with its worker (else TimeoutError)
    offline.append(a.ok(2, {"receiverId": victim.user_id, "content": "while you were away 2"}))

    # the victim reconnects (wherever it lands) and resumes with its token
    again = server.tcp_client()
    assert again.login("k0 again", victim.token)["id"] == victim.user_id
    mailbox = [again.recv_push(3.0) for _ in offline]
    assert [(action, m["id"]) for action, m in mailbox] == [(101, r["id"]) for r in offline], mailbox
    assert [m["id"] for m in again.ok(7)["messages"]] == [r["id"] for r in offline]
    dm(a, again, "welcome back")
    dm(again, b, "i am back")
    channel_message(a, [b, again], "the room after the restart")   # the membership came back with the login
    assert_no_more_pushes([a, b, again])

    # the replacement serves clients too
    newcomer = None
    for _ in range(40):
        client = server.tcp_client()
        client.sync()
        if workers_of(server, [client])[0] == replaced[0].pid:
            newcomer = client
            break
        client.close()
    assert newcomer is not None, f"no connection landed on the replacement worker {replaced[0].pid}"
    newcomer.login("newcomer")
    dm(newcomer, a, "from the new worker")
    dm(b, newcomer, "to the new worker")
    newcomer.ok(3, {"name": room})
    channel_message(b, [a, again, newcomer], "the room reaches the new worker")
    assert_no_more_pushes([a, b, again, newcomer])


# ---------------------------------------------------------------------------
# 4./5. stopping the supervisor


def test_sigterm_stops_supervisor_and_all_workers(start_server):
    server = start_workers(start_server)
    clients, _ = spread_clients(server, 8, min_workers=3)
    login_all(clients, [f"t{i}" for i in range(len(clients))])
    workers = worker_processes(server)
    assert len(workers) == WORKERS
    started = time.monotonic()
    server.signal_and_check(signal.SIGTERM, "to a 4-worker supervisor with 8 clients")   # exit 0 within 5 s
    assert time.monotonic() - started < 5.0
    assert wait_for(lambda: all(gone(p) for p in workers), 1.0), \
        f"workers still running after the supervisor exited: {[p.pid for p in workers if not gone(p)]}"
    for client in clients:
        client.wait_closed(EXIT_TIMEOUT)        # TimeoutError if the connection stays open


def test_sigkill_of_supervisor_leaves_no_orphans(start_server):
    server = start_workers(start_server)
    clients, _ = spread_clients(server, 8, min_workers=3)
    login_all(clients, [f"o{i}" for i in range(len(clients))])
    workers = worker_processes(server)
    assert len(workers) == WORKERS
    server.kill()       # SIGKILL: no chance to stop the workers itself
    assert wait_for(lambda: all(gone(p) for p in workers), EXIT_TIMEOUT), \
        f"orphaned workers {EXIT_TIMEOUT}s after SIGKILL of the supervisor: " \
        f"{[p.pid for p in workers if not gone(p)]}"
    for client in clients:
        client.wait_closed(EXIT_TIMEOUT)        # TimeoutError if the connection stays open
