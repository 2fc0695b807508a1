"""tools/connflood end to end on a small N against a real server (1 and 3 workers).

The accounting tests make one client process die, hang or straggle through the hidden
``--test-fault K:M:ACTION`` flag (process K acts once M of its connections are set up,
after a last report); everything else, the parent's collection of the reports and its
verdict, is the real path.
"""
from __future__ import annotations

import json
import os

from tests.support import REPO_ROOT
import socket
import subprocess
import sys
import time

from tests.support.servers import HOST, free_port, server_env

ROOT = REPO_ROOT
CONNFLOOD = ROOT / "tools" / "connflood"


def connflood(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # from another directory: the launcher must not depend on the working directory
    return subprocess.run([sys.executable, str(CONNFLOOD), *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env=server_env())


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_counted(result: dict, connections: int) -> None:
    assert result["connections"] == connections
    assert result["connected"] + result["failed"] + result["unaccounted"] == connections, result


def test_tcp_login_hold_and_probe(server):
    done = connflood("--host", HOST, "--port", str(server.tcp_port), "--connections", "600",
                     "--processes", "2", "--login", "--hold", "2", "--heartbeat", "0.5", "--probe",
                     "--probe-sample", "50", "--probe-round-trips", "20", "--probe-messages", "4", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 600)
    assert result["connected"] == result["logged_in"] == 600 and result["failed"] == 0
    assert result["unaccounted"] == 0 and result["lost_processes"] == []
    assert result["open_at_end"] == 600 and result["errors"] == {} and result["closed"] == {}
    assert result["seconds"] > 0 and result["processes"] == 2
    assert result["probe"]["dm"]["round_trips"] == 20 and result["probe"]["dm"]["p99_ms"] > 0
    broadcast = result["probe"]["broadcast"]
    assert broadcast["members"] == 50 and broadcast["delivered"] == broadcast["expected"] == 200
    assert "connected" in done.stderr                     # the progress line
    assert "holding:" in done.stderr and "stopping:" in done.stderr
    server.assert_alive()


def test_websocket_login(server):
    done = connflood("--port", str(server.ws_port), "--ws", "--connections", "300", "--processes", "2",
                     "--login", "--hold", "0.5", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 300)
    assert result["connected"] == result["logged_in"] == 300 and result["failed"] == result["unaccounted"] == 0


def test_refused_connections_are_counted_by_kind():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]                    # bound, not listening: refused
        done = connflood("--port", str(port), "--connections", "50", "--connect-timeout", "10", "--json")
    assert done.returncode == 1
    result = last_json(done)
    assert_counted(result, 50)
    assert result["connected"] == 0 and result["failed"] == 50 and result["unaccounted"] == 0
    assert result["errors"] == {"ECONNREFUSED": 50}


def test_only_loopback_and_sane_flags():
    for args in (["--host", "10.1.2.3", "--port", str(free_port()), "--connections", "1"],
                 ["--port", "1", "--connections", "40000", "--processes", "1"],
                 ["--port", "1", "--connections", "0"]):
        done = connflood(*args, timeout=30)
        assert done.returncode == 2, (args, done.stderr)


# -- accounting: every connection counted, whatever a client process does -------------------
# 600 connections from 2 processes at 300 a second in all: each process needs about 2 s, so
# a fault after 50 of its connections hits it in the middle of its connect phase.
FLOOD = ("--connections", "600", "--processes", "2", "--login", "--rate", "300", "--hold", "0.5",
         "--report-timeout", "3", "--json")


def test_a_straggling_process_does_not_lose_the_others_reports(server):
    """Process 1 stops for 2 s mid-connect, so process 0 is done connecting and holding long
    before it (longer than --hold). Each process's figures must still be counted: the old
    parent read process 0's final report while waiting for process 1 to connect, and
    dropped it (the summary said 300 connected, exit 0)."""
    done = connflood("--port", str(server.tcp_port), *FLOOD, "--report-timeout", "10",
                     "--test-fault", "1:50:pause:2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 600)
    assert result["connected"] == result["open_at_end"] == 600 and result["unaccounted"] == 0
    assert result["lost_processes"] == []
    server.assert_alive()


def test_a_process_killed_mid_connect_is_counted_as_unaccounted(server):
    started = time.monotonic()
    done = connflood("--port", str(server.tcp_port), *FLOOD, "--test-fault", "1:50:kill")
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 600)
    # process 0 connected its 300; process 1 reported at least its first 50, then died
    assert 350 <= result["connected"] < 600 and result["failed"] == 0
    assert result["unaccounted"] == 600 - result["connected"] > 0
    [lost] = result["lost_processes"]
    assert lost["index"] == 1 and lost["share"] == 300 and "exit code -9" in lost["why"]
    assert lost["last_report"]["phase"] == "connecting" and lost["last_report"]["connected"] >= 50
    assert result["open_at_end"] == 300                  # only what process 0 still held
    assert "unaccounted" in done.stdout and "lost" in done.stdout
    assert time.monotonic() - started < 30
    server.assert_alive()


def test_a_process_hung_mid_connect_is_counted_after_the_bounded_wait(server):
    """Process 1 stops itself (SIGSTOP) mid-connect: silent, the parent stops waiting for it
    after --report-timeout, holds, asks for the final reports, waits --report-timeout again,
    kills it and counts its last report; the rest of its share is unaccounted."""
    started = time.monotonic()
    done = connflood("--port", str(server.tcp_port), *FLOOD, "--test-fault", "1:50:stop", timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 600)
    assert 350 <= result["connected"] < 600 and result["unaccounted"] == 600 - result["connected"]
    [lost] = result["lost_processes"]
    assert lost["index"] == 1 and "no final report within 3 s" in lost["why"]
    assert lost["last_report"]["connected"] >= 50
    assert 6 <= elapsed < 40, elapsed                    # two bounded waits of 3 s, no more
    server.assert_alive()


def test_a_process_hung_in_the_hold_is_named_and_fails_the_run(server):
    """All connections were set up (nothing unaccounted), but process 1 never answers the
    stop: its last report counts, it is killed, named, and the exit code says so."""
    done = connflood("--port", str(server.tcp_port), *FLOOD, "--test-fault", "1:0:hold-stop", timeout=60)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, 600)
    assert result["connected"] == 600 and result["unaccounted"] == 0
    [lost] = result["lost_processes"]
    assert lost["index"] == 1 and lost["last_report"]["phase"] == "holding"
    assert result["open_at_end"] == 300
    server.assert_alive()


def test_the_launcher_runs_the_package_without_touching_sys_path():
    text = CONNFLOOD.read_text()
    assert text.startswith("#!/usr/bin/env python3\n") and os.access(CONNFLOOD, os.X_OK)
    assert "sys.path.insert" not in text and "sys.path.append" not in text
    assert "from zim.connflood import main" in text


def test_connections_beat_from_their_setup_so_a_long_connect_phase_keeps_them(start_server):
    """A connect phase longer than the server's --idle-timeout (a rate of 60 a second
    for 300 connections: 5 s, against 2 s): each set-up connection sends heartbeats
    from the moment it is set up, so the server closes none of them."""
    srv = start_server(flags=("--idle-timeout", "2", "--max-conns-per-address", "0"))
    done = connflood("--port", str(srv.tcp_port), "--connections", "300", "--processes", "2", "--login",
                     "--rate", "60", "--heartbeat", "0.4", "--hold", "1.5", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert result["seconds"] >= 4.5                       # the phase did outlast the idle timeout
    assert result["connected"] == result["open_at_end"] == 300 and result["closed"] == {}
    srv.assert_alive()
