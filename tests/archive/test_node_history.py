"""History on nodes with ``--archive`` (zim.nodes.tiers): private history stays whole
when Redis loses its copy (TTL expiry, the cap, FLUSHALL), paging across the
tiers is the same as paging in Redis, reading old pages loads them into
``cold`` so that the next read does not touch PostgreSQL, and a PostgreSQL that
is down fails the page rather than cut it short.

Real node processes (whose archiver writes PostgreSQL), a real redis-server
and a real PostgreSQL (one of each for the module); each test starts from an
empty Redis (no shard lease of an earlier test's nodes).
"""
from __future__ import annotations

import time

import pytest

from tests.support import archive_nodes, postgres_servers, wait_for
from tests.support.archive_nodes import caught_up, start_node
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server
from tests.support.client import unique

from zim.archive.schema import migrate
from zim.nodes import schema
from zim.nodes.archive_schema import archive_keys

pytestmark = [requires_postgres, requires_redis_server]
postgres_server = postgres_servers.postgres_server
redis_server, redis_db = archive_nodes.redis_server, archive_nodes.redis_db
READS = "zim_archive_reads_total"


@pytest.fixture(scope="module")
def dsn(postgres_server) -> str:
    found = postgres_server.create_database("node_history")
    migrate(found)
    return found


def pair(node):
    alice, bob = node.tcp_client(), node.tcp_client()
    alice.login(unique("alice"))
    bob.login(unique("bob"))
    return alice, bob


def send(alice, bob, count: int) -> None:
    for number in range(count):
        alice.ok(2, {"receiverId": bob.user_id, "content": f"m{number}"})


def expected_pages(everything: list[dict], limit: int) -> list[tuple[list[dict], bool]]:
    """The pages Store.history's meaning gives, walking down from the newest."""
    pages, before = [], None
    while True:
        older = [m for m in everything if before is None or m["seq"] < before]
        page = older[-limit:]
        pages.append((page, len(older) > limit))
        if len(older) <= limit:
            return pages
        before = page[0]["seq"]


def read_pages(client, limit: int, **where) -> list[tuple[list[dict], bool]]:
    pages, before = [], None
    while True:
        query = dict(where, limit=limit)
        if before is not None:
            query["beforeSeq"] = before
        answer = client.ok(5, query)
        pages.append((answer["messages"], answer["hasMore"]))
        if not answer["hasMore"] or not answer["messages"] or len(pages) > 100:
            return pages
        before = answer["messages"][0]["seq"]


def everything_in_redis(client, **where) -> list[dict]:
    found = client.ok(5, dict(where, limit=1000))
    assert not found["hasMore"]
    return found["messages"]


def check_whole(pages: list, count: int) -> None:
    seqs = [m["seq"] for page, _ in reversed(pages) for m in page]
    assert seqs == list(range(1, count + 1)), "seq gap-free from 1 across the tiers"


def test_private_history_stays_whole_after_the_ttl(start_server, redis_server, redis_db, dsn):
    node, scraper = start_node(start_server, redis_server, dsn, "--retain-private", "2s:0")
    alice, bob = pair(node)
    send(alice, bob, 30)
    before = everything_in_redis(alice, userId=bob.user_id)     # none expires before it is archived
    assert len(before) == 30
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id))
    log = schema.pair_keys(alice.user_id, bob.user_id).log
    assert wait_for(lambda: not redis_db.exists(log), 15), "the log expires"
    send(alice, bob, 3)     # the newest in Redis, the rest in PostgreSQL only
    everything = before + alice.ok(5, {"userId": bob.user_id, "limit": 3})["messages"]
    pages = read_pages(bob, 7, userId=alice.user_id)
    assert pages == expected_pages(everything, 7)
    check_whole(pages, 33)


def test_private_history_stays_whole_past_the_cap(start_server, redis_server, redis_db, dsn):
    node, scraper = start_node(start_server, redis_server, dsn, "--retain-private", "30d:5")
    alice, bob = pair(node)
    send(alice, bob, 19)
    before = everything_in_redis(alice, userId=bob.user_id)     # none is trimmed before it is archived
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id))
    send(alice, bob, 1)     # trims the log to its cap, now that the rest is archived
    everything = before + alice.ok(5, {"userId": bob.user_id, "limit": 1})["messages"]
    assert len(everything) == 20 and redis_db.xlen(schema.pair_keys(alice.user_id, bob.user_id).log) == 5
    for limit in (3, 5, 8):     # pages that end inside the log, at its edge, across it
        pages = read_pages(bob, limit, userId=alice.user_id)
        assert pages == expected_pages(everything, limit)
        check_whole(pages, 20)


def test_after_flushall_history_comes_back_and_old_pages_are_read_once(
        start_server, redis_server, redis_db, dsn, postgres_server):
    node, scraper = start_node(start_server, redis_server, dsn, "--archive-kinds", "private,channel")
    alice, bob = pair(node)
    send(alice, bob, 25)
    channel = unique("room")
    alice.ok(3, {"name": channel})
    for number in range(12):
        alice.ok(4, {"channel": channel, "content": f"c{number}"})
    dms, posts = everything_in_redis(alice, userId=bob.user_id), everything_in_redis(alice, channel=channel)
    before_flush = read_pages(bob, 6, userId=alice.user_id)
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id), schema.channel_keys(channel))
    redis_db.flushall()

    reads = scraper.value(READS)
    pages = read_pages(bob, 6, userId=alice.user_id)
    assert pages == before_flush == expected_pages(dms, 6)
    check_whole(pages, 25)
    assert read_pages(alice, 5, channel=channel) == expected_pages(posts, 5)
    after_first = scraper.value(READS)
    assert after_first > reads, "the pages came from PostgreSQL"
    # they are in Redis now, with a TTL: the same pages again do not touch PostgreSQL
    cold = archive_keys(schema.pair_keys(alice.user_id, bob.user_id)).cold
    assert redis_db.zcard(cold) == 25 and redis_db.pttl(cold) > 0
    assert read_pages(bob, 6, userId=alice.user_id) == before_flush
    assert read_pages(alice, 5, channel=channel) == expected_pages(posts, 5)
    assert scraper.value(READS) == after_first
    # a hole in cold: what is below it is not taken for whole, PostgreSQL fills it
    redis_db.zremrangebyscore(cold, 10, 10)
    assert read_pages(bob, 6, userId=alice.user_id) == before_flush
    assert scraper.value(READS) > after_first

    # PostgreSQL down: a page it would give fails, none is cut short
    redis_db.delete(cold)
    postgres_server.kill()
    try:
        assert wait_for(lambda: not postgres_server.accepts_connections(), 10), "PostgreSQL is down"
        assert bob.error(5, {"userId": alice.user_id, "limit": 6}, timeout=30) == "internal"
    finally:
        postgres_server.restart(down_for=0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:      # the link comes back on its own
        answer = bob.call(5, {"userId": alice.user_id, "limit": 6})
        if "error" not in answer:
            break
        time.sleep(0.3)
    assert (answer["messages"], answer["hasMore"]) == before_flush[0]
