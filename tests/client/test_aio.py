"""zim.client.aio against real servers: login, requests, pushes in seq order with no
hole (gap filling from history after 103 ``skipped`` and after a disconnect),
reconnects with the token across a server restart, the mailbox, errors."""
from __future__ import annotations

import asyncio

import pytest

from tests.support.client import unique
from tests.support.servers import HOST
from zim.client.aio import Client, Closed, Push, ZimError, connect

NO_CHANNEL_RATE = ("--channel-rate", "0")


def url(srv, transport: str) -> str:
    return f"tcp://{HOST}:{srv.tcp_port}" if transport == "tcp" else f"ws://{HOST}:{srv.ws_port}/"


async def collect(client: Client, count: int, timeout: float = 10.0) -> list[Push]:
    """The next ``count`` pushes, then none more for a while (each exactly once)."""
    got = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < count:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            got.append(await client.next_push(max(0.01, remaining)))
        except asyncio.TimeoutError:
            raise AssertionError(f"{len(got)} of {count} pushes: {[p.message.get('content') for p in got]}")
    with pytest.raises(asyncio.TimeoutError):
        extra = await client.next_push(1.5)
        raise AssertionError(f"one push too many: {extra}")
    return got


async def mailbox_ids(srv, transport: str, name: str, token: str) -> list[str]:
    """What is left in the user's mailbox, seen from a second connection of the user
    (without acking: ``auto_ack=False``)."""
    async with await connect(url(srv, transport), name, token, auto_ack=False, reconnect=False) as other:
        return [message["id"] for message in (await other.pull())["messages"]]


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_login_send_receive_and_ack(start_server, transport):
    srv = start_server(flags=NO_CHANNEL_RATE)

    async def scenario():
        async with await connect(url(srv, transport), unique("alice")) as alice, \
                await connect(url(srv, transport), unique("bob")) as bob:
            assert alice.user_id and alice.token and alice.user_id != bob.user_id
            room = unique("room")
            await bob.join(room)
            await alice.join(room)
            sent = [await alice.send_channel(room, f"c{i}") for i in range(3)]
            dm = await alice.send_user(bob.user_id, "hello bob")
            got = await collect(bob, 4)
            channel = [p for p in got if p.action == 102]
            assert [(p.seq, p.content, p.message["id"]) for p in channel] == \
                [(r["seq"], f"c{i}", r["id"]) for i, r in enumerate(sent)]
            assert all(p.conversation == ("channel", room) and not p.filled for p in channel)
            [direct] = [p for p in got if p.action == 101]
            assert (direct.content, direct.seq) == ("hello bob", dm["seq"])
            assert direct.conversation == ("user", alice.user_id)
            assert direct.message["sender"]["id"] == alice.user_id
            assert bob.last_seqs == {("channel", room): 3, ("user", alice.user_id): 1}
            # alice's own sends are not pushed back to her
            with pytest.raises(asyncio.TimeoutError):
                await alice.next_push(0.5)
            # the delivered direct message was acknowledged: the mailbox is empty
            deadline = asyncio.get_running_loop().time() + 5
            while await mailbox_ids(srv, transport, bob.name, bob.token):
                assert asyncio.get_running_loop().time() < deadline, "the DM was never acknowledged"
                await asyncio.sleep(0.1)
            page = await bob.history(channel=room, limit=2)
            assert [m["content"] for m in page["messages"]] == ["c1", "c2"] and page["hasMore"]
            await bob.leave(room)
            assert ("channel", room) not in bob.last_seqs

    asyncio.run(scenario())


def test_own_send_right_after_the_last_seq_seen_is_the_last_seq(start_server):
    """A send whose seq follows the last one delivered is the conversation's newest:
    saved ``last_seqs`` then resume after it, and it is not delivered back later."""
    srv = start_server(flags=NO_CHANNEL_RATE)

    async def scenario():
        async with await connect(url(srv, "tcp"), unique("alice")) as alice, \
                await connect(url(srv, "tcp"), unique("bob")) as bob:
            room = unique("room")
            await alice.join(room)
            await bob.join(room)
            await bob.send_channel(room, "from bob")
            assert [p.seq for p in await collect(alice, 1)] == [1]
            mine = await alice.send_channel(room, "from alice")
            assert mine["seq"] == 2 and alice.last_seqs == {("channel", room): 2}
            saved = alice.last_seqs
        async with await connect(url(srv, "tcp"), alice.name, alice.token, last_seqs=saved) as again:
            with pytest.raises(asyncio.TimeoutError):
                extra = await again.next_push(1.5)
                raise AssertionError(f"delivered again: {extra}")

    asyncio.run(scenario())


