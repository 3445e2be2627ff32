"""Helpers shared by the test packages, the benchmarks (bench/) and the local cluster (deploy/).

- :mod:`~tests.support.polling`: ``eventually`` / ``eventually_sync``, the one way to wait for a condition;
- :mod:`~tests.support.ci`: ``skip_or_fail``, the one rule for a missing prerequisite (skip, fail under CI);
- :mod:`~tests.support.net`: ``free_port``, ``port_is_free``, ``http_request``;
- :mod:`~tests.support.gateway_process` and :mod:`~tests.support.redis_server`: the one launcher of
  ``chat-gateway serve`` and of ``redis-server`` processes; :mod:`~tests.support.redis_cluster` builds
  Redis Cluster and Sentinel groups from the latter;
- :mod:`~tests.support.live_server`: an in-process uvicorn server; :mod:`~tests.support.postgres`,
  :mod:`~tests.support.node`, :mod:`~tests.support.stomp_wire`: PostgreSQL databases, Node clients,
  STOMP by hand.
"""
