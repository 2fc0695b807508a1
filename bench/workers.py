#!/usr/bin/env python3
"""Multi-worker mode: cross-worker private messages and channel fan-out, workers 1 vs N.

For each worker count W in ``--workers-list`` (default ``1,4``) this starts a real
server (``python -m zim --workers W``, loopback ports, a temporary data directory),
waits until all W workers listen, and measures two things on it:

(a) Private messages. 2P clients (``--pairs`` P, default 100 → 200 clients, in
``--dm-processes`` client processes) log in as new users. The clients' local ports
tell which worker serves each (psutil: the workers' sockets), and the clients are
paired across workers whenever the split allows it (sorted by worker, client i is
paired with client i + P). Every client then sends ``--dm-messages`` private
messages (action 2) to its partner, pipelined with up to ``--dm-window``
unanswered requests. Counted: responses/s and pushes (101) received/s over the
wall time (first send → last packet), loss (every message must reach the
partner exactly once), responses per server-CPU-second, and send-to-receipt
latency of every push (its content starts with the send time, CLOCK_MONOTONIC ns,
which is system-wide). Mailboxes are not acked: they grow by the messages sent.

(b) Channel fan-out, exactly as ``broadcast.py`` measures it (its code is reused):
``--members`` K members (default 10,000) in at least two client processes subscribe
to one channel; SO_REUSEPORT spreads them over the workers (the split is printed).
One publisher sends M messages; M × K deliveries are expected (loss must be 0).
Deliveries/s (wall) and deliveries per server-CPU-second, where the server's
CPU is user + system of the supervisor and all its workers, read over the send
phase only.

The figure the issue sets a target on: per-core throughput ratio = deliveries per
server-CPU-second with W workers / with the first W of the list (target: >= 0.8,
i.e. adding workers must not cut per-core delivery throughput by more than 20%).
The exit code reflects correctness only (no loss, no errors, no worker restart);
the target is reported, not enforced.

The clients share the machine's cores with the server; wall-clock rates depend
on them, per-CPU-second figures much less.

Example: ``python bench/workers.py --json``; small: ``--members 200 --pairs 20 --runs 1``
"""
from __future__ import annotations

import argparse
import select
import shlex
import socket
import statistics
import sys
import time

import orjson

import benchlib
import broadcast  # the fan-out members, publisher and one run

from zim.protocol import LOGIN, SEND_USER, PUSH_USER_MESSAGE as PUSH_USER
STAMP_DIGITS = broadcast.STAMP_DIGITS
CONTENT_KEY = b'"content":"'
TARGET_RATIO = 0.8
QUIET_SECONDS = 2.0      # a run with every send answered ends after this long without a packet


# -- private-message clients (client processes) ----------------------------------
class DMClient:
    """One logged-in user sending to its partner; all counters are per run."""

    def __init__(self, sock: socket.socket, user_id: str) -> None:
        self.sock = sock
        self.user_id = user_id
        self.prefix = b""
        self.buf = bytearray()
        self.seq = 0
        self.reset()

    def reset(self) -> None:
        self.sent = self.acked = self.errors = self.pushes = self.unexpected = 0

    def next_seq(self) -> int:
        self.seq = self.seq % 32767 + 1
        return self.seq


def log_in_clients(port: int, first: int, count: int,
                   deadline: float) -> tuple[list[DMClient], list[str]]:
    """Connect ``count`` clients and log each in as a new user (few: done one by one)."""
    clients: list[DMClient] = []
    failures: list[str] = []
    for number in range(first, first + count):
        if time.monotonic() > deadline:
            failures.append("setup timed out")
            break
        try:
            sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(benchlib.tcp_packet(LOGIN, 1, orjson.dumps({"name": f"dm-{number}"})))
            buf = bytearray()
            reply = None
            while reply is None:
                data = sock.recv(65536)
                if not data:
                    raise OSError("closed by the server during login")
                buf += data
                for action, seq, body in benchlib.tcp_split(buf):
                    if action == LOGIN and seq == 1:
                        reply = orjson.loads(body) if body else {}
            if "error" in reply:
                raise OSError(f"login: {reply['error']}")
        except OSError as exc:
            failures.append(str(exc))
            continue
        client = DMClient(sock, reply["id"])
        client.buf = buf
        clients.append(client)
    return clients, failures


