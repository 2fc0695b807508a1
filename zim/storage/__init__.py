"""Where zim keeps users, channels, messages and mailboxes.

- ``store``: the ``Store`` interface the IM logic (zim.im) talks to and
  ``MemoryStore`` (nothing kept on exit); ``Pending`` (a result that comes once
  stored) is ``zim.pending``'s, re-exported here;
- ``durable``: ``DurableStore``, the default: users and memberships in memory,
  every change and message sent to a writer process;
- ``writer``: that process: group commit into SQLite, answers after the commit;
- ``sqlite``: ``SQLiteStore``, the SQL (schema, batches, pruning) the writer runs;
- ``archiver``: with ``--archive``, the messages the writer queued written
  behind to PostgreSQL, and history below SQLite read from it;
- ``retention``: the retention tiers (TTL and cap per kind of conversation).
"""
from zim.storage.retention import Retention, Tier
from zim.pending import Pending
from zim.storage.store import MemoryStore, Store

__all__ = ["MemoryStore", "Pending", "Retention", "Store", "Tier"]
