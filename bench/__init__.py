"""Benchmarks of chat-gateway against a peer broker (RabbitMQ Web-STOMP), run by ``make bench``.

Not part of the test suite (pytest's testpaths is ``tests``) and not installed with the package.
Every load loop here is bounded in message count and in time, and only ever targets 127.0.0.1.
Modules:

- :mod:`bench.wire`      minimal STOMP framing and a small WebSocket STOMP client for load generation;
- :mod:`bench.stats`     percentiles and medians;
- :mod:`bench.procs`     gateway / redis / RabbitMQ processes and their CPU time;
- :mod:`bench.scenarios` the load scenarios (fan-out, many publishers, connection rate, chat path);
- :mod:`bench.run`       the command line: runs every scenario against both systems and writes JSON;
- :mod:`bench.chat_curve` (``--curve``) the chat path at stepped open-loop rates against RabbitMQ: knees,
                          curves past the knee, rows check, storage ceiling, window-64 session, profile;
- :mod:`bench.fastwire`  the cheap WebSocket STOMP client the curve uses (framing in ``data_received``);
- :mod:`bench.storage_ceiling` ``ChatRepository.save_batch`` driven directly (a subprocess of the curve).

The bench package may import the gateway's CLI only as a subprocess, and ``tests.support.redis_server``
for a private redis-server; it never imports gateway internals into the load generator. The one
exception is :mod:`bench.storage_ceiling`, its own process, which calls the stable
``ChatRepository.save_batch`` directly.
"""