def test_gap_filling_when_merged_pushes_skip(start_server):
    """Bursts to a channel merged in 103s of at most 2 messages: the receiver gets every
    message once, in seq order; its own sends (never pushed back) leave no hole."""
    srv = start_server(flags=("--push-window-ms", "50", "--push-max", "2", *NO_CHANNEL_RATE))

    async def scenario():
        address = url(srv, "tcp")
        async with await connect(address, unique("alice")) as alice, \
                await connect(url(srv, "ws"), unique("bob")) as bob:
            room = unique("burst")
            await alice.join(room)
            await bob.join(room)
            results = []
            for burst in range(3):
                results += await asyncio.gather(*[alice.send_channel(room, f"a{burst}.{i}") for i in range(12)])
                results.append(await bob.send_channel(room, f"b{burst}"))       # bob's own: not delivered
                await asyncio.sleep(0.2)
            got = await collect(bob, 36)
            expected = sorted((r["seq"], r["id"]) for r in results)
            own = {r["id"] for r in results[12::13]}
            assert [(p.seq, p.message["id"]) for p in got] == [e for e in expected if e[1] not in own]
            assert all(p.message["sender"]["id"] == alice.user_id for p in got)
            # the server did skip messages (103 with skipped > 0): those came from history
            filled = [p for p in got if p.filled]
            assert 20 <= len(filled) < 36, len(filled)
            assert bob.last_seqs[("channel", room)] == 39

    asyncio.run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_fill_from_history_after_a_disconnect(start_server, transport):
    srv = start_server(flags=NO_CHANNEL_RATE)

    async def scenario():
        async with await connect(url(srv, transport), unique("alice")) as alice, \
                await connect(url(srv, transport), unique("bob"), backoff=(1.5, 1.5)) as bob:
            room = unique("room")
            await bob.join(room)
            await alice.join(room)
            await alice.send_channel(room, "before")
            [first] = await collect(bob, 1)
            assert first.seq == 1
            bob.drop_connection()           # as a network failure: no close, no goodbye
            for i in range(5):
                await alice.send_channel(room, f"while away {i}")
            dm = await alice.send_user(bob.user_id, "dm while away")
            got = await collect(bob, 6)
            assert bob.reconnects == 1
            channel = [p for p in got if p.action == 102]
            assert [(p.seq, p.content) for p in channel] == [(i + 2, f"while away {i}") for i in range(5)]
            assert all(p.filled for p in channel)       # read from history after the login
            [direct] = [p for p in got if p.action == 101]
            assert direct.message["id"] == dm["id"]
            await alice.send_channel(room, "after")
            [after] = await collect(bob, 1)
            assert (after.seq, after.content, after.filled) == (7, "after", False)

    asyncio.run(scenario())


def test_reconnect_after_the_server_restarts(start_server, tmp_path):
    data = tmp_path / "data"
    first = start_server(flags=NO_CHANNEL_RATE, data_dir=data)
    tcp_port, ws_port = first.tcp_port, first.ws_port

    async def scenario():
        alice = await connect(url(first, "tcp"), unique("alice"))
        bob = await connect(url(first, "ws"), unique("bob"), backoff=(0.1, 0.5))
        async with alice, bob:
            bob_id, bob_token = bob.user_id, bob.token
            room = unique("room")
            await bob.join(room)
            await alice.join(room)
            await alice.send_channel(room, "one")
            assert [p.content for p in await collect(bob, 1)] == ["one"]
            await alice.close()
            await asyncio.to_thread(first.stop)
            await asyncio.sleep(1.0)            # bob keeps trying meanwhile
            second = start_server(flags=(*NO_CHANNEL_RATE, "--tcp", f"{HOST}:{tcp_port}",
                                         "--ws", f"{HOST}:{ws_port}"), data_dir=data, wait=False)
            second.tcp_port, second.ws_port = tcp_port, ws_port
            await asyncio.to_thread(second.wait_ready)
            async with await connect(url(second, "tcp"), unique("carol")) as carol:
                await carol.join(room)
                for i in range(3):
                    await carol.send_channel(room, f"after restart {i}")
                got = await collect(bob, 3)
            assert [(p.seq, p.content) for p in got] == [(i + 2, f"after restart {i}") for i in range(3)]
            assert bob.reconnects >= 1 and bob.user_id == bob_id and bob.token != bob_token
            assert (await bob.history(channel=room))["messages"][0]["content"] == "one"   # still a member

    asyncio.run(scenario())


