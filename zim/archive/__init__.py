"""The archive tier: messages, users, memberships and seq counters kept for good in PostgreSQL.

``config`` (the options), ``schema`` (versioned migrations, monthly partitions),
``link`` (libpq on the reactor, pipeline mode), ``store`` (``Archive``: the
calls), ``stats`` (its metrics). Run behind Redis by a node
(``zim.nodes.archiving``, ``zim.nodes.tiers``, ``zim.nodes.refill``) and behind
SQLite by a single server (``zim.storage.archiver``); docs/storage.md.
"""
