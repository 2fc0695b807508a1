"""The reactor's own API, in process: wake-ups from other threads, stop(), the link's commands."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from zim._core import Reactor
from zim.client import split_tcp


def test_watch_runs_the_callback_on_wakeups_from_another_thread():
    reactor = Reactor(65536, lambda *args: None)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    seen: list[int] = []

    def on_wake() -> None:
        seen.append(os.eventfd_read(wake))      # drain: the watch is edge-triggered
        if sum(seen) >= 10:
            reactor.stop()

    reactor.watch(wake, on_wake)

    def writer() -> None:
        for _ in range(10):
            os.eventfd_write(wake, 1)
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    reactor.run()
    thread.join()
    assert sum(seen) == 10
    assert time.monotonic() - started < 5
    reactor.unwatch(wake)
    with pytest.raises(ValueError):
        reactor.unwatch(wake) or reactor.watch(-1, on_wake)
    os.close(wake)


def test_watch_refuses_a_descriptor_in_use():
    reactor = Reactor(65536, lambda *args: None)
    read_end, write_end = os.pipe()
    reactor.watch(read_end, lambda: None)
    with pytest.raises(ValueError):
        reactor.watch(read_end, lambda: None)
    reactor.unwatch(read_end)
    reactor.watch(read_end, lambda: None)       # free again after unwatch
    reactor.unwatch(read_end)
    os.close(read_end)
    os.close(write_end)


def test_stop_before_run_returns_at_once():
    reactor = Reactor(65536, lambda *args: None)
    reactor.stop()
    started = time.monotonic()
    reactor.run()
    assert time.monotonic() - started < 1.5


def test_link_commands_are_packed_at_the_heads_zim_core_exports():
    """The router's commands carried out in C, as a Python packer would read them:
    a TCP-framed packet, the command in the action field, a fixed head, the payload."""
    from zim import _core

    reactor = Reactor(65536, lambda *args: None)
    ours, theirs = socket.socketpair()
    link = reactor.adopt_link(ours.detach())
    assert reactor.command_reply(link, 5, 7, 9, True, b"reply")
    assert reactor.command_push_user(link, 11, 12, 13, b"push")
    assert reactor.command_broadcast(link, 14, 15, 16, b"cast")
    assert not reactor.command_reply(link + 1, 5, 7, 9, True, b"stale")     # a stale link: nothing
    reactor.timer(reactor.stop).set(0)          # one pass: its flush writes the commands
    reactor.run()
    theirs.settimeout(5)
    data = bytearray()
    while len(data) < 3 * 8 + _core.REPLY_HEAD + _core.PUSH_USER_HEAD + _core.BROADCAST_HEAD + 13:
        data += theirs.recv(65536)
    packets = split_tcp(data)
    assert not data, f"a partial packet: {bytes(data[:40])!r}"
    heads = [(_core.CMD_REPLY, ">QHHB", _core.REPLY_HEAD, (5, 7, 9, 1), b"reply"),
             (_core.CMD_PUSH_USER, ">QQH", _core.PUSH_USER_HEAD, (11, 12, 13), b"push"),
             (_core.CMD_BROADCAST, ">IQH", _core.BROADCAST_HEAD, (14, 15, 16), b"cast")]
    assert len(packets) == len(heads)
    for (action, seq, body), (command, layout, head, fields, payload) in zip(packets, heads):
        assert (action, seq) == (command, 0) and struct.calcsize(layout) == head
        assert struct.unpack_from(layout, body) == fields and body[head:] == payload
    assert _core.LINK_HANDLE_MASK == (1 << _core.HANDLE_BITS) - 1 and _core.PEER_MARK == 1 << _core.PEER_BIT
    assert _core.REQUEST_HEAD == struct.calcsize(">QQ")         # conn, user
    theirs.close()
