"""Huge groups: one channel whose members are spread over every worker of ``--workers 4``.

A channel message crosses from the router to each worker holding members once,
and each worker fans it out to its own members in C. These tests hold 2,000
member connections (raw sockets driven from one epoll loop in this process, plus
a few WebSocket members) and check, packet by packet, that every member gets
every message exactly once and in seq order, that the sending connection gets
none of its own (the sender's other device does), and that members who leave,
turn pushes off, disconnect or join between messages get exactly what they
should. Which worker holds a connection is read from the kernel (psutil).
"""
from __future__ import annotations

import select
import socket
import time
from collections import Counter

import orjson
import pytest

from tests.support.servers import ServerProcess
from tests.server.test_workers import port_owners, worker_processes
from tests.support.client import TcpClient, WsClient, ZimClient, tcp_packet, unique
from zim.client import split_tcp

WORKERS = 4
MEMBERS = 2000
LOGIN, SUBSCRIBE, SEND_CHANNEL, UNSUBSCRIBE = 1, 3, 4, 6
PUSH_CHANNEL = 102
TIMEOUT = 15.0


class Crowd:
    """Many TCP member connections of one test, read from one epoll loop.

    Each connection keeps only its socket, an input buffer and the packets
    received so far (action, seq, decoded body), in arrival order.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.inbuf: dict[int, bytearray] = {}
        self.packets: dict[int, list[tuple[int, int, dict]]] = {}

    def open(self, count: int, channel: str, prefix: str) -> list[int]:
        """Connect ``count`` members; each logs in as a new user and subscribes
        (both requests in one write). Returns their fds once all are answered."""
        subscribe = tcp_packet(SUBSCRIBE, 2, {"name": channel})
        fds = []
        for number in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(tcp_packet(LOGIN, 1, {"name": f"{prefix}-{number}"}) + subscribe)
            sock.setblocking(False)
            fd = sock.fileno()
            self.socks[fd] = sock
            self.inbuf[fd] = bytearray()
            self.packets[fd] = []
            self.epoll.register(fd, select.EPOLLIN)
            fds.append(fd)
        self.wait_answers(fds, SUBSCRIBE, 2)
        return fds

    def send_all(self, fds: list[int], action: int, seq: int, body: dict) -> None:
        packet = tcp_packet(action, seq, body)
        for fd in fds:
            self.socks[fd].sendall(packet)

    def close(self, fds: list[int]) -> None:
        for fd in fds:
            self.epoll.unregister(fd)
            self.socks.pop(fd).close()

    def close_all(self) -> None:
        self.close(list(self.socks))
        self.epoll.close()

    def pump(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout`` and split it into packets."""
        for fd, _ in self.epoll.poll(timeout):
            try:
                data = self.socks[fd].recv(1 << 16)
            except BlockingIOError:
                continue
            assert data, f"the server closed member fd {fd}"
            buf = self.inbuf[fd]
            buf += data
            self.packets[fd] += [(action, seq, orjson.loads(body or b"{}")) for action, seq, body in split_tcp(buf)]

    def wait_until(self, done, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.pump(0.05)

    def wait_answers(self, fds: list[int], action: int, seq: int) -> None:
        """Every fd has its answer to (action, seq), and none is an error."""
        def answered(fd: int) -> bool:
            return any(a == action and s == seq for a, s, _ in self.packets[fd])

        self.wait_until(lambda: all(answered(fd) for fd in fds), f"{len(fds)} answers to action {action}")
        for fd in fds:
            for a, s, body in self.packets[fd]:
                assert "error" not in body, f"member fd {fd}: action {a} seq {s} failed: {body}"

    def pushes(self, fd: int) -> list[int]:
        """The seqs of the channel pushes this member received, in arrival order."""
        return [body["seq"] for action, seq, body in self.packets[fd] if action == PUSH_CHANNEL]

    def local_port(self, fd: int) -> int:
        return self.socks[fd].getsockname()[1]


def owners_of(server: ServerProcess, ports: list[int]) -> list[int]:
    """The worker pid holding each client port (the clients have had a round trip)."""
    owners = port_owners(server)
    missing = [port for port in ports if port not in owners]
    assert not missing, f"{len(missing)} client ports are on no worker"
    return [owners[port] for port in ports]


def send_messages(sender: ZimClient, channel: str, count: int) -> list[int]:
    """Send ``count`` channel messages pipelined; their seqs, in order."""
    seqs = [sender.send(SEND_CHANNEL, {"channel": channel, "content": f"m{i}"}) for i in range(count)]
    return [sender.wait_response(seq, TIMEOUT)[2]["seq"] for seq in seqs]


def take_channel_pushes(client: ZimClient, count: int) -> list[int]:
    return [body["seq"] for action, body in client.recv_pushes(count, TIMEOUT) if action == PUSH_CHANNEL]


@pytest.fixture
def workers_server(start_server) -> ServerProcess:
    # no channel rate limit: the bursts here are a test of delivery, not of the limit
    return start_server(flags=("--workers", str(WORKERS), "--channel-rate", "0"))


def test_channel_of_2000_members_over_every_worker(workers_server: ServerProcess) -> None:
    srv = workers_server
    channel = unique("huge")
    crowd = Crowd(srv.tcp_port)
    try:
        members = crowd.open(MEMBERS, channel, "member")
        ws_members = [srv.ws_client() for _ in range(8)]
        for number, client in enumerate(ws_members):
            client.login(f"ws-member-{number}")
            client.ok(SUBSCRIBE, {"name": channel})

        # every worker holds members: the fan-out really crosses to all of them
        owners = owners_of(srv, [crowd.local_port(fd) for fd in members])
        per_worker = Counter(owners)
        assert len(worker_processes(srv)) == WORKERS
        assert len(per_worker) == WORKERS, f"members on only {len(per_worker)} workers: {per_worker}"
        worker_of = dict(zip(members, owners))

        # the sender, and a second device of the same user on another worker
        sender = srv.tcp_client()
        login = sender.login(unique("sender"))
        sender.ok(SUBSCRIBE, {"name": channel})
        sender_worker = owners_of(srv, [sender.sock.getsockname()[1]])[0]
        device = None
        for _ in range(40):
            candidate = srv.tcp_client()
            candidate.login("sender", token=login["token"])
            if owners_of(srv, [candidate.sock.getsockname()[1]])[0] != sender_worker:
                device = candidate
                break
            candidate.close()
        assert device is not None, "40 connections all landed on the sender's worker"

        first = send_messages(sender, channel, 5)
        assert first == sorted(first) and len(set(first)) == 5
        crowd.wait_until(lambda: all(len(crowd.pushes(fd)) >= 5 for fd in members), "the first 5 pushes")
        assert take_channel_pushes(device, 5) == first
        for client in ws_members:
            assert take_channel_pushes(client, 5) == first

        # between messages: some leave, some turn pushes off, a whole worker's members
        # disconnect, and new members join (spread over the workers by the kernel)
        gone_worker = owners[0]
        disconnected = [fd for fd in members if worker_of[fd] == gone_worker]
        staying = [fd for fd in members if worker_of[fd] != gone_worker]
        leavers, silenced, kept = staying[:150], staying[150:200], staying[200:]
        crowd.send_all(leavers, UNSUBSCRIBE, 3, {"name": channel})
        crowd.send_all(silenced, SUBSCRIBE, 4, {"name": channel, "push": False})
        crowd.wait_answers(leavers, UNSUBSCRIBE, 3)
        crowd.wait_answers(silenced, SUBSCRIBE, 4)
        crowd.close(disconnected)
        joiners = crowd.open(300, channel, "joiner")
        assert set(owners_of(srv, [crowd.local_port(fd) for fd in joiners])) == set(per_worker), \
            "300 joiners did not reach every worker"

        second = send_messages(sender, channel, 3)
        assert second[0] == first[-1] + 1
        crowd.wait_until(lambda: all(len(crowd.pushes(fd)) >= 3 for fd in joiners), "the joiners' pushes")
        crowd.wait_until(lambda: all(len(crowd.pushes(fd)) >= 8 for fd in kept), "the members' 8 pushes")
        assert take_channel_pushes(device, 3) == second
        for client in ws_members:
            assert take_channel_pushes(client, 3) == second

        # a round trip on every connection, then nothing more came: exactly once each
        for fd in members + joiners:
            if fd in crowd.socks:
                crowd.socks[fd].sendall(tcp_packet(9, 5))
        live = [fd for fd in members + joiners if fd in crowd.socks]
        crowd.wait_answers(live, 9, 5)
        wrong = {fd: crowd.pushes(fd) for fd in kept if crowd.pushes(fd) != first + second}
        assert not wrong, f"{len(wrong)} members got the wrong pushes, e.g. {list(wrong.items())[:3]}"
        wrong = {fd: crowd.pushes(fd) for fd in joiners if crowd.pushes(fd) != second}
        assert not wrong, f"{len(wrong)} joiners got the wrong pushes, e.g. {list(wrong.items())[:3]}"
        wrong = {fd: crowd.pushes(fd) for fd in leavers + silenced if crowd.pushes(fd) != first}
        assert not wrong, f"{len(wrong)} leavers got pushes after leaving, e.g. {list(wrong.items())[:3]}"
        sender.sync()
        assert not [p for p in sender.pushes if p[0] == PUSH_CHANNEL], "the sending connection got its own"
        device.assert_no_push()
        srv.assert_alive()
    finally:
        crowd.close_all()


def test_members_of_one_user_on_several_workers_get_one_copy_each(workers_server: ServerProcess) -> None:
    """A user with a connection on every worker: each connection gets each message
    once, though the user's membership is known to every worker."""
    srv = workers_server
    channel = unique("devices")
    first = srv.tcp_client()
    login = first.login(unique("many-devices"))
    first.ok(SUBSCRIBE, {"name": channel})
    devices: list[ZimClient] = [first]
    seen = {owners_of(srv, [first.sock.getsockname()[1]])[0]}
    for _ in range(60):
        if len(seen) == WORKERS:
            break
        client: ZimClient = srv.tcp_client()
        client.login("many-devices", token=login["token"])
        worker = owners_of(srv, [client.sock.getsockname()[1]])[0]
        if worker in seen:
            client.close()
            continue
        seen.add(worker)
        devices.append(client)
    assert len(seen) == WORKERS, f"60 connections reached only {len(seen)} workers"
    sender: TcpClient | WsClient = srv.ws_client()
    sender.login(unique("sender"))
    sender.ok(SUBSCRIBE, {"name": channel})
    sent = send_messages(sender, channel, 4)
    for device in devices:
        assert take_channel_pushes(device, 4) == sent
        device.assert_no_push()
