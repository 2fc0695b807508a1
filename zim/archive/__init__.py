"""The archive tier: messages, users, memberships and seq counters kept for good in PostgreSQL.

``schema`` (versioned migrations, monthly partitions), ``link`` (libpq on the
reactor, pipeline mode), ``store`` (``Archive``: the calls). Not wired into the
servers yet: docs/storage.md, "The archive tier (PostgreSQL): foundation".
"""
