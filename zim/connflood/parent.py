"""connflood's parent process: it starts the client processes, reads their reports
in every phase, runs the probe while the connections are held, and sums up."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import sys
import threading
import time
from collections import Counter

import orjson

from zim.connflood.channels import ChannelPlan
from zim.connflood.flood import flood_process
from zim.connflood.options import (AFTER_PROBE, EXIT_FAILED, EXIT_OK, EXIT_UNACCOUNTED, PROBE_GRACE,
                                   parse_args)
from zim.connflood.probe import run_probe


class Child:
    """What the parent knows about one client process."""

    def __init__(self, index: int, share: int, process, pipe) -> None:
        self.index = index
        self.share = share
        self.process = process
        self.pipe = pipe
        self.figures: dict = {}             # the last report
        self.heard = time.monotonic()       # when the last report came
        self.connect_seconds: float | None = None
        self.done: tuple | None = None      # (deliveries, latencies) of the final report
        self.eof = False                    # the pipe closed: the process ended
        self.lost: str | None = None        # why its final report is missing

    @property
    def connected_phase_over(self) -> bool:
        return self.connect_seconds is not None or self.done is not None or self.eof


class Collector:
    """Reads every client process's pipe and keeps its last report. Every phase of
    the parent goes through ``pump``, so no report waits in a pipe unread."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.by_pipe = {child.pipe: child for child in children}

    def open_pipes(self) -> list:
        return [child.pipe for child in self.children if not child.eof]

    def pump(self, timeout: float) -> None:
        pipes = self.open_pipes()
        if not pipes:
            time.sleep(timeout)
            return
        for pipe in multiprocessing.connection.wait(pipes, timeout=timeout):
            child = self.by_pipe[pipe]
            try:
                while pipe.poll(0):
                    self.take(child, pipe.recv())
            except (EOFError, OSError):
                child.eof = True

    def take(self, child: Child, message: tuple) -> None:
        kind, _, figures = message[:3]
        child.figures = figures
        child.heard = time.monotonic()
        if kind == "connected":
            child.connect_seconds = message[3]
        elif kind == "done":
            child.done = (message[3], message[4])

    def silent(self, child: Child, report_timeout: float) -> bool:
        return time.monotonic() - child.heard > report_timeout

    def totals(self, *keys: str) -> dict:
        return {key: sum(child.figures.get(key, 0) for child in self.children) for key in keys}


