#!/usr/bin/env python3
"""How a reactor should talk to Redis: a client thread, or a socket in the loop.

Starts its own redis-server (``zim.testing.redis.LocalRedis``: a free loopback
port, ``--save "" --appendonly no``, a temporary directory; stopped at the end).
One operation is what a channel send will cost a node: a pipeline of
``INCR seq`` and ``XADD`` of a 200-byte message (``MAXLEN ~ 1000``, so memory
stays bounded). A real ``zim.Reactor`` runs its loop; ``--depths`` D operations
are kept in flight: each one settled issues the next from the loop, as handlers
will. Two ways, each with the same ``pipeline(commands) -> Pending`` face:

- ``thread``: redis-py (hiredis parser) in a client thread. Calls go through a
  queue; the thread sends everything queued as one redis-py pipeline, puts the
  replies on a deque and writes an eventfd the reactor watches (``Reactor.watch``);
  the loop settles them.
- ``socket``: ``zim.nodes.link.RedisLink``, a non-blocking socket in the loop,
  commands packed by ``hiredis.pack_command``, replies parsed by ``hiredis.Reader``.

For each way and depth, ``--runs`` runs of ``--ops`` operations (after a
warm-up), the median run reported: operations per second, latency from issue to
settle (p50, p99), CPU time of this process per operation (every thread: the
client thread's work counts) and of redis-server per operation. ``--busy-us``
adds that much CPU work in the loop per settled operation (a handler's work):
the thread then waits for the interpreter lock while the loop is busy.

Example: ``python bench/redis_link.py --ops 20000 --runs 3 --json``
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from collections import deque

import psutil
import redis

import benchlib
from zim._core import Reactor
from zim.nodes.link import RedisLink
from zim.pending import Pending
from zim.testing.redis import LocalRedis

MODES = ("thread", "socket")
PAYLOAD = b"m" * 200
RUN_LIMIT_S = 60.0


class ThreadedRedis:
    """redis-py in a client thread, results handed to the loop through an eventfd."""

    def __init__(self, reactor: Reactor, port: int) -> None:
        self.client = redis.Redis(host=benchlib.LOOPBACK, port=port)
        self.reactor = reactor
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.results: deque = deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        reactor.watch(self.wake_fd, self._on_wake)
        self.thread = threading.Thread(target=self._serve, name="redis-client", daemon=True)
        self.thread.start()

    def pipeline(self, commands: list[tuple]) -> Pending:
        pending = Pending()
        self.requests.put((commands, pending))
        return pending

    def _serve(self) -> None:
        while True:
            batch = [self.requests.get()]
            while True:
                try:
                    batch.append(self.requests.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [item for item in batch if item is not None]
            pipe = self.client.pipeline(transaction=False)
            for commands, _ in batch:
                for command in commands:
                    pipe.execute_command(*command)
            try:
                replies = pipe.execute(raise_on_error=False) if batch else []
                start = 0
                for commands, pending in batch:
                    self.results.append((pending, True, replies[start:start + len(commands)]))
                    start += len(commands)
            except redis.RedisError as exc:
                self.results.extend((pending, False, str(exc)) for _, pending in batch)
            os.eventfd_write(self.wake_fd, 1)
            if stop:
                return

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        results = self.results
        while results:
            pending, ok, value = results.popleft()
            pending.settle(ok, value)

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(10)
        self.reactor.unwatch(self.wake_fd)
        os.close(self.wake_fd)
        self.client.close()


class Driver:
    """Keeps ``depth`` operations in flight on a client until ``count`` have settled."""

    def __init__(self, reactor: Reactor, client, depth: int, busy_us: float,
                 redis_process: psutil.Process) -> None:
        self.reactor = reactor
        self.redis_process = redis_process
        self.client = client
        self.depth = depth
        self.busy_s = busy_us / 1e6
        self.operation = [("INCR", "bench:seq"),
                          ("XADD", "bench:stream", "MAXLEN", "~", "1000", "*", "m", PAYLOAD)]
        self.latencies_ns: list[int] = []
        self.errors = 0

    def drive(self, warmup: int, count: int) -> None:
        """Run the loop (once: a reactor runs until stop) for ``warmup`` operations,
        then ``count`` measured ones; ``measured`` holds the snapshots around them."""
        self.warmup, self.count = warmup, warmup + count
        self.issued = self.settled = 0
        self.measured: dict = {}
        for _ in range(min(self.depth, self.count)):
            self._issue()
        alarm = self.reactor.timer(self._give_up)
        alarm.set(time.monotonic_ns() + int(RUN_LIMIT_S * 1e9))
        self.reactor.run()
        alarm.close()

    def _snapshot(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), sum(self.redis_process.cpu_times()[:2])

    def _give_up(self) -> None:
        self.reactor.stop()

    def _issue(self) -> None:
        self.issued += 1
        self.client.pipeline(self.operation).wait(self._settled, time.perf_counter_ns(), None)

    def _settled(self, started_ns: int, _unused, ok: bool, value) -> None:
        self.settled += 1
        if self.settled > self.warmup:
            self.latencies_ns.append(time.perf_counter_ns() - started_ns)
        if self.settled == self.warmup:
            self.measured["start"] = self._snapshot()
        if not ok or not isinstance(value[0], int):
            self.errors += 1
            self.reactor.stop()     # a failed run: no reissue (a link that is down fails at once)
            return
        if self.busy_s:
            until = time.perf_counter() + self.busy_s
            while time.perf_counter() < until:
                pass
        if self.issued < self.count:
            self._issue()
        elif self.settled == self.count:
            self.measured["end"] = self._snapshot()
            self.reactor.stop()


def one_run(mode: str, server: LocalRedis, depth: int, ops: int, busy_us: float) -> dict:
    reactor = Reactor(65536, lambda *packet: None)
    if mode == "thread":
        client = ThreadedRedis(reactor, server.port)
    else:
        client = RedisLink(reactor, server.host, server.port)
    driver = Driver(reactor, client, depth, busy_us, psutil.Process(server.pid()))
    try:
        driver.drive(min(ops, 500), ops)    # the warm-up connects and makes the first allocations
    finally:
        client.close()
    if "end" not in driver.measured:
        raise RuntimeError(f"{mode} depth {depth}: {driver.settled} operations of "
                           f"{driver.count} settled in {RUN_LIMIT_S:g} s")
    (wall0, cpu0, redis0), (wall1, cpu1, redis1) = driver.measured["start"], driver.measured["end"]
    wall, cpu, redis_cpu = wall1 - wall0, cpu1 - cpu0, redis1 - redis0
    latencies = sorted(driver.latencies_ns)
    return {
        "ops_per_s": len(latencies) / wall,
        "p50_us": benchlib.percentile(latencies, 0.50) / 1e3,
        "p99_us": benchlib.percentile(latencies, 0.99) / 1e3,
        "cpu_us_per_op": cpu / len(latencies) * 1e6,
        "redis_cpu_us_per_op": redis_cpu / len(latencies) * 1e6,
        "errors": driver.errors + (ops - len(latencies)),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, with the median of every figure beside it."""
    middle = sorted(runs, key=lambda run: run["ops_per_s"])[len(runs) // 2]
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("ops_per_s", "p50_us", "p99_us", "cpu_us_per_op", "redis_cpu_us_per_op")}
    summary["errors"] = sum(run["errors"] for run in runs)
    summary["median_run"] = middle
    return summary


