"""Process-level behaviour: restarts keep data, liveness timeouts, signals, CLI flags,
channel push batching (103)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.client import Closed, error_code, unique, ws_frame, ws_message

# ---------------------------------------------------------------- restarts


def test_restart_keeps_users_messages_memberships_and_acks(start_server, tmp_path):
    data = tmp_path / "data"
    first = start_server(data_dir=data)
    alice = first.tcp_client()
    alice.login(unique("alice"))
    bob = first.ws_client()
    bob.login(unique("bob"))
    channel = unique("durable")
    alice.ok(3, {"name": channel})
    bob.ok(3, {"name": channel, "push": False})
    before = [alice.ok(4, {"channel": channel, "content": f"c{i}"}) for i in range(3)]
    dms = [alice.ok(2, {"receiverId": bob.user_id, "content": f"d{i}"}) for i in range(3)]
    bob.recv_pushes(3)
    bob.ok(8, {"ids": [dms[0]["id"]]})
    first.stop()

    second = start_server(data_dir=data)
    alice2 = second.tcp_client()
    assert alice2.login(alice.name, token=alice.token)["id"] == alice.user_id
    bob2 = second.ws_client()
    assert bob2.login(bob.name, token=bob.token)["id"] == bob.user_id
    # the mailbox minus the acked message
    assert [m["id"] for _, m in bob2.recv_pushes(2)] == [dms[1]["id"], dms[2]["id"]]
    bob2.assert_no_push()
    assert [m["id"] for m in bob2.ok(7)["messages"]] == [dms[1]["id"], dms[2]["id"]]
    # history and seq continue; ids keep increasing
    page = bob2.ok(5, {"channel": channel})
    assert [m["id"] for m in page["messages"]] == [r["id"] for r in before]
    assert [m["sender"]["name"] for m in page["messages"]] == [alice.name] * 3
    after = alice2.ok(4, {"channel": channel, "content": "after restart"})
    assert after["seq"] == 4 and int(after["id"]) > int(before[-1]["id"])
    assert alice2.ok(2, {"receiverId": bob.user_id, "content": "d3"})["seq"] == 4
    assert [m["content"] for m in alice2.ok(5, {"userId": bob.user_id})["messages"]] == ["d0", "d1", "d2", "d3"]
    # memberships with their push setting: alice follows the channel again, bob (push off) does not
    carol = second.tcp_client()
    carol.login(unique("carol"))
    carol.ok(3, {"name": channel})
    carol.ok(4, {"channel": channel, "content": "hello both"})
    assert alice2.recv_push()[1]["content"] == "hello both"
    bob2.recv_push()                        # the 101 push of "d3"
    bob2.assert_no_push()


def test_send_response_means_stored_even_if_killed(start_server, tmp_path):
    """SIGKILL right after the response: the message must still be there after a restart."""
    data = tmp_path / "data"
    first = start_server(data_dir=data)
    alice = first.tcp_client()
    alice.login(unique("alice"))
    bob = first.tcp_client()
    bob.login(unique("bob"))
    channel = unique("killed")
    alice.ok(3, {"name": channel})
    sent = alice.ok(4, {"channel": channel, "content": "survives kill"})
    dm = alice.ok(2, {"receiverId": bob.user_id, "content": "dm survives kill"})
    first.kill()

    second = start_server(data_dir=data)
    alice2 = second.tcp_client()
    assert alice2.login(alice.name, token=alice.token)["id"] == alice.user_id
    assert [m["id"] for m in alice2.ok(5, {"channel": channel})["messages"]] == [sent["id"]]
    bob2 = second.tcp_client()
    bob2.login(bob.name, token=bob.token)
    assert bob2.recv_push()[1]["id"] == dm["id"]


# ---------------------------------------------------------------- liveness


def test_login_and_idle_timeouts(start_server):
    srv = start_server(["--login-timeout", "1", "--idle-timeout", "2"])
    never_logs_in = srv.tcp_client()
    only_heartbeats = srv.tcp_client()          # heartbeats do not replace logging in
    silent = srv.tcp_client()
    silent.login(unique("silent"))
    busy = srv.tcp_client()
    busy.login(unique("busy"))
    ws_never = srv.raw_ws().handshake()
    no_handshake = srv.raw_ws()                 # connected to the WebSocket port, sends nothing
    ws_silent = srv.raw_ws().handshake()
    ws_silent.send_frame(2, ws_message(1, 1, {"name": unique("wss")}))
    assert ws_silent.read_packet()[:2] == (1, 1)
    ws_pinger = srv.raw_ws().handshake()
    ws_pinger.send_frame(2, ws_message(1, 1, {"name": unique("wsp")}))
    assert ws_pinger.read_packet()[:2] == (1, 1)

    start = time.monotonic()
    heartbeats_closed = False
    while time.monotonic() - start < 5.0:
        busy.ok(9)
        ws_pinger.send_frame(9, b"alive")
        fin, rsv, opcode, payload = ws_pinger.read_frame()
        assert (opcode, payload) == (10, b"alive"), "a server ping or other frame instead of our pong"
        if not heartbeats_closed:
            try:
                only_heartbeats.ok(9, timeout=1)
            except (Closed, OSError):
                heartbeats_closed = True
        time.sleep(0.4)

    assert heartbeats_closed, "a connection that never logged in outlived the login timeout"
    assert isinstance(never_logs_in.wait_closed(1), Closed)
    assert isinstance(silent.wait_closed(1), Closed)
    assert no_handshake.expect_eof(1) == b""
    for ws in (ws_never, ws_silent):
        code, _ = ws.read_close(1)
        assert code == 1001
    busy.ok(9)
    ws_pinger.send(ws_frame(2, ws_message(9, 2, {})))
    assert ws_pinger.read_packet()[:2] == (9, 2)


# ----------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_clients_connected(start_server, signum):
    srv = start_server()
    clients = []
    for i in range(20):
        client = srv.tcp_client() if i % 2 else srv.ws_client()
        client.login(unique("sig"))
        clients.append(client)
    half = srv.raw_tcp()
    half.sendall(b"\x00\x00\x01\x00\x00\x09")        # mid-packet
    srv.signal_and_check(signum, "with 20 clients connected")
    for client in clients:
        assert isinstance(client.wait_closed(3), Closed)


def test_sigterm_right_after_startup(start_server):
    """As soon as a port accepts, SIGTERM must stop the server: no startup window in
    which the signal is lost (or kills the process before its handler is in place)."""
    for attempt in range(10):
        srv = start_server(wait=False)
        deadline = time.monotonic() + 15
        while True:                         # the first moment the TCP port accepts
            assert time.monotonic() < deadline and srv.alive(), srv.stderr()
            try:
                socket.create_connection(srv.tcp, timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.0005)
        srv.signal_and_check(signal.SIGTERM, f"right after the TCP port accepted (attempt {attempt})")


def test_sigterm_right_after_clients_close(start_server):
    """A signal that lands while the reactor works in C (not in epoll_wait) must not be lost."""
    for attempt in range(3):
        srv = start_server()
        time.sleep(0.3)
        clients = [srv.tcp_client() for _ in range(20)]
        for client in clients:
            client.ok(9)
        srv.close_clients()
        srv.signal_and_check(signal.SIGTERM, f"right after 20 clients closed (attempt {attempt})")


# --------------------------------------------------------------------- CLI


@pytest.mark.parametrize("flags", [
    ["--max-packet", "7"], ["--max-packet", "abc"], ["--tcp", "127.0.0.1:notaport"],
    ["--tcp", "127.0.0.1:70000"], ["--workers", "0"], ["--login-timeout", "-1"], ["--bogus"],
    ["--user-rate", "-1"], ["--user-rate", "fast"], ["--channel-rate", "-0.5"], ["--channel-rate", "nan"],
    ["--channel-rate", "inf"], ["--channel-rate", "1e12"], ["--max-outbuf", "1024"], ["--max-outbuf", "2GiB"],
    ["--max-outbuf", "-8MiB"], ["--max-outbuf", "8MB!"], ["--max-outbuf", "4MiB", "--max-packet", "4194304"],
    ["--channel-push", "maybe"],
])
def test_cli_rejects_bad_flags(tmp_path, zim_env, flags):
    data = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "zim", "--data", str(data), *flags],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path,
                            env=zim_env)
    assert result.returncode == 2, result.stderr        # argparse's status for a usage error
    assert "zim-server: error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not data.exists()                            # refused before anything started


def test_cli_port_in_use(tmp_path, zim_env):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = subprocess.run([sys.executable, "-m", "zim", "--tcp", f"127.0.0.1:{port}", "--ws", "off",
                                 "--data", str(tmp_path)], capture_output=True, text=True, timeout=20,
                                cwd=tmp_path, env=zim_env)
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_cli_help(tmp_path, zim_env):
    result = subprocess.run([sys.executable, "-m", "zim", "--help"], capture_output=True, text=True,
                            timeout=20, cwd=tmp_path, env=zim_env)
    assert result.returncode == 0
    for flag in ("--tcp", "--ws", "--data", "--max-packet", "--workers"):
        assert flag in result.stdout


# ------------------------------------------------------- 103 channel batches


def test_channel_push_batching(start_server):
    """--push-window-ms/--push-max: one 103 per member connection per slice, newest push-max
    messages, the older ones counted in ``skipped``."""
    srv = start_server(["--push-window-ms", "300", "--push-max", "3"])
    channel = unique("batch")
    sender = srv.tcp_client()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    member = srv.ws_client()
    member.login(unique("member"))
    member.ok(3, {"name": channel})
    member_phone = srv.tcp_client()
    member_phone.login(member.name, token=member.token)
    seqs = [sender.send(4, {"channel": channel, "content": f"b{i}"}) for i in range(5)]
    results = [sender.wait_response(seq)[2] for seq in seqs]
    assert all(error_code(r) is None for r in results)
    for device in (member, member_phone):
        action, batch = device.recv_push(3)
        assert action == 103, f"expected a 103 batch, got {action}"
        assert batch["channel"] == channel
        assert [m["seq"] for m in batch["messages"]] == [3, 4, 5]
        assert [m["content"] for m in batch["messages"]] == ["b2", "b3", "b4"]
        assert batch["skipped"] == 2
        device.assert_no_push(0.5)
    sender.assert_no_push()
    # after a quiet period a new slice starts
    time.sleep(0.5)
    sender.ok(4, {"channel": channel, "content": "later"})
    action, batch = member.recv_push(3)
    assert action in (102, 103)
    messages = [batch] if action == 102 else batch["messages"]
    assert [m["content"] for m in messages] == ["later"]
