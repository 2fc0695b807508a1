"""Issue 14: nothing one user does hurts another, here through the store.

Large messages make large store answers (a mailbox or a history page) and large
link packets (a DM of several MB with a large ``--max-packet``). None of them may
break an internal link (the store writer's, a worker's): every request is
answered correctly, nobody else gets ``internal``, and the writer never restarts.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.support.servers import durable_store_on_a_test_link

from tests.support import client as test_client
from tests.support.client import ZimClient, error_code, unique
from zim.client import take_tcp_packet, tcp_header, tcp_packet

DM_SIZE = 65_000            # a DM filling a default 64 KiB packet (with its JSON around it)
DM_COUNT = 100
MiB = 1 << 20


def login(srv, name: str, token: str | None = None, timeout: float = 20.0) -> ZimClient:
    client = srv.tcp_client(timeout=timeout)
    client.login(name, token=token)
    return client


def send_many(client: ZimClient, action: int, bodies: list[dict], window: int = 16) -> list[dict]:
    """Pipeline requests (at most ``window`` in flight); every one must succeed."""
    results: list[dict] = []
    waiting: list[int] = []
    for body in bodies:
        waiting.append(client.send(action, body))
        if len(waiting) >= window:
            results.append(_ok(client, waiting.pop(0), action))
    while waiting:
        results.append(_ok(client, waiting.pop(0), action))
    return results


def _ok(client: ZimClient, seq: int, action: int) -> dict:
    got_action, _, result = client.wait_response(seq, timeout=60)
    assert got_action == action
    assert error_code(result) is None, result
    return result


class Bystanders(threading.Thread):
    """Another pair of users talking all along: every one of their requests must
    succeed (sends, history reads, mailbox pulls and acks)."""

    def __init__(self, srv) -> None:
        super().__init__(daemon=True)
        self.a = login(srv, unique("by-a"))
        self.b = login(srv, unique("by-b"))
        self.done = threading.Event()
        self.errors: list[str] = []
        self.requests = 0

    def run(self) -> None:
        deadline = time.monotonic() + 180       # bounded whatever happens
        a, b = self.a, self.b
        step = 0
        while not self.done.is_set() and time.monotonic() < deadline and step < 20_000:
            step += 1
            me, other = (a, b) if step % 2 else (b, a)
            try:
                self._check(me.call(2, {"receiverId": other.user_id, "content": f"hello {step}"},
                                    timeout=30))
                if step % 5 == 0:
                    self._check(me.call(5, {"userId": other.user_id, "limit": 5}, timeout=30))
                if step % 7 == 0:
                    page = me.call(7, {"limit": 20}, timeout=30)
                    self._check(page)
                    ids = [m["id"] for m in page.get("messages", [])]
                    if ids:
                        self._check(me.call(8, {"ids": ids}, timeout=30))
                    me.pushes.clear()
            except Exception as exc:  # noqa: BLE001 -- a timeout or a closed link is a failure too
                self.errors.append(f"step {step}: {exc!r}")
                return
            time.sleep(0.002)

    def _check(self, result: dict) -> None:
        self.requests += 1
        if error_code(result) is not None:
            self.errors.append(repr(result)[:300])

    def finish(self) -> None:
        self.done.set()
        self.join(60)
        assert not self.is_alive(), "the bystanders' requests hung"
        assert not self.errors, self.errors[:5]
        assert self.requests > 10, "the bystanders did not get going"


def read_pushes(client: ZimClient) -> list[dict]:
    """The pushes received so far, up to a heartbeat round trip."""
    client.sync()
    pushed = [body for action, body in client.pushes if action == 101]
    client.pushes.clear()
    return pushed


def drain_mailbox(client: ZimClient, limit: int = 100) -> list[dict]:
    """Pull and ack until the mailbox is empty; each page holds the oldest messages."""
    got: list[dict] = []
    more = True
    for _ in range(2 * DM_COUNT + 2):
        page = client.ok(7, {"limit": limit}, timeout=60)
        messages = page["messages"]
        assert type(page.get("hasMore")) is bool, page
        if not messages:
            assert page["hasMore"] is False
            return got
        assert more, "the last page said there was no more"
        more = page["hasMore"]
        got += messages
        client.ok(8, {"ids": [m["id"] for m in messages]}, timeout=60)
    raise AssertionError("the mailbox never emptied")


def read_history(client: ZimClient, other_id: str, count: int) -> list[dict]:
    """Every message of a conversation, newest page first, paging on with hasMore."""
    collected: list[dict] = []
    before = None
    for _ in range(count + 2):
        query = {"userId": other_id, "limit": 100}
        if before is not None:
            query["beforeSeq"] = before
        page = client.ok(5, query, timeout=60)
        messages = page["messages"]
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(seqs)
        if before is not None:
            assert not seqs or seqs[-1] == before - 1, (seqs[-3:], before)
        collected = messages + collected
        if not page["hasMore"]:
            return collected
        assert messages, "hasMore with an empty page"
        before = seqs[0]
    raise AssertionError("history paging never ended")


def assert_writer_never_restarted(srv) -> None:
    text = srv.stderr()
    assert "writer process ended" not in text, text[-3000:]
    assert "broken link framing" not in text, text[-3000:]
    assert "closed a link" not in text, text[-3000:]


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_hundred_dms_of_64kb_then_login_pull_and_history(start_server, workers):
    """100 DMs of 64 KB (6.5 MB of mailbox): the receiver logs in (its mailbox is
    pushed in packets under 1 MiB: the oldest ones, a page cut short), pulls and
    acks everything, and reads its history page by page, while another pair keeps
    talking: nobody gets ``internal`` and the writer is never restarted."""
    srv = start_server(flags=("--workers", workers, "--channel-rate", "0"))
    receiver = login(srv, unique("rcv"))
    receiver_id, token, name = receiver.user_id, receiver.token, receiver.name
    receiver.close()
    bystanders = Bystanders(srv)
    bystanders.start()
    sender = login(srv, unique("snd"))
    contents = [f"{i:03d}" + "m" * (DM_SIZE - 3) for i in range(DM_COUNT)]
    sent = send_many(sender, 2, [{"receiverId": receiver_id, "content": c} for c in contents])
    assert [r["seq"] for r in sent] == list(range(1, DM_COUNT + 1))

    # login: answered, then the oldest messages pushed, each packet < 1 MiB (the
    # client asserts it), about 1 MB of them in all
    receiver = login(srv, name, token=token)
    pushed = read_pushes(receiver)
    assert 1 <= len(pushed) < DM_COUNT
    assert [m["content"] for m in pushed] == contents[:len(pushed)]
    assert sum(len(m["content"]) for m in pushed) <= 1_000_000

    # a pull page is cut short too, and says there is more
    first = receiver.ok(7, {"limit": 100}, timeout=60)
    assert 1 <= len(first["messages"]) < DM_COUNT and first["hasMore"] is True
    got = drain_mailbox(receiver)
    assert [m["content"] for m in got] == contents
    assert [m["seq"] for m in got] == list(range(1, DM_COUNT + 1))

    history = read_history(receiver, sender.user_id, DM_COUNT)
    assert [m["seq"] for m in history] == list(range(1, DM_COUNT + 1))
    assert [m["content"] for m in history] == contents

    # the same history, read by the sender too, and a login once everything is acked
    assert [m["seq"] for m in read_history(sender, receiver_id, DM_COUNT)] == list(range(1, DM_COUNT + 1))
    receiver.close()
    again = login(srv, name, token=token)
    assert read_pushes(again) == []

    bystanders.finish()
    srv.assert_alive()
    assert_writer_never_restarted(srv)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_one_dm_of_6mb_with_max_packet_8mib(start_server, monkeypatch, workers):
    """With --max-packet 8MiB a DM of ~6 MB crosses every link (worker -> router,
    router -> writer, the writer's answers, router -> worker): stored, pushed,
    pulled and read from history whole, while another pair keeps talking."""
    monkeypatch.setattr(test_client, "SERVER_PACKET_LIMIT", 16 * MiB)    # one message > 1 MiB
    srv = start_server(flags=("--workers", workers, "--channel-rate", "0", "--max-packet", str(8 * MiB),
                              "--max-outbuf", str(64 * MiB)))
    bystanders = Bystanders(srv)
    bystanders.start()
    receiver = login(srv, unique("rcv"))
    receiver_id, token, name = receiver.user_id, receiver.token, receiver.name
    receiver.close()
    sender = login(srv, unique("snd"), timeout=60)
    big = "B" * (6 * 1000 * 1000)
    small = "after the big one"
    sent = send_many(sender, 2, [{"receiverId": receiver_id, "content": big},
                                 {"receiverId": receiver_id, "content": small}])
    assert [r["seq"] for r in sent] == [1, 2]

    receiver = login(srv, name, token=token, timeout=60)
    pushed = read_pushes(receiver)
    assert [m["content"] for m in pushed] == [big]      # the page holds one message at least
    got = drain_mailbox(receiver)
    assert [m["content"] for m in got] == [big, small]
    history = read_history(receiver, sender.user_id, 2)
    assert [(m["seq"], m["content"]) for m in history] == [(1, big), (2, small)]

    # the receiver online: the 6 MB push goes straight through
    third = send_many(sender, 2, [{"receiverId": receiver_id, "content": big}])
    assert third[0]["seq"] == 3
    action, push = receiver.recv_push(timeout=60)
    assert action == 101 and push["content"] == big and push["seq"] == 3

    bystanders.finish()
    srv.assert_alive()
    assert_writer_never_restarted(srv)


# ------------------------------------------------------------ links, unit level


def _run_reactor(reactor, timeout: float = 5.0) -> None:
    """reactor.run() until something calls stop(), at most ``timeout`` seconds."""
    timer = threading.Timer(timeout, reactor.stop)
    timer.start()
    try:
        reactor.run()
    finally:
        timer.cancel()


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the other end writes until it closes (EOF), within timeout."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except (socket.timeout, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def test_a_link_carries_packets_far_over_the_old_4mib_cap():
    """Link packets of 6 MiB (the old cap was 4 MiB) are delivered whole, both ways."""
    from zim._core import Reactor

    got: list[tuple[int, int, bytes]] = []
    echoed: list[bytes] = []
    closed: list[int] = []
    done = threading.Semaphore(0)

    def on_packet(conn: int, action: int, seq: int, body: bytes) -> None:
        got.append((action, seq, body))
        done.release()

    reactor = Reactor(65536, on_packet, on_link_closed=closed.append)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = reactor.adopt_link(ours.detach())
    body = os.urandom(6 * MiB)
    assert reactor.reply(link, 9, 4, body)      # queued now, written by the loop

    def peer() -> None:
        theirs.sendall(tcp_packet(7, 3, body))
        echoed.append(_read_exactly(theirs, 8 + len(body)))

    def stop_when_done() -> None:
        done.acquire(timeout=10)
        thread.join(10)
        reactor.stop()

    thread = threading.Thread(target=peer)
    thread.start()
    stopper = threading.Thread(target=stop_when_done)
    stopper.start()
    _run_reactor(reactor, timeout=15)
    stopper.join(15)
    assert not closed, "the link was closed"
    assert [(a, s, len(b)) for a, s, b in got] == [(7, 3, len(body))] and got[0][2] == body
    assert echoed == [tcp_packet(9, 4, body)]
    assert reactor.link_max_packet >= 64 * MiB
    reactor.close_all()
    theirs.close()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("frame", [
    tcp_header(0x7FFF0000, 1, 2) + b"x" * 64,       # over any link cap: too large
    tcp_header(4, 1, 2),                            # a length below the header: broken
], ids=["too-large", "broken"])
def test_a_bad_frame_on_a_link_closes_it_without_writing_into_it(frame):
    """A link never gets a client's ``too_large`` answer (or anything else) for a
    frame it cannot carry: it is closed at once, and its closing reported."""
    from zim._core import Reactor

    got: list[tuple[int, int, bytes]] = []
    closed: list[int] = []
    def on_closed(handle: int) -> None:
        closed.append(handle)
        reactor.stop()

    reactor = Reactor(65536, lambda conn, action, seq, body: got.append((action, seq, body)),
                      on_link_closed=on_closed)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = reactor.adopt_link(ours.detach())
    good = tcp_packet(1, 1, b"hello")
    theirs.sendall(good + frame)
    started = time.monotonic()
    _run_reactor(reactor, timeout=3.0)
    assert closed == [link], "the link was not closed (promptly)"
    assert time.monotonic() - started < 2.5
    assert got == [(1, 1, b"hello")]            # what came before the bad frame was delivered
    assert _read_all(theirs, timeout=2.0) == b"", "something was written into the link"
    reactor.close_all()
    theirs.close()


# ------------------------------------------------------------ store pages, unit level


def _message(text: str, message_id: int) -> dict:
    return {"id": str(message_id), "seq": 0, "content": text,
            "sender": {"id": "1", "name": "a"}, "createdAt": 1764300000000 + message_id}


def _encoded(messages: list[dict]) -> int:
    import orjson

    return sum(len(orjson.dumps(m)) + 1 for m in messages)


def test_sqlite_pages_stop_by_bytes_at_the_source(tmp_path):
    """History and mailbox pages stop once past PAGE_BYTES (with two messages at
    least): the writer never answers a monster, and zim.im can tell a page was cut."""
    from zim import im
    from zim.storage.sqlite import PAGE_BYTES, PAGE_OVERHEAD, SQLiteStore
    from zim.storage.store import USER

    assert PAGE_BYTES == im.RESPONSE_BUDGET and PAGE_OVERHEAD == im._PAGE_OVERHEAD
    store = SQLiteStore(str(tmp_path / "zim.db"))
    try:
        store.create_user(1, "a")
        store.create_user(2, "b")
        size = 65_000
        for i in range(DM_COUNT):
            store.append_user_message(1, 2, _message(f"{i:03d}" + "x" * size, 10**15 + i))
        biggest = size + 400

        page, more = store.history(USER, (1, 2), None, 100)
        seqs = [m["seq"] for m in page]
        assert more is True and 2 <= len(seqs) < DM_COUNT
        assert seqs == list(range(DM_COUNT - len(seqs) + 1, DM_COUNT + 1)), "the newest, oldest first"
        assert PAGE_BYTES < _encoded(page) <= PAGE_BYTES + biggest
        kept, cut = im.newest_that_fit(page)
        assert cut and kept == page[1:] and _encoded(kept) <= PAGE_BYTES

        page, more = store.history(USER, (1, 2), 3, 100)      # a short page is not cut
        assert [m["seq"] for m in page] == [1, 2] and more is False

        pulled = store.mailbox_pull(2, 100)
        assert 2 <= len(pulled) < DM_COUNT
        assert [m["seq"] for m in pulled] == list(range(1, len(pulled) + 1)), "the oldest"
        assert PAGE_BYTES < _encoded(pulled) <= PAGE_BYTES + biggest
        assert len(im.oldest_that_fit(pulled)) == len(pulled) - 1

        # one message over the budget on its own: the page still takes a second,
        # so whoever trims it to the first knows there is more
        store.append_user_message(1, 2, _message("H" * (2 * PAGE_BYTES), 2 * 10**15))
        store.mailbox_ack(2, [str(10**15 + i) for i in range(DM_COUNT)])
        store.append_user_message(1, 2, _message("after", 2 * 10**15 + 1))
        assert [m["content"][:5] for m in store.mailbox_pull(2, 100)] == ["HHHHH", "after"]
        assert im.oldest_that_fit(store.mailbox_pull(2, 100))[0]["content"][0] == "H"
        store.mailbox_ack(2, [str(2 * 10**15 + 1)])
        assert len(store.mailbox_pull(2, 100)) == 1      # alone: nothing more
    finally:
        store.close()


def test_writer_refuses_an_answer_over_the_link_limit_alone(tmp_path):
    """An answer too big for the link is REFUSED: that operation alone fails, the
    batch is committed and later operations go on (no FAILED, no RESYNC needed)."""
    import orjson

    from zim.storage.retention import Retention
    from zim.storage.sqlite import SQLiteStore
    from zim.storage.writer import (OK, OP_CREATE_USER, OP_HISTORY, OP_MAILBOX, OP_USER_MESSAGE,
                                    REFUSED, Writer)

    store = SQLiteStore(str(tmp_path / "zim.db"))
    try:
        writer = Writer(store, Retention(), link_max_packet=100_000)
        ops = [(OP_CREATE_USER, orjson.dumps([1, "a"])), (OP_CREATE_USER, orjson.dumps([2, "b"]))]
        ops += [(OP_USER_MESSAGE, orjson.dumps([1, 2, _message("y" * 30_000, 10**15 + i)])) for i in range(5)]
        ops += [(OP_HISTORY, orjson.dumps(["user", [1, 2], None, 100])),
                (OP_USER_MESSAGE, orjson.dumps([1, 2, _message("later", 10**15 + 9)])),
                (OP_MAILBOX, orjson.dumps([2, 1]))]
        answers = writer.apply(ops)
        statuses = [take_tcp_packet(bytearray(answer))[1] for answer in answers]     # the seq field
        assert statuses == [OK] * 7 + [REFUSED, OK, OK]
        assert all(len(answer) <= 100_000 for answer in answers)
        assert not writer.failed
        assert [m["seq"] for m in store.history("user", (1, 2), None, 100)[0]] == [1, 2, 3, 4, 5, 6]
    finally:
        store.close()


def test_a_refused_call_fails_alone_in_the_server(tmp_path):
    """REFUSED undoes that call's memory change only; the calls after it stand, and
    the writer is not asked to resync (it never stopped)."""
    from zim.storage.writer import OK, REFUSED

    with durable_store_on_a_test_link(tmp_path) as store:
        store.meta.create_user(1, "alice")
        calls = [store.subscribe("one", 1, True), store.subscribe("two", 1, True),
                 store.set_user_name(1, "alice2")]
        outcomes: list[bool] = []
        for call in calls:
            call.wait(lambda first, second, ok, value: outcomes.append(ok), None, None)
        store.on_link_packet(3, REFUSED, b'"refused: KeyError()"')
        store.on_link_packet(3, OK, b"null")
        store.on_link_packet(2, OK, b"null")
        assert outcomes == [False, True, True]
        assert not store.channel_exists("one")
        assert store.membership("two", 1) is True and store.user_name(1) == "alice2"
        assert store.undone_upto == 0       # no RESYNC: later calls were not undone
