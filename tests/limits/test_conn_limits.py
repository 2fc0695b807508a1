"""Connections per address (--max-conns-per-address, on by default: 1000) and per user
(--max-conns-per-user), over the whole server, and the address key a handler sees of a
connection not logged in (ctx.peer): real servers, real sockets from several loopback
addresses (127.0.0.0/8 is all local on Linux), one process and two workers."""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
import urllib.error

import psutil
import pytest

from tests.support.servers import HOST, free_port
from tests.server.test_metrics import Scraper
from tests.support.client import Closed, RawWs, TcpClient, ZimClient, decode_body, unique

A, B = "127.0.0.2", "127.0.0.3"     # the crowded address, and another one
REFUSAL_CODE = "too_many_connections"
WAIT = 8.0


class TcpFrom(TcpClient):
    """A TcpClient whose connection comes from ``source``."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 5.0) -> None:
        ZimClient.__init__(self, timeout)
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()


class RawWsFrom(RawWs):
    """A RawWs whose connection comes from ``source``."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 5.0) -> None:
        # RawWs.__init__ would connect from the default address: set its fields here
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.status, self.headers, self.key = "", {}, ""


def tcp_from(srv, source: str) -> TcpFrom:
    return srv._track(TcpFrom(HOST, srv.tcp_port, source))


def ws_from(srv, source: str) -> RawWsFrom:
    return srv._track(RawWsFrom(HOST, srv.ws_port, source))


def served_tcp(srv, source: str) -> TcpFrom:
    """A TCP connection the server accepted and answers (a heartbeat round trip)."""
    client = tcp_from(srv, source)
    client.sync()
    return client


def served_ws(srv, source: str) -> RawWsFrom:
    client = ws_from(srv, source).handshake()
    client.send_packet(9, 1)
    action, seq, body = client.read_packet()
    assert (action, seq) == (9, 1) and "time" in body, body
    return client


def assert_refused_tcp(srv, source: str, limit: int) -> None:
    """The server answers one error packet (action 0, seq 0) and closes."""
    client = tcp_from(srv, source)
    action, seq, raw = client._recv_packet(time.monotonic() + 5)
    assert (action, seq) == (0, 0)
    assert decode_body(raw) == {"error": {"code": REFUSAL_CODE,
                                          "message": f"at most {limit} connections per address"}}
    with pytest.raises(Closed):
        client._recv_packet(time.monotonic() + 5)


def assert_refused_ws(srv, source: str) -> None:
    """An upgrade gets HTTP 429 with Connection: close, then the end of the connection."""
    client = ws_from(srv, source)
    client.send(RawWs.upgrade_request("dGhlIHNhbXBsZSBub25jZQ=="))
    status, headers = client.read_http_head()
    assert status.startswith("HTTP/1.1 429"), status
    assert headers.get("connection", "").lower() == "close", headers
    length = int(headers["content-length"])
    rest = client.expect_eof()
    assert len(rest) == length and b"connections per address" in rest, rest


