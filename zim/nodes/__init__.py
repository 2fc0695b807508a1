"""Several zim nodes as one IM service, sharing a Redis or a Redis Cluster
(``zim-server --redis URL``; docs/redis.md).

- ``node``: ``Node``, a server as one node: the shared token secret, its
  Snowflake worker id, its beat, its pub/sub channels.
- ``store``: ``RedisStore``, the Store over Redis: messages, history and
  mailboxes in Redis; users and memberships cached per node, kept current by a
  change feed, negative answers confirmed in Redis.
- ``fabric``: ``NodeFabric``, the routing interface across nodes: presence,
  private pushes to the nodes holding a user, channel pushes over sharded
  pub/sub to the nodes with members.
- ``client`` and ``link``: ``RedisClient``, the non-blocking Redis client the
  reactor serves (one server or a cluster: slot routing, MOVED/ASK/NOSCRIPT),
  over ``RedisLink`` and ``SubscriberLink``.
- ``schema``: the data layout (keys with hash tags, one slot per conversation)
  and its Lua scripts.
- ``local``: throwaway Redis servers and clusters on loopback ports, for tests,
  benches and trying several nodes on one machine.
"""