def test_mailbox_is_delivered_and_acked_after_login(start_server):
    srv = start_server()

    async def scenario():
        async with await connect(url(srv, "tcp"), unique("alice")) as alice:
            bob = await connect(url(srv, "tcp"), unique("bob"))
            bob_name, bob_token = bob.name, bob.token
            await bob.close()
            sent = [await alice.send_user(bob.user_id, f"d{i}") for i in range(3)]
            async with await connect(url(srv, "ws"), bob_name, bob_token) as bob:
                got = await collect(bob, 3)
                assert [(p.seq, p.content) for p in got] == [(r["seq"], f"d{i}") for i, r in enumerate(sent)]
                deadline = asyncio.get_running_loop().time() + 5
                while await mailbox_ids(srv, "tcp", bob_name, bob.token):
                    assert asyncio.get_running_loop().time() < deadline, "the mailbox was never acknowledged"
                    await asyncio.sleep(0.1)

    asyncio.run(scenario())


def test_error_answers_raise_zim_error(start_server):
    srv = start_server()

    async def scenario():
        async with await connect(url(srv, "tcp"), unique("alice")) as alice:
            with pytest.raises(ZimError) as caught:
                await alice.send_channel(unique("nowhere"), "hi")
            assert caught.value.code == "not_found" and caught.value.action == 4
            with pytest.raises(ZimError) as caught:
                await alice.join("")
            assert caught.value.code == "bad_request"
            with pytest.raises(ZimError) as caught:
                await alice.request(77, {})
            assert caught.value.code == "unknown_action"
            with pytest.raises(ZimError) as caught:
                await alice.history()
            assert caught.value.code == "bad_request"
            assert "time" in await alice.request(9)         # still usable after errors
        with pytest.raises(ZimError) as caught:
            await connect(url(srv, "ws"), "mallory", token="v2.1.0.1.forged")
        assert caught.value.code == "unauthorized"
        with pytest.raises(ValueError):
            await connect(f"http://{HOST}:{srv.tcp_port}/", "x")

    asyncio.run(scenario())


def test_client_as_context_manager_without_connect(start_server):
    srv = start_server()

    async def scenario():
        async with Client(url(srv, "ws"), unique("dora")) as dora:
            assert dora.user_id and (await dora.request(9))["time"] > 0
        with pytest.raises(Closed):
            await dora.next_push(0.2)       # closed: nothing more comes
        assert [p async for p in dora.pushes()] == []

    asyncio.run(scenario())


def test_compressed_tcp_with_gap_filling_and_a_reconnect(start_server, monkeypatch):
    """compress=True: asked again at every login; merged pushes that skip, history
    pages and the mailbox arrive compressed and are delivered whole, in seq order."""
    from zim.client import aio, codec

    seen = []                       # the seq of every TCP packet the clients read, as it came

    def watching(buffer, max_packet=codec.DEFAULT_MAX_PACKET, inflate=False):
        seen.extend(seq for _, seq, _ in codec.split_tcp(bytearray(buffer), max_packet))
        return codec.split_tcp(buffer, max_packet, inflate)

    monkeypatch.setattr(aio, "split_tcp", watching)
    srv = start_server(flags=("--push-window-ms", "50", "--push-max", "2", *NO_CHANNEL_RATE))
    with pytest.raises(ValueError, match="tcp://"):
        Client(url(srv, "ws"), compress=True)

    async def scenario():
        async with await connect(url(srv, "tcp"), unique("alice"), compress=True) as alice, \
                await connect(url(srv, "tcp"), unique("bob"), compress=True, backoff=(0.5, 0.5)) as bob:
            assert alice.compressed and bob.compressed
            room = unique("burst")
            await alice.join(room)
            await bob.join(room)
            text = " and the minutes of the meeting" * 10
            sent = []
            for burst in range(2):
                sent += await asyncio.gather(*[alice.send_channel(room, f"{burst}.{i}{text}") for i in range(9)])
                await asyncio.sleep(0.2)
            bob.drop_connection()           # pushed meanwhile: filled from history after the login
            sent += await asyncio.gather(*[alice.send_channel(room, f"away {i}{text}") for i in range(5)])
            dm = await alice.send_user(bob.user_id, "a direct message" + text)
            got = await collect(bob, 24)
            assert bob.reconnects == 1 and bob.compressed
            channel = [p for p in got if p.action != 101]
            assert [(p.seq, p.message["id"]) for p in channel] == sorted((r["seq"], r["id"]) for r in sent)
            assert len([p for p in channel if p.filled]) >= 10      # skipped by 103s, or away
            [direct] = [p for p in got if p.action == 101]
            assert direct.message["id"] == dm["id"] and direct.content.endswith(text)

    asyncio.run(scenario())
    assert any(seq & codec.SEQ_DEFLATED for seq in seen)