def dm_run(clients: list[DMClient], messages: int, window: int, content_size: int,
           deadline: float, conn) -> dict:
    """Every client sends ``messages`` to its partner with ``window`` in flight; the
    run ends when every client has all its answers and all its partner's pushes."""
    by_fd = {c.sock.fileno(): c for c in clients}
    epoll = select.epoll()
    for fd in by_fd:
        epoll.register(fd, select.EPOLLIN)
    for client in clients:
        client.reset()
    padding = b"x" * max(0, content_size - STAMP_DIGITS)
    pack = benchlib.tcp_packet
    monotonic_ns = time.monotonic_ns
    latencies_ns: list[int] = []
    closed = 0
    last_ns = 0

    def fill(client: DMClient) -> None:
        batch = []
        while client.sent < messages and client.sent - client.acked < window:
            body = b'%s%020d%s"}' % (client.prefix, monotonic_ns(), padding)
            batch.append(pack(SEND_USER, client.next_seq(), body))
            client.sent += 1
        if batch:
            client.sock.sendall(b"".join(batch))

    conn.send(("armed",))
    if not conn.poll(60) or conn.recv()[0] != "go":
        raise broadcast.StopRun()
    for client in clients:
        fill(client)
    waiting = {fd for fd in by_fd}      # clients not yet complete
    quiet_since = time.monotonic()
    while waiting and time.monotonic() < deadline:
        events = epoll.poll(0.2, 1024)
        if not events:
            all_answered = all(c.acked >= c.sent >= messages for c in clients)
            if all_answered and time.monotonic() - quiet_since > QUIET_SECONDS:
                break       # pushes still missing now are lost
            continue
        quiet_since = time.monotonic()
        now = monotonic_ns()
        for fd, _ in events:
            client = by_fd[fd]
            try:
                data = client.sock.recv(1 << 18)
            except (BlockingIOError, socket.timeout):
                continue
            except OSError:
                data = b""
            if not data:
                closed += 1
                epoll.unregister(fd)
                waiting.discard(fd)
                continue
            client.buf += data
            for action, _seq, body in benchlib.tcp_split(client.buf):
                if action == SEND_USER:
                    client.acked += 1
                    if body.startswith(b'{"error"'):
                        client.errors += 1
                elif action == PUSH_USER:
                    client.pushes += 1
                    at = body.find(CONTENT_KEY) + len(CONTENT_KEY)
                    stamp = body[at:at + STAMP_DIGITS]
                    if at >= len(CONTENT_KEY) and stamp.isdigit():
                        latencies_ns.append(now - int(stamp))
                else:
                    client.unexpected += 1
            fill(client)
            if client.acked >= messages and client.pushes >= messages:
                waiting.discard(fd)
        last_ns = now
    epoll.close()
    return {
        "clients": len(clients), "sent": sum(c.sent for c in clients),
        "acked": sum(c.acked for c in clients), "errors": sum(c.errors for c in clients),
        "pushes": sum(c.pushes for c in clients),
        "unexpected": sum(c.unexpected for c in clients), "closed": closed,
        "incomplete": len(waiting), "last_ns": last_ns, "latencies_ns": latencies_ns,
    }


