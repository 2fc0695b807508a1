#!/usr/bin/env python3
"""Huge groups: time from send to the last receipt, a channel of N members over W workers.

For each N of ``--members-list`` (default ``10000,100000``) this starts a fresh
``python -m zim --workers W`` (default 8; loopback ports, a temporary data
directory), and N members, in client processes of at most ``--per-process``
sockets each, log in as new users and subscribe to one channel. SO_REUSEPORT
spreads them over the workers (the split is printed, from the workers'
descriptor counts). More than ~20,000 connections to one port use several
source addresses (127.0.0.1, 127.0.0.2, ...; IP_BIND_ADDRESS_NO_PORT), since
one source address has only 28,232 ephemeral ports.

One publisher connection (in this process, a member too) then sends, in each
of ``--runs`` runs:

- **single**: one channel message; measured: the time from the send to the
  LAST member's receipt, and the p50 and p99 of all N receipt times;
- **burst**: ``--burst`` B messages written at once; measured: the time from
  the first send to the last receipt of the last message, and p50/p99 of every
  delivery's time from its own message's send.

A receipt time is when the member's client process read the push: the
content starts with its send time (CLOCK_MONOTONIC ns, shared by every process
on the machine); each member process stamps every batch of reads with the
clock and turns the byte counts of each member into the time its k-th push
was complete (one *sample* connection per process parses every packet and gives
the push sizes and send times; every member receives the same byte stream).
Loss (expected deliveries minus complete ones) must be 0.

Server CPU per message and per delivery: the CPU time of the router, the
workers and the store's writer (``/proc/PID/task/*/schedstat``, nanoseconds)
over each phase; the workers' share and each worker's time are printed, to
show the fan-out ran on every worker. On loopback the server's CPU includes
the kernel's receive-side work for the clients' sockets.

The client processes share the machine's cores with the server (this
machine: see ``nproc`` in the header; with 2 cores, 8 workers and the client
processes take turns), so receipt times include the clients' own scheduling.

Example: ``python bench/hugegroup.py --json``; small: ``--members-list 500 --workers 2 --runs 1``
"""
from __future__ import annotations

import argparse
import array
import os
import select
import shlex
import statistics
import sys
import time

import orjson
import psutil

import benchlib
import broadcast  # members' setup, the publisher, the channel, the stamp format

PUSH_CHANNEL = broadcast.PUSH_CHANNEL
STAMP_DIGITS = broadcast.STAMP_DIGITS
CONNECTIONS_PER_SOURCE = 20_000  # of the 28,232 ephemeral ports (32768-60999) of one address
OPEN_FILES_MARGIN = 100
MAX_PER_PROCESS = 19_000         # the open-files limit is 20,000 per process


# -- members (client processes) ----------------------------------------------
class SampleStream:
    """The push stream of one member, parsed: where each push ends and when it was sent."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ends: list[int] = []       # cumulative byte offset of each push's end
        self.stamps: list[int] = []     # its send time (ns), from the content
        self.unexpected = 0

    def feed(self, data: memoryview) -> None:
        self.buf += data
        for action, _seq, body in benchlib.tcp_split(self.buf):
            if action != PUSH_CHANNEL:
                self.unexpected += 1
                continue
            self.ends.append((self.ends[-1] if self.ends else 0) + benchlib.HEADER_SIZE + len(body))
            content = orjson.loads(body).get("content", "")
            self.stamps.append(int(content[:STAMP_DIGITS]) if content[:STAMP_DIGITS].isdigit() else 0)


def receive_run(epoll: select.epoll, fds: list[int], messages: int, deadline: float, conn) -> dict:
    """Read one run on every member; each read is logged as (fd, clock, bytes so far),
    and turned at the end into the time each member's k-th push was complete."""
    totals = [0] * (max(fds) + 1)
    read_fd, read_ns, read_total = array.array("l"), array.array("q"), array.array("q")
    sample_fd = fds[0]
    sample = SampleStream()
    remaining: set[int] | None = None   # members short of the whole stream, once its length is known
    target = 0
    closed = 0
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    bufs = [chunk]
    read_some = benchlib.read_some
    monotonic_ns = time.monotonic_ns
    conn.send(("armed",))
    while time.monotonic() < deadline:
        if remaining is None and len(sample.ends) >= messages:
            target = sample.ends[messages - 1] if messages else 0
            remaining = {fd for fd in fds if totals[fd] < target}
        if remaining is not None and not remaining:
            break
        events = epoll.poll(0.1, 8192)
        if not events:
            # quiet: the parent may say that fewer messages were accepted than asked
            if conn.poll():
                order = conn.recv()
                if order[0] != "accepted":
                    raise broadcast.StopRun()
                messages = min(messages, order[1])
            continue
        now = monotonic_ns()
        for fd, _ in events:
            n = read_some(fd, bufs)
            if n < 0:
                continue
            if n == 0:
                closed += 1
                epoll.unregister(fd)
                if remaining is not None:
                    remaining.discard(fd)
                continue
            total = totals[fd] = totals[fd] + n
            read_fd.append(fd)
            read_ns.append(now)
            read_total.append(total)
            if fd == sample_fd:
                sample.feed(view[:n])
            if remaining is not None and total >= target:
                remaining.discard(fd)
    return receipts(fds, totals, read_fd, read_ns, read_total, sample, messages, closed)


