"""What bench/peers.py's clients say to each peer: the channel, the 100-byte
payloads, and each peer's wire format (``Wire``: subscribe, deliveries,
publishes and their answers) for redis (RESP), NATS and the asyncio server.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


PEERS = ("zim", "redis", "nats", "asyncio")
CHANNEL = b"bench"
PAYLOAD_SIZE = 100
FIRST_PING_WAIT = 5.0       # NATS: seconds a subscriber waits for the server's first PING
QUIET_SECONDS = 2.0         # after the last answer, a subscriber silent this long is short


def payload(number: int) -> bytes:
    """Message ``number``'s 100 bytes: its number, then padding (never a delimiter)."""
    return b"%010d" % number + b"x" * (PAYLOAD_SIZE - 10)


# -- the peers' wire formats ------------------------------------------------------
def resp_command(*parts: bytes) -> bytes:
    """A redis command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


NATS_CONNECT = b'CONNECT {"verbose":false,"pedantic":false}\r\n'


@dataclasses.dataclass(frozen=True)
class Wire:
    """What a peer's clients send and receive; every delivery has one exact size."""

    subscribe: bytes               # a subscriber sends this once connected
    subscribed: bytes              # ... and is subscribed when what it read ends so
    delivery_head: bytes           # a delivery is head + payload + tail
    delivery_tail: bytes
    publish_head: bytes            # a publish is head + payload + tail
    publish_tail: bytes
    publisher_hello: bytes         # the publisher's first bytes (then PING, NATS only)
    first_ping: bool               # the server PINGs each new client once (NATS)
    answer_end: bytes              # the publisher's answers are lines ending so
    ping_acks: bool                # no answer per publish: a PING after every batch
    good_answer: Callable[[int], bytes]   # the answer to one publish, given N subscribers
    # The idle test's ``--idle-channels``: one request subscribing to several channels,
    # and whether what a connection read so far says all of ``count`` are subscribed.
    subscribe_many: Callable[[list[bytes]], bytes]
    subscribed_many: Callable[[bytearray, int], bool]

    def delivery(self, number: int) -> bytes:
        return self.delivery_head + payload(number) + self.delivery_tail

    @property
    def delivery_size(self) -> int:
        return len(self.delivery_head) + PAYLOAD_SIZE + len(self.delivery_tail)

    def publish(self, number: int) -> bytes:
        return self.publish_head + payload(number) + self.publish_tail


WIRES = {
    # A PUBLISH is answered with the number of receivers: ":N\r\n".
    "redis": Wire(
        subscribe=resp_command(b"SUBSCRIBE", CHANNEL),
        subscribed=b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(CHANNEL), CHANNEL),
        delivery_head=b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(CHANNEL), CHANNEL, PAYLOAD_SIZE),
        delivery_tail=b"\r\n",
        publish_head=b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(CHANNEL), CHANNEL, PAYLOAD_SIZE),
        publish_tail=b"\r\n", publisher_hello=b"", first_ping=False, answer_end=b"\r\n",
        ping_acks=False, good_answer=lambda subscribers: b":%d\r\n" % subscribers,
        # Each channel is confirmed with the connection's subscription count: the last is N.
        subscribe_many=lambda names: resp_command(b"SUBSCRIBE", *names),
        subscribed_many=lambda buf, count: buf.endswith(b"\r\n:%d\r\n" % count)),
    # The PING makes the server answer PONG once the CONNECT and SUB are processed.
    # nats-server also PINGs every new client once, about 2 s after it connects (to
    # measure the round trip; later PINGs come every ping_interval, set to 1 h):
    # subscribers wait for that PING and answer it before any run, so that no PING
    # ever lands in a counted stream.
    "nats": Wire(
        subscribe=NATS_CONNECT + b"SUB %s 1\r\nPING\r\n" % CHANNEL,
        subscribed=b"PONG\r\n",
        delivery_head=b"MSG %s 1 %d\r\n" % (CHANNEL, PAYLOAD_SIZE),
        delivery_tail=b"\r\n",
        publish_head=b"PUB %s %d\r\n" % (CHANNEL, PAYLOAD_SIZE),
        publish_tail=b"\r\n", publisher_hello=NATS_CONNECT, first_ping=True,
        answer_end=b"\r\n", ping_acks=True,
        good_answer=lambda subscribers: b"PONG\r\n",
        subscribe_many=lambda names: NATS_CONNECT + b"".join(
            b"SUB %s %d\r\n" % (name, sid) for sid, name in enumerate(names, 1)) + b"PING\r\n",
        subscribed_many=lambda buf, count: b"PONG\r\n" in buf),
    # bench/asyncio_server.py's line protocol.
    "asyncio": Wire(
        subscribe=b"SUB %s\n" % CHANNEL, subscribed=b"OK\n",
        delivery_head=b"MSG ", delivery_tail=b"\n",
        publish_head=b"PUB %s " % CHANNEL, publish_tail=b"\n",
        publisher_hello=b"", first_ping=False, answer_end=b"\n", ping_acks=False,
        good_answer=lambda subscribers: b"OK\n",
        subscribe_many=lambda names: b"".join(b"SUB %s\n" % name for name in names),
        subscribed_many=lambda buf, count: buf.count(b"OK\n") >= count),
}