def dm_process(port: int, first: int, count: int, setup_timeout: float, conn) -> None:
    """A client process: log ``count`` users in, take partners, then do runs on order."""
    benchlib.raise_open_files(count + 100)
    clients, failures = log_in_clients(port, first, count, time.monotonic() + setup_timeout)
    conn.send(("ready", [(c.sock.getsockname()[1], c.user_id) for c in clients],
               failures[:5], len(failures)))
    try:
        while conn.poll(900):     # bounded: the parent gives orders well within this
            order = conn.recv()
            if order[0] == "partners":
                for client, partner in zip(clients, order[1]):
                    client.prefix = orjson.dumps({"receiverId": partner, "content": ""})[:-2]
            elif order[0] == "run":
                _, messages, window, content_size, run_timeout = order
                conn.send(("result", dm_run(clients, messages, window, content_size,
                                            time.monotonic() + run_timeout, conn)))
            else:
                break
    except broadcast.StopRun:
        pass
    finally:
        for client in clients:
            client.sock.close()


def pair_across_workers(clients: list[tuple[int, str, int]]) -> tuple[dict[str, str], int]:
    """Partners for (local port, user id, worker) clients, across workers when possible.

    Sorted by worker, client i is paired with client i + n/2: every pair is
    cross-worker unless one worker serves more than half of the clients.
    Returns user id → partner id and the number of cross-worker pairs.
    """
    ordered = sorted(clients, key=lambda c: (c[2], c[0]))
    half = len(ordered) // 2
    partners: dict[str, str] = {}
    cross = 0
    for one, other in zip(ordered[:half], ordered[half:2 * half]):
        partners[one[1]], partners[other[1]] = other[1], one[1]
        cross += one[2] != other[2]
    return partners, cross


# -- one server -------------------------------------------------------------------
def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def dm_phase(args, server: benchlib.Server, tree: benchlib.ProcessTree) -> dict:
    clients_wanted = 2 * args.pairs
    processes = max(1, min(args.dm_processes, clients_wanted))
    base, extra = divmod(clients_wanted, processes)
    with benchlib.ClientProcesses() as group:
        group.start(dm_process, [
            (server.tcp_port, index * (base + 1), base + (1 if index < extra else 0), args.setup_timeout)
            for index in range(processes)])
        ready = group.receive_all(args.setup_timeout + 30, "log its clients in")
        logged_in = []
        for _, clients, failures, failed in ready:
            logged_in.append(clients)
            for reason in failures:
                print(f"  dm setup failure: {reason}")
            if failed:
                print(f"  {failed} dm client(s) of one process failed to log in")
        total = sum(len(clients) for clients in logged_in)
        if total != clients_wanted:
            raise RuntimeError(f"only {total}/{clients_wanted} dm clients logged in")
        served = server.client_workers()
        located = [(port, user, served.get(port, -1)) for clients in logged_in for port, user in clients]
        if any(worker < 0 for _, _, worker in located):
            raise RuntimeError("a dm client's connection was not found on any worker")
        partners, cross = pair_across_workers(located)
        for pipe, clients in zip(group.pipes, logged_in):
            pipe.send(("partners", [partners[user] for _, user in clients]))
        split = [sum(1 for c in located if c[2] == w) for w in range(server.workers)]
        print(f"dm: {total} clients in {processes} process(es), per worker {split}; "
              f"{args.pairs} pairs, {cross} cross-worker; {args.dm_messages} messages of "
              f"{args.content_size} B per client per run, window {args.dm_window}")
        sys.stdout.flush()
        runs = []
        for number in range(1, args.runs + 1):
            group.send_all(("run", args.dm_messages, args.dm_window, args.content_size, args.run_timeout))
            for message in group.receive_all(30, "arm its dm run"):
                if message[0] != "armed":
                    raise RuntimeError(f"a dm process answered {message[0]!r}")
            before = tree.cpu_times()
            start_ns = time.monotonic_ns()
            group.send_all(("go",))
            results = [m[1] for m in group.receive_all(args.run_timeout + 30, "finish its dm run")]
            after = tree.cpu_times()
            if tree.changed():
                raise RuntimeError("a server process ended or restarted during the dm run")
            runs.append(_dm_summary(number, args, results, start_ns, before, after, cross))
    return {
        "clients": total, "pairs": args.pairs, "cross_worker_pairs": cross, "per_worker": split,
        "client_processes": processes, "messages_per_client": args.dm_messages,
        "window": args.dm_window, "runs": runs,
        **_over_runs(runs, "responses_per_second", "pushes_per_second", "responses_per_cpu_second"),
    }