def receipts(fds: list[int], totals: list[int], read_fd: array.array, read_ns: array.array,
             read_total: array.array, sample: SampleStream, messages: int, closed: int) -> dict:
    """Per message: every member's receipt time minus the send time (ns), from the
    read log in one pass (a member's k-th push is complete at its first read that
    reaches the k-th end offset)."""
    ends = sample.ends[:messages]
    latencies = [array.array("q") for _ in ends]
    complete = [0] * len(totals)        # pushes complete so far, per fd
    for fd, now, total in zip(read_fd, read_ns, read_total):
        k = complete[fd]
        while k < len(ends) and total >= ends[k]:
            latencies[k].append(now - sample.stamps[k])
            k += 1
        complete[fd] = k
    stream_end = ends[-1] if ends else 0
    return {
        "members": len(fds), "delivered": sum(complete[fd] for fd in fds),
        "short": sum(1 for fd in fds if complete[fd] < messages),
        "over": sum(1 for fd in fds if totals[fd] > stream_end),
        "closed": closed, "unexpected": sample.unexpected, "push_bytes": ends[0] if ends else 0,
        "stamps": sample.stamps[:messages], "latencies": [lat.tobytes() for lat in latencies],
    }


def member_process(port: int, first: int, count: int, sources: int, inflight: int,
                   setup_timeout: float, conn) -> None:
    """A client process: hold ``count`` members and read each run the parent orders."""
    benchlib.raise_open_files(count + OPEN_FILES_MARGIN)
    sockets, early, failures = broadcast.open_members(port, first, count, inflight,
                                                      time.monotonic() + setup_timeout, sources)
    if early:       # pushes before any message was sent: the byte counts would be off
        failures.append(f"{len(early)} bytes arrived before the first message")
        for sock in sockets:
            sock.close()
        sockets = []
    conn.send(("ready", len(sockets), failures[:5], len(failures)))
    epoll = select.epoll()
    fds = [sock.fileno() for sock in sockets]
    for fd in fds:
        epoll.register(fd, select.EPOLLIN)
    try:
        while conn.poll(900):   # bounded: the parent gives orders well within this
            order = conn.recv()
            if order[0] == "accepted":
                continue        # a finished run's note, not read during the run
            if order[0] != "run" or not fds:
                break
            _, messages, run_timeout = order
            conn.send(("result", receive_run(epoll, fds, messages, time.monotonic() + run_timeout, conn)))
    except broadcast.StopRun:
        pass
    finally:
        epoll.close()
        for sock in sockets:
            sock.close()


