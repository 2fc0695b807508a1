"""zim.archive.schema against a real PostgreSQL: migrations, refusals, monthly partitions."""
from __future__ import annotations

import calendar

import pytest
from hypothesis import given, strategies as st

from tests.support import postgres_servers
from tests.support.postgres_servers import requires_postgres
from zim.archive.config import check_dsn
from zim.archive.schema import (SCHEMA_VERSION, months_of, ArchiveError, SchemaTooNew, conversation_key, migrate, month_of,
                                partition_ddl, schema_version)
from zim.ids import EPOCH_MS, TIME_SHIFT
from zim.testing.ports import free_loopback_port

pytestmark = requires_postgres
postgres_server = postgres_servers.postgres_server
fresh_database = postgres_servers.fresh_database

TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"


def test_migrate_from_empty_then_again_is_a_no_op(postgres_server, fresh_database):
    dsn = fresh_database()
    assert schema_version(dsn) == 0
    assert migrate(dsn) == 0
    assert schema_version(dsn) == SCHEMA_VERSION
    database = dsn.rsplit("/", 1)[1]
    tables = postgres_server.execute(TABLES, database)
    assert {"messages", "users", "memberships", "conversations", "zim_schema"} <= {t for (t,) in tables}
    assert migrate(dsn) == SCHEMA_VERSION        # nothing left to do
    assert postgres_server.execute(TABLES, database) == tables
    assert postgres_server.execute("SELECT count(*) FROM zim_schema", database) == [("1",)]


def test_an_older_database_is_upgraded_keeping_its_rows(postgres_server, fresh_database):
    dsn = fresh_database()
    database = dsn.rsplit("/", 1)[1]
    assert migrate(dsn, target=1) == 0
    assert schema_version(dsn) == 1
    postgres_server.execute("INSERT INTO users (id, name) VALUES (7, 'ann')", database)
    assert migrate(dsn) == 1
    assert schema_version(dsn) == SCHEMA_VERSION
    assert postgres_server.execute("SELECT id, name FROM users", database) == [("7", "ann")]
    tables = {t for (t,) in postgres_server.execute(TABLES, database)}
    assert {"channels", "grants", "settings"} <= tables


def test_a_database_newer_than_the_code_is_refused(postgres_server, fresh_database):
    dsn = fresh_database()
    migrate(dsn)
    postgres_server.execute(f"UPDATE zim_schema SET version = {SCHEMA_VERSION + 1}", dsn.rsplit("/", 1)[1])
    with pytest.raises(SchemaTooNew, match="newer than this zim"):
        migrate(dsn)


def test_a_failed_migration_leaves_nothing_behind(postgres_server, fresh_database):
    dsn = fresh_database()
    database = dsn.rsplit("/", 1)[1]
    postgres_server.execute("CREATE TABLE users (x int)", database)     # in version 1's way
    with pytest.raises(ArchiveError, match="already exists"):
        migrate(dsn)
    assert schema_version(dsn) == 0
    assert [t for (t,) in postgres_server.execute(TABLES, database)] == ["users"]


def test_bad_and_unreachable_dsns_say_so(postgres_server):
    with pytest.raises(ValueError, match="bad PostgreSQL DSN"):
        check_dsn("not a dsn")
    with pytest.raises(ValueError, match="PostgreSQL DSN"):
        check_dsn("")
    with pytest.raises(ArchiveError, match="cannot connect"):
        migrate(f"postgresql://zim@127.0.0.1:{free_loopback_port()}/postgres?connect_timeout=2")
    with pytest.raises(ArchiveError, match="does not exist"):
        migrate(postgres_server.dsn("no_such_database"))


def _id_at(year: int, month: int, day: int, ms_of_day: int = 0) -> int:
    ms = calendar.timegm((year, month, day, 0, 0, 0)) * 1000 + ms_of_day
    return (ms - EPOCH_MS) << TIME_SHIFT


def test_month_bounds_follow_the_snowflake_clock(postgres_server, fresh_database):
    last_of_january = _id_at(2026, 1, 31, 86_400_000 - 1) | 0x3FFFFF     # the last id of the month
    assert month_of(last_of_january) == (2026, 1)
    assert month_of(last_of_january + 1) == (2026, 2)
    assert month_of(_id_at(2026, 12, 31, 86_399_999)) == (2026, 12)
    assert month_of(_id_at(2027, 1, 1)) == (2027, 1)
    with pytest.raises(ValueError):
        month_of(1 << 63)
    dsn = fresh_database()
    migrate(dsn)
    database = dsn.rsplit("/", 1)[1]
    for month in ((2026, 1), (2026, 2), (2026, 12), (2027, 1)):
        postgres_server.execute(partition_ddl(*month), database)
    postgres_server.execute(partition_ddl(2026, 1), database)      # again: no error
    # the bounds meet: the last id of January goes to January, the next to February
    postgres_server.execute(f"INSERT INTO messages VALUES ({last_of_january}, 'c:x', 1, '{{}}'), "
                            f"({last_of_january + 1}, 'c:x', 2, '{{}}')", database)
    placed = postgres_server.execute("SELECT tableoid::regclass::text FROM messages ORDER BY id", database)
    assert placed == [("messages_2026_01",), ("messages_2026_02",)]


def test_conversation_keys():
    assert conversation_key("channel", "room") == "c:room"
    assert conversation_key("user", (9, 3)) == conversation_key("user", (3, 9)) == "u:3:9"
    with pytest.raises(ValueError):
        conversation_key("channel", (1, 2))
    with pytest.raises(ValueError):
        conversation_key("group", "x")


@given(st.lists(st.integers(min_value=0, max_value=(1 << 63) - 1), max_size=50),
       st.lists(st.integers(min_value=-3, max_value=3), max_size=20))
def test_months_of_many_ids_is_the_month_of_each(ids, steps_around_a_bound):
    bound = _id_at(2026, 3, 1)      # ids on both sides of a month's first id, next to each other
    ids = ids + [bound + step for step in steps_around_a_bound]
    assert months_of(ids) == {month_of(message_id) for message_id in ids}
