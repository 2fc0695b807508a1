"""tools/connflood end to end on a small N against a real server (1 and 3 workers)."""
from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

from conftest import HOST, free_port

CONNFLOOD = pathlib.Path(__file__).resolve().parent.parent / "tools" / "connflood"


def connflood(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONNFLOOD), *args], capture_output=True, text=True,
                          timeout=timeout)


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tcp_login_hold_and_probe(server):
    done = connflood("--host", HOST, "--port", str(server.tcp_port), "--connections", "600",
                     "--processes", "2", "--login", "--hold", "2", "--heartbeat", "0.5", "--probe",
                     "--probe-sample", "50", "--probe-round-trips", "20", "--probe-messages", "4", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert result["connected"] == result["logged_in"] == 600 and result["failed"] == 0
    assert result["open_at_end"] == 600 and result["errors"] == {}
    assert result["seconds"] > 0 and result["processes"] == 2
    assert result["probe"]["dm"]["round_trips"] == 20 and result["probe"]["dm"]["p99_ms"] > 0
    broadcast = result["probe"]["broadcast"]
    assert broadcast["members"] == 50 and broadcast["delivered"] == broadcast["expected"] == 200
    assert "connected" in done.stderr                     # the progress line
    server.assert_alive()


def test_websocket_login(server):
    done = connflood("--port", str(server.ws_port), "--ws", "--connections", "300", "--processes", "2",
                     "--login", "--hold", "0.5", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert result["connected"] == result["logged_in"] == 300 and result["failed"] == 0


def test_refused_connections_are_counted_by_kind():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]                    # bound, not listening: refused
        done = connflood("--port", str(port), "--connections", "50", "--connect-timeout", "10", "--json")
    assert done.returncode == 1
    result = last_json(done)
    assert result["connected"] == 0 and result["failed"] == 50
    assert result["errors"] == {"ECONNREFUSED": 50}


def test_only_loopback_and_sane_flags():
    for args in (["--host", "10.1.2.3", "--port", str(free_port()), "--connections", "1"],
                 ["--port", "1", "--connections", "40000", "--processes", "1"],
                 ["--port", "1", "--connections", "0"]):
        done = connflood(*args, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
