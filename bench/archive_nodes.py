#!/usr/bin/env python3
"""The archive tier on a node: private messages with and without ``--archive``, same run.

Starts one PostgreSQL (``zim.testing.postgres.LocalPostgres``, ``fsync=off``)
and, for each setup, a fresh redis-server (``appendfsync always``, as
bench/nodes.py) and one zim node on it: first without the archive, then with
``--archive`` on a fresh database (private conversations archived, the
default). The private-message load is bench/nodes.py's (``dm_phase``: ``--pairs``
pairs, each client sends ``--dm-messages`` with ``--dm-window`` in flight, ``--runs``
runs, medians). Figures:

- DMs acknowledged per server-CPU-second, server = the node's process tree +
  redis-server (PostgreSQL's CPU is **not** in it: it is given apart, as CPU
  seconds per 1,000 messages archived): the median over the runs (CPU read
  while the clients send), and over the whole phase (logins, runs and, with the
  archive, until everything is archived: the archiver's work after the sends counts);
- with the archive: the archive's throughput (messages newly stored in
  PostgreSQL per second, from the node's ``zim_archive_messages_total``, over the
  load and until the lag is back to 0), the lag (``zim_archive_lag_seconds``
  sampled every 0.2 s: median and max under load) and the drain time after the
  last run.

Example: ``python bench/archive_nodes.py --json`` (50 pairs, 400 messages per client per run, 3 runs)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request

import benchlib
import nodes
import workers
from archive import server_cpu
from zim.testing.postgres import LocalPostgres
from zim.testing.ports import free_loopback_port

SAMPLE_EVERY = 0.2          # seconds between reads of the node's /metrics
DRAIN_TIMEOUT = 120.0


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class LagSampler(threading.Thread):
    """Reads the lag every SAMPLE_EVERY seconds until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_EVERY):
            self.samples.append(metric(self.port, "zim_archive_lag_seconds"))


def setup(args, postgres: LocalPostgres | None, name: str) -> dict:
    """One node (and its Redis), with the archive on a fresh database if ``postgres``."""
    metrics_port = free_loopback_port()
    flags = ["--metrics", f"127.0.0.1:{metrics_port}"]
    if postgres is not None:
        flags += ["--archive", postgres.create_database(name)]
    redis = nodes.RedisService(False)
    server = benchlib.Server(extra_args=flags)
    code = None
    try:
        redis.start()
        server.redis = redis.url
        root = server.start()
        group = benchlib.ProcessGroup({"nodes": [benchlib.ProcessTree(root)], "redis": redis.trees()})
        print(f"== {name}: {' '.join(server.command[3:])}")
        sys.stdout.flush()
        sampler = LagSampler(metrics_port) if postgres is not None else None
        pg_before = server_cpu(postgres) if postgres is not None else 0.0
        started = time.monotonic()
        phase_before = group.cpu_times()
        if sampler is not None:
            sampler.start()
        dm = nodes.dm_phase(args, [server], group, redis)
        result = {"dm": dm}
        acked = sum(run["responses"] for run in dm["runs"])
        if sampler is not None:
            loaded = time.monotonic()
            sampler.done.set()
            while (metric(metrics_port, "zim_archive_messages_total") < acked
                   and time.monotonic() - loaded < DRAIN_TIMEOUT):
                time.sleep(0.05)
            drained = time.monotonic()
            archived = metric(metrics_port, "zim_archive_messages_total")
            pg_cpu = server_cpu(postgres) - pg_before
            result["archive"] = {
                "messages_acked": acked, "messages_archived": archived,
                "archive_messages_per_second": round(archived / (drained - started)),
                "lag_median_s": round(statistics.median(sampler.samples), 3) if sampler.samples else None,
                "lag_max_s": round(max(sampler.samples), 3) if sampler.samples else None,
                "drain_after_load_s": round(drained - loaded, 3),
                "postgres_cpu_s_per_1000_messages": round(1000 * pg_cpu / archived, 4) if archived else None,
                "failures": metric(metrics_port, "zim_archive_failures_total"),
            }
            print(f"  archive: {result['archive']}")
        phase_after = group.cpu_times()     # the logins, the runs, and the archive's drain
        phase_cpu = phase_after.user + phase_after.system - phase_before.user - phase_before.system
        result["phase_dms_per_cpu_second"] = round(acked / phase_cpu) if phase_cpu > 0 else None
        print(f"  whole phase (logins, runs, drain): {acked} DMs, node+redis CPU {phase_cpu:.2f} s = "
              f"{result['phase_dms_per_cpu_second']} DMs per server-CPU-s")
        result["ok"] = dm["ok"] and server.alive()
        return result
    finally:
        if server.process is not None:
            code = server.stop()
        redis.stop()
        print(f"  {name} exit code {code}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workers.add_dm_args(parser, 400)
    parser.set_defaults(pairs=50)
    for flag, kind, default, what in (("--content-size", int, 100, "message content size"),
                                      ("--runs", int, 3, "runs per setup; medians are reported"),
                                      ("--setup-timeout", float, 60.0, "seconds to log the clients in"),
                                      ("--run-timeout", float, 120.0, "seconds allowed per run")):
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    if min(args.pairs, args.dm_messages, args.dm_window, args.dm_processes, args.runs) < 1:
        parser.error("counts, windows and --runs must be at least 1")
    args.workers = 1
    return args


def run(args: argparse.Namespace, info: dict) -> int:
    postgres = LocalPostgres().start()
    try:
        without = setup(args, None, "without")
        with_archive = setup(args, postgres, "archived")
    finally:
        postgres.close()
    key = "responses_per_cpu_second"
    ratio = nodes.ratio(with_archive["dm"][key], without["dm"][key])
    whole = "phase_dms_per_cpu_second"
    phase_ratio = nodes.ratio(with_archive[whole], without[whole])
    print(f"RESULT dm per server-CPU-s (node+redis, PostgreSQL apart), median of the runs: without "
          f"{without['dm'][key]} with --archive {with_archive['dm'][key]} ratio {ratio}; whole phase with "
          f"the drain: {without[whole]} -> {with_archive[whole]} ratio {phase_ratio}; archive "
          f"{with_archive['archive']}")
    archive = with_archive["archive"]
    ok = without["ok"] and with_archive["ok"] and archive["messages_archived"] >= archive["messages_acked"]
    if args.json:
        benchlib.print_json({"bench": "archive_nodes", "ok": ok, "without": without, "with_archive": with_archive,
                             "ratio_per_cpu_second": ratio, "ratio_phase_per_cpu_second": phase_ratio,
                             "pairs": args.pairs,
                             "dm_messages": args.dm_messages, "dm_window": args.dm_window, "runs": args.runs,
                             "machine": info})
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("archive_nodes", "zim node: private messages with and without --archive",
                             parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
