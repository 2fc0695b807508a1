"""The archive's tables in PostgreSQL, and their versioned migrations.

``migrate(dsn)`` brings a database to ``SCHEMA_VERSION``: the table
``zim_schema`` holds the version applied; each newer migration runs once, in a
transaction of its own, under an advisory lock (nodes starting together
migrate one after the other; the second finds nothing left to do). A database
whose version is newer than this code's is refused (``SchemaTooNew``): old code
must not write into tables it does not know. Migrations run blocking, at
startup, before the loop serves anyone.

Version 1:

- ``messages``: one row per message, partitioned by RANGE of its id (a
  Snowflake id grows with its creation time, zim.ids, so a range of ids is a
  range of time): one partition per calendar month (UTC), created on demand by
  the writer before a batch needs it (``partition_ddl``). The primary key is the
  id, so upserting a message again is a no-op. ``conversation`` is
  ``conversation_key(kind, key)``; reads go by the index (conversation, seq).
  ``body`` is the message's JSON as the store holds it (type ``json``: its text
  kept as written).
- ``users`` (id, name, token epoch), ``memberships`` (channel, user, push flag)
  and ``conversations`` (each conversation's highest seq): what the archive
  needs to be read back after a cache loses its data.

Version 2:

- ``channels`` (name, private flag) and ``grants`` (channel, user, may invite):
  a private channel stays private after a cache lost its data;
- ``settings`` (name, value): the service's shared values that must outlive
  Redis, such as the token secret (else every token stops verifying).

User ids are 64-bit unsigned (zim.storage.store.MAX_USER_ID), more than
``bigint`` holds: they are ``numeric(20)``. Message ids are 63-bit (``bigint``).
"""
from __future__ import annotations

import calendar
import contextlib
import datetime
from typing import Iterable, Iterator

from zim.ids import EPOCH_MS, TIME_SHIFT
from zim.pending import Pending
from zim.storage.store import CHANNEL, USER, HistoryKind, pair_key

