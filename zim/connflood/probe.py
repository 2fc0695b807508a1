"""connflood's probe, in the parent while the connections are held: what a user
feels at that scale, through zim.client's blocking client."""
from __future__ import annotations

import time

from zim.client import ProtocolError, TcpClient, ZimError
from zim.connflood.options import PROBE_CHANNEL
from zim.protocol import PUSH_USER_MESSAGE, SEND_CHANNEL, SEND_USER, SUBSCRIBE

PROBE_TIMEOUT = 10.0        # seconds for a connection, an answer or a push


def probe_client(args, name: str) -> TcpClient:
    """One logged-in TCP connection."""
    client = TcpClient(args.host, args.port, PROBE_TIMEOUT)
    try:
        client.login(name)
    except BaseException:
        client.close()
        raise
    return client


def wait_push(client: TcpClient, action: int) -> None:
    """The next push of ``action`` (others are passed over), within PROBE_TIMEOUT."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    while client.recv_push(max(0.0, deadline - time.monotonic()))[0] != action:
        pass


def dm_round_trips(args) -> dict:
    """A -> B (push to B), B -> A on receipt (push to A): A times the round trip."""
    times = []
    with probe_client(args, "probe-a") as a, probe_client(args, "probe-b") as b:
        for _ in range(args.probe_round_trips):
            start = time.monotonic_ns()
            a.send(SEND_USER, {"receiverId": b.user_id, "content": "ping"})
            wait_push(b, PUSH_USER_MESSAGE)
            b.send(SEND_USER, {"receiverId": a.user_id, "content": "pong"})
            wait_push(a, PUSH_USER_MESSAGE)
            times.append(time.monotonic_ns() - start)
    times.sort()
    return {"round_trips": len(times), "p50_ms": times[len(times) // 2] / 1e6,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] / 1e6}


def broadcast_probe(args) -> int:
    """Send the probe channel messages (the sample connections receive them)."""
    with probe_client(args, "probe-publisher") as publisher:
        publisher.ok(SUBSCRIBE, {"name": PROBE_CHANNEL})
        for _ in range(args.probe_messages):
            content = b"%020d" % time.monotonic_ns()
            publisher.ok(SEND_CHANNEL, {"channel": PROBE_CHANNEL, "content": content.decode() + "x" * 80})
            time.sleep(0.05)
    return args.probe_messages


def run_probe(args, probe: dict) -> None:
    """The probe's thread: the parent's main thread keeps reading the pipes meanwhile."""
    try:
        probe["dm"] = dm_round_trips(args)
        probe["broadcast_messages"] = broadcast_probe(args)
    except (OSError, ZimError, ProtocolError) as exc:
        probe["error"] = str(exc)
