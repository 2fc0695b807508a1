"""The sessions of bench/fuzz.py: what one fuzzer connection does from
start to end (a TCP or WebSocket stream of requests, random bytes, handshakes,
the sweep of every field), as generators of chunks to write, drawing frames
from a shared ``Budget``.
"""
from __future__ import annotations

import random
import time

from fuzz_frames import Gen, HEARTBEAT, LOGIN, OP_BINARY, OP_CLOSE, VALID_OFFERS, mutate
from zim.client import ws_close_payload, ws_message


# -- sessions ---------------------------------------------------------------------------
# A session is a generator yielding chunks ``(data, ends, kinds)`` to write (a frame
# counts when the byte at its end offset was written; a kind of None is a frame
# split over several chunks that is counted with its last chunk), or commands:
# ("hold", seconds) and ("reset",) (close with a RST after the last chunk).

class Budget:
    """Frames a fuzzer may still start; sessions stop when it is spent."""

    def __init__(self, frames: int, deadline: float) -> None:
        self.left = frames
        self.deadline = deadline

    def take(self, wanted: int) -> int:
        if time.monotonic() >= self.deadline:
            return 0
        granted = max(0, min(wanted, self.left))
        self.left -= granted
        return granted

    def give_back(self, frames: int) -> None:
        self.left += frames