# -- the server's CPU time, per process -----------------------------------------
def cpu_ns(process: psutil.Process) -> int:
    """CPU time of every thread of a process so far, in ns (0 once it is gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{process.pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{process.pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def server_roles(server: benchlib.Server) -> dict[str, list[psutil.Process]]:
    """The router, its workers (by index) and the other children (the store's writer)."""
    root = psutil.Process(server.process.pid)
    if server.workers == 1:             # one process serves the clients and runs the handlers
        return {"router": [], "workers": [root], "writer": root.children(recursive=True)}
    workers = [p for p in server.worker_processes() if "zim.worker" in " ".join(p.cmdline())]
    others = [p for p in root.children(recursive=True) if p not in workers]
    return {"router": [root], "workers": workers, "writer": others}


def cpu_reading(roles: dict[str, list[psutil.Process]]) -> dict[str, list[int]]:
    return {role: [cpu_ns(p) for p in processes] for role, processes in roles.items()}


# -- orchestration -----------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members-list", default="10000,100000", metavar="N,N",
                        help="channel sizes to measure, comma-separated (default 10000,100000)")
    parser.add_argument("--workers", type=int, default=8, metavar="W",
                        help="server workers (default 8; each holds at most ~19,000 members)")
    parser.add_argument("--burst", type=int, default=10, metavar="B",
                        help="messages of the burst phase (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--content-size", type=int, default=100, metavar="BYTES",
                        help=f"message content size (default 100; at least {STAMP_DIGITS}, the send time)")
    parser.add_argument("--per-process", type=int, default=12_500, metavar="N",
                        help="member sockets per client process (default 12,500)")
    parser.add_argument("--inflight", type=int, default=500, metavar="N",
                        help="members joining at once per client process (default 500)")
    parser.add_argument("--sources", type=int, default=0, metavar="N",
                        help="client source addresses 127.0.0.1..N (default 0: one per 20,000 members)")
    parser.add_argument("--setup-timeout", type=float, default=600.0, metavar="S",
                        help="seconds allowed to subscribe the members (default 600)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed per phase (default 120)")
    parser.add_argument("--pause", type=float, default=0.5, metavar="S",
                        help="quiet seconds before each phase (default 0.5)")
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra zim-server flags, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    try:
        args.members_counts = [int(n) for n in args.members_list.split(",") if n.strip()]
    except ValueError:
        parser.error("--members-list takes comma-separated integers, e.g. 10000,100000")
    if not args.members_counts or min(args.members_counts) < 1:
        parser.error("--members-list needs member counts of at least 1")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be in 1..64")
    if min(args.burst, args.runs, args.per_process, args.inflight) < 1:
        parser.error("--burst, --runs, --per-process and --inflight must be at least 1")
    if args.per_process > MAX_PER_PROCESS:
        parser.error(f"--per-process above {MAX_PER_PROCESS} does not fit the open-files limit")
    if not STAMP_DIGITS <= args.content_size <= 60000:
        parser.error(f"--content-size must be in {STAMP_DIGITS}..60000")
    if not 0 <= args.sources <= 254:
        parser.error("--sources must be in 0..254")
    if min(args.setup_timeout, args.run_timeout) <= 0 or args.pause < 0:
        parser.error("timeouts must be positive and --pause not negative")
    too_many = [n for n in args.members_counts if n > MAX_PER_PROCESS * args.workers]
    if too_many:
        parser.error(f"{too_many[0]} members do not fit {args.workers} workers of at most "
                     f"{MAX_PER_PROCESS} connections each")
    return args


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def one_phase(kind: str, number: int, messages: int, args, group: benchlib.ClientProcesses,
              publisher: broadcast.Publisher, roles: dict, tree: benchlib.ProcessTree) -> dict:
    """Send ``messages`` at once and collect every member's receipt times."""
    time.sleep(args.pause)
    group.send_all(("run", messages, args.run_timeout))
    for message in group.receive_all(30, "arm its run"):
        if message[0] != "armed":
            raise RuntimeError(f"a member process answered {message[0]!r}")
    before = cpu_reading(roles)
    ticks_before = tree.cpu_times()     # user and system apart, in 10 ms ticks
    start_ns = time.monotonic_ns()
    acked, errors, error_texts = publisher.publish(messages, time.monotonic() + args.run_timeout)
    ack_ns = time.monotonic_ns() - start_ns
    group.send_all(("accepted", acked - errors))
    results = [m[1] for m in group.receive_all(args.run_timeout + 30, "finish its run")]
    after = cpu_reading(roles)
    ticks_after = tree.cpu_times()
    if tree.changed():
        raise RuntimeError("a server process ended or restarted during the run")
    worker_ns = [b - a for a, b in zip(before["workers"], after["workers"])]
    cpu = {role: sum(after[role]) - sum(before[role]) for role in before}
    server_ns = sum(cpu.values())
    members = sum(r["members"] for r in results)
    expected = members * messages
    delivered = sum(r["delivered"] for r in results)
    stamps = max((r["stamps"] for r in results), key=len)   # a process short of some has fewer
    per_message = [array.array("q") for _ in stamps]
    for result in results:
        for k, raw in enumerate(result["latencies"]):
            per_message[k].frombytes(raw)
    everything = sorted(ns for lat in per_message for ns in lat)
    # the last receipt of all, counted from the first send
    last_ns = max((stamps[k] + max(lat) - stamps[0] for k, lat in enumerate(per_message) if lat),
                  default=None)
    run = {
        "phase": kind, "run": number, "members": members, "messages": messages,
        "expected": expected, "delivered": delivered, "loss": expected - delivered,
        "short_members": sum(r["short"] for r in results),
        "over_members": sum(r["over"] for r in results),
        "closed_members": sum(r["closed"] for r in results),
        "unexpected_packets": sum(r["unexpected"] for r in results),
        "publish_errors": errors, "publish_error_samples": error_texts,
        "push_bytes": results[0]["push_bytes"],
        "ack_ms": _ms(ack_ns),
        "last_receipt_ms": _ms(last_ns),
        "receipt_p50_ms": _ms(benchlib.percentile(everything, 0.50)),
        "receipt_p99_ms": _ms(benchlib.percentile(everything, 0.99)),
        "server_cpu_ms": _ms(server_ns),
        "server_cpu_ms_by_role": {role: _ms(ns) for role, ns in cpu.items()},
        "server_cpu_user_ms": round((ticks_after.user - ticks_before.user) * 1000, 1),
        "server_cpu_system_ms": round((ticks_after.system - ticks_before.system) * 1000, 1),
        "worker_cpu_ms": [_ms(ns) for ns in worker_ns],
        "server_cpu_ms_per_message": _ms(server_ns / messages),
        "server_cpu_ns_per_delivery": round(server_ns / delivered) if delivered else None,
    }
    run["ok"] = (run["loss"] == 0 and errors == 0 and run["over_members"] == 0
                 and run["closed_members"] == 0 and run["unexpected_packets"] == 0)
    roles_text = ", ".join(f"{role} {ms:.1f}" for role, ms in run["server_cpu_ms_by_role"].items())
    print(f"{kind} run {number}: {messages} message(s), {delivered:,}/{expected:,} deliveries "
          f"(loss {run['loss']:,}); last receipt {run['last_receipt_ms']} ms after the first send "
          f"(publisher's ack {run['ack_ms']} ms); receipt p50 {run['receipt_p50_ms']} ms "
          f"p99 {run['receipt_p99_ms']} ms; server CPU {run['server_cpu_ms']:.1f} ms ({roles_text}; "
          f"user {run['server_cpu_user_ms']} + sys {run['server_cpu_system_ms']} in 10 ms ticks) "
          f"= {run['server_cpu_ms_per_message']} ms/message, {run['server_cpu_ns_per_delivery']} "
          f"ns/delivery; per worker {[round(ms, 1) for ms in run['worker_cpu_ms']]} ms; "
          f"push {run['push_bytes']} B{'' if run['ok'] else '; FAILED'}")
    if error_texts:
        print(f"  publish errors, e.g. {error_texts[0]}")
    sys.stdout.flush()
    return run