def run(args, info: dict) -> int:
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    rows = []
    with LocalRedis() as server:
        print(f"# redis-server on port {server.port}; op = INCR + XADD of {len(PAYLOAD)} bytes; "
              f"{args.ops} ops per run, median of {args.runs}, busy {args.busy_us:g} us per op")
        print(f"{'mode':8} {'depth':>5} {'ops/s':>9} {'p50 us':>8} {'p99 us':>8} "
              f"{'cpu us/op':>9} {'redis us/op':>11}")
        for depth in depths:
            for mode in modes:
                summary = median_run([one_run(mode, server, depth, args.ops, args.busy_us)
                                      for _ in range(args.runs)])
                summary.update(mode=mode, depth=depth)
                rows.append(summary)
                print(f"{mode:8} {depth:>5} {summary['ops_per_s']:>9.0f} {summary['p50_us']:>8.1f} "
                      f"{summary['p99_us']:>8.1f} {summary['cpu_us_per_op']:>9.2f} "
                      f"{summary['redis_cpu_us_per_op']:>11.2f}")
                sys.stdout.flush()
    ok = all(row["errors"] == 0 for row in rows)
    print(f"RESULT redis_link {'ok' if ok else 'FAILED'}: " + "; ".join(
        f"{row['mode']} depth {row['depth']}: {row['ops_per_s']:.0f} ops/s, "
        f"{row['cpu_us_per_op']:.1f} us CPU/op" for row in rows))
    if args.json:
        benchlib.print_json({"bench": "redis_link", "ok": ok, "ops": args.ops, "runs": args.runs,
                             "busy_us": args.busy_us, "rows": rows, "machine": info})
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="thread,socket")
    parser.add_argument("--depths", default="1,4,16,64,256", help="operations in flight")
    parser.add_argument("--ops", type=int, default=20000, help="operations per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (the median is reported)")
    parser.add_argument("--busy-us", type=float, default=0.0, help="loop CPU work per settled op")
    parser.add_argument("--json", action="store_true", help="a JSON line at the end")
    args = parser.parse_args()
    if set(args.modes.split(",")) - set(MODES):
        parser.error(f"--modes: choose among {','.join(MODES)}")
    return benchlib.run_main("redis_link", "Redis from a reactor: client thread vs socket in the loop",
                             args, run)


if __name__ == "__main__":
    sys.exit(main())
