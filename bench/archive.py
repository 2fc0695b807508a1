#!/usr/bin/env python3
"""The archive tier's foundation: batches into PostgreSQL, and history pages out of it.

Starts its own PostgreSQL (``zim.testing.postgres.LocalPostgres``: initdb in a
temporary directory, a free loopback port, ``fsync=off``: the figures are the
link's and the SQL's, not the disk's; removed at the end) and migrates it. A real
``zim.Reactor`` runs its loop with a ``zim.archive.link.PgLink``; ``Archive``
makes the calls, as the nodes will.

- **write**: ``--messages`` messages of 200 bytes, ``archive_messages`` in
  batches of each of ``--batches`` sizes, ``--depths`` batches in flight (each
  one committed issues the next, from the loop), one channel per run: messages
  per second, batch latency (issue to commit, p50 and p99), CPU per message of
  this process and of PostgreSQL (the postmaster and its backends).
- **read**: ``--reads`` history pages of ``--page`` messages at random depths
  of the last run's channel, one at a time: p50 and p99 from issue to answer.

Each figure is the median of ``--runs`` runs. Example:
``python bench/archive.py --messages 20000 --runs 3 --json``
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import psutil

import benchlib
from zim._core import Reactor
from zim.archive.link import PgLink
from zim.archive.schema import migrate
from zim.archive.store import Archive
from zim.ids import Snowflake
from zim.testing.postgres import LocalPostgres

RUN_LIMIT_S = 120.0
PAYLOAD = "m" * 200


def server_cpu(server: LocalPostgres) -> float:
    """CPU seconds of the postmaster and every backend so far."""
    root = psutil.Process(server.pid())
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def drive(archive: Archive, issue, count: int, depth: int) -> list[float]:
    """Run the loop until ``count`` calls made by ``issue(index)`` have settled,
    ``depth`` at a time; returns each call's latency in seconds."""
    reactor = archive.link.reactor
    latencies: list[float] = []
    state = {"next": 0, "failed": None}

    def start_one() -> None:
        index = state["next"]
        state["next"] += 1
        issue(index).wait(done, time.perf_counter(), None)

    def done(started: float, _: None, ok: bool, value) -> None:
        if not ok:
            state["failed"] = value
            reactor.stop()
            return
        latencies.append(time.perf_counter() - started)
        if state["next"] < count:
            start_one()
        elif len(latencies) == count:
            reactor.stop()

    def begin() -> None:
        if archive.link.state != "up":
            kick.set(time.monotonic_ns() + 1_000_000)
            return
        for _ in range(min(depth, count)):
            start_one()

    def give_up() -> None:
        state["failed"] = f"not done in {RUN_LIMIT_S:g} s"
        reactor.stop()

    kick, limit = reactor.timer(begin), reactor.timer(give_up)
    kick.set(time.monotonic_ns())
    limit.set(time.monotonic_ns() + int(RUN_LIMIT_S * 1e9))
    reactor.run()
    kick.close()
    limit.close()
    if state["failed"] is not None:
        raise RuntimeError(f"the archive failed: {state['failed']}")
    return latencies


def one_run(server: LocalPostgres, dsn: str, args, batch: int, depth: int, ids: Snowflake, run: int) -> dict:
    archive = Archive(PgLink(Reactor(65536, lambda *packet: None), dsn))
    channel = f"bench-{batch}-{depth}-{run}"
    batches = [[("channel", channel, {"id": str(ids.next()), "seq": first + offset + 1, "content": PAYLOAD})
                for offset in range(min(batch, args.messages - first))]
               for first in range(0, args.messages, batch)]
    cpu, pg_cpu, wall = time.process_time(), server_cpu(server), time.perf_counter()
    latencies = drive(archive, lambda index: archive.archive_messages(batches[index]), len(batches), depth)
    wall, cpu, pg_cpu = time.perf_counter() - wall, time.process_time() - cpu, server_cpu(server) - pg_cpu
    latencies.sort()
    result = {"messages_per_s": args.messages / wall, "batch_p50_ms": benchlib.percentile(latencies, 0.5) * 1e3,
              "batch_p99_ms": benchlib.percentile(latencies, 0.99) * 1e3,
              "client_cpu_us_per_message": cpu / args.messages * 1e6,
              "postgres_cpu_us_per_message": pg_cpu / args.messages * 1e6}
    archive.link.close()
    if args.reads:      # a reactor runs once: a new one, and a new link
        archive = Archive(PgLink(Reactor(65536, lambda *packet: None), dsn))
        draw = random.Random(run)
        befores = [draw.randint(args.page + 1, args.messages + 1) for _ in range(args.reads)]
        reads = drive(archive, lambda index: archive.history("channel", channel, befores[index], args.page),
                      args.reads, 1)
        reads.sort()
        result.update(read_p50_ms=benchlib.percentile(reads, 0.5) * 1e3,
                      read_p99_ms=benchlib.percentile(reads, 0.99) * 1e3)
        archive.link.close()
    return result


def run(args, info: dict) -> int:
    ids = Snowflake(1)
    rows = []
    with LocalPostgres() as server:
        dsn = server.create_database("bench")
        migrate(dsn)
        for batch in args.batches:
            for depth in args.depths:
                runs = [one_run(server, dsn, args, batch, depth, ids, number) for number in range(args.runs)]
                median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                rows.append({"batch": batch, "depth": depth, **median})
                reads = (f"  history page of {args.page}: p50 {median['read_p50_ms']:.2f} ms, "
                         f"p99 {median['read_p99_ms']:.2f} ms" if args.reads else "")
                print(f"batch {batch:5d} x {depth:2d} in flight: {median['messages_per_s']:9,.0f} msg/s, "
                      f"batch p50 {median['batch_p50_ms']:.2f} ms p99 {median['batch_p99_ms']:.2f} ms, "
                      f"CPU/msg: zim {median['client_cpu_us_per_message']:.1f} us, "
                      f"postgres {median['postgres_cpu_us_per_message']:.1f} us{reads}")
                sys.stdout.flush()
    print(f"RESULT archive ok: medians of {args.runs} runs of {args.messages} messages")
    if args.json:
        benchlib.print_json({"bench": "archive", "ok": True, "rows": rows, "machine": info,
                             "messages": args.messages, "runs": args.runs})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--batches", type=lambda text: [int(x) for x in text.split(",")], default=[1, 100, 1000],
                        help="batch sizes, comma-separated")
    parser.add_argument("--depths", type=lambda text: [int(x) for x in text.split(",")], default=[1, 4],
                        help="batches in flight, comma-separated")
    parser.add_argument("--reads", type=int, default=200, help="history pages read per run (0: none)")
    parser.add_argument("--page", type=int, default=50, help="messages per history page")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    if args.messages < args.page + 1:
        parser.error("--messages must exceed --page")
    return benchlib.run_main("archive", "the archive tier: batches into PostgreSQL, history pages out", args, run)


if __name__ == "__main__":
    sys.exit(main())
