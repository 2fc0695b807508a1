#!/usr/bin/env python3
"""The archive behind SQLite on a single server (``--archive``, zim.storage.archiver).

Starts its own PostgreSQL (``zim.testing.postgres.LocalPostgres``, ``fsync=off``)
and, per run, two single-worker servers one after the other: ``--store sqlite``
without the archive, and with ``--archive`` (a fresh database each run). The
load is bench/store.py's: ``--senders`` senders in ``--client-processes``
processes send private messages to offline receivers.

- **saturated**: every sender keeps ``--window`` messages in flight until
  ``--messages`` are acknowledged. Reported, with and without the archive:
  stored DMs per second and per server-CPU-second (the server and its writer;
  the archiver runs in the server process). With it: the archive's throughput
  (messages over the time from the first send until the queue is empty), the
  lag when the senders finish, and how long it takes to drain.
- **sustained**: all senders together send ``--rate`` DMs a second for
  ``--rate-seconds`` (open loop) with the archive on; the lag is sampled from
  ``/metrics`` every 100 ms: its median and maximum, and the pending count's maximum.

Medians of ``--runs`` runs (the two servers alternate within each run).
Example: ``python bench/archive_single.py --runs 3 --json``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request

import benchlib
import store as store_bench

from zim.testing.ports import free_loopback_port
from zim.testing.postgres import LocalPostgres

LOOPBACK = "127.0.0.1"


def figures(port: int) -> dict[str, float]:
    """The archive's gauges and counters from ``/metrics``."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as answer:
        found = {}
        for line in answer.read().decode().splitlines():
            if line.startswith("zim_archive_"):
                name, value = line.split()[:2]
                found[name] = float(value)
        return found


class Sampler(threading.Thread):
    """``/metrics`` every 100 ms while the load runs: lag and pending."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.lags: list[float] = []
        self.pending: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            found = figures(self.port)
            self.lags.append(found["zim_archive_lag_seconds"])
            self.pending.append(found["zim_archive_pending"])

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def drain_seconds(port: int, timeout: float = 120.0) -> float:
    """Seconds until the archive's queue is empty (ticks refresh it once a second at most)."""
    started = time.monotonic()
    while figures(port)["zim_archive_pending"] > 0:
        if time.monotonic() - started > timeout:
            raise RuntimeError("the archive did not drain")
        time.sleep(0.02)
    return time.monotonic() - started


def one_server(args, postgres: LocalPostgres | None, run: int) -> dict:
    metrics = free_loopback_port()
    extra = ["--store", "sqlite", "--metrics", f"{LOOPBACK}:{metrics}"]
    if postgres is not None:
        extra += ["--archive", postgres.create_database(f"single{run}"), "--archive-batch", str(args.batch)]
    with benchlib.Server(extra_args=extra, workers=1) as server:
        tree = benchlib.ProcessTree(server.start())
        with store_bench.client_group(server.tcp_port, args.senders, args.client_processes) as group:
            deadline = time.monotonic() + args.run_timeout
            started = time.monotonic()
            row = store_bench.one_run(group, tree, (
                "run", "saturated", max(1, args.messages // args.senders), args.window, 0.0, 0.0,
                args.content_size, deadline), args.run_timeout)
            if postgres is not None:
                row["lag_at_end_s"] = figures(metrics)["zim_archive_lag_seconds"]
                row["drain_s"] = drain_seconds(metrics)
                row["archived_per_second"] = row["messages"] / (time.monotonic() - started)
                sampler = Sampler(metrics)
                sampler.start()
                try:
                    store_bench.one_run(group, tree, (
                        "run", "moderate", 0, 0, args.rate, args.rate_seconds, args.content_size,
                        time.monotonic() + args.run_timeout), args.run_timeout)
                finally:
                    sampler.stop()
                row["sustained_lag_p50_s"] = statistics.median(sampler.lags) if sampler.lags else None
                row["sustained_lag_max_s"] = max(sampler.lags, default=None)
                row["sustained_pending_max"] = max(sampler.pending, default=None)
        if server.stop() != 0:
            raise RuntimeError(f"the server did not stop cleanly:\n{server.log_tail()}")
    return row


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def run(args, info: dict) -> int:
    plain, archived = [], []
    with LocalPostgres() as postgres:
        for index in range(args.runs):
            plain.append(one_server(args, None, index))
            archived.append(one_server(args, postgres, index))
            print(f"run {index + 1}: without {plain[-1]['per_second']:,.0f} DMs/s, "
                  f"with {archived[-1]['per_second']:,.0f} DMs/s, archive {archived[-1]['archived_per_second']:,.0f}"
                  f" msgs/s, drained in {archived[-1]['drain_s']:.2f} s")
            sys.stdout.flush()
    result = {"bench": "archive_single", "ok": True, "machine": info, "runs": {"without": plain, "with": archived}}
    for key in ("per_second", "per_cpu_second", "p50_ms", "p99_ms"):
        result[f"without_{key}"] = store_bench.median(plain, key)
        result[f"with_{key}"] = store_bench.median(archived, key)
    for key in ("archived_per_second", "lag_at_end_s", "drain_s", "sustained_lag_p50_s",
                "sustained_lag_max_s", "sustained_pending_max"):
        result[key] = store_bench.median(archived, key)
    with_cpu, without_cpu = result["with_per_cpu_second"], result["without_per_cpu_second"]
    # a tiny run may use less CPU than psutil can see: no per-CPU figure then
    result["cpu_ratio"] = with_cpu / without_cpu if with_cpu and without_cpu else None
    print(f"RESULT archive_single: DMs/s {result['without_per_second']:,.0f} without, "
          f"{result['with_per_second']:,.0f} with --archive; per server-CPU-s "
          f"{store_bench._count(without_cpu)} vs {store_bench._count(with_cpu)} "
          f"(ratio {'n/a' if result['cpu_ratio'] is None else format(result['cpu_ratio'], '.2f')}); "
          f"archive {result['archived_per_second']:,.0f} msgs/s, lag at the end {_seconds(result['lag_at_end_s'])}, "
          f"drained in {_seconds(result['drain_s'])}; at {args.rate:,.0f}/s lag p50 "
          f"{_seconds(result['sustained_lag_p50_s'])} max {_seconds(result['sustained_lag_max_s'])} "
          f"(medians of {args.runs})")
    if args.json:
        benchlib.print_json(result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    store_bench.add_load_arguments(parser, messages=40_000, rate=3_000, rate_seconds=5.0)
    parser.add_argument("--batch", type=int, default=1000, help="--archive-batch")
    args = parser.parse_args()
    return benchlib.run_main("archive_single", "zim --archive behind SQLite: DM cost, archive throughput and lag",
                             args, run)


if __name__ == "__main__":
    sys.exit(main())
