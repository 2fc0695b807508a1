"""A server at its open-file limit keeps serving and turns new connections away cleanly."""
from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.servers import HOST, free_port, server_env
from tests.support.client import TcpClient

FD_LIMIT = 64


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_open_file_limit_refuses_cleanly(tmp_path, workers):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "zim", "--workers", workers, "--tcp", f"{HOST}:{port}", "--ws", "off",
         "--data", str(tmp_path)],
        env=server_env(), stderr=subprocess.PIPE, text=True, preexec_fn=_low_fd_limit)
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                keeper = TcpClient(HOST, port, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        keeper.login("keeper")
        # far more connections than the descriptors of every worker together
        for _ in range(int(workers) * FD_LIMIT + 40):
            sockets.append(socket.create_connection((HOST, port), timeout=5))
        time.sleep(1.0)                     # time for the server to turn the excess away
        refused = 0
        for sock in sockets:
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    refused += 1
            except BlockingIOError:
                pass                        # accepted and idle
            except ConnectionResetError:
                refused += 1
        assert refused >= 40, f"only {refused} connections were turned away"
        # the server neither spins on its readable listener nor stalls
        time.sleep(1.0)
        procs = [psutil.Process(process.pid), *psutil.Process(process.pid).children()]
        cpu_before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        time.sleep(1.0)
        cpu_after = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        assert cpu_after - cpu_before < 0.3, f"server burns CPU at the limit ({cpu_after - cpu_before:.2f} s/s)"
        assert keeper.ok(9, {})["time"] > 0      # the connections it has are still served
        for sock in sockets:
            sock.close()
        sockets.clear()
        time.sleep(0.5)
        fresh = TcpClient(HOST, port, timeout=5)   # and it accepts again once below the limit
        assert fresh.login("fresh")["id"]
        fresh.close()
        keeper.close()
    finally:
        for sock in sockets:
            sock.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr[-2000:]
    assert "refused at the open-file limit" in stderr, stderr[-2000:]
