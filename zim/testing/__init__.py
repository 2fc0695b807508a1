"""zim.testing: throwaway services for tests and benchmarks, on free loopback ports.

- ``zim.testing.ports``: ``free_loopback_port`` (and ``LOOPBACK``);
- ``zim.testing.redis``: ``LocalRedis``, a redis-server keeping nothing unless
  asked (kill, restart, pause and resume it: the failures a node must survive),
  and ``LocalCluster``, a Redis Cluster of such masters.

Not used by the server itself: nothing here runs in ``zim-server``.
"""