def _over_runs(runs: list[dict], *rates: str) -> dict:
    """Medians of the rates and latencies over runs, total loss, and whether all were ok."""
    keys = (*rates, "latency_p50_ms", "latency_p99_ms")
    return {**{key: _median(runs, key) for key in keys},
            "loss": sum(r["loss"] for r in runs), "ok": all(r["ok"] for r in runs)}


def _dm_summary(number: int, args, results: list[dict], start_ns: int, before, after,
                cross: int) -> dict:
    responses = sum(r["acked"] for r in results)
    pushes = sum(r["pushes"] for r in results)
    errors = sum(r["errors"] for r in results)
    expected = 2 * args.pairs * args.dm_messages
    wall = max(1e-9, (max(r["last_ns"] for r in results) - start_ns) / 1e9)
    server_user = after.user - before.user
    server_system = after.system - before.system
    server_cpu = server_user + server_system
    latencies = sorted(ns / 1e6 for r in results for ns in r["latencies_ns"])
    run = {
        "run": number, "expected": expected, "responses": responses, "pushes": pushes,
        "loss": expected - pushes, "errors": errors,
        "unexpected_packets": sum(r["unexpected"] for r in results),
        "closed_clients": sum(r["closed"] for r in results),
        "wall_seconds": round(wall, 4), "server_cpu_seconds": round(server_cpu, 4),
        "server_cpu_user_seconds": round(server_user, 4),
        "server_cpu_system_seconds": round(server_system, 4),
        "responses_per_second": round(responses / wall),
        "pushes_per_second": round(pushes / wall),
        "responses_per_cpu_second": round(responses / server_cpu) if server_cpu > 0 else None,
        "latency_p50_ms": _round(benchlib.percentile(latencies, 0.50)),
        "latency_p99_ms": _round(benchlib.percentile(latencies, 0.99)),
        "latency_samples": len(latencies), "cross_worker_pairs": cross,
    }
    run["ok"] = (run["loss"] == 0 and responses == expected and errors == 0
                 and run["unexpected_packets"] == 0 and run["closed_clients"] == 0)
    print(f"dm run {number}: {responses:,}/{expected:,} responses in {wall:.3f} s = "
          f"{_rate(run['responses_per_second'])}/s; {pushes:,} pushes (loss {run['loss']:,}) = "
          f"{_rate(run['pushes_per_second'])}/s; server CPU {server_cpu:.3f} s (user "
          f"{server_user:.2f} + sys {server_system:.2f}) = {_rate(run['responses_per_cpu_second'])} "
          f"messages/CPU-s; latency p50 {run['latency_p50_ms']} ms p99 {run['latency_p99_ms']} ms; "
          f"errors {errors}")
    sys.stdout.flush()
    return run