def start_with_metrics(start_server, *flags: str, default_limits: bool = False):
    """A server with --metrics, once ready (``default_limits``: the flags' defaults, not
    conftest's TEST_LIMITS)."""
    port = free_port()
    srv = start_server(flags=("--metrics", f"{HOST}:{port}", *flags), default_limits=default_limits)
    scraper = Scraper(port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if scraper.get("/readyz")[0] == 200:
                return srv, scraper
        except urllib.error.URLError:
            pass
        assert time.monotonic() < deadline, f"never ready:\n{srv.stderr()}"
        time.sleep(0.05)


def open_connections(scraper: Scraper, count: int) -> None:
    """Wait until the server holds exactly ``count`` client connections."""
    scraper.wait(lambda got: sum(value for (name, _), value in got.items() if name == "zim_connections")
                 == count, f"{count} connections open")


def address_limit_closes(scraper: Scraper) -> float:
    return scraper.value("zim_connections_closed_total", reason="address_limit")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_connections_per_address(start_server, workers):
    srv, scraper = start_with_metrics(start_server, "--workers", workers, "--max-conns-per-address", "5")
    # five from A, TCP and WebSocket together: all served
    first = [served_tcp(srv, A) for _ in range(3)] + [served_ws(srv, A) for _ in range(2)]
    open_connections(scraper, 5)
    # the sixth is refused at once, on either port, with a word to say why
    assert_refused_tcp(srv, A, 5)
    assert_refused_ws(srv, A)
    # another address is not concerned
    others = [served_tcp(srv, B), served_ws(srv, B)]
    # two of A's close: two more from A are served, and the count is exact again after
    first[0].close()
    first[3].close()
    open_connections(scraper, 5)
    again = [served_tcp(srv, A), served_ws(srv, A)]
    assert_refused_tcp(srv, A, 5)
    assert address_limit_closes(scraper) == 3
    for client in first[1:3] + first[4:] + others + again:
        if isinstance(client, TcpFrom):
            client.sync()
    srv.assert_alive()


def test_default_limit_is_a_thousand_per_address(start_server):
    srv, scraper = start_with_metrics(start_server, "--workers", "2", default_limits=True)
    crowd = [tcp_from(srv, A) for _ in range(1000)]
    open_connections(scraper, 1000)             # accepted, spread over both workers
    assert_refused_tcp(srv, A, 1000)
    assert_refused_ws(srv, A)
    served_tcp(srv, B)
    for client in crowd[::100]:
        client.sync()
    assert address_limit_closes(scraper) == 2


def test_no_limit_when_zero(start_server):
    srv, scraper = start_with_metrics(start_server, "--max-conns-per-address", "0")
    clients = [served_tcp(srv, A) for _ in range(20)]
    assert len(clients) == 20 and address_limit_closes(scraper) == 0


# -- the address key a handler sees, and connections per user (an app script) ----------------

APP_SCRIPT = '''
import argparse
import sys

import zim
from zim.limits import ClientLimits

app = zim.App()


@app.route(200, login=False)
def whoami(ctx, body):
    return {"peer": ctx.peer, "worker": ctx.conn >> 56, "user": ctx.user_id}


parser = argparse.ArgumentParser()
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--per-user", type=int, default=0)
parser.add_argument("--per-address", type=int, default=1000)
parser.add_argument("--tcp6", action="store_true", help="TCP on [::1] instead")
args = parser.parse_args(sys.argv[4:])
tcp = sys.argv[1]
if args.tcp6:
    tcp = "[::1]:" + tcp.rpartition(":")[2]
app.run(tcp=tcp, ws=sys.argv[2], data=sys.argv[3], workers=args.workers,
        client_limits=ClientLimits(max_conns_per_user=args.per_user, max_conns_per_address=args.per_address))
'''


def whoami(client) -> dict:
    return client.ok(200)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_handler_sees_the_address_of_a_connection_not_logged_in(start_server, workers):
    srv = start_server(app_script=APP_SCRIPT, flags=("--workers", workers))
    source = "127.0.0.5"
    expected = int(ipaddress.IPv4Address(source))
    tcp = tcp_from(srv, source)
    assert whoami(tcp)["peer"] == expected
    ws = served_ws(srv, source)
    ws.send_packet(200, 2)
    assert ws.read_packet()[2]["peer"] == expected
    assert whoami(tcp_from(srv, "127.0.0.6"))["peer"] == expected + 1
    tcp.login(unique("peer"))
    assert whoami(tcp) == {"peer": None, "worker": whoami(tcp)["worker"], "user": tcp.user_id}


def test_an_ipv6_address_has_one_key_in_every_worker(start_server):
    srv = start_server(app_script=APP_SCRIPT, flags=("--workers", "2", "--tcp6"), wait=False)
    deadline = time.monotonic() + 15
    seen: dict[int, set] = {}
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"not both workers: {seen}\n{srv.stderr()}"
        try:
            client = srv._track(TcpClient("::1", srv.tcp_port))
        except OSError:
            time.sleep(0.05)            # not listening yet
            continue
        answer = whoami(client)
        seen.setdefault(answer["worker"], set()).add(answer["peer"])
        client.close()
    keys = set().union(*seen.values())
    assert len(keys) == 1 and isinstance(next(iter(keys)), int), seen


def test_connections_per_user_over_workers(start_server):
    srv = start_server(app_script=APP_SCRIPT, flags=("--workers", "2", "--per-user", "3"))
    by_worker: dict[int, list] = {0: [], 1: []}
    deadline = time.monotonic() + 15
    while min(len(conns) for conns in by_worker.values()) < 3:
        assert time.monotonic() < deadline, "the kernel never spread the connections"
        client = srv.tcp_client()
        by_worker[whoami(client)["worker"]].append(client)
    (a0, b0, c0), (a1, b1, c1) = by_worker[0][:3], by_worker[1][:3]
    name = unique("many")
    token = a0.login(name)["token"]
    a1.login(name, token)
    b0.login(name, token)
    # three logged in over both workers: a fourth login is refused, on either worker
    body = {"name": name, "token": token}
    assert b1.error(1, body) == REFUSAL_CODE
    assert c0.error(1, body) == REFUSAL_CODE
    # a refused connection stays usable, and is not logged in
    assert whoami(b1)["user"] is None
    # one closes: the count drops (once its worker has told the router)
    a1.close()
    deadline = time.monotonic() + WAIT
    while (result := b1.call(1, body)).get("error"):
        assert result["error"]["code"] == REFUSAL_CODE, result
        assert time.monotonic() < deadline, "the close never counted"
        time.sleep(0.05)
    assert c1.error(1, body) == REFUSAL_CODE
    # another user is not concerned
    c1.login(unique("other"))
    srv.assert_alive()


def test_connections_per_user_single_process(start_server):
    srv = start_server(app_script=APP_SCRIPT, flags=("--per-user", "2"))
    clients = [srv.tcp_client() for _ in range(4)]
    name = unique("few")
    token = clients[0].login(name)["token"]
    clients[1].login(name, token)
    assert clients[2].error(1, {"name": name, "token": token}) == REFUSAL_CODE
    clients[0].close()
    deadline = time.monotonic() + WAIT
    while (result := clients[2].call(1, {"name": name, "token": token})).get("error"):
        assert time.monotonic() < deadline, result
        time.sleep(0.05)
    assert clients[3].error(1, {"name": name, "token": token}) == REFUSAL_CODE


def worker_pid(srv, index: int) -> int:
    for child in psutil.Process(srv.proc.pid).children():
        command = child.cmdline()
        if "zim.worker" in command and command[command.index("--index") + 1] == str(index):
            return child.pid
    raise AssertionError(f"no worker {index}")


def test_a_dead_workers_connections_stop_counting(start_server):
    """Killed, a worker's connections no longer count, per address or per user."""
    srv = start_server(app_script=APP_SCRIPT, flags=("--workers", "2", "--per-user", "2", "--per-address", "4"))
    crowd = [tcp_from(srv, A) for _ in range(4)]
    on = [whoami(client)["worker"] for client in crowd]
    assert_refused_tcp(srv, A, 4)
    doomed = on[0]
    # one user on both workers (connections from addresses of their own until both are seen)
    # (until both workers listen, the kernel gives every connection to the first)
    by_worker: dict[int, list[TcpFrom]] = {0: [], 1: []}
    deadline = time.monotonic() + 15
    source = 10
    while len(by_worker[doomed]) < 1 or len(by_worker[1 - doomed]) < 2:
        assert time.monotonic() < deadline, "the kernel never spread the connections"
        client = tcp_from(srv, f"127.0.1.{source}")
        by_worker[whoami(client)["worker"]].append(client)
        source = source % 250 + 1
    there, (here, late) = by_worker[doomed][0], by_worker[1 - doomed][:2]
    name = unique("spread")
    token = there.login(name)["token"]
    here.login(name, token)
    body = {"name": name, "token": token}
    assert late.error(1, body) == REFUSAL_CODE
    os.kill(worker_pid(srv, doomed), signal.SIGKILL)
    for client, worker in zip(crowd, on):
        if worker == doomed:
            client.wait_closed()
    there.wait_closed()
    # the user's connection there is gone: a login works again (once the router saw it die)
    deadline = time.monotonic() + WAIT
    while (result := late.call(1, body)).get("error"):
        assert result["error"]["code"] == REFUSAL_CODE and time.monotonic() < deadline, result
        time.sleep(0.05)
    # and A has room again for as many as died (the replacement may still be starting)
    lost = on.count(doomed)
    deadline = time.monotonic() + WAIT
    fresh = []
    while len(fresh) < lost:
        assert time.monotonic() < deadline, f"{len(fresh)} of {lost} new connections from A"
        client = tcp_from(srv, A)
        try:
            whoami(client)
        except (Closed, AssertionError):
            time.sleep(0.1)         # refused: the dead worker's count not cleared yet
            continue
        fresh.append(client)
    assert_refused_tcp(srv, A, 4)
    srv.assert_alive()
