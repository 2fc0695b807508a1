#!/usr/bin/env python3
"""History pages of a node with ``--archive`` from each tier: Redis's log (hot), ``cold``, PostgreSQL.

Starts a redis-server and a PostgreSQL of its own (``zim.testing``: free
loopback ports, temporary directories, removed at the end) and one zim node
(``python -m zim --redis URL --archive DSN``). Each run: a new pair of users,
``--messages`` DMs between them, then (once the archiver caught up: the pair's
``archived`` watermark is its seq) ``--reads`` history pages of ``--page``
messages at random depths, one at a time over TCP, timed from request to
answer at the client:

- **hot**: every page from Redis's log;
- **postgres**: after ``FLUSHALL``, each page with the pair's ``cold`` set
  deleted just before it (outside the timing), so the page comes from PostgreSQL
  (and is loaded into ``cold``);
- **cold**: the same pages again once ``cold`` holds the whole conversation.

Each figure is the median of ``--runs`` runs. Example:
``python bench/history_tiers.py --messages 2000 --reads 200 --runs 3 --json``
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import benchlib
from zim.client.blocking import TcpClient
from zim.nodes import schema
from zim.nodes.archive_schema import archive_keys

CATCH_UP_S = 60.0


def timed_pages(client: TcpClient, other: str, befores: list[int], page: int, before_each=None) -> list[float]:
    latencies = []
    for before in befores:
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        answer = client.call(5, {"userId": other, "beforeSeq": before, "limit": page}, timeout=30)
        latencies.append(time.perf_counter() - started)
        if "error" in answer or len(answer["messages"]) != min(page, before - 1):
            raise RuntimeError(f"a page before {before} came back wrong: {str(answer)[:300]}")
    return sorted(latencies)


def one_run(node: benchlib.Server, redis_db, args, run: int) -> dict:
    alice, bob = (TcpClient(benchlib.LOOPBACK, node.tcp_port, timeout=30) for _ in range(2))
    alice_id, bob_id = alice.login(f"alice{run}")["id"], bob.login(f"bob{run}")["id"]
    # the first DM alone: a new conversation's seq is first looked up in the archive
    alice.call(2, {"receiverId": bob_id, "content": "message 0 " + "x" * 100}, timeout=30)
    sent = [alice.send(2, {"receiverId": bob_id, "content": f"message {number} " + "x" * 100})
            for number in range(1, args.messages)]
    for seq in sent:
        alice.wait_response(seq, timeout=30)
    keys = schema.pair_keys(int(alice_id), int(bob_id))
    deadline = time.monotonic() + CATCH_UP_S
    while redis_db.get(archive_keys(keys).archived) != str(args.messages).encode():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the archiver did not catch up: {redis_db.get(archive_keys(keys).archived)} of "
                               f"{redis_db.get(keys.seq)}\n{node.log_tail()}")
        time.sleep(0.05)
    draw = random.Random(run)
    befores = [draw.randint(args.page + 1, args.messages + 1) for _ in range(args.reads)]
    found = {"hot": timed_pages(bob, alice_id, befores, args.page)}
    redis_db.flushall()
    cold = archive_keys(keys).cold
    found["postgres"] = timed_pages(bob, alice_id, befores, args.page, lambda: redis_db.delete(cold))
    for before in range(args.messages + 1, 1, -args.page):      # every page once: cold holds them all
        bob.call(5, {"userId": alice_id, "beforeSeq": before, "limit": args.page}, timeout=30)
    found["cold"] = timed_pages(bob, alice_id, befores, args.page)
    alice.close()
    bob.close()
    return benchlib.latency_figures(found)


def run(args, info: dict) -> int:
    with benchlib.redis_and_archive() as (redis_server, dsn, redis_db):
        with benchlib.Server(redis=redis_server.url, extra_args=["--archive", dsn, "--read-rate", "0"]) as node:
            node.start()
            runs = [one_run(node, redis_db, args, number) for number in range(args.runs)]
    median = benchlib.median_latencies(runs, f"page of {args.page}")
    print(f"RESULT history_tiers ok: medians of {args.runs} runs, {args.reads} pages each of {args.messages} DMs")
    if args.json:
        benchlib.print_json({"bench": "history_tiers", "ok": True, "machine": info, "messages": args.messages,
                             "reads": args.reads, "page": args.page, "runs": args.runs, **median})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="DMs in each run's conversation")
    parser.add_argument("--reads", type=int, default=200, help="pages read per tier and run")
    parser.add_argument("--page", type=int, default=50, help="messages per page")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    if args.messages < args.page + 1:
        parser.error("--messages must exceed --page")
    return benchlib.run_main("history_tiers", "history pages from Redis, its cold cache and PostgreSQL", args, run)


if __name__ == "__main__":
    sys.exit(main())
