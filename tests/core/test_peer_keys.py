"""Address keys and the address table of zim._core (--max-conns-per-address), on their
own: the keyed hash against SipHash-2-4's reference, the keys of IPv4, IPv4-mapped and
IPv6 addresses, the accounting over several regions (workers) as hypothesis properties,
the per-user connection counts the router keeps, and the keys a real reactor gives
connections from real sockets."""
from __future__ import annotations

import ipaddress
import mmap
import socket
import struct
import threading
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from tests.support.servers import free_port
from zim.client import tcp_packet
from zim._core import (
    PEER_MARK, Reactor, _debug_ipv6_key, _debug_siphash, _DebugAddressTable, address_table_bytes,
    clear_address_region, init_address_table,
)
from zim._idmap import IdMap

MASK64 = (1 << 64) - 1
KEYS = (0x0123456789ABCDEF, 0x0FEDCBA987654321, 0x1111222233334444, 0x5555666677778888)
KEY_OFFSET = 16     # address_header_t: magic(8) slots(4) regions(4) key[4]
REGIONS = 3


def rotl(x: int, bits: int) -> int:
    return ((x << bits) | (x >> (64 - bits))) & MASK64


def siphash24(k0: int, k1: int, message: bytes) -> int:
    """SipHash-2-4, straight from the paper (the reference the C code must match)."""
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & MASK64; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & MASK64; v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & MASK64; v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & MASK64; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)

    tail_length = len(message) % 8
    words = [int.from_bytes(message[i:i + 8], "little") for i in range(0, len(message) - tail_length, 8)]
    last = (len(message) & 0xFF) << 56 | int.from_bytes(message[len(message) - tail_length:], "little")
    for m in [*words, last]:
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def table(regions: int = REGIONS, anonymous: bool = True):
    """A fresh address table with the known KEYS (shared anonymous memory, or a bytearray:
    clearing a region then falls back from madvise to memset)."""
    size = address_table_bytes(regions)
    buffer = mmap.mmap(-1, size) if anonymous else bytearray(size)
    init_address_table(buffer, regions)
    struct.pack_into("=4Q", buffer, KEY_OFFSET, *KEYS)
    return buffer


def colliding_peers() -> tuple[int, int]:
    """Two IPv4 keys that share a slot under KEYS (a birthday search: a few hundred tries)."""
    view = _DebugAddressTable(table(1), 0)
    seen: dict[int, int] = {}
    peer = 0x0A000001
    while True:
        slot = view.slot(peer)
        if slot in seen:
            return seen[slot], peer
        seen[slot] = peer
        peer += 1


COLLIDING = colliding_peers()
PEERS = [*COLLIDING, 0x7F000002, 0x7F000003, 0xC0A80001]


def test_siphash_reference_vector():
    # the paper's test key 00..0f and message 00..07: vectors_sip64[8]
    k0, k1 = int.from_bytes(bytes(range(8)), "little"), int.from_bytes(bytes(range(8, 16)), "little")
    assert _debug_siphash(k0, k1, int.from_bytes(bytes(range(8)), "little")) == 0x93F5F5799A932462


@given(st.integers(0, MASK64), st.integers(0, MASK64), st.integers(0, MASK64))
def test_siphash_matches_the_reference(k0, k1, m):
    assert _debug_siphash(k0, k1, m) == siphash24(k0, k1, m.to_bytes(8, "little"))


@given(st.integers(0, 2**32 - 1), st.integers(0, MASK64), st.integers(0, MASK64))
def test_ipv4_mapped_key_is_the_ipv4_address(v4, k0, k1):
    mapped = ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(v4)}")
    assert _debug_ipv6_key(mapped.packed, k0, k1) == v4


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1), st.integers(0, MASK64), st.integers(0, MASK64))
def test_ipv6_key_is_one_per_slash_64(address, other_host, k0, k1):
    address = ipaddress.IPv6Address(address)
    if address.ipv4_mapped is not None:
        return
    same_prefix = ipaddress.IPv6Address((int(address) >> 64 << 64) | other_host)
    key = _debug_ipv6_key(address.packed, k0, k1)
    assert key == _debug_ipv6_key(same_prefix.packed, k0, k1)
    assert 0 < key < 2**32
    hashed = siphash24(k0, k1, (int(address) >> 64).to_bytes(8, "little")) & 0xFFFFFFFF
    assert key == (hashed or 1)


def test_ipv6_keys_depend_on_the_secret():
    address = ipaddress.IPv6Address("2001:db8:1:2::5").packed
    keys = {_debug_ipv6_key(address, k0, 7) for k0 in range(50)}
    assert len(keys) == 50
    assert PEER_MARK == 1 << 63


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, REGIONS - 1), st.sampled_from(PEERS), st.booleans()),
                    max_size=200),
       limit=st.integers(1, 6), anonymous=st.booleans())
