#!/usr/bin/env python3
"""The durable store: stored messages per second and send-to-ack latency.

For each store in ``--stores`` (default ``sqlite,memory``) this starts a real
single-worker server (``python -m zim --workers 1 --store S``, loopback ports, a
temporary data directory). Each of S senders (S in ``--senders-list``, default
1,4,16, spread over ``--client-processes`` processes) logs in and sends private
messages (action 2, ``--content-size`` bytes) to its own receiver, who is offline,
so every message is stored in history and a mailbox and pushed to nobody. With
``--store sqlite`` a response is sent only once the message is committed (group
commit in the writer process), so the response rate is the stored rate.

Two kinds of run per sender count:

- saturated: every sender keeps ``--window`` requests in flight until it has sent
  its share of ``--messages``. Reported: stored messages per second (responses
  over the wall time from the first send to the last response), per
  server-CPU-second (server = the server process and its writer), and the
  send-to-ack latency p50/p99 of every message.
- moderate: all senders together send ``--rate`` messages per second on a fixed
  schedule for ``--rate-seconds``, open loop. Reported: latency p50/p99. The
  store's added latency is sqlite's p99 minus memory's p99, in the same run.

Then the engine alone: ``zim.storage.writer`` started on a fresh database and fed
``--engine-messages`` private-message operations over its socketpair as fast as
it takes them; committed operations per second (what the store can absorb when
the server in front of it is not the limit).

Client and server share the machine's cores (saturated runs use
``--client-processes`` client processes, moderate runs one). Medians over ``--runs`` runs.
Example: ``python bench/store.py --json``; small: ``--messages 2000 --runs 1 --rate-seconds 1``
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import orjson

import benchlib

from zim.protocol import LOGIN, SEND_USER
OP_USER_MESSAGE = 6          # zim.storage.writer's operation code


# -- client processes ---------------------------------------------------------------
class Sender:
    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self.sock = sock
        self.prefix = prefix            # '{"receiverId":"...","content":"' 
        self.buf = bytearray()
        self.seq = 0
        self.sent_ns: dict[int, int] = {}
        self.sent = self.acked = self.errors = 0

    def send(self, count: int, padding: bytes, now_ns: int) -> None:
        packets = []
        for _ in range(count):
            self.seq = self.seq % 32767 + 1
            self.sent_ns[self.seq] = now_ns
            packets.append(benchlib.tcp_packet(SEND_USER, self.seq, self.prefix + padding + b'"}'))
        self.sent += count
        self.sock.sendall(b"".join(packets))


def login(port: int, name: str) -> tuple[socket.socket, str]:
    sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(benchlib.tcp_packet(LOGIN, 1, orjson.dumps({"name": name})))
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            raise OSError("closed by the server during login")
        buf += data
        for action, seq, body in benchlib.tcp_split(buf):
            if action == LOGIN:
                reply = orjson.loads(body)
                if "error" in reply:
                    raise OSError(f"login: {reply['error']}")
                return sock, reply["id"]


def run_senders(senders: list[Sender], mode: str, per_sender: int, window: int, rate: float,
                seconds: float, content_size: int, deadline: float) -> dict:
    padding = b"x" * content_size
    by_fd = {s.sock.fileno(): s for s in senders}
    epoll = select.epoll()
    for fd in by_fd:
        epoll.register(fd, select.EPOLLIN)
    for sender in senders:
        sender.sent = sender.acked = sender.errors = 0
        sender.sent_ns.clear()
    latencies: list[int] = []
    monotonic_ns = time.monotonic_ns
    first_ns = monotonic_ns()
    last_ns = first_ns
    interval_ns = int(1e9 * len(senders) / rate) if mode == "moderate" else 0
    stop_sending_ns = first_ns + int(seconds * 1e9)
    next_due = {fd: first_ns + i * interval_ns // max(1, len(senders)) for i, fd in enumerate(by_fd)}
    if mode == "saturated":
        for sender in senders:
            sender.send(min(window, per_sender), padding, monotonic_ns())

    def done() -> bool:
        if mode == "saturated":
            return all(s.acked >= per_sender for s in senders)
        return monotonic_ns() >= stop_sending_ns and all(s.acked >= s.sent for s in senders)

    while not done() and time.monotonic() < deadline:
        timeout = 0.2
        if mode == "moderate" and monotonic_ns() < stop_sending_ns:
            now = monotonic_ns()
            for fd, sender in by_fd.items():
                due = 0
                while next_due[fd] <= now and next_due[fd] < stop_sending_ns:
                    due += 1
                    next_due[fd] += interval_ns
                if due:
                    sender.send(due, padding, now)
            timeout = max(0.0, (min(next_due.values()) - monotonic_ns()) / 1e9)
        for fd, _ in epoll.poll(timeout, 1024):
            sender = by_fd[fd]
            data = sender.sock.recv(1 << 18)
            if not data:
                raise OSError("the server closed a sender")
            now = monotonic_ns()
            sender.buf += data
            for action, seq, body in benchlib.tcp_split(sender.buf):
                if action != SEND_USER:
                    continue
                sender.acked += 1
                latencies.append(now - sender.sent_ns.pop(seq))
                if body.startswith(b'{"error"'):
                    sender.errors += 1
            last_ns = now
            if mode == "saturated":
                more = min(per_sender - sender.sent, window - (sender.sent - sender.acked))
                if more > 0:
                    sender.send(more, padding, now)
    epoll.close()
    return {"sent": sum(s.sent for s in senders), "acked": sum(s.acked for s in senders),
            "errors": sum(s.errors for s in senders), "first_ns": first_ns, "last_ns": last_ns,
            "latencies_ns": latencies}


def client_process(port: int, first: int, count: int, conn) -> None:
    senders = []
    for number in range(first, first + count):
        receiver_sock, receiver_id = login(port, f"receiver-{number}")
        receiver_sock.close()           # offline: messages go to history and the mailbox only
        sock, _ = login(port, f"sender-{number}")
        prefix = orjson.dumps({"receiverId": receiver_id, "content": ""})[:-2]
        senders.append(Sender(sock, prefix))
    conn.send(("ready",))
    while conn.poll(900):
        order = conn.recv()
        if order[0] != "run":
            break
        conn.send(("armed",))
        if not conn.poll(60) or conn.recv()[0] != "go":
            break
        conn.send(("result", run_senders(senders, *order[1:])))
    for sender in senders:
        sender.sock.close()


# -- one server ------------------------------------------------------------------
def one_run(group: benchlib.ClientProcesses, tree: benchlib.ProcessTree, order: tuple,
            timeout: float) -> dict:
    group.send_all(order)
    group.receive_all(30, "arm its run")
    before = tree.cpu_times()
    group.send_all(("go",))
    results = [m[1] for m in group.receive_all(timeout + 30, "finish its run")]
    after = tree.cpu_times()
    acked = sum(r["acked"] for r in results)
    if sum(r["errors"] for r in results):
        raise RuntimeError(f"{sum(r['errors'] for r in results)} sends answered an error")
    if acked < sum(r["sent"] for r in results):
        raise RuntimeError("some sends were never answered")
    wall = (max(r["last_ns"] for r in results) - min(r["first_ns"] for r in results)) / 1e9
    cpu = (after.user + after.system) - (before.user + before.system)
    latencies = sorted(x for r in results for x in r["latencies_ns"])
    return {"messages": acked, "seconds": wall, "per_second": acked / wall if wall else None,
            "per_cpu_second": acked / cpu if cpu else None, "server_cpu_seconds": cpu,
            "p50_ms": benchlib.percentile(latencies, 0.5) / 1e6,
            "p99_ms": benchlib.percentile(latencies, 0.99) / 1e6}


def client_group(port: int, senders: int, processes: int) -> benchlib.ClientProcesses:
    """Client processes holding ``senders`` logged-in senders (and their offline receivers)."""
    processes = max(1, min(processes, senders))
    base, extra = divmod(senders, processes)
    group = benchlib.ClientProcesses()
    starts, first = [], 0
    for index in range(processes):
        count = base + (1 if index < extra else 0)
        starts.append((port, first, count))
        first += count
    group.start(client_process, starts)
    group.receive_all(60, "log its senders in")
    return group


def measure_store(args, store: str) -> dict:
    out: dict = {}
    with benchlib.Server(extra_args=["--store", store], workers=1) as server:
        root = server.start()
        tree = benchlib.ProcessTree(root)
        for senders in args.senders_list:
            per_sender = max(1, args.messages // senders)
            saturated, moderate = [], []
            # saturated: the senders in --client-processes processes (clients need CPU too);
            # moderate: all in one process, so the light load adds no client process to
            # the competition for the cores
            for processes, kind in ((args.client_processes, "saturated"), (1, "moderate")):
                with client_group(server.tcp_port, senders, processes) as group:
                    for _ in range(args.runs):
                        if kind == "saturated":
                            saturated.append(one_run(group, tree, (
                                "run", "saturated", per_sender, args.window, 0.0, 0.0, args.content_size,
                                time.monotonic() + args.run_timeout), args.run_timeout))
                        else:
                            moderate.append(one_run(group, tree, (
                                "run", "moderate", 0, 0, args.rate, args.rate_seconds, args.content_size,
                                time.monotonic() + args.run_timeout), args.run_timeout))
            row = {
                "stored_per_second": median(saturated, "per_second"),
                "stored_per_cpu_second": median(saturated, "per_cpu_second"),
                "saturated_p50_ms": median(saturated, "p50_ms"),
                "saturated_p99_ms": median(saturated, "p99_ms"),
                "moderate_rate": args.rate,
                "moderate_p50_ms": median(moderate, "p50_ms"),
                "moderate_p99_ms": median(moderate, "p99_ms"),
                "runs": {"saturated": saturated, "moderate": moderate},
            }
            out[str(senders)] = row
            print(f"{store:>6} senders={senders:<3} stored/s {row['stored_per_second']:>9,.0f}  "
                  f"per CPU-s {_count(row['stored_per_cpu_second']):>9}  "
                  f"saturated p50/p99 {row['saturated_p50_ms']:7.2f} /{row['saturated_p99_ms']:7.2f} ms  "
                  f"at {args.rate:,.0f}/s p50/p99 {row['moderate_p50_ms']:6.2f} /{row['moderate_p99_ms']:6.2f} ms")
            sys.stdout.flush()
        if server.stop() != 0:
            raise RuntimeError(f"the {store} server did not stop cleanly:\n{server.log_tail()}")
    return out


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# -- the writer alone -------------------------------------------------------------
def measure_engine(messages: int, content_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="zim-engine-") as tmp:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "zim.storage.writer", "--db", os.path.join(tmp, "zim.db"),
             "--link-fd", str(theirs.fileno()), "--parent", str(os.getpid()), "--log-level", "WARNING"],
            pass_fds=(theirs.fileno(),), cwd=benchlib.REPO_ROOT)
        theirs.close()
        try:
            content = "x" * content_size
            ops = []
            for i in range(messages):
                msg = {"id": str(10**17 + i), "seq": 0, "content": content,
                       "sender": {"id": str(1 + i % 16), "name": "sender"}, "createdAt": 1764300000000,
                       "receiverId": str(100 + i % 16)}
                ops.append(benchlib.tcp_packet(OP_USER_MESSAGE, 0,
                                               orjson.dumps([1 + i % 16, 100 + i % 16, msg])))
            chunks = [b"".join(ops[i:i + 1000]) for i in range(0, len(ops), 1000)]
            buf = bytearray()
            answered = failed = 0
            start = time.perf_counter()
            ours.setblocking(False)
            pending = list(reversed(chunks))
            outgoing = b""
            while answered < messages:
                if not outgoing and pending:
                    outgoing = pending.pop()
                readable, writable, _ = select.select([ours], [ours] if outgoing else [], [], 30)
                if not readable and not writable:
                    raise RuntimeError("the writer stopped answering")
                if writable:
                    sent = ours.send(outgoing)
                    outgoing = outgoing[sent:]
                if readable:
                    data = ours.recv(1 << 20)
                    if not data:
                        raise RuntimeError("the writer closed the link")
                    buf += data
                    for _action, status, _body in benchlib.tcp_split(buf):
                        answered += 1
                        failed += status != 0
            seconds = time.perf_counter() - start
        finally:
            ours.close()
            process.wait(10)
        if failed:
            raise RuntimeError(f"the writer failed {failed} operations")
        return {"messages": messages, "seconds": seconds, "per_second": messages / seconds}


def run(args, info: dict) -> int:
    result: dict = {"bench": "store", "ok": True, "machine": info, "stores": {}}
    engine = [measure_engine(args.engine_messages, args.content_size) for _ in range(args.runs)]
    result["engine_per_second"] = median(engine, "per_second")
    each = ", ".join(f"{e['per_second']:,.0f}" for e in engine)
    print(f"engine: zim.storage.writer alone commits {result['engine_per_second']:,.0f} private messages/s "
          f"(median of {args.runs}: {each})")
    for store in args.stores:
        result["stores"][store] = measure_store(args, store)
    if "sqlite" in result["stores"] and "memory" in result["stores"]:
        for senders, row in result["stores"]["sqlite"].items():
            memory = result["stores"]["memory"][senders]
            added = row["moderate_p99_ms"] - memory["moderate_p99_ms"]
            row["added_p99_ms"] = added
            print(f"senders={senders:<3} store added at {args.rate:,.0f}/s: p99 {added:+.2f} ms; "
                  f"saturated throughput sqlite/memory {row['stored_per_second'] / memory['stored_per_second']:.2f}")
    best = max(row["stored_per_second"] for row in result["stores"].get("sqlite", {}).values()) \
        if "sqlite" in result["stores"] else None
    print(f"RESULT store: engine {result['engine_per_second']:,.0f} msgs/s; "
          f"through the server {best:,.0f} stored msgs/s (target 100,000)" if best else
          f"RESULT store: engine {result['engine_per_second']:,.0f} msgs/s")
    if args.json:
        benchlib.print_json(result)
    return 0


def add_load_arguments(parser: argparse.ArgumentParser, messages: int, rate: float, rate_seconds: float) -> None:
    """The flags of the senders' load (saturated and moderate runs), shared with bench/archive_single.py."""
    parser.add_argument("--messages", type=int, default=messages, help="per saturated run, all senders")
    parser.add_argument("--window", type=int, default=64, help="requests in flight per sender (saturated)")
    parser.add_argument("--rate", type=float, default=rate, help="messages/s of a moderate run, all senders")
    parser.add_argument("--rate-seconds", type=float, default=rate_seconds)
    parser.add_argument("--content-size", type=int, default=100)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run-timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=lambda t: t.split(","), default=["sqlite", "memory"])
    parser.add_argument("--senders-list", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 16])
    add_load_arguments(parser, messages=60_000, rate=5_000, rate_seconds=3.0)
    parser.add_argument("--engine-messages", type=int, default=200_000)
    args = parser.parse_args()
    return benchlib.run_main("store", "zim durable store: stored messages/s and send-to-ack latency", args, run)


if __name__ == "__main__":
    sys.exit(main())