def progress_line(collector: Collector, start: float, report_timeout: float) -> None:
    """connected: set up (logged in with --login); tcp: TCP connects done so far."""
    total = collector.totals("tcp_connected", "connected", "failed", "joins")
    elapsed = time.monotonic() - start
    ended = sum(1 for child in collector.children if child.eof and child.done is None)
    silent = sum(1 for child in collector.children
                 if not child.eof and collector.silent(child, min(5.0, report_timeout)))
    print(f"\rconnected {total['connected']:>9,}  tcp {total['tcp_connected']:>9,}  "
          f"failed {total['failed']:>7,}  {total['connected'] / max(elapsed, 1.0):>8,.0f}/s  "
          f"{elapsed:6.1f} s" + (f"  joins {total['joins']:,}" if total["joins"] else "")
          + (f"  {ended} process(es) ended early" if ended else "")
          + (f"  {silent} silent" if silent else ""),
          end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base, extra = divmod(args.connections, args.processes)
    sample_base, sample_extra = divmod(min(args.probe_sample, args.connections), args.processes)
    context = multiprocessing.get_context("fork")
    children: list[Child] = []
    completed = False
    try:
        first = 0                           # user number of a process's first connection
        for index in range(args.processes):
            ours, theirs = context.Pipe()
            share = base + (index < extra)
            process = context.Process(target=flood_process, daemon=True, args=(
                args, index, share, sample_base + (index < sample_extra), theirs,
                [child.pipe for child in children] + [ours], first))
            first += share
            process.start()
            theirs.close()
            children.append(Child(index, share, process, ours))
        code = run(args, children)
        completed = True
        return code
    finally:
        # the client processes close their connections after their final report; after
        # an error here they would wait for a stop that does not come
        deadline = time.monotonic() + (30 if completed else 0)
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()
                child.process.join(5)


def run(args, children: list[Child]) -> int:
    collector = Collector(children)
    start = time.monotonic()

    # 1. connect: until every process has said so, ended, or stayed silent too long
    deadline = start + args.connect_timeout + args.report_timeout
    last_line = start
    while time.monotonic() < deadline:
        if all(child.connected_phase_over or collector.silent(child, args.report_timeout)
               for child in children):
            break
        collector.pump(0.2)
        if time.monotonic() - last_line >= 1.0:
            progress_line(collector, start, args.report_timeout)
            last_line = time.monotonic()
    progress_line(collector, start, args.report_timeout)
    print(file=sys.stderr)
    connect_seconds = max((c.connect_seconds for c in children if c.connect_seconds is not None), default=0.0)

    # 2. hold, with the probe in a thread: the pipes are read all along
    hold_start = time.monotonic()
    probe: dict = {}
    if args.probe:
        thread = threading.Thread(target=run_probe, args=(args, probe), daemon=True)
        thread.start()
        while thread.is_alive() and time.monotonic() < hold_start + args.hold + PROBE_GRACE:
            collector.pump(0.2)
        if thread.is_alive():
            probe["error"] = f"the probe did not finish within --hold + {PROBE_GRACE:.0f} s"
        hold_end = max(hold_start + args.hold, time.monotonic() + AFTER_PROBE)
    else:
        hold_end = hold_start + args.hold
    open_now = sum(c.figures.get("alive", 0) for c in children if not c.eof)
    print(f"holding: {open_now:,} open, {max(0.0, hold_end - time.monotonic()):.0f} s more",
          file=sys.stderr, flush=True)
    while time.monotonic() < hold_end:
        collector.pump(min(0.2, max(0.0, hold_end - time.monotonic())))
    held_seconds = time.monotonic() - hold_start

    # 3. stop, and wait a bounded time for every final report
    print("stopping: closing the connections", file=sys.stderr, flush=True)
    for child in children:
        if not child.eof:
            try:
                child.pipe.send(("stop",))
            except OSError:
                pass
    final_deadline = time.monotonic() + args.report_timeout
    while time.monotonic() < final_deadline and any(c.done is None and not c.eof for c in children):
        collector.pump(0.2)
    for child in children:
        if child.done is not None:
            continue
        if child.eof:
            child.process.join(5)
            child.lost = f"ended (exit code {child.process.exitcode}) without its final report"
        else:
            child.process.kill()
            child.process.join(5)
            child.lost = f"no final report within {args.report_timeout:g} s of the stop; killed"
    return summarize(args, children, collector, connect_seconds, held_seconds, probe)


def summarize(args, children: list[Child], collector: Collector, connect_seconds: float,
              held_seconds: float, probe: dict) -> int:
    totals = collector.totals("connected", "failed")
    errors: Counter = Counter()
    closed: Counter = Counter()
    for child in children:
        errors.update(child.figures.get("errors", {}))
        closed.update(child.figures.get("closed", {}))
    unaccounted = args.connections - totals["connected"] - totals["failed"]
    lost = [{"index": child.index, "pid": child.process.pid, "share": child.share, "why": child.lost,
             "last_report": {key: child.figures.get(key, 0) for key in
                             ("phase", "connected", "failed", "pending", "alive")}}
            for child in children if child.lost]
    finished = [child for child in children if child.done is not None]
    open_at_end = sum(child.figures.get("alive", 0) for child in finished)
    deliveries = sum(child.done[0] for child in finished)
    latencies = sorted(x for child in finished for x in child.done[1])
    logged_in = totals["connected"] if args.login else 0
    if args.probe and "broadcast_messages" in probe:
        members = min(args.probe_sample, logged_in)
        probe["broadcast"] = {
            "members": members, "expected": probe["broadcast_messages"] * members, "delivered": deliveries,
            "p50_ms": latencies[len(latencies) // 2] / 1e6 if latencies else None,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e6 if latencies else None}
    summary = {"connections": args.connections, "connected": totals["connected"], "failed": totals["failed"],
               "unaccounted": unaccounted, "logged_in": logged_in,
               "seconds": round(connect_seconds, 3),
               "connect_rate": round(totals["connected"] / connect_seconds) if connect_seconds else None,
               "errors": dict(errors), "closed": dict(closed), "open_at_end": open_at_end,
               "processes": args.processes, "lost_processes": lost,
               "held_seconds": round(held_seconds, 1), "probe": probe}
    if args.channels_per_user:
        summary["channels"] = ChannelPlan(args.connections, args.channels_per_user, *args.channel_sizes).summary()
        summary["channels"]["joined"] = collector.totals("joins")["joins"]
    print(f"connected {summary['connected']:,} of {args.connections:,} (logged in {logged_in:,}), failed "
          f"{summary['failed']:,}, unaccounted {unaccounted:,}, in {connect_seconds:.1f} s "
          f"({summary['connect_rate'] or 0:,}/s); errors {dict(errors)}; closed later {dict(closed)}; "
          f"open at the end of the hold: {open_at_end:,}")
    if "channels" in summary:
        plan = summary["channels"]
        print(f"channels: {plan['joined']:,} of {plan['memberships']:,} joins answered, {plan['channels']:,} "
              f"channels of {plan['sizes'][0]:,} to {plan['sizes'][-1]:,} members")
    for entry in lost:
        print(f"client process {entry['index']} (pid {entry['pid']}, {entry['share']:,} connections) lost: "
              f"{entry['why']}; its last report: {entry['last_report']}")
    if probe:
        print(f"probe: {orjson.dumps(probe).decode()}")
    if args.json:
        print(orjson.dumps(summary).decode())
    if unaccounted or lost:
        return EXIT_UNACCOUNTED
    if summary["failed"] or closed:
        return EXIT_FAILED
    return EXIT_OK