# 64-bit key of pg_advisory_xact_lock: "zim sche" in ASCII
MIGRATION_LOCK = 0x7A696D2073636865 - (1 << 63)
MAX_MESSAGE_ID = (1 << 63) - 1

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: messages by month, users, memberships, seq counters
    (
        """CREATE TABLE messages (
               id bigint NOT NULL,
               conversation text NOT NULL,
               seq bigint NOT NULL,
               body json NOT NULL,
               PRIMARY KEY (id)
           ) PARTITION BY RANGE (id)""",
        "CREATE INDEX messages_by_conversation ON messages (conversation, seq)",
        """CREATE TABLE users (
               id numeric(20) PRIMARY KEY,
               name text NOT NULL,
               token_epoch bigint NOT NULL DEFAULT 0
           )""",
        """CREATE TABLE memberships (
               channel text NOT NULL,
               user_id numeric(20) NOT NULL,
               push boolean NOT NULL,
               PRIMARY KEY (channel, user_id)
           )""",
        "CREATE INDEX memberships_by_user ON memberships (user_id)",
        """CREATE TABLE conversations (
               conversation text PRIMARY KEY,
               seq bigint NOT NULL
           )""",
    ),
    # 2: what else a cache that lost its data is filled from: channels (and
    # whether private), grants, and the service's settings (the token secret)
    (
        """CREATE TABLE channels (
               name text PRIMARY KEY,
               private boolean NOT NULL
           )""",
        """CREATE TABLE grants (
               channel text NOT NULL,
               user_id numeric(20) NOT NULL,
               can_invite boolean NOT NULL,
               PRIMARY KEY (channel, user_id)
           )""",
        "CREATE INDEX grants_by_user ON grants (user_id)",
        """CREATE TABLE settings (
               name text PRIMARY KEY,
               value bytea NOT NULL
           )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer zim than this one."""


class ArchiveError(RuntimeError):
    """PostgreSQL refused a statement, or could not be reached (its message says which)."""


def conversation_key(kind: HistoryKind, key: str | tuple[int, int]) -> str:
    """The ``conversation`` column of a channel (``c:NAME``) or of a pair of users
    (``u:LOW:HIGH``, the same from either side)."""
    if kind == CHANNEL:
        if not isinstance(key, str):
            raise ValueError(f"a channel's key is its name, not {key!r}")
        return "c:" + key
    if kind == USER:
        low, high = pair_key(*key)  # type: ignore[misc]
        return f"u:{low}:{high}"
    raise ValueError(f"unknown history kind {kind!r}")


# -- monthly partitions ------------------------------------------------------------

def month_of(message_id: int) -> tuple[int, int]:
    """(year, month) in UTC of the millisecond a Snowflake id was made in."""
    if not 0 <= message_id <= MAX_MESSAGE_ID:
        raise ValueError(f"a message id is a 63-bit Snowflake, not {message_id}")
    moment = datetime.datetime.fromtimestamp(((message_id >> TIME_SHIFT) + EPOCH_MS) / 1000,
                                             datetime.timezone.utc)
    return moment.year, moment.month


def _first_id_of(year: int, month: int) -> int:
    """The smallest Snowflake id made in that month (0 before zim's epoch)."""
    start_ms = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
    return max(0, start_ms - EPOCH_MS) << TIME_SHIFT


def partition_name(year: int, month: int) -> str:
    return f"messages_{year:04d}_{month:02d}"


def partition_ddl(year: int, month: int) -> str:
    """The statement creating the month's partition if it does not exist yet."""
    return (f"CREATE TABLE IF NOT EXISTS {partition_name(year, month)} PARTITION OF messages "
            f"FOR VALUES FROM ({_first_id_of(year, month)}) TO ({_first_id_of(*_following(year, month))})")


def months_of(message_ids: Iterable[int]) -> set[tuple[int, int]]:
    """The months of many ids: a date is worked out only for an id outside the
    last month found (a batch's ids are mostly of one month)."""
    months: set[tuple[int, int]] = set()
    low = high = -1
    for message_id in message_ids:
        if not low <= message_id < high:
            month = month_of(message_id)
            months.add(month)
            low, high = _first_id_of(*month), _first_id_of(*_following(*month))
    return months


def _following(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


# -- migrations ----------------------------------------------------------------------

def migrate(dsn: str, target: int = SCHEMA_VERSION) -> int:
    """Bring the database at ``dsn`` to ``target`` (SCHEMA_VERSION unless a test
    wants an older one; blocking); returns the version it had before. ``SchemaTooNew`` if it is newer than this code,
    ``ArchiveError`` if PostgreSQL cannot be reached or refuses a statement (the
    failed migration is rolled back whole)."""
    from psycopg import pq
    conn = pq.PGconn.connect(dsn.encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise ArchiveError(f"cannot connect to the archive: {conn.get_error_message().strip()}")
        found = None
        while True:
            execute_blocking(conn, "BEGIN")
            try:
                execute_blocking(conn, f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                execute_blocking(conn, "CREATE TABLE IF NOT EXISTS zim_schema (version integer NOT NULL)")
                rows = execute_blocking(conn, "SELECT version FROM zim_schema")
                if not rows:
                    execute_blocking(conn, "INSERT INTO zim_schema (version) VALUES (0)")
                version = int(rows[0][0]) if rows else 0
                found = version if found is None else found
                if version > SCHEMA_VERSION:
                    raise SchemaTooNew(f"the archive's schema is version {version}, newer than this "
                                       f"zim's ({SCHEMA_VERSION}): upgrade zim before using this database")
                if version >= target:
                    execute_blocking(conn, "COMMIT")
                    return found
                for statement in MIGRATIONS[version]:
                    execute_blocking(conn, statement)
                execute_blocking(conn, f"UPDATE zim_schema SET version = {version + 1}")
                execute_blocking(conn, "COMMIT")
            except BaseException:
                conn.exec_(b"ROLLBACK")
                raise
    finally:
        conn.finish()


START_CONNECT_TIMEOUT = 2       # seconds a server's start waits for PostgreSQL before going on without it


def migrate_at_start(dsn: str) -> str | None:
    """``migrate`` as a server's start runs it: waiting at most
    START_CONNECT_TIMEOUT seconds for PostgreSQL. None once migrated; the reason
    (str) if PostgreSQL could not be reached or refused (the server then serves
    without it and migrates over its link later: ``migrate_on_link``).
    ``SchemaTooNew`` is raised: the server must not start."""
    from psycopg.conninfo import make_conninfo
    try:
        migrate(make_conninfo(dsn, connect_timeout=START_CONNECT_TIMEOUT))
    except ArchiveError as exc:
        return str(exc)
    return None


def schema_version(dsn: str) -> int:
    """The version applied to the database (0: none), blocking."""
    from psycopg import pq
    conn = pq.PGconn.connect(dsn.encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise ArchiveError(f"cannot connect to the archive: {conn.get_error_message().strip()}")
        if not execute_blocking(conn, "SELECT to_regclass('zim_schema')")[0][0]:
            return 0
        rows = execute_blocking(conn, "SELECT version FROM zim_schema")
        return int(rows[0][0]) if rows else 0
    finally:
        conn.finish()


def execute_blocking(conn, sql: str) -> list[tuple]:
    from psycopg import pq
    result = conn.exec_(sql.encode())
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise ArchiveError(f"{sql.split()[0]} failed: {result.get_error_message().strip()}")
    return [tuple(None if value is None else value.decode() for value in
                  (result.get_value(row, col) for col in range(result.nfields)))
            for row in range(result.ntuples)]


# -- the service's settings, read at start ------------------------------------------------

def shared_settings(dsn: str, offered: dict[str, bytes]) -> dict[str, bytes]:
    """The values of ``offered``'s settings as the archive holds them (blocking, at
    a node's start): each one absent is stored as offered (INSERT ... ON CONFLICT
    DO NOTHING), then all are read back, so nodes starting together agree on the
    first writer's values. ``ArchiveError`` if PostgreSQL cannot say."""
    with _connected(dsn) as conn:
        found = {}
        for name, value in offered.items():
            _execute_binary(conn, b"INSERT INTO settings (name, value) VALUES ($1::text, $2::bytea) "
                                  b"ON CONFLICT (name) DO NOTHING", [name.encode(), value])
            found[name] = bytes(_execute_binary(conn, b"SELECT value FROM settings WHERE name = $1::text",
                                                [name.encode()])[0][0])
        return found


def first_generation(dsn: str, name: str, offered: bytes) -> tuple[bytes | None, bool]:
    """The setting ``name`` (a cache's generation marker, blocking, at a node's
    start): ``(value, offered_stored)``. ``offered`` is stored only if the setting
    is absent and the archive knows no conversation and no channel yet (a cache
    could not have lost any of them), in one statement, so nodes starting together
    agree on the first one's; ``(None, False)`` if absent and not stored.
    ``ArchiveError`` if PostgreSQL cannot say."""
    with _connected(dsn) as conn:
        _execute_binary(conn, b"INSERT INTO settings (name, value) SELECT $1::text, $2::bytea "
                              b"WHERE NOT EXISTS (SELECT 1 FROM conversations) "
                              b"AND NOT EXISTS (SELECT 1 FROM channels) ON CONFLICT (name) DO NOTHING",
                        [name.encode(), offered])
        rows = _execute_binary(conn, b"SELECT value FROM settings WHERE name = $1::text", [name.encode()])
        value = bytes(rows[0][0]) if rows else None
        return value, value == offered


@contextlib.contextmanager
def _connected(dsn: str) -> Iterator:
    """A blocking libpq connection for the start, finished on leaving."""
    from psycopg import pq
    conn = pq.PGconn.connect(dsn.encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise ArchiveError(f"cannot connect to the archive: {conn.get_error_message().strip()}")
        yield conn
    finally:
        conn.finish()


def _execute_binary(conn, sql: bytes, params: list[bytes]) -> list[tuple]:
    """One statement with text and bytea parameters, all sent and read back as
    binary (a bytea's bytes as they are, a text's UTF-8)."""
    from psycopg import pq
    result = conn.exec_params(sql, params, param_formats=[1] * len(params), result_format=1)
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise ArchiveError(f"{sql.split()[0].decode()} failed: {result.get_error_message().strip()}")
    return [tuple(result.get_value(row, col) for col in range(result.nfields)) for row in range(result.ntuples)]


# -- the migrations from the loop (a server whose PostgreSQL was down at its start) -------------

_READ_VERSION = (
    (f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})", ()),
    ("CREATE TABLE IF NOT EXISTS zim_schema (version integer NOT NULL)", ()),
    ("INSERT INTO zim_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM zim_schema)", ()),
    ("SELECT version FROM zim_schema", ()),
)


def migrate_on_link(link, target: int = SCHEMA_VERSION) -> Pending:
    """``migrate``'s work over a ``zim.archive.link.PgLink``, without blocking the
    loop: one transaction reads the version, one more applies each migration
    (with its version, under the advisory lock). Settles with the version found
    before, or fails with the reason (a newer schema than this code's, PostgreSQL
    refusing or unreachable: call again later; a migration another process
    applied in between fails here and is found done the next time)."""
    result = Pending()
    link.transaction(_READ_VERSION).wait(_version_read, (link, result, target), None)
    return result


def _version_read(shared: tuple, found: int | None, ok: bool, value) -> None:
    link, result, target = shared
    if not ok:
        result.settle(False, value)
        return
    version = int(value[-1][0][0])
    found = version if found is None else found
    if version > SCHEMA_VERSION:
        result.settle(False, f"the archive's schema is version {version}, newer than this zim's "
                             f"({SCHEMA_VERSION}): upgrade zim before using this database")
    elif version >= target:
        result.settle(True, found)
    else:
        statements = [_READ_VERSION[0], *((sql, ()) for sql in MIGRATIONS[version]),
                      (f"UPDATE zim_schema SET version = {version + 1} WHERE version = {version}", ())]
        link.transaction(statements).wait(_migrated_one, shared, found)


def _migrated_one(shared: tuple, found: int, ok: bool, value) -> None:
    link, result, _ = shared
    if not ok:
        result.settle(False, value)
        return
    link.transaction(_READ_VERSION).wait(_version_read, shared, found)
