"""``--metrics``: the figures of a real server move as clients do things, on 1 and 3 workers;
``/readyz`` follows the store writer; a real Prometheus scrapes them; closes are counted
and logged by reason; a login waiting on a busy server is not cut by --login-timeout."""
from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import prometheus as prometheus_servers
from tests.support.servers import HOST, free_port
from tests.support.client import unique
from zim.client import tcp_header

prometheus = prometheus_servers.prometheus

WAIT = 8.0          # generous: closes of broken connections wait for the peer's EOF


class Scraper:
    def __init__(self, port: int) -> None:
        self.base = f"http://{HOST}:{port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def samples(self) -> dict[tuple[str, tuple], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait(self, check, what: str, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = self.samples()
            if check(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen in {timeout} s; metrics:\n"
                                     + "\n".join(f"{k} {v}" for k, v in sorted(got.items()) if v))
            time.sleep(0.1)


def sample(got: dict, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def start_with_metrics(start_server, *flags: str):
    port = free_port()
    srv = start_server(flags=("--metrics", f"{HOST}:{port}", *flags))
    scraper = Scraper(port)
    deadline = time.monotonic() + 10
    while True:                                 # serving metrics, workers listening, writer up
        try:
            if scraper.get("/readyz")[0] == 200:
                return srv, scraper
        except urllib.error.URLError:
            pass                                # the metrics port opens just after the clients' ports
        assert time.monotonic() < deadline, f"never ready:\n{srv.stderr()}"
        time.sleep(0.05)


def writer_process(srv) -> psutil.Process:
    for child in psutil.Process(srv.proc.pid).children(recursive=True):
        if "zim.storage.writer" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no writer process")


@pytest.mark.parametrize("workers", ["1", "3"])
def test_counters_follow_requests_errors_pushes_and_closes(start_server, workers):
    srv, scraper = start_with_metrics(start_server, "--workers", workers, "--channel-rate", "0",
                                      "--max-packet", "1024")
    before = scraper.samples()
    alice, bob = srv.tcp_client(), srv.tcp_client()
    a, b = alice.login(unique("alice")), bob.login(unique("bob"))
    alice.ok(2, {"receiverId": b["id"], "content": "hi"})
    bob.recv_push()
    room = unique("room")
    alice.ok(3, {"name": room})
    bob.ok(3, {"name": room})
    alice.ok(4, {"channel": room, "content": "all"})
    bob.recv_push()
    assert alice.error(77) == "unknown_action"
    assert alice.error(2, b"not json") == "bad_request"
    assert alice.error(2, {"receiverId": "1", "content": "x"}) == "not_found"
    stranger = srv.tcp_client()
    assert stranger.error(2, {"receiverId": a["id"], "content": "x"}) == "not_logged_in"
    # one connection sends a packet over --max-packet, another breaks the framing
    big = srv.raw_tcp()
    big.sendall(tcp_header(2048, 2, 5) + b"x" * 2040)    # whole, but over --max-packet
    broken = srv.raw_tcp()
    broken.sendall(tcp_header(3, 1, 1))
    for sock in (big, broken):
        sock.settimeout(5)
        while sock.recv(4096):          # the answer (too_large), then the server's half-close
            pass
        sock.close()

    def delta(got, name, **labels):
        return sample(got, name, **labels) - sample(before, name, **labels)

    got = scraper.wait(lambda got: delta(got, "zim_connections_closed_total", reason="too_large") == 1
                       and delta(got, "zim_connections_closed_total", reason="protocol_error") == 1,
                       "the too_large and protocol_error closes")
    assert delta(got, "zim_requests_total", action="1") == 2
    assert delta(got, "zim_requests_total", action="2") == 4      # dm, not json, unknown user, stranger
    assert delta(got, "zim_requests_total", action="other") == 1    # 77
    assert delta(got, "zim_logins_total") == 2
    assert delta(got, "zim_users_created_total") == 2
    assert delta(got, "zim_errors_total", code="unknown_action") == 1
    assert delta(got, "zim_errors_total", code="bad_request") == 1
    assert delta(got, "zim_errors_total", code="not_found") == 1
    assert delta(got, "zim_errors_total", code="not_logged_in") == 1
    assert delta(got, "zim_pushes_total", kind="user") == 2      # a DM: the receiver, the sender's devices
    assert delta(got, "zim_pushes_total", kind="channel") == 1
    assert delta(got, "zim_deliveries_total", kind="user") == 1
    assert delta(got, "zim_deliveries_total", kind="channel") == 1
    assert delta(got, "zim_connections_accepted_total") == 5
    assert sample(got, "zim_connections", transport="tcp") == 3            # alice, bob, stranger
    assert sample(got, "zim_connections_logged_in") == 2
    assert delta(got, "zim_bytes_received_total") > 2048
    assert delta(got, "zim_bytes_sent_total") > 0
    assert sample(got, "zim_store_batch_operations_count") >= 1
    # the peer closing is counted as such, and the gauges come down
    stranger.close()
    bob.close()
    got = scraper.wait(lambda got: delta(got, "zim_connections_closed_total", reason="peer") == 2
                       and sample(got, "zim_connections", transport="tcp") == 1
                       and sample(got, "zim_connections_logged_in") == 1, "the peers' closes")
    ws = srv.ws_client()
    ws.login(unique("carol"))
    got = scraper.wait(lambda got: sample(got, "zim_connections", transport="ws") == 1, "a WebSocket connection")
    assert sample(got, "zim_connections_logged_in") == 2


def test_login_and_idle_timeouts_are_counted_and_logged_once_per_interval(start_server):
    srv, scraper = start_with_metrics(start_server, "--workers", "1", "--login-timeout", "1")
    silent = [srv.raw_tcp() for _ in range(5)]
    scraper.wait(lambda got: sample(got, "zim_connections_closed_total", reason="login_timeout") == 5,
                 "5 login timeouts")
    more = [srv.raw_tcp() for _ in range(3)]
    scraper.wait(lambda got: sample(got, "zim_connections_closed_total", reason="login_timeout") == 8,
                 "8 login timeouts")
    time.sleep(1.5)
    lines = [line for line in srv.stderr().splitlines() if "login_timeout" in line]
    # the first close of the reason is logged at once; the next ones wait for its interval (10 s)
    assert len(lines) == 1, lines
    assert re.search(r"server: 5 connections closed \(login_timeout: not logged in within --login-timeout\)",
                     lines[0]), lines
    for sock in silent + more:
        sock.close()


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_login_waiting_on_a_busy_server_is_not_cut_by_the_login_timeout(start_server, workers):
    srv, scraper = start_with_metrics(start_server, "--workers", workers, "--login-timeout", "1")
    writer = writer_process(srv)
    client = srv.tcp_client(timeout=10)
    writer.suspend()                    # the store answers nothing: the login waits for it
    try:
        seq = client.send(1, {"name": unique("patient")})
        time.sleep(3.0)                 # three login timeouts go by
    finally:
        writer.resume()
    action, _, body = client.wait_response(seq, 5)
    assert "id" in body, body
    assert client.ok(9)["time"]        # still open
    got = scraper.samples()
    assert sample(got, "zim_connections_closed_total", reason="login_timeout") == 0
    assert sample(got, "zim_connections_logged_in") == 1


def test_readyz_is_unready_while_the_writer_cannot_start_and_restarts_back_off(start_server, tmp_path):
    data = tmp_path / "data"
    srv, scraper = start_with_metrics(start_server, "--workers", "1", "--data", str(data))
    assert scraper.get("/healthz") == (200, "ok")
    # the database is replaced by something SQLite cannot open: each new writer fails at once
    db = data / "zim.db"
    os.rename(db, tmp_path / "zim.db.saved")
    db.mkdir()
    writer_process(srv).kill()
    deadline = time.monotonic() + 5
    while scraper.get("/readyz")[0] != 503:
        assert time.monotonic() < deadline, "readyz stayed 200 with the writer down"
        time.sleep(0.05)
    status, reason = scraper.get("/readyz")
    assert (status, reason) == (503, "the store writer is down (restarting)")
    assert scraper.get("/healthz") == (200, "ok")
    time.sleep(5.0)
    # backed off: 0.5, 1, 2 s between failed starts (whole seconds on the tick), not a tight loop
    ended = [line for line in srv.stderr().splitlines() if "the writer process ended" in line]
    assert 2 <= len(ended) <= 5, ended
    assert any("exit status 1" in line and "restarting it in" in line for line in ended), ended
    client = srv.tcp_client()
    assert client.error(1, {"name": "x"}) == "internal"
    # the database back: the next start works and the server is ready again
    db.rmdir()
    os.rename(tmp_path / "zim.db.saved", db)
    deadline = time.monotonic() + 20
    while scraper.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, f"not ready again:\n{srv.stderr()[-3000:]}"
        time.sleep(0.1)
    assert srv.tcp_client().login(unique("back"))["id"]
    assert scraper.value("zim_store_writer_restarts_total") >= 2


def test_a_real_prometheus_scrapes_a_server_with_workers(start_server, prometheus):
    srv, scraper = start_with_metrics(start_server, "--workers", "3")
    prom = prometheus([f"{HOST}:{scraper.base.rsplit(':', 1)[1]}"])
    clients = [srv.tcp_client() for _ in range(6)]
    for client in clients:
        client.login(unique("p"))
    assert prom.wait_for("zim_logins_total", lambda v: v == [6.0]) == [6.0]
    assert prom.wait_for("sum(zim_connections)", lambda v: v == [6.0]) == [6.0]
    assert prom.wait_for('zim_requests_total{action="1"}', lambda v: v == [6.0]) == [6.0]
    assert prom.wait_for('up{job="zim"}') == [1.0]
    [target] = prom.targets()
    assert target["health"] == "up" and target["lastError"] == ""


def test_a_killed_worker_is_restarted_counted_and_its_gauges_cleared(start_server):
    srv, scraper = start_with_metrics(start_server, "--workers", "2")
    clients = [srv.tcp_client() for _ in range(8)]
    for client in clients:
        client.login(unique("w"))
    accepted = sample(scraper.wait(lambda got: sample(got, "zim_connections_logged_in") == 8, "8 logged in"),
                      "zim_connections_accepted_total")
    workers = [child for child in psutil.Process(srv.proc.pid).children()
               if "zim.worker" in " ".join(child.cmdline())]
    assert len(workers) == 2
    workers[0].kill()
    got = scraper.wait(lambda got: sample(got, "zim_worker_restarts_total") == 1
                       and sample(got, "zim_connections_logged_in") < 8, "a worker restarted")
    assert sample(got, "zim_connections_accepted_total") == accepted   # totals go on after a restart
    assert re.search(r"worker \d \(pid \d+\) ended \(killed by SIGKILL\); restarting it", srv.stderr())
    scraper.wait(lambda got: scraper.get("/readyz")[0] == 200, "ready again")


def test_metrics_off_by_default_and_a_bad_address_is_refused(start_server, zim_env):
    import subprocess
    import sys

    srv = start_server(flags=("--workers", "1"))
    assert "metrics on" not in srv.stderr()
    result = subprocess.run([sys.executable, "-m", "zim", "--metrics", "nohost:notaport"], env=zim_env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "--metrics" in result.stderr, result.stderr