class SessionBudget:
    """One session's share of a ``Budget``: what it took, so that what it could not
    write (the server closed first) goes back to the others."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.taken = 0

    def take(self, wanted: int) -> int:
        granted = self.budget.take(wanted)
        self.taken += granted
        return granted


def pack(frames: list[tuple[bytes, str | None]]) -> tuple[bytes, list[int], list[str | None]]:
    ends, kinds, offset = [], [], 0
    for data, kind in frames:
        offset += len(data)
        ends.append(offset)
        kinds.append(kind)
    return b"".join(d for d, _ in frames), ends, kinds


def session_kind(rng: random.Random, number: int) -> str:
    if number == 0:
        return "sweep"
    r = rng.random()
    if r < 0.15:
        return "tcp_stream"
    if r < 0.35:
        return "tcp_break"
    if r < 0.45:
        return "tcp_random"
    if r < 0.60:
        return "ws_stream"
    if r < 0.80:
        return "ws_break"
    return "ws_handshake"


def run_session(kind: str, gen: Gen, budget: SessionBudget, tcp_sweep: bool):
    rng = gen.rng
    if kind == "sweep":
        yield from sweep_session(gen, budget, tcp=tcp_sweep)
    elif kind == "tcp_stream":
        yield from tcp_stream(gen, budget, login=rng.random() < 0.8, length=stream_length(rng), breaking=0.5)
    elif kind == "tcp_break":
        yield from tcp_stream(gen, budget, login=rng.random() < 0.5, length=rng.choice((0, 0, 1, 3)), breaking=1)
    elif kind == "tcp_random":
        for _ in range(rng.choice((1, 1, 1, 2, 4))):
            if not budget.take(1):
                return
            size = rng.choice((1, 3, 7, 8, 9, 16, 100, 1000, 4096, 70000))
            yield pack([(rng.randbytes(size), "tcp_random_bytes")])
    elif kind == "ws_stream":
        yield from ws_stream(gen, budget, deflate=rng.random() < 0.5, login=rng.random() < 0.8,
                             length=stream_length(rng), breaking=0.5)
    elif kind == "ws_break":
        yield from ws_stream(gen, budget, deflate=rng.random() < 0.6, login=rng.random() < 0.5,
                             length=rng.choice((0, 0, 1, 3)), breaking=1)
    else:
        yield from ws_handshake_session(gen, budget)
    if rng.random() < 0.05:
        yield ("reset",)


def sweep_session(gen: Gen, budget: SessionBudget, tcp: bool):
    requests = gen.sweep()
    rng = gen.rng
    frames: list[tuple[bytes, str | None]] = []
    requests.insert(0, (LOGIN, 1, gen.login_body()))
    granted = budget.take(len(requests) + 1)    # all at once: the sweep is not cut short by the others
    if not tcp:
        frames.append((gen.handshake_bytes(None), "ws_handshake"))
        granted -= 1
    requests = requests[:granted]
    for start in range(0, len(requests), 64):
        batch = requests[start:start + 64]
        for action, seq, body in batch:
            if tcp:
                frames.append((gen.tcp(action, seq, body), "tcp:sweep"))
            else:
                frames.append((gen.ws(OP_BINARY, ws_message(action, seq, body)), "ws_message:sweep"))
        yield pack(frames)
        frames = []
        if rng.random() < 0.2:
            yield ("hold", 0.02)


def stream_length(rng: random.Random) -> int:
    return rng.choice((1, 2, 5, 10, 20, 50, 100, 200))


def tcp_stream(gen: Gen, budget: SessionBudget, login: bool, length: int, breaking: float):
    rng = gen.rng
    frames: list[tuple[bytes, str | None]] = []
    if login and budget.take(1):
        frames.append((gen.tcp(LOGIN, rng.randrange(1, 32768), gen.login_body()), "tcp_login"))
    remaining = length
    while remaining > 0:
        batch = budget.take(min(remaining, rng.choice((1, 8, 32, 64, 128))))
        if not batch:
            break
        remaining -= batch
        for _ in range(batch):
            if rng.random() < 0.01:     # a mutated packet in the middle of the stream (may desync it)
                action, seq, body, _ = gen.request()
                frames.append((mutate(gen.tcp(action, seq, body), rng, rng.randrange(1, 4)), "tcp_mutated_packet"))
            else:
                action, seq, body, what = gen.request()
                frames.append((gen.tcp(action, seq, body), "tcp:" + what))
        yield pack(frames)
        frames = []
        if rng.random() < 0.01:
            yield ("hold", rng.choice((0.05, 0.2, 0.5)))
    if rng.random() < breaking and budget.take(1):
        data, what = gen.tcp_breaking()
        frames.append((data, what))
    if frames:
        yield pack(frames)


def ws_stream(gen: Gen, budget: SessionBudget, deflate: bool, login: bool, length: int, breaking: float):
    rng = gen.rng
    if not budget.take(1):
        return
    offer = rng.choice(VALID_OFFERS) if deflate else None
    frames: list[tuple[bytes, str | None]] = [(gen.handshake_bytes(offer), "ws_handshake")]
    if login and budget.take(1):
        payload = ws_message(LOGIN, rng.randrange(1, 32768), gen.login_body())
        frames.append((gen.ws(OP_BINARY, gen.deflate(payload) if deflate else payload, rsv=4 if deflate else 0),
                       "ws_login"))
    remaining = length
    while remaining > 0:
        wanted = min(remaining, rng.choice((1, 8, 32, 64, 128)))
        granted = budget.take(wanted)
        if not granted:
            break
        remaining -= granted
        produced = 0
        while produced < granted:
            parts, what = gen.ws_stream_frames(deflate)
            for part in parts:
                frames.append((part, what))
            produced += len(parts)
        if produced > granted:          # fragments and control frames between them: a few more
            budget.take(produced - granted)
        yield pack(frames)
        frames = []
        if rng.random() < 0.01:
            yield ("hold", rng.choice((0.05, 0.2, 0.5)))
    r = rng.random()
    if r < breaking and budget.take(1):
        frames.append(gen.ws_breaking(deflate))
    elif r < breaking + 0.2 and budget.take(1):
        frames.append((gen.ws(OP_CLOSE, ws_close_payload(1000, b"bye")), "ws_close"))
    if frames:
        yield pack(frames)


def ws_handshake_session(gen: Gen, budget: SessionBudget):
    rng = gen.rng
    if not budget.take(1):
        return
    data, kind, complete = gen.bad_handshake()
    if not complete:
        # partial: part of it, a pause, then the rest of a good head or nothing
        yield pack([(data, None)])
        yield ("hold", rng.choice((0.05, 0.3, 1.0)))
        if rng.random() < 0.5 and kind == "hs_partial":
            rest = gen.handshake_bytes(None)
            yield pack([(rest[len(data):] if rest.startswith(data) else rest, kind)])
        else:
            yield pack([(b"", kind)])
        return
    if rng.random() < 0.3:
        # byte by byte for a while (a slow client), then the rest
        cut = rng.randrange(1, min(len(data), 40))
        for i in range(cut):
            yield pack([(data[i:i + 1], None)])
        yield pack([(data[cut:], kind)])
    else:
        yield pack([(data, kind)])
    if rng.random() < 0.5 and budget.take(1):      # in case it was accepted: a request
        payload = ws_message(HEARTBEAT, 1, b"{}")
        yield pack([(gen.ws(OP_BINARY, payload), "ws_after_odd_handshake")])
