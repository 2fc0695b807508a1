"""A fuzzer process of bench/fuzz.py: its own users and channels (``make_pool``)
and ``--connections`` non-blocking connections on one epoll loop, each running
a session (bench/fuzz_sessions.py), reading and discarding what the server
sends, and counting the frames the kernel accepted.
"""
from __future__ import annotations

import errno
import random
import select
import signal
import socket
import struct
import time
from collections import Counter, deque

import orjson

import benchlib
from fuzz_frames import Gen, LOGIN, Pool
from fuzz_sessions import Budget, SessionBudget, run_session, session_kind


# -- a fuzzer process ---------------------------------------------------------------------
class Conn:
    __slots__ = ("sock", "fd", "script", "out", "pos", "ends", "kinds", "index", "state", "until",
                 "reset", "number", "started", "port", "budget", "counted", "kind")

    def __init__(self, sock, script, number: int, port: int, budget: SessionBudget, kind: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.script = script
        self.out = b""
        self.pos = 0
        self.ends: list[int] = []
        self.kinds: list[str | None] = []
        self.index = 0
        self.state = "send"         # send | hold | drain
        self.until = 0.0
        self.reset = False
        self.number = number
        self.started = time.time()
        self.kind = kind
        self.port = port
        self.budget = budget
        self.counted = 0


def make_pool(tcp_port: int, ws_port: int, sink_id: str, users: int, channels: int, proc: int,
              run_id: str, max_packet: int, bombs: list[bytes]) -> Pool:
    tokens, ids = [], []
    for i in range(users):
        sock = socket.create_connection((benchlib.LOOPBACK, tcp_port), timeout=10)
        try:
            sock.sendall(benchlib.tcp_packet(LOGIN, 1, orjson.dumps({"name": f"fuzz-{proc}-{i}"})))
            buffer = bytearray()
            deadline = time.monotonic() + 10
            answer = None
            while answer is None and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed a fuzzer's setup login")
                buffer += chunk
                for action, seq, body in benchlib.tcp_split(buffer):
                    if (action, seq) == (LOGIN, 1):
                        answer = orjson.loads(body)
            if not answer or "token" not in answer:
                raise RuntimeError(f"fuzzer setup login failed: {answer}")
            tokens.append(answer["token"])
            ids.append(answer["id"])
        finally:
            sock.close()
    names = [f"fz-{run_id}-{proc}-{i}" for i in range(channels)]
    return Pool(tokens, ids, sink_id, names, max_packet, ws_port, bombs)


def fuzzer(proc: int, options: dict, counters, pipe) -> None:
    """One fuzzing client process: sessions on ``options['connections']`` sockets at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = make_pool(options["tcp_port"], options["ws_port"], options["sink_id"], options["users"],
                         options["channels"], proc, options["run_id"], options["max_packet"], options["bombs"])
    except Exception as exc:        # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"fuzzer {proc}: {exc!r}"))
        return
    pipe.send(("ready",))
    if not pipe.poll(60) or pipe.recv()[0] != "go":
        return
    frames_by_kind: Counter = Counter()
    stats: Counter = Counter()
    recent: deque = deque(maxlen=20000)   # (session number, kind, start, end) of the last sessions, wall clock
    budget = Budget(options["frames"], time.monotonic() + options["seconds"])
    replay: list[int] | None = options.get("replay")
    epoll = select.epoll()
    conns: dict[int, Conn] = {}
    buffer = bytearray(1 << 18)
    sent_total = 0
    next_session = 0 if replay is None else None
    replay_queue = deque(replay or [])
    seed = options["seed"]
    internal_marker = b'"code":"internal"'
    concurrency = 1 if replay is not None else options["connections"]
    drain_seconds = options["drain"]

    def start_session() -> bool:
        nonlocal next_session
        if replay is not None:
            if not replay_queue:
                return False
            number = replay_queue.popleft()
        else:
            number = next_session
            next_session += 1
        rng = random.Random(f"{seed}:{proc}:{number}")
        kind = session_kind(rng, number)
        gen = Gen(rng, pool)
        share = SessionBudget(budget)
        script = run_session(kind, gen, share, tcp_sweep=proc % 2 == 0)
        port = options["tcp_port"] if kind.startswith("tcp") or (kind == "sweep" and proc % 2 == 0) \
            else options["ws_port"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((benchlib.LOOPBACK, port))
        if code not in (0, errno.EINPROGRESS):
            stats["connect_errors"] += 1
            sock.close()
            return True
        conn = Conn(sock, script, number, port, share, kind)
        conns[conn.fd] = conn
        epoll.register(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        stats["sessions"] += 1
        stats[f"session_{kind}"] += 1
        return True

    def finish(conn: Conn, how: str) -> None:
        pending = conn.budget.taken - conn.counted
        if pending > 0:
            stats["frames_unsent"] += pending
            budget.give_back(pending)           # other sessions write them
        conns.pop(conn.fd, None)
        try:
            epoll.unregister(conn.fd)
        except OSError:
            pass
        if conn.reset:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
        stats[how] += 1
        recent.append((conn.number, conn.kind, round(conn.started, 3), round(time.time(), 3)))

    def refill(conn: Conn) -> None:
        """Next chunk of the script, or the next state when it has none."""
        while True:
            try:
                item = next(conn.script)
            except StopIteration:
                if conn.reset:
                    finish(conn, "closed_reset")
                    return
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    finish(conn, "closed_by_server")
                    return
                conn.state = "drain"
                conn.until = time.monotonic() + drain_seconds
                epoll.modify(conn.fd, select.EPOLLIN)
                return
            if item[0] == "hold":
                conn.state = "hold"
                conn.until = time.monotonic() + item[1]
                epoll.modify(conn.fd, select.EPOLLIN)
                return
            if item[0] == "reset":
                conn.reset = True
                continue
            conn.out, conn.ends, conn.kinds = item
            conn.pos = conn.index = 0
            if conn.out or conn.ends:
                return

    def write(conn: Conn) -> None:
        nonlocal sent_total
        while conn.fd in conns and conn.state == "send":
            if conn.pos >= len(conn.out) and conn.index >= len(conn.ends):
                refill(conn)
                continue
            if conn.pos < len(conn.out):
                try:
                    n = conn.sock.send(memoryview(conn.out)[conn.pos:conn.pos + (1 << 20)])
                except BlockingIOError:
                    return
                except OSError as exc:
                    finish(conn, "connect_errors" if exc.errno == errno.ECONNREFUSED else "closed_by_server")
                    return
                conn.pos += n
            ends, kinds = conn.ends, conn.kinds
            while conn.index < len(ends) and ends[conn.index] <= conn.pos:
                kind = kinds[conn.index]
                if kind is not None:
                    frames_by_kind[kind] += 1
                    sent_total += 1
                    conn.counted += 1
                conn.index += 1

    def read(conn: Conn) -> None:
        while True:
            try:
                n = conn.sock.recv_into(buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                finish(conn, "connect_errors" if exc.errno == errno.ECONNREFUSED else
                       "closed_by_server" if conn.state != "drain" else "drained")
                return
            if n == 0:
                finish(conn, "closed_by_server" if conn.state != "drain" else "drained")
                return
            stats["bytes_received"] += n
            if internal_marker in buffer[:n]:      # uncompressed answers (TCP, plain WebSocket)
                stats["internal_answers"] += 1

    last_report = 0.0
    started = time.monotonic()
    hard_stop = started + options["seconds"] + drain_seconds + 10
    try:
        while True:
            now = time.monotonic()
            if now > hard_stop:
                stats["hard_stopped"] += 1
                break
            while len(conns) < concurrency and budget.left > 0 and now < budget.deadline:
                if not start_session():
                    break
            if not conns and (budget.left <= 0 or now >= budget.deadline or (replay is not None and not replay_queue)):
                break
            for fd, events in epoll.poll(0.05):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    read(conn)
                    if fd not in conns:
                        continue
                if events & select.EPOLLOUT and conn.state == "send":
                    write(conn)
            now = time.monotonic()
            for conn in list(conns.values()):
                if conn.state == "hold" and now >= conn.until:
                    conn.state = "send"
                    epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
                    write(conn)
                elif conn.state == "drain" and now >= conn.until:
                    finish(conn, "drain_timeouts")
                elif conn.state == "send" and now >= budget.deadline + drain_seconds:
                    finish(conn, "cut_at_deadline")
            if now - last_report > 0.25:
                counters[proc] = sent_total
                last_report = now
                if pipe.poll() and pipe.recv()[0] == "stop":
                    break
    finally:
        for conn in list(conns.values()):
            finish(conn, "closed_at_stop")
        epoll.close()
        counters[proc] = sent_total
    pipe.send(("done", {"frames": sent_total, "by_kind": dict(frames_by_kind), "stats": dict(stats),
                        "seconds": time.monotonic() - started, "recent_sessions": list(recent)}))