def broadcast_phase(args, server: benchlib.Server, tree: benchlib.ProcessTree) -> dict:
    # At least two client processes: the open-files limit is per process.
    processes = max(2, -(-args.members // args.per_process))
    base, extra = divmod(args.members, processes)
    publisher = None
    with benchlib.ClientProcesses() as group:
        setup_start = time.monotonic()
        group.start(broadcast.member_process, [
            (server.tcp_port, index * (base + 1), base + (1 if index < extra else 0), 500,
             args.setup_timeout)
            for index in range(processes)])
        ready = 0
        for _, count, failures, failed in group.receive_all(args.setup_timeout + 30,
                                                            "subscribe its members"):
            ready += count
            for reason in failures:
                print(f"  setup failure: {reason}")
            if failed:
                print(f"  {failed} member(s) of one process failed to set up")
        served = server.client_workers()
        split = [0] * server.workers
        for worker in served.values():
            split[worker] += 1
        print(f"broadcast: {ready}/{args.members} members in {processes} client processes "
              f"subscribed in {time.monotonic() - setup_start:.1f} s, per worker {split}; "
              f"{args.messages} messages of {args.content_size} B per run, window {args.window}")
        sys.stdout.flush()
        if ready != args.members:
            raise RuntimeError("not every member could subscribe")
        try:
            publisher = broadcast.Publisher(server.tcp_port, args.content_size, args.window)
            run_args = argparse.Namespace(messages=args.messages, run_timeout=args.run_timeout)
            runs = []
            for number in range(1, args.runs + 1):
                run = broadcast.one_run(number, run_args, tree, publisher, group.pipes)
                if tree.changed():
                    raise RuntimeError("a server process ended or restarted during the broadcast run")
                run["ok"] = (run["loss"] == 0 and run["publish_errors"] == 0
                             and run["over_members"] == 0 and run["unexpected_packets"] == 0)
                runs.append(run)
        finally:
            if publisher is not None:
                publisher.close()
    return {
        "members": args.members, "per_worker": split, "client_processes": processes,
        "messages": args.messages, "window": args.window, "runs": runs,
        **_over_runs(runs, "deliveries_per_second", "deliveries_per_cpu_second"),
    }


def measure(args, workers: int) -> dict:
    server = benchlib.Server(extra_args=shlex.split(args.server_args), workers=workers)
    try:
        root = server.start()
        tree = benchlib.ProcessTree(root)
        print(f"== workers={workers}: server pid {root.pid} "
              f"(+{len(tree.processes) - 1} child processes): {shlex.join(server.command)}")
        sys.stdout.flush()
        dm = dm_phase(args, server, tree)
        dm_rss = tree.rss()
        fanout = broadcast_phase(args, server, tree)
        rss = tree.rss()
        if not server.alive():
            raise RuntimeError(f"the server died:\n{server.log_tail()}")
    finally:
        code = server.stop()
    result = {"workers": workers, "dm": dm, "broadcast": fanout, "server_exit_code": code,
              "server_rss_after_dm": dm_rss, "server_rss_after": rss,
              "server_command": server.command}
    result["ok"] = dm["ok"] and fanout["ok"] and code == 0
    print(f"RESULT workers W={workers} "
          f"dm_responses_per_second={_rate(dm['responses_per_second'])} "
          f"dm_pushes_per_second={_rate(dm['pushes_per_second'])} "
          f"dm_responses_per_cpu_second={_rate(dm['responses_per_cpu_second'])} "
          f"dm_loss={dm['loss']} dm_latency_p50_ms={dm['latency_p50_ms']} "
          f"dm_latency_p99_ms={dm['latency_p99_ms']} "
          f"broadcast_deliveries_per_second={_rate(fanout['deliveries_per_second'])} "
          f"broadcast_deliveries_per_cpu_second={_rate(fanout['deliveries_per_cpu_second'])} "
          f"broadcast_loss={fanout['loss']} broadcast_latency_p50_ms={fanout['latency_p50_ms']} "
          f"broadcast_latency_p99_ms={fanout['latency_p99_ms']} "
          f"server_rss_mib={rss / 2**20:.0f} server_exit_code={code} {'OK' if result['ok'] else 'FAILED'}")
    sys.stdout.flush()
    return result


# -- orchestration -------------------------------------------------------------------
def add_dm_args(parser: argparse.ArgumentParser, messages: int) -> None:
    """The private-message flags, shared with bench/nodes.py."""
    parser.add_argument("--pairs", type=int, default=100, metavar="P",
                        help="private-message pairs: 2P clients (default 100)")
    parser.add_argument("--dm-messages", type=int, default=messages, metavar="N",
                        help=f"private messages each client sends per run (default {messages})")
    parser.add_argument("--dm-window", type=int, default=8, metavar="N",
                        help="unanswered private messages per client (default 8)")
    parser.add_argument("--dm-processes", type=int, default=2, metavar="N",
                        help="client processes for the private-message clients (default 2; "
                             "bench/nodes.py: at least one per node)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers-list", default="1,4", metavar="W,W",
                        help="worker counts to measure, comma-separated; the first is the "
                             "baseline of the per-core ratio (default 1,4)")
    add_dm_args(parser, 1000)
    broadcast.add_fanout_args(parser, 10_000)
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra zim-server flags, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    try:
        args.workers_counts = [int(w) for w in args.workers_list.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers-list takes comma-separated integers, e.g. 1,4")
    if not args.workers_counts or any(w < 1 for w in args.workers_counts):
        parser.error("--workers-list needs worker counts of at least 1")
    if min(args.pairs, args.dm_messages, args.dm_window, args.dm_processes, args.members,
           args.window, args.runs, args.per_process) < 1:
        parser.error("counts, windows and --runs must be at least 1")
    if not STAMP_DIGITS <= args.content_size <= 60000:
        parser.error(f"--content-size must be in {STAMP_DIGITS}..60000")
    if args.per_process > 19000 or 2 * args.pairs > 19000 * args.dm_processes:
        parser.error("too many sockets per client process for the open-files limit")
    if args.messages <= 0:
        args.messages = max(100, min(20_000, 5_000_000 // args.members))
    return args


def run(args: argparse.Namespace, info: dict) -> int:
    print(f"worker counts {args.workers_counts}; dm: {args.pairs} pairs; broadcast: "
          f"{args.members} members; {args.runs} run(s) each")
    sys.stdout.flush()
    measured = [measure(args, workers) for workers in args.workers_counts]
    baseline = measured[0]
    base_rate = baseline["broadcast"]["deliveries_per_cpu_second"]
    ratios: dict[str, float | None] = {}
    dm_ratios: dict[str, float | None] = {}
    for result in measured[1:]:
        rate = result["broadcast"]["deliveries_per_cpu_second"]
        ratio = rate / base_rate if rate and base_rate else None
        ratios[str(result["workers"])] = _round(ratio)
        dm_rate, dm_base = (result["dm"]["responses_per_cpu_second"],
                            baseline["dm"]["responses_per_cpu_second"])
        dm_ratios[str(result["workers"])] = _round(dm_rate / dm_base if dm_rate and dm_base else None)
        met = "n/a" if ratio is None else ("met" if ratio >= TARGET_RATIO else "NOT met")
        print(f"RESULT workers per-core ratio W={result['workers']}/W={baseline['workers']} "
              f"= {'n/a' if ratio is None else f'{ratio:.3f}'} (broadcast deliveries per "
              f"server-CPU-second {_rate(rate)} / {_rate(base_rate)}); target >= {TARGET_RATIO}: "
              f"{met}; dm messages per server-CPU-second ratio = "
              f"{dm_ratios[str(result['workers'])]}")
    if not ratios:
        print("RESULT workers per-core ratio n/a (one worker count measured)")
    known = [r for r in ratios.values() if r is not None]
    ok = all(r["ok"] for r in measured)
    if args.json:
        benchlib.print_json({
            "bench": "workers", "ok": ok, "workers_list": args.workers_counts,
            "baseline_workers": baseline["workers"], "results": {str(r["workers"]): r for r in measured},
            "per_core_ratio": ratios, "dm_per_core_ratio": dm_ratios,
            "target_ratio": TARGET_RATIO,
            "target_met": (all(r >= TARGET_RATIO for r in known) if known and len(known) == len(ratios)
                           else None),
            "pairs": args.pairs, "dm_messages": args.dm_messages, "dm_window": args.dm_window,
            "members": args.members, "messages": args.messages, "window": args.window,
            "content_size": args.content_size, "runs": args.runs, "machine": info,
        })
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("workers", "zim multi-worker: cross-worker private messages and "
                             "channel fan-out", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
