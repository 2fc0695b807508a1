"""The multi-node layer (Redis), under construction (issue 7).

Several zim nodes will form one IM service by sharing a Redis (or a Redis
Cluster): presence, private-message routing, channel fan-out over pub/sub,
seq, history and mailboxes. What is here so far:

- ``zim.nodes.link``: ``RedisLink``, the connection to Redis that a reactor
  serves without blocking; calls return ``zim.storage.store.Pending``.
- ``zim.nodes.local``: ``LocalRedis``, a throwaway redis-server on a loopback
  port, for tests, benches and trying several nodes on one machine.
- ``zim.nodes.schema``: the data layout in Redis (keys with hash tags, one slot
  per conversation) and its atomic operations (Lua scripts): seq, history,
  mailboxes, memberships, presence; see docs/redis.md.
"""