def test_address_accounting(ops, limit, anonymous):
    """Over any sequence of accepts (admit) and closes (release) in any region: an
    address's count is the connections held in its slot (its own, plus any address
    sharing the slot: only ever an overcount), a connection is refused exactly when
    that count has reached the limit, and everything goes back to 0."""
    buffer = table(anonymous=anonymous)
    views = [_DebugAddressTable(buffer, region) for region in range(REGIONS)]
    held: Counter = Counter()
    for region, peer, accept in ops:
        in_slot = sum(n for (_, other), n in held.items() if views[0].slot(other) == views[0].slot(peer))
        assert views[region].count(peer) == in_slot
        if accept:
            admitted = views[region].admit(peer, limit)
            assert admitted == (in_slot < limit)
            held[(region, peer)] += admitted
        elif held[(region, peer)]:
            views[region].release(peer)
            held[(region, peer)] -= 1
        for other in PEERS:
            mine = sum(held[(r, other)] for r in range(REGIONS))
            assert mine <= limit and views[0].count(other) >= mine
    assert views[0].count(COLLIDING[0]) == sum(held[(r, p)] for r in range(REGIONS) for p in COLLIDING)
    # a dead worker's region is cleared: the others' connections still count
    clear_address_region(buffer, 1)
    for peer in PEERS:
        assert views[2].count(peer) == sum(held[(r, p)] for r in (0, 2) for p in PEERS
                                            if views[0].slot(p) == views[0].slot(peer))
    for (region, peer), n in held.items():
        if region != 1:
            for _ in range(n):
                views[region].release(peer)
    assert all(views[0].count(peer) == 0 for peer in PEERS)
    views[0].release(PEERS[0])          # never below zero
    assert views[0].count(PEERS[0]) == 0


def test_a_table_must_be_one():
    with pytest.raises(ValueError):
        _DebugAddressTable(bytearray(address_table_bytes(1)), 0)       # no header
    with pytest.raises(ValueError):
        _DebugAddressTable(table(2), 2)                                 # no such region
    reactor = Reactor(65536, lambda *packet: None)
    with pytest.raises(ValueError):
        reactor.share_address_table(bytearray(64), 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.booleans()), max_size=100))
def test_conn_counts(ops):
    """The router's per-worker user -> connections table: up per login, down per
    reported close (several in one report), never below 0, empty users leave it."""
    counts, model = IdMap(), Counter()
    for user, login in ops:
        if login:
            counts.add_one(user)
            model[user] += 1
        else:
            counts.release(user.to_bytes(8, "big") * 2 + (99).to_bytes(8, "big"))
            model[user] = max(0, model[user] - 2)
        assert all(counts.get(u) == model[u] for u in range(1, 5))
        assert len(counts) == sum(1 for n in model.values() if n)


# -- a real reactor, real sockets ----------------------------------------------------------

def peer_of(listen_host: str, connect_host: str, source: str, buffer=None) -> int:
    """conn_peer of a connection from ``source`` to a reactor listening on ``listen_host``."""
    seen: list[int] = []

    def on_packet(conn, action, seq, body):
        seen.append(reactor.conn_peer(conn))
        reactor.stop()

    reactor = Reactor(65536, on_packet, max_conns_per_address=10)
    if buffer is not None:
        reactor.share_address_table(buffer, 1)
    port = free_port()
    reactor.listen(listen_host, port)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    family = socket.AF_INET6 if ":" in connect_host else socket.AF_INET
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect((connect_host, port))
        client.sendall(tcp_packet(9, 1))
        thread.join(5)
    assert not thread.is_alive()
    reactor.close_all()
    assert reactor.address_count(seen[0]) == 0         # counted while open, released at the close
    return seen[0]


def test_reactor_peer_keys():
    assert peer_of("127.0.0.1", "127.0.0.1", "127.0.0.5") == int(ipaddress.IPv4Address("127.0.0.5"))
    # a dual-stack listener: an IPv4 client has its IPv4 key
    assert peer_of("::", "127.0.0.1", "127.0.0.6") == int(ipaddress.IPv4Address("127.0.0.6"))
    # IPv6: the /64 under the table's key, the same in every process sharing the table
    shared = table()
    expected = _debug_ipv6_key(ipaddress.IPv6Address("::1").packed, KEYS[0], KEYS[1])
    assert peer_of("::1", "::1", "::1", shared) == expected
    assert peer_of("::1", "::1", "::1", shared) == expected


def test_conn_slot_stays_96_bytes():
    assert Reactor(65536, lambda *packet: None).stats()["conn_slot_bytes"] == 96
