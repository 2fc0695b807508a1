"""Issue 14's memory limits: a connection's requests in flight are capped (the server stops
reading it), and the output queued for all clients of a worker stays under
--max-client-memory, the largest queues cut first, while readers get every message."""
from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest

from tests.support.servers import HOST, free_port
from tests.server.test_metrics import Scraper, sample, writer_process
from tests.support.client import tcp_packet, unique

MIB = 1 << 20


def start(start_server, *flags: str):
    port = free_port()
    srv = start_server(flags=("--metrics", f"{HOST}:{port}", "--channel-rate", "0", *flags))
    return srv, Scraper(port)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_pipelining_client_is_not_read_past_its_requests_in_flight(start_server, workers):
    srv, scraper = start(start_server, "--workers", workers, "--max-inflight", "8")
    reader = srv.tcp_client(timeout=20)
    reader.login(unique("reader"))
    writer = writer_process(srv)
    before = scraper.value("zim_requests_total", action="5")
    writer.suspend()                    # the store answers nothing: history requests stay in flight
    try:
        reader.send_raw(b"".join(tcp_packet(5, 100 + i, {"userId": reader.user_id}) for i in range(300)))
        time.sleep(2.0)
        read = scraper.value("zim_requests_total", action="5") - before
        assert read <= 8, f"{read} requests read while 8 may be in flight"
    finally:
        writer.resume()
    # once answered, the rest are read and answered, in order
    for i in range(300):
        action, seq, body = reader.wait_response(100 + i, 20)
        assert (action, seq) == (5, 100 + i) and body == {"messages": [], "hasMore": False}, body


def rss_of_tree(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_non_reading_members_are_cut_largest_first_and_readers_get_everything(start_server):
    budget = 4 * MIB
    srv, scraper = start(start_server, "--workers", "1", "--max-outbuf", "2MiB",
                         "--max-client-memory", str(budget))
    channel = unique("busy")
    readers = []
    for _ in range(3):
        client = srv.tcp_client(timeout=30)
        client.login(unique("r"))
        client.ok(3, {"name": channel})
        readers.append(client)
    stalled = []
    for _ in range(40):
        client = srv.tcp_client(timeout=30)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.login(unique("s"))
        client.ok(3, {"name": channel})
        stalled.append(client)              # never reads again
    sender = srv.tcp_client(timeout=30)
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    baseline = rss_of_tree(srv.proc.pid)
    peak = [baseline]
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_of_tree(srv.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    content = "x" * 60_000
    messages = 150
    got = [0] * len(readers)

    def read_all(index: int) -> None:
        pushes = readers[index].recv_pushes(messages, timeout=60)
        got[index] = len(pushes)

    threads = [threading.Thread(target=read_all, args=(i,)) for i in range(len(readers))]
    for thread in threads:
        thread.start()
    for i in range(messages):
        sender.ok(4, {"channel": channel, "content": f"{i}:{content}"}, timeout=30)
    for thread in threads:
        thread.join(90)
    sampling.set()
    sampler.join()
    assert got == [messages] * len(readers), got      # the readers got every message
    metrics = scraper.wait(lambda m: sample(m, "zim_connections_closed_total", reason="memory_budget") >= 1,
                           "a close for the memory budget")
    cut = sample(metrics, "zim_connections_closed_total", reason="memory_budget")
    capped = sample(metrics, "zim_connections_closed_total", reason="output_cap")
    assert cut + capped <= len(stalled)
    growth = peak[0] - baseline
    # 40 stalled members at the 2 MiB cap each would hold 80 MiB; the budget keeps it near 4 MiB
    assert growth < budget + 40 * MIB, f"server grew {growth / MIB:.1f} MiB with a {budget / MIB:.0f} MiB budget"
    deadline = time.monotonic() + 3
    while "memory_budget" not in srv.stderr():     # logged, by reason, at the next tick
        assert time.monotonic() < deadline, srv.stderr()
        time.sleep(0.1)


def test_bad_memory_flags_are_refused(zim_env):
    import subprocess
    import sys

    for flags, says in [(["--max-client-memory", "1MiB"], "--max-client-memory"),
                        (["--max-client-memory", "4MiB", "--max-outbuf", "8MiB"], "at least --max-outbuf"),
                        (["--max-inflight", "0"], "--max-inflight")]:
        result = subprocess.run([sys.executable, "-m", "zim", *flags], env=zim_env, capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 2 and says in result.stderr, (flags, result.stderr)


def test_the_limits_in_force_are_logged_at_start(start_server):
    srv, _ = start(start_server, "--workers", "2")
    budget = psutil.virtual_memory().total // 4 // 2
    deadline = time.monotonic() + 5
    while "limits:" not in srv.stderr():
        assert time.monotonic() < deadline, srv.stderr()
        time.sleep(0.05)
    line = next(line for line in srv.stderr().splitlines() if "limits:" in line)
    assert f"--max-client-memory {budget} bytes per serving process (auto)" in line, line
    assert "--max-outbuf 8388608 bytes per connection" in line and "--max-inflight 128" in line, line