def measure(args, members: int) -> dict:
    """One server, ``members`` members, ``--runs`` runs of the single and burst phases."""
    processes = max(2, -(-members // args.per_process))
    sources = args.sources or -(-members // CONNECTIONS_PER_SOURCE)
    base, extra = divmod(members, processes)
    counts = [base + (1 if index < extra else 0) for index in range(processes)]
    firsts = [sum(counts[:index]) for index in range(processes)]
    server = benchlib.Server(extra_args=shlex.split(args.server_args), workers=args.workers)
    runs: list[dict] = []
    try:
        root = server.start()
        tree = benchlib.ProcessTree(root)
        roles = server_roles(server)
        print(f"== {members:,} members, {args.workers} workers: server pid {root.pid}: "
              f"{shlex.join(server.command)}")
        sys.stdout.flush()
        fds_before = [p.num_fds() for p in roles["workers"]]
        with benchlib.ClientProcesses() as group:
            setup_start = time.monotonic()
            group.start(member_process, [
                (server.tcp_port, first, count, sources, args.inflight, args.setup_timeout)
                for first, count in zip(firsts, counts)])
            ready = 0
            for _, count, failures, failed in group.receive_all(args.setup_timeout + 30,
                                                                "subscribe its members"):
                ready += count
                for reason in failures:
                    print(f"  setup failure: {reason}")
                if failed:
                    print(f"  {failed} member(s) of one process failed to set up")
            split = [p.num_fds() - before for p, before in zip(roles["workers"], fds_before)]
            print(f"setup: {ready:,}/{members:,} members in {processes} client processes from "
                  f"{sources} source address(es) subscribed in {time.monotonic() - setup_start:.1f} s; "
                  f"connections per worker {split}")
            sys.stdout.flush()
            if ready != members:
                raise RuntimeError("not every member could subscribe")
            publisher = broadcast.Publisher(server.tcp_port, args.content_size, args.burst)
            try:
                for number in range(1, args.runs + 1):
                    runs.append(one_phase("single", number, 1, args, group, publisher, roles, tree))
                    runs.append(one_phase("burst", number, args.burst, args, group, publisher, roles, tree))
            finally:
                publisher.close()
        rss = tree.rss()
        if not server.alive():
            raise RuntimeError(f"the server died:\n{server.log_tail()}")
    finally:
        code = server.stop()
    return summary(args, members, runs, split, processes, sources, rss, code, server.command)


def summary(args, members: int, runs: list[dict], split: list[int], processes: int, sources: int,
            rss: int, code: int | None, command: list[str]) -> dict:
    def median(phase: str, key: str) -> float | None:
        return _median([r[key] for r in runs if r["phase"] == phase])

    keys = ("last_receipt_ms", "receipt_p50_ms", "receipt_p99_ms", "ack_ms",
            "server_cpu_ms_per_message", "server_cpu_ns_per_delivery")
    result = {
        "members": members, "workers": args.workers, "burst": args.burst, "runs": runs,
        "connections_per_worker": split, "client_processes": processes, "source_addresses": sources,
        "single": {key: median("single", key) for key in keys},
        "burst_phase": {key: median("burst", key) for key in keys},
        "loss": sum(r["loss"] for r in runs), "server_rss_after": rss, "server_exit_code": code,
        "server_command": command,
    }
    result["ok"] = all(r["ok"] for r in runs) and code == 0
    single, burst = result["single"], result["burst_phase"]
    print(f"RESULT hugegroup members={members} workers={args.workers} "
          f"single_last_receipt_ms={single['last_receipt_ms']} single_p50_ms={single['receipt_p50_ms']} "
          f"single_p99_ms={single['receipt_p99_ms']} burst={args.burst} "
          f"burst_last_receipt_ms={burst['last_receipt_ms']} burst_p50_ms={burst['receipt_p50_ms']} "
          f"burst_p99_ms={burst['receipt_p99_ms']} "
          f"cpu_ms_per_message={burst['server_cpu_ms_per_message']} "
          f"cpu_ns_per_delivery={burst['server_cpu_ns_per_delivery']} loss={result['loss']} "
          f"server_rss_mib={rss / 2**20:.0f} {'OK' if result['ok'] else 'FAILED'}")
    sys.stdout.flush()
    return result


def run(args: argparse.Namespace, info: dict) -> int:
    print(f"channel sizes {args.members_counts}; {args.workers} workers on {info['nproc']} cores; "
          f"{args.runs} run(s) of 1 message and of a burst of {args.burst}; medians are reported")
    sys.stdout.flush()
    measured = [measure(args, members) for members in args.members_counts]
    ok = all(r["ok"] for r in measured)
    if args.json:
        benchlib.print_json({
            "bench": "hugegroup", "ok": ok, "workers": args.workers, "burst": args.burst,
            "runs": args.runs, "content_size": args.content_size, "machine": info,
            "results": {str(r["members"]): r for r in measured},
        })
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("hugegroup", "zim huge groups: send to last receipt, one channel "
                             "over every worker", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
