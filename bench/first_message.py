#!/usr/bin/env python3
"""A new conversation's first DM on a node with ``--archive``: with the generation marker, and without.

Starts a redis-server and a PostgreSQL of its own (``zim.testing``: free
loopback ports, temporary directories, removed at the end) and one zim node
(``python -m zim --redis URL --archive DSN``), which sets the generation
marker at its start (docs/redis.md). Each run: one sender and ``--pairs``
receivers it never wrote to, then one first DM to each, one at a time over TCP,
timed from request to answer at the client:

- **marker**: Redis holds the marker, so the append starts the pair itself;
- **postgres**: the marker deleted from Redis (the node now takes every pair
  without seq for one Redis may have lost): each first DM asks PostgreSQL
  for the pair's seq first. The marker is put back after the phase.

Both phases in the same run, on the same node; each figure is the median of
``--runs`` runs. Example: ``python bench/first_message.py --pairs 300 --runs 5 --json``
"""
from __future__ import annotations

import argparse
import sys
import time

import benchlib
from zim.client.blocking import TcpClient
from zim.nodes.archive_schema import GENERATION_KEY


def first_dms(node: benchlib.Server, pairs: int, name: str) -> list[float]:
    """Seconds from request to answer of one first DM to each of ``pairs`` new receivers."""
    sender = TcpClient(benchlib.LOOPBACK, node.tcp_port, timeout=30)
    sender.login(f"{name}-sender")
    receivers = []
    for number in range(pairs):
        receiver = TcpClient(benchlib.LOOPBACK, node.tcp_port, timeout=30)
        receivers.append((receiver, receiver.login(f"{name}-{number}")["id"]))
    latencies = []
    for _, receiver_id in receivers:
        started = time.perf_counter()
        answer = sender.call(2, {"receiverId": receiver_id, "content": "hello"}, timeout=30)
        latencies.append(time.perf_counter() - started)
        if answer.get("seq") != 1:
            raise RuntimeError(f"a first DM came back wrong: {str(answer)[:300]}")
    for receiver, _ in receivers:
        receiver.close()
    sender.close()
    return sorted(latencies)


def one_run(node: benchlib.Server, redis_db, pairs: int, run: int) -> dict:
    marker = redis_db.get(GENERATION_KEY)
    if marker is None:
        raise RuntimeError(f"the node set no generation marker\n{node.log_tail()}")
    found = {"marker": first_dms(node, pairs, f"m{run}")}
    redis_db.delete(GENERATION_KEY)
    try:
        found["postgres"] = first_dms(node, pairs, f"p{run}")
    finally:
        redis_db.set(GENERATION_KEY, marker)
    return benchlib.latency_figures(found)


def run(args, info: dict) -> int:
    with benchlib.redis_and_archive() as (redis_server, dsn, redis_db):
        with benchlib.Server(redis=redis_server.url, extra_args=["--archive", dsn]) as node:
            node.start()
            runs = [one_run(node, redis_db, args.pairs, number) for number in range(args.runs)]
    median = benchlib.median_latencies(runs, "first DM of a new pair")
    print(f"RESULT first_message ok: medians of {args.runs} runs, {args.pairs} new pairs per phase")
    if args.json:
        benchlib.print_json({"bench": "first_message", "ok": True, "machine": info, "pairs": args.pairs,
                             "runs": args.runs, **median})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="new pairs per phase and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return benchlib.run_main("first_message", "a new conversation's first DM, with and without the marker",
                             args, run)


if __name__ == "__main__":
    sys.exit(main())
