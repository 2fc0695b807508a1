"""One abusive client against honest users: their DM p99 during each attack, against quiet.

    python bench/abuse.py --workers 2 --rounds 3 --json

A ``zim-server --workers N`` with its default limits. Honest users (5 senders from
127.0.0.2, their 5 receivers from 127.0.0.3) send direct messages one at a time,
each sender at most 10 a second (under the default --user-rate of 20); a DM's time
is from its request to its answer (stored). Each attack runs in its own process
from its own loopback address, as fast as it can, and stops by itself after the
phase, at nice 19: on this machine it shares the server's cores, and its own CPU
would not be the server's on a network. Rounds alternate quiet and attack phases;
the figures are the medians over the rounds of each phase's p99, and their ratio
(same run, same machine).

Attacks (issue 14): registration-flood (new users), token-guessing (forged
tokens), connection-flood (connections past --max-conns-per-address), dm-flood
(DMs at one user: --user-rate, --max-mailbox), channel-flood (new channels),
ack-flood (acks of the longest list allowed, pipelined), history-hoard (history
requests pipelined on connections that never read).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time

import orjson

from benchlib import LOOPBACK, ProcessTree, Server, percentile, print_json, run_main, tcp_packet, tcp_split

from zim.protocol import ACK, HISTORY, LOGIN, SEND_USER, SUBSCRIBE
HONEST_PAIRS = 5
HONEST_RATE = 10.0              # DMs a second per honest sender


class Conn:
    """A blocking TCP client that pipelines: ``send`` returns the seq, ``call`` waits for it."""

    def __init__(self, port: int, source: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.seq = 0
        self.answers: dict[int, dict] = {}

    def send(self, action: int, body: dict) -> int:
        self.seq = self.seq % 32767 + 1
        self.sock.sendall(tcp_packet(action, self.seq, orjson.dumps(body)))
        return self.seq

    def _read(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data
        for _action, seq, body in tcp_split(self.buf):
            if seq:
                self.answers[seq] = orjson.loads(body) if body else {}

    def wait(self, seq: int) -> dict:
        while seq not in self.answers:
            self._read()
        return self.answers.pop(seq)

    def call(self, action: int, body: dict) -> dict:
        return self.wait(self.send(action, body))

    def close(self) -> None:
        self.sock.close()


def error_code(body: dict) -> str | None:
    error = body.get("error")
    return error.get("code") if isinstance(error, dict) else None


# -- attacks (each in its own process, until ``until``) ----------------------------

def registration_flood(port: int, until: float) -> dict:
    refused = created = 0
    while time.monotonic() < until:
        conns = []
        for _ in range(50):
            try:
                conns.append(Conn(port, "127.0.9.1"))
            except OSError:
                break
        seqs = [conn.send(LOGIN, {"name": "bot"}) for conn in conns]
        for conn, seq in zip(conns, seqs):
            try:
                code = error_code(conn.wait(seq))
            except OSError:
                code = "closed"
            created += code is None
            refused += code is not None
            conn.close()
    return {"created": created, "refused": refused}


def token_guessing(port: int, until: float) -> dict:
    conns = [Conn(port, "127.0.9.2") for _ in range(50)]
    codes: dict[str, int] = {}
    while time.monotonic() < until:
        seqs = [conn.send(LOGIN, {"name": "x", "token": "v2." + os.urandom(24).hex()}) for conn in conns]
        for conn, seq in zip(conns, seqs):
            code = error_code(conn.wait(seq)) or "ok"
            codes[code] = codes.get(code, 0) + 1
    return codes


def connection_flood(port: int, until: float) -> dict:
    held, refused = [], 0
    while time.monotonic() < until:
        try:
            conn = Conn(port, "127.0.9.3", timeout=2.0)
        except OSError:
            refused += 1
            continue
        held.append(conn)
        if len(held) % 100 == 0:        # refused ones are closed by the server: find and drop them
            conn.sock.setblocking(False)
            alive = []
            for c in held:
                c.sock.setblocking(False)
                try:
                    data = c.sock.recv(4096)
                    if data == b"" or data:
                        refused += 1
                        c.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    refused += 1
                    c.close()
                    continue
                c.sock.setblocking(True)
                alive.append(c)
            held = alive
    for c in held:
        c.close()
    return {"held_at_end": len(held), "refused": refused}


def _logged_in(port: int, source: str, name: str) -> tuple[Conn, str]:
    conn = Conn(port, source)
    answer = conn.call(LOGIN, {"name": name})
    return conn, answer["id"]


def _pipeline(conn: Conn, until: float, request, depth: int = 64) -> dict:
    codes: dict[str, int] = {}
    outstanding = []
    while time.monotonic() < until:
        while len(outstanding) < depth:
            outstanding.append(conn.send(*request()))
        code = error_code(conn.wait(outstanding.pop(0))) or "ok"
        codes[code] = codes.get(code, 0) + 1
    for seq in outstanding:
        conn.wait(seq)
    return codes


def dm_flood(port: int, until: float, victim: str) -> dict:
    conn, _ = _logged_in(port, "127.0.9.4", "spammer")
    return _pipeline(conn, until, lambda: (SEND_USER, {"receiverId": victim, "content": "spam" * 100}))


def channel_flood(port: int, until: float) -> dict:
    conn, _ = _logged_in(port, "127.0.9.5", "creator")
    count = iter(range(10**9))
    return _pipeline(conn, until, lambda: (SUBSCRIBE, {"name": f"flood-{os.getpid()}-{next(count)}"}))


def ack_flood(port: int, until: float) -> dict:
    conn, _ = _logged_in(port, "127.0.9.6", "acker")
    ids = [str(10**17 + i) for i in range(1000)]
    return _pipeline(conn, until, lambda: (ACK, {"ids": ids}), depth=96)


def history_hoard(port: int, until: float, channel: str) -> dict:
    """Four users pipeline history pages of ~800 KB and never read; a connection the
    server cuts (--max-outbuf) comes back at once, logged in with its token."""
    tokens = []
    for _ in range(4):
        conn = Conn(port, "127.0.9.7")
        answer = conn.call(LOGIN, {"name": "hoarder"})
        conn.call(SUBSCRIBE, {"name": channel})
        tokens.append(answer["token"])
        conn.close()
    request = tcp_packet(HISTORY, 1, orjson.dumps({"channel": channel, "limit": 100}))
    conns: list[Conn | None] = [None] * 4
    sent = reconnects = 0
    while time.monotonic() < until:
        progressed = False
        for i, conn in enumerate(conns):
            try:
                if conn is None:
                    conn = conns[i] = Conn(port, "127.0.9.7")
                    conn.call(LOGIN, {"name": "hoarder", "token": tokens[i]})
                    conn.sock.setblocking(False)
                    reconnects += 1
                conn.sock.send(request * 16)
                sent += 16
                progressed = True
            except (BlockingIOError, InterruptedError):
                pass
            except (OSError, KeyError):     # cut by the server (or refused): come back
                if conn is not None:
                    conn.close()
                conns[i] = None
        if not progressed:
            time.sleep(0.01)        # the server stopped reading us: that is the limit working
    for conn in conns:
        if conn is not None:
            conn.close()
    return {"requests_sent": sent, "connections": reconnects}


ATTACKS = {
    "registration-flood": registration_flood,
    "token-guessing": token_guessing,
    "connection-flood": connection_flood,
    "dm-flood": dm_flood,
    "channel-flood": channel_flood,
    "ack-flood": ack_flood,
    "history-hoard": history_hoard,
}


def _attack_main(name: str, port: int, until: float, extra: tuple, results) -> None:
    # The attacker shares the server's two cores here; from another machine its own
    # CPU would not be taken from the server. Niced, it runs on what the server and
    # the honest users leave, and still sends as fast as that allows.
    os.nice(19)
    try:
        results.put((name, ATTACKS[name](port, until, *extra)))
    except Exception as exc:    # noqa: BLE001 - reported, the bench goes on
        results.put((name, {"error": repr(exc)}))


# -- honest users ----------------------------------------------------------------

class Honest:
    def __init__(self, port: int) -> None:
        self.pairs = []
        for i in range(HONEST_PAIRS):
            sender, _ = _logged_in(port, "127.0.0.2", f"sender{i}")
            receiver, receiver_id = _logged_in(port, "127.0.0.3", f"receiver{i}")
            self.pairs.append((sender, receiver, receiver_id))
        self.sent = 0

    def measure(self, count: int) -> list[float]:
        times = []
        gap = 1.0 / (HONEST_RATE * HONEST_PAIRS)
        next_at = time.perf_counter()
        for i in range(count):
            sender, receiver, receiver_id = self.pairs[i % HONEST_PAIRS]
            now = time.perf_counter()
            if now < next_at:
                time.sleep(next_at - now)
            next_at = max(now, next_at) + gap
            started = time.perf_counter()
            answer = sender.call(SEND_USER, {"receiverId": receiver_id, "content": f"hello {self.sent}"})
            times.append(time.perf_counter() - started)
            self.sent += 1
            if error_code(answer) is not None:
                raise RuntimeError(f"an honest DM was refused: {answer}")
        for sender, receiver, _ in self.pairs:      # keep mailboxes empty: the honest receivers read and ack
            receiver.sock.setblocking(False)
            try:
                while True:
                    receiver.buf += receiver.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                pass
            finally:
                receiver.sock.setblocking(True)
            pushed = [orjson.loads(body)["id"] for action, _, body in tcp_split(receiver.buf) if action == 101]
            for start in range(0, len(pushed), 500):
                receiver.call(ACK, {"ids": pushed[start:start + 500]})
        return times


def run(args, info) -> int:
    names = list(ATTACKS) if args.attacks == "all" else args.attacks.split(",")
    for name in names:
        if name not in ATTACKS:
            raise RuntimeError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    server = Server(workers=args.workers, default_limits=True, extra_args=args.server_args.split())
    tree = ProcessTree(server.start())
    results = []
    try:
        honest = Honest(server.tcp_port)
        victim = honest.pairs[0][2]
        owner, _ = _logged_in(server.tcp_port, "127.0.0.4", "owner")
        channel = "hoard-me"
        owner.call(SUBSCRIBE, {"name": channel})
        for i in range(100):
            owner.call(4, {"channel": channel, "content": "x" * 8000})
            time.sleep(0.06)    # under the default --user-rate
        honest.measure(100)     # warm up
        context = multiprocessing.get_context("spawn")
        for name in names:
            quiet, loud, attack_results, rss = [], [], [], []
            extra = {"dm-flood": (victim,), "history-hoard": (channel,)}.get(name, ())
            for _ in range(args.rounds):
                quiet.append(percentile(sorted(honest.measure(args.dms)), 0.99))
                queue = context.Queue()
                phase = args.dms / (HONEST_RATE * HONEST_PAIRS) + 3.0
                process = context.Process(target=_attack_main,
                                          args=(name, server.tcp_port, time.monotonic() + phase + 2.0, extra, queue))
                process.start()
                time.sleep(1.5)         # the attack under way
                loud.append(percentile(sorted(honest.measure(args.dms)), 0.99))
                rss.append(tree.rss())
                process.join(timeout=phase + 60)
                if process.is_alive():
                    process.kill()
                    raise RuntimeError(f"attack {name} did not stop by itself")
                attack_results.append(queue.get(timeout=10)[1])
                if not server.alive():
                    raise RuntimeError(f"the server died during {name}: {server.log_tail()}")
            row = {"attack": name, "quiet_p99_ms": round(statistics.median(quiet) * 1000, 2),
                   "attack_p99_ms": round(statistics.median(loud) * 1000, 2),
                   "quiet_p99s_ms": [round(v * 1000, 2) for v in quiet],
                   "attack_p99s_ms": [round(v * 1000, 2) for v in loud],
                   "server_rss_mib": round(max(rss) / 2**20, 1), "attacker": attack_results[-1]}
            row["ratio"] = round(row["attack_p99_ms"] / row["quiet_p99_ms"], 2)
            results.append(row)
            print(f"{name:20s} quiet p99 {row['quiet_p99_ms']:7.2f} ms  attack p99 {row['attack_p99_ms']:7.2f} ms"
                  f"  ratio {row['ratio']:5.2f}  rss {row['server_rss_mib']} MiB  attacker {row['attacker']}",
                  flush=True)
    finally:
        server.stop()
    worst = max(row["ratio"] for row in results)
    print(f"RESULT abuse: worst ratio {worst:.2f} (target <= 2.0) over {len(results)} attacks")
    if args.json:
        print_json({"bench": "abuse", "ok": True, "workers": args.workers, "rounds": args.rounds,
                    "dms_per_phase": args.dms, "results": results, "machine": info})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dms", type=int, default=200, help="honest DMs per phase (default 200)")
    parser.add_argument("--attacks", default="all", help=f"comma-separated, or all: {', '.join(ATTACKS)}")
    parser.add_argument("--server-args", default="", help="more zim-server flags, one string")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    return run_main("abuse", "zim abuse: honest DM p99 during each attack vs quiet", args, run)


if __name__ == "__main__":
    sys.exit(main())
