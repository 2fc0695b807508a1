"""The honest client of bench/fuzz.py: a TCP user and a WebSocket user doing
real work (private and channel messages with their pushes, history, mailbox,
heartbeats, token logins) the whole time the fuzzers run, each request timed.
"""
from __future__ import annotations

import signal
import socket
import time
from collections import Counter

import orjson

import benchlib
from fuzz_frames import (
    ACK, HEARTBEAT, HISTORY, LOGIN, OP_BINARY, PULL, PUSH_BATCH, PUSH_CHANNEL, PUSH_USER, SEND_CHANNEL, SEND_USER,
    SUBSCRIBE,
)


# -- the honest client ----------------------------------------------------------------------
class HonestConn:
    """A blocking client (TCP or plain WebSocket) that keeps pushes apart from answers."""

    def __init__(self, kind: str, tcp_port: int, ws_port: int, timeout: float) -> None:
        self.kind = kind
        port = tcp_port if kind == "tcp" else ws_port
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.pushes: list[tuple[int, dict]] = []
        self.answers: dict[tuple[int, int], dict] = {}
        self.seq = 0
        if kind == "ws":
            request, accept = benchlib.ws_handshake_request(port)
            self.sock.sendall(request)
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in self.buffer:
                self._recv(deadline)
            end = self.buffer.index(b"\r\n\r\n") + 4
            head = bytes(self.buffer[:end])
            del self.buffer[:end]
            if not benchlib.ws_handshake_ok(head, accept):
                raise RuntimeError(f"honest WebSocket upgrade refused: {head[:100]!r}")

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the honest connection")
        self.buffer += chunk

    def _take(self) -> None:
        if self.kind == "tcp":
            packets = benchlib.tcp_split(self.buffer)
        else:
            packets = []
            for opcode, action, seq, body in benchlib.ws_split(self.buffer):
                if opcode != OP_BINARY:
                    raise ConnectionError(f"honest WebSocket got opcode {opcode}: {body[:60]!r}")
                packets.append((action, seq, body))
        for action, seq, body in packets:
            value = orjson.loads(body) if body else {}
            if seq == 0:
                self.pushes.append((action, value))
            else:
                self.answers[(action, seq)] = value

    def send(self, action: int, body: dict) -> int:
        self.seq = self.seq % 32767 + 1
        payload = orjson.dumps(body)
        self.sock.sendall(benchlib.tcp_packet(action, self.seq, payload) if self.kind == "tcp"
                          else benchlib.ws_packet(action, self.seq, payload))
        return self.seq

    def answer(self, action: int, seq: int, deadline: float) -> dict:
        while True:
            self._take()
            if (action, seq) in self.answers:
                return self.answers.pop((action, seq))
            self._recv(deadline)

    def push(self, actions: tuple[int, ...], match, deadline: float) -> dict:
        while True:
            self._take()
            for i, (got, body) in enumerate(self.pushes):
                if got in actions and match(body):
                    del self.pushes[:i + 1]
                    return body
            self._recv(deadline)

    def request(self, action: int, body: dict, timeout: float) -> tuple[dict, float]:
        start = time.monotonic()
        seq = self.send(action, body)
        answer = self.answer(action, seq, start + timeout)
        elapsed = time.monotonic() - start
        if "error" in answer:
            raise RuntimeError(f"action {action} answered {answer['error']}")
        return answer, elapsed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def honest(options: dict, pipe) -> None:
    """Real work in a loop until told to stop: see the module docstring."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    timeout = options["honest_timeout"]
    tcp_port, ws_port = options["tcp_port"], options["ws_port"]
    channel = f"honest-{options['run_id']}"
    latencies: list[float] = []
    push_latencies: list[float] = []
    errors: list[str] = []
    stats: Counter = Counter()
    users: dict[str, dict] = {}
    conns: dict[str, HonestConn] = {}

    def connect(who: str, kind: str) -> None:
        if who in conns:
            conns.pop(who).close()
        conn = HonestConn(kind, tcp_port, ws_port, timeout)
        body = {"name": f"honest-{who}"}
        if who in users:
            body["token"] = users[who]["token"]
        answer, elapsed = conn.request(LOGIN, body, timeout)
        latencies.append(elapsed)
        users[who] = answer
        conns[who] = conn
        _, elapsed = conn.request(SUBSCRIBE, {"name": channel}, timeout)
        latencies.append(elapsed)

    def timed(who: str, action: int, body: dict) -> dict:
        answer, elapsed = conns[who].request(action, body, timeout)
        latencies.append(elapsed)
        stats["requests"] += 1
        return answer

    try:
        connect("a", "tcp")
        connect("b", "ws")
    except Exception as exc:        # noqa: BLE001
        pipe.send(("error", f"honest client setup: {exc!r}"))
        return
    first = last = None
    rounds = 0
    stop = False
    hard_stop = time.monotonic() + options["seconds"] + 120
    while not stop and time.monotonic() < hard_stop:
        if pipe.poll():
            stop = pipe.recv()[0] == "stop"
        rounds += 1
        try:
            a, b = conns["a"], conns["b"]
            text = f"dm {rounds}"
            sent = time.monotonic()
            timed("a", SEND_USER, {"receiverId": users["b"]["id"], "content": text})
            b.push((PUSH_USER,), lambda m, t=text: m.get("content") == t, sent + timeout)
            push_latencies.append(time.monotonic() - sent)
            text = f"channel {rounds}"
            sent = time.monotonic()
            answer = timed("b", SEND_CHANNEL, {"channel": channel, "content": text})
            # a 102, or with --push-window-ms a 103 holding it
            a.push((PUSH_CHANNEL, PUSH_BATCH), lambda m, t=text: m.get("content") == t or any(
                isinstance(x, dict) and x.get("content") == t for x in m.get("messages") or ()), sent + timeout)
            push_latencies.append(time.monotonic() - sent)
            page = timed("a", HISTORY, {"channel": channel, "limit": 3})
            if not page.get("messages") or page["messages"][-1].get("content") != text \
                    or page["messages"][-1].get("seq") != answer.get("seq"):
                raise RuntimeError(f"history does not end with the message just sent: {page}")
            box = timed("b", PULL, {"limit": 100})
            ids = [m["id"] for m in box.get("messages", [])]
            if ids:
                timed("b", ACK, {"ids": ids})
            timed("a", HEARTBEAT, {})
            a.pushes.clear()
            b.pushes.clear()
            if rounds % 20 == 0:
                fresh = HonestConn("tcp", tcp_port, ws_port, timeout)
                try:
                    _, elapsed = fresh.request(LOGIN, {"name": "honest-a", "token": users["a"]["token"]}, timeout)
                    latencies.append(elapsed)
                    _, elapsed = fresh.request(HEARTBEAT, {}, timeout)
                    latencies.append(elapsed)
                    stats["requests"] += 2
                    stats["fresh_connections"] += 1
                finally:
                    fresh.close()
            now = time.time()
            if first is None:
                pipe.send(("ready",))       # one round done: the fuzzers may start
                first = now
            last = now
        except Exception as exc:        # noqa: BLE001 - every failure is an error to report
            errors.append(f"{time.strftime('%H:%M:%S')} round {rounds}: {exc!r}")
            stats["errors"] += 1
            try:
                connect("a", "tcp")
                connect("b", "ws")
                stats["reconnects"] += 1
            except Exception as again:  # noqa: BLE001
                errors.append(f"reconnect failed: {again!r}")
                time.sleep(0.5)
        if not stop:
            time.sleep(options["honest_interval"])
    for conn in conns.values():
        conn.close()
    latencies.sort()
    push_latencies.sort()
    pipe.send(("done", {
        "rounds": rounds, "requests": len(latencies), "errors": stats["errors"], "error_samples": errors[:10],
        "reconnects": stats["reconnects"], "fresh_connections": stats["fresh_connections"],
        "p50_ms": _ms(benchlib.percentile(latencies, 0.5)), "p99_ms": _ms(benchlib.percentile(latencies, 0.99)),
        "max_ms": _ms(latencies[-1] if latencies else None),
        "push_p50_ms": _ms(benchlib.percentile(push_latencies, 0.5)),
        "push_p99_ms": _ms(benchlib.percentile(push_latencies, 0.99)),
        "first_round_at": first, "last_round_at": last,
    }))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def new_user(port: int) -> str:
    conn = HonestConn("tcp", port, 0, 10)
    try:
        answer, _ = conn.request(LOGIN, {"name": "fuzz-sink"}, 10)
        return answer["id"]
    finally:
        conn.close()
