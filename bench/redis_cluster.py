"""``python -m bench.run --redis-cluster``: cross-node fan-out through one Redis vs a 3-shard Redis Cluster.

Owns: the bus-level benchmark of issue 13. One publisher node and two subscriber nodes, each a
separate process running the gateway's :class:`~gateway.broker.redis.RedisBroker` (the same listener
container and publishing path the gateway uses), exchange room publications (``envelope`` payloads of
``--payload`` bytes) over ``--rooms`` rooms; every subscriber node is subscribed to every room, so each
publication is delivered twice, once per subscriber node (cross-node fan-out). The publisher sends
``--messages`` publications closed-loop in pipelined batches of ``--batch`` (``publish_many``, one
pipeline per primary on a cluster).

Topologies, each on fresh processes:

- ``single``: one redis-server, classic Pub/Sub (today's deployment);
- ``cluster-sharded``: 3 primaries + 3 replicas, ``redis_sharded_pubsub`` on (SSUBSCRIBE/SPUBLISH);
- ``cluster-classic``: the same cluster with classic Pub/Sub (the mixed-fleet default), where every
  PUBLISH is broadcast over the cluster bus to every node.

Reported per topology: publications/s and deliveries/s (first publication sent to last delivery
received), CPU seconds of every Redis process (``/proc/<pid>/stat``, utime+stime) and its share of the
run, and the check that every publication crossed exactly one shard: per primary, ``INFO
commandstats`` ``cmdstat_spublish`` calls must equal the number of publications whose channel's slot
that primary owns (computed from ``CLUSTER KEYSLOT``), and ``CLUSTER INFO``
``cluster_stats_messages_publish_sent`` (classic broadcast over the cluster bus) must stay 0, while
``cluster_stats_messages_publishshard_sent`` shows the copy each shard sends only to its own replica.

Results go to ``bench/results/redis-cluster-<time>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.queues
import statistics
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds, machine_info
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOPOLOGIES = ("single", "cluster-sharded", "cluster-classic")
ROOM_PREFIX = "/sub/chat/room/"
SUBSCRIBER_NODES = 2
DRAIN_TIMEOUT_S = 120.0
IDLE_SAMPLE_S = 3.0


def _broker(url: str, node_id: str, sharded: bool, prefix: str) -> Any:
    from gateway.broker.channels import SpringChannelMapper
    from gateway.broker.redis import RedisBroker

    mapper = SpringChannelMapper(prefix=prefix, node_id=node_id, payload="envelope", sharded=sharded)
    return RedisBroker(url, node_id=node_id, channel_mapper=mapper, timeout_s=10.0, pool_size=4)


def _subscriber(url: str, node_id: str, sharded: bool, prefix: str, rooms: list[str], expected: int,
                ready: multiprocessing.queues.Queue[Any], results: multiprocessing.queues.Queue[Any]) -> None:
    """A subscriber node (own process): subscribe every room, count deliveries until ``expected``."""
    async def run() -> None:
        from gateway.broker.base import Publication

        count = 0
        first = last = 0.0
        done = asyncio.Event()

        def on_publication(publication: Publication) -> None:
            nonlocal count, first, last
            count += 1
            last = time.time()
            if count == 1:
                first = last
            if count >= expected:
                done.set()

        broker = _broker(url, node_id, sharded, prefix)
        await broker.start(on_publication)
        for room in rooms:
            await broker.subscribe(ROOM_PREFIX + room)
        ready.put((node_id, broker.links()))
        try:
            await asyncio.wait_for(done.wait(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            pass
        results.put({"node": node_id, "received": count, "first": first, "last": last,
                     "connections": broker.connections})
        await broker.stop()

    asyncio.run(run())


@dataclass
class TopologyResult:
    topology: str
    messages: int
    deliveries: int
    seconds: float
    publications_per_s: float
    deliveries_per_s: float
    redis_cpu_s: dict[str, float] = field(default_factory=dict)
    redis_cpu_util: dict[str, float] = field(default_factory=dict)
    redis_idle_cpu_s: dict[str, float] = field(default_factory=dict)
    """What the same process burnt idle over the same length of time (cluster cron, replication pings)."""
    spublish_calls: dict[str, int] = field(default_factory=dict)
    publish_calls: dict[str, int] = field(default_factory=dict)
    expected_per_primary: dict[str, int] = field(default_factory=dict)
    bus_publish_sent: dict[str, int] = field(default_factory=dict)
    bus_publishshard_sent: dict[str, int] = field(default_factory=dict)
    one_shard_each: bool | None = None
    subscriber_links: dict[str, dict[str, str]] = field(default_factory=dict)


def _info(server: RedisServer, *command: str) -> dict[str, str]:
    reply = server.command(*command)
    assert isinstance(reply, bytes)
    out = {}
    for line in reply.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _calls(stats: dict[str, str], command: str) -> int:
    raw = stats.get(f"cmdstat_{command}", "")
    for part in raw.split(","):
        if part.startswith("calls="):
            return int(part[6:])
    return 0


async def _publish(url: str, sharded: bool, prefix: str, rooms: list[str], messages: int, batch: int,
                   payload: bytes) -> tuple[float, int]:
    from gateway.broker.base import Publication

    broker = _broker(url, "publisher", sharded, prefix)
    await broker.start(lambda publication: None)
    seqs: Counter[str] = Counter()
    start = time.time()
    sent = 0
    while sent < messages:
        chunk = []
        for _ in range(min(batch, messages - sent)):
            room = rooms[sent % len(rooms)]
            seqs[room] += 1
            chunk.append(Publication(ROOM_PREFIX + room, payload, seq=seqs[room]))
            sent += 1
        await broker.publish_many(chunk)
    await broker.stop()
    return start, sent


def run_topology(topology: str, args: argparse.Namespace) -> TopologyResult:
    cluster: RedisClusterProcesses | None = None
    single: RedisServer | None = None
    if topology == "single":
        single = RedisServer().start()
        url = single.url
        servers = {f"single:{single.port}": single}
    else:
        cluster = RedisClusterProcesses().start()
        url = cluster.url
        servers = {}
        primaries = {s.port for s in cluster.primaries()}
        for server in cluster.servers:
            servers[f"{'primary' if server.port in primaries else 'replica'}:{server.port}"] = server
    sharded = topology == "cluster-sharded"
    prefix = f"b{uuid.uuid4().hex[:6]}:"
    rooms = [uuid.uuid4().hex for _ in range(args.rc_rooms)]
    payload = b"x" * args.rc_payload
    expected = args.rc_messages
    ctx = multiprocessing.get_context("spawn")
    ready: multiprocessing.queues.Queue[Any] = ctx.Queue()
    results: multiprocessing.queues.Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=_subscriber, args=(url, f"sub{i}", sharded, prefix, rooms, expected, ready, results))
             for i in range(SUBSCRIBER_NODES)]
    try:
        for proc in procs:
            proc.start()
        links = dict(ready.get(timeout=60) for _ in procs)
        for server in servers.values():
            server.command("CONFIG", "RESETSTAT")
        idle_before = {name: cpu_seconds(s.pid) or 0.0 for name, s in servers.items()}
        time.sleep(IDLE_SAMPLE_S)
        idle_rate = {name: ((cpu_seconds(s.pid) or 0.0) - idle_before[name]) / IDLE_SAMPLE_S
                     for name, s in servers.items()}
        bus_before = {name: _info(s, "CLUSTER", "INFO") for name, s in servers.items()} if cluster else {}
        cpu_before = {name: cpu_seconds(s.pid) or 0.0 for name, s in servers.items()}
        start, sent = asyncio.run(_publish(url, sharded, prefix, rooms, args.rc_messages, args.rc_batch, payload))
        got = [results.get(timeout=DRAIN_TIMEOUT_S + 30) for _ in procs]
        cpu_after = {name: cpu_seconds(s.pid) or 0.0 for name, s in servers.items()}
        end = max(r["last"] for r in got)
        seconds = max(end - start, 1e-9)
        deliveries = sum(r["received"] for r in got)
        result = TopologyResult(
            topology, sent, deliveries, round(seconds, 3), round(sent / seconds), round(deliveries / seconds),
            subscriber_links=links)
        for name, server in servers.items():
            used = cpu_after[name] - cpu_before[name]
            result.redis_cpu_s[name] = round(used, 3)
            result.redis_cpu_util[name] = round(used / seconds, 3)
            result.redis_idle_cpu_s[name] = round(idle_rate[name] * seconds, 3)
            stats = _info(server, "INFO", "commandstats")
            result.spublish_calls[name] = _calls(stats, "spublish")
            result.publish_calls[name] = _calls(stats, "publish")
        if cluster is not None:
            for name, server in servers.items():
                after = _info(server, "CLUSTER", "INFO")
                for key, target in (("cluster_stats_messages_publish_sent", result.bus_publish_sent),
                                    ("cluster_stats_messages_publishshard_sent", result.bus_publishshard_sent)):
                    target[name] = int(after.get(key, "0")) - int(bus_before[name].get(key, "0"))
            owner_of_room = {room: cluster.owner(cluster.keyslot(prefix + room)).port for room in rooms}
            per_room = Counter(rooms[i % len(rooms)] for i in range(sent))
            for name in servers:
                if name.startswith("primary:"):
                    port = int(name.split(":")[1])
                    result.expected_per_primary[name] = sum(n for room, n in per_room.items()
                                                            if owner_of_room[room] == port)
            if sharded:
                result.one_shard_each = (
                    all(result.spublish_calls[n] == result.expected_per_primary.get(n, 0) for n in servers)
                    and sum(result.spublish_calls.values()) == sent
                    and all(v == 0 for v in result.bus_publish_sent.values()))
        return result
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        if cluster is not None:
            cluster.close()
        if single is not None:
            single.close()


def print_table(results: list[TopologyResult]) -> None:
    print(f"{'topology':<16} {'pub/s':>8} {'deliv/s':>9} {'deliveries':>11}  "
          "Redis CPU s (share of run) [idle CPU over the same time]")
    for r in results:
        cpu = ", ".join(f"{k} {v:.2f} ({r.redis_cpu_util[k]:.0%}) [{r.redis_idle_cpu_s[k]:.2f}]"
                        for k, v in r.redis_cpu_s.items())
        print(f"{r.topology:<16} {r.publications_per_s:>8} {r.deliveries_per_s:>9} {r.deliveries:>11}  {cpu}")
        if r.spublish_calls and r.topology != "single":
            print(f"{'':<16} SPUBLISH per node {r.spublish_calls}; expected per primary {r.expected_per_primary}")
            print(f"{'':<16} bus publish sent {r.bus_publish_sent}; publishshard sent {r.bus_publishshard_sent}")
        if r.one_shard_each is not None:
            print(f"{'':<16} every publication crossed exactly one shard: {r.one_shard_each}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cluster", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Redis Cluster fan-out (bench.redis_cluster)")
    group.add_argument("--rc-messages", dest="rc_messages", type=int, default=60000, help="publications per run")
    group.add_argument("--rc-rooms", dest="rc_rooms", type=int, default=64, help="rooms (channels)")
    group.add_argument("--rc-batch", dest="rc_batch", type=int, default=64, help="publications per publish_many")
    group.add_argument("--rc-payload", dest="rc_payload", type=int, default=100, help="body bytes")
    group.add_argument("--rc-runs", dest="rc_runs", type=int, default=3, help="runs per topology (median reported)")
    group.add_argument("--rc-topologies", dest="rc_topologies", default=",".join(TOPOLOGIES),
                       help=f"comma list of {', '.join(TOPOLOGIES)}")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "quick", False):  # bench.run --redis-cluster --quick: one small run each (~1 min)
        args.rc_messages = min(args.rc_messages, 10000)
        args.rc_runs = 1
    topologies = [t for t in args.rc_topologies.split(",") if t]
    runs: dict[str, list[TopologyResult]] = {t: [] for t in topologies}
    for index in range(args.rc_runs):
        for topology in topologies if index % 2 == 0 else reversed(topologies):
            result = run_topology(topology, args)
            runs[topology].append(result)
            print_table([result])
    medians = []
    for results in runs.values():
        ordered = sorted(results, key=lambda r: r.deliveries_per_s)
        medians.append(ordered[len(ordered) // 2])
    print("\nmedian run per topology:")
    print_table(medians)
    ok = all(r.deliveries == r.messages * SUBSCRIBER_NODES for rs in runs.values() for r in rs)
    ok = ok and all(r.one_shard_each is not False for rs in runs.values() for r in rs)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"redis-cluster-{stamp}.json"
    out.write_text(json.dumps({
        "machine": machine_info(), "args": vars(args),
        "runs": {t: [asdict(r) for r in rs] for t, rs in runs.items()},
        "median_deliveries_per_s": {t: statistics.median(r.deliveries_per_s for r in rs) for t, rs in runs.items()},
        "all_delivered_and_one_shard_each": ok,
    }, indent=2))
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
