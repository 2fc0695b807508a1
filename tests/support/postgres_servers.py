"""A real PostgreSQL for tests (zim.testing.postgres.LocalPostgres).

A test module names the fixture at module level
(``postgres_server = postgres_servers.postgres_server``) and marks itself with
``requires_postgres``: without PostgreSQL installed it is skipped, saying why;
under ``CI=true`` that skip is a failure (tests/conftest.py), CI installs it.
One server per module: each test that needs a blank schema takes a database of
its own from it (``fresh_database``).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator

import pytest

from zim.testing.postgres import LocalPostgres, postgres_bin_dir

requires_postgres = pytest.mark.skipif(
    postgres_bin_dir() is None,
    reason="PostgreSQL is not installed (apt-get install postgresql; CI installs it)")

_databases = itertools.count(1)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[LocalPostgres]:
    """A PostgreSQL server on a free loopback port (initdb in a temporary
    directory), accepting connections; stopped and removed at the end of the module."""
    server = LocalPostgres().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fresh_database(postgres_server: LocalPostgres) -> Callable[[], str]:
    """``fresh_database()``: the DSN of a new, empty database on the module's server."""
    return lambda: postgres_server.create_database(f"t{next(_databases)}")
