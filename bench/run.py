"""``python -m bench.run [--quick]``: every benchmark scenario, against the gateway and RabbitMQ Web-STOMP.

Owns the plan (which scenarios, how big, how many runs), the order of runs (the two systems
alternate, ABBA, so slow drift of a shared machine hits both alike), the summary (median of runs,
ratios gateway/peer) and the JSON file under ``bench/results/``.

Scenarios compared with the peer (same client code, same sizes, same run):

1. ``fanout``            1 publisher, 50 subscribers, one destination, closed-loop window;
2. ``fanout_paced``      the same topology at a fixed light rate: latency without saturation;
3. ``many_publishers``   20 publishers x 20 subscribers on one destination;
4. ``connection_rate``   WebSocket + CONNECT/CONNECTED + DISCONNECT sessions, 10 at a time.

Gateway only (no peer equivalent): ``chat_sqlite`` (SEND /pub/chat/message, persisted with group
commit, then fanned out), ``chat_redis_2nodes_sqlite`` and ``chat_redis_2nodes_postgres`` (the same
across two gateway processes sharing a private redis-server and one database) and
``fanout_redis_2nodes`` (scenario 1 through Redis, subscribers on both nodes).

The gateway runs as child processes on free loopback ports; RabbitMQ is started and its plugin
enabled by :class:`bench.procs.RabbitPeer` (needs root), or the peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import (
    GatewayNode,
    PeerUnavailable,
    PostgresDatabase,
    RabbitPeer,
    RedisServer,
    RedisServerMissing,
    SqliteDatabase,
    machine_info,
)
from bench.scenarios import (
    Endpoint,
    Result,
    chat_body,
    chat_decoder,
    connection_rate,
    plain_body,
    plain_decoder,
    pubsub_run,
)
from bench.stats import median_of_runs, ratio

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAYLOAD_BYTES = 100

# Figures compared between the systems, and whether higher is better (for the notes only).
COMPARED: dict[str, tuple[tuple[str, bool], ...]] = {
    "pubsub": (("deliveries_per_s", True), ("p50_ms", False), ("p99_ms", False),
               ("server_cpu_us_per_delivery", False), ("server_cpu_util", False)),
    "connect": (("sessions_per_s", True), ("open_p50_ms", False), ("open_p99_ms", False),
                ("server_cpu_us_per_session", False)),
}


@dataclass(frozen=True)
class Plan:
    runs: int
    fanout_messages: int
    paced_rate: float
    paced_seconds: float
    many_per_publisher: int
    connections: int
    chat_per_publisher: int
    redis_fanout_messages: int
    time_limit_s: float


FULL = Plan(runs=3, fanout_messages=3000, paced_rate=20.0, paced_seconds=5.0, many_per_publisher=200,
            connections=1000, chat_per_publisher=150, redis_fanout_messages=2000, time_limit_s=90.0)
QUICK = Plan(runs=1, fanout_messages=1000, paced_rate=20.0, paced_seconds=3.0, many_per_publisher=50,
             connections=300, chat_per_publisher=40, redis_fanout_messages=500, time_limit_s=40.0)

Runner = Callable[[Endpoint, str], Awaitable[Result]]

_tree: list[Path] = []  # --gateway-tree: another checkout's gateway package to benchmark


def gateway_node(database_url: str, **kwargs: Any) -> GatewayNode:
    if _tree:
        kwargs["tree"] = _tree[0]
    # The abuse limits of issue 10 (per-address SEND rate, sessions per address) would throttle a load
    # generator on 127.0.0.1 that RabbitMQ lets through; off here as in the chat curve.
    from bench.chat_curve import GATEWAY_ENV
    kwargs.setdefault("env", dict(GATEWAY_ENV))
    return GatewayNode(database_url, **kwargs)


def comparative_scenarios(plan: Plan) -> list[tuple[str, str, str, Runner]]:
    """(name, kind, description, runner(endpoint, destination)) of the scenarios run on both systems."""
    body, decode, limit = plain_body(PAYLOAD_BYTES), plain_decoder, plan.time_limit_s
    paced_count = max(1, int(plan.paced_rate * plan.paced_seconds))
    return [
        ("fanout", "pubsub",
         f"1 publisher -> 50 subscribers, {plan.fanout_messages} messages of {PAYLOAD_BYTES} B, window 16",
         lambda ep, dest: pubsub_run(ep, destination=dest, publishers=1, subscribers=50,
                                     per_publisher=plan.fanout_messages, window=16, make_body=body,
                                     decode=decode, time_limit_s=limit)),
        ("fanout_paced", "pubsub",
         f"1 publisher -> 50 subscribers at a fixed {plan.paced_rate:g} msg/s for {plan.paced_seconds:g} s",
         lambda ep, dest: pubsub_run(ep, destination=dest, publishers=1, subscribers=50,
                                     per_publisher=paced_count, window=paced_count, make_body=body,
                                     decode=decode, time_limit_s=limit, rate_per_s=plan.paced_rate)),
        ("many_publishers", "pubsub",
         f"20 publishers x {plan.many_per_publisher} messages -> 20 subscribers, window 8 per publisher",
         lambda ep, dest: pubsub_run(ep, destination=dest, publishers=20, subscribers=20,
                                     per_publisher=plan.many_per_publisher, window=8, make_body=body,
                                     decode=decode, time_limit_s=limit)),
        ("connection_rate", "connect",
         f"{plan.connections} sessions (WebSocket + CONNECT/CONNECTED + DISCONNECT), 10 concurrent",
         lambda ep, dest: connection_rate(ep, total=plan.connections, concurrency=10, time_limit_s=limit)),
    ]


def completed(results: list[Result]) -> list[Result]:
    """The runs without a failure (medians use only these), or all runs if every one failed."""
    return [r for r in results if not r.get("failure")] or results


def failed_counts(runs: dict[str, list[Result]]) -> dict[str, int]:
    return {system: sum(1 for r in results if r.get("failure")) for system, results in runs.items()}


def summarize(kind: str, runs: dict[str, list[Result]]) -> dict[str, Any]:
    """Medians per system; the ratio of the medians; and the median of the per-run ratios (run i of
    the gateway against run i of the peer, measured back to back, so slow drift cancels out)."""
    medians = {system: median_of_runs(completed(results)) for system, results in runs.items()}
    out: dict[str, Any] = {"median": medians, "failed_runs": failed_counts(runs)}
    if "gateway" in medians and "rabbitmq" in medians:
        out["ratio_gateway_over_peer"] = {
            key: ratio(medians["gateway"].get(key), medians["rabbitmq"].get(key))
            for key, _ in COMPARED[kind]}
        paired: dict[str, float | None] = {}
        for key, _ in COMPARED[kind]:
            ratios = [r for g, p in zip(runs["gateway"], runs["rabbitmq"], strict=True)
                      if (r := ratio(g.get(key), p.get(key))) is not None]
            paired[key] = round(statistics.median(ratios), 3) if ratios else None
        out["paired_ratio_median"] = paired
    return out


def _line(name: str, system: str, run: int, result: Result) -> str:
    keys = ("deliveries_per_s", "sessions_per_s", "p50_ms", "p99_ms", "open_p50_ms",
            "server_cpu_us_per_delivery", "server_cpu_us_per_session", "server_cpu_util",
            "client_cpu_util", "other_cpu_util")
    shown = " ".join(f"{k}={result[k]}" for k in keys if result.get(k) is not None)
    failure = f" FAILURE={result['failure']}" if result.get("failure") else ""
    return f"  {name:22} {system:9} run {run + 1}: {shown}{failure}"


async def run_comparative(plan: Plan, endpoints: dict[str, Endpoint], only: set[str] | None,
                          log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    systems = list(endpoints)
    for name, kind, description, runner in comparative_scenarios(plan):
        if only is not None and name not in only:
            continue
        log(f"{name}: {description}")
        runs: dict[str, list[Result]] = {system: [] for system in systems}
        for run in range(plan.runs):
            order = systems if run % 2 == 0 else systems[::-1]
            for system in order:
                endpoint = endpoints[system]
                destination = f"{endpoint.topic_prefix}{name}-{run}"
                result = await runner(endpoint, destination)
                result["order"] = order.index(system)
                runs[system].append(result)
                log(_line(name, system, run, result))
        results[name] = {"description": description, "kind": kind, "runs": runs, **summarize(kind, runs)}
    return results


Database = SqliteDatabase | PostgresDatabase


async def chat_run(nodes: list[GatewayNode], database: Database, *, publishers: int, subscribers: int,
                   per_publisher: int, window: int, time_limit_s: float, tag: str) -> Result:
    room_id = nodes[0].create_room(f"bench-{tag}")
    endpoint = Endpoint("gateway", [n.ws_url for n in nodes], "bench", "", "/", "/sub/chat/room/",
                        [n.pid for n in nodes], named_logins=True)
    result = await pubsub_run(endpoint, destination=f"/sub/chat/room/{room_id}", publishers=publishers,
                              subscribers=subscribers, per_publisher=per_publisher, window=window,
                              make_body=chat_body(room_id, PAYLOAD_BYTES), decode=chat_decoder,
                              time_limit_s=time_limit_s, content_type="application/json",
                              send_destination="/pub/chat/message")
    # Each message is one SEND -> one commit (shared) -> one publication; messages_per_s is the rate
    # of messages persisted *and* delivered to every subscriber.
    result["persisted_talk_rows"] = await database.talk_rows(room_id)
    if result["persisted_talk_rows"] != result["messages_sent"] and result.get("failure") is None:
        result["failure"] = f"{result['persisted_talk_rows']} rows stored for {result['messages_sent']} sent"
    return result


def _gateway_only_entry(description: str, runs: list[Result]) -> dict[str, Any]:
    return {"description": description, "kind": "pubsub", "runs": {"gateway": runs},
            "median": {"gateway": median_of_runs(completed(runs))},
            "failed_runs": failed_counts({"gateway": runs})}


async def run_gateway_only(plan: Plan, workdir: Path, only: set[str] | None,
                           log: Callable[[str], None]) -> dict[str, Any]:
    """The chat path (SQLite; Redis + 2 nodes on SQLite and on PostgreSQL) and fan-out through Redis."""
    results: dict[str, Any] = {}

    def wanted(name: str) -> bool:
        return only is None or name in only

    chat_text = (f"10 publishers x {plan.chat_per_publisher} SEND /pub/chat/message (persisted, group commit) "
                 "-> 5 subscribers of the room, window 4 per publisher")

    async def chat_scenario(name: str, description: str, database: Database, redis_url: str | None,
                            node_count: int) -> None:
        log(f"{name}: {description}")
        nodes: list[GatewayNode] = []
        runs: list[Result] = []
        try:
            for _ in range(node_count):
                nodes.append(gateway_node(database.url, redis_url=redis_url,
                                          allow_client_broker_send=False).start(workdir))
            for run in range(plan.runs):
                result = await chat_run(nodes, database, publishers=10, subscribers=5,
                                        per_publisher=plan.chat_per_publisher, window=4,
                                        time_limit_s=plan.time_limit_s, tag=f"{name}-{run}")
                runs.append(result)
                log(_line(name, "gateway", run, result))
        finally:
            for node in nodes:
                node.stop()
        results[name] = _gateway_only_entry(description, runs)

    if wanted("chat_sqlite"):
        database = await SqliteDatabase(workdir / "chat.db").setup()
        await chat_scenario("chat_sqlite", f"{chat_text}; one gateway process, SQLite (WAL)", database, None, 1)

    redis_names = {"chat_redis_2nodes_sqlite", "chat_redis_2nodes_postgres", "fanout_redis_2nodes"}
    if only is not None and not redis_names & only:
        return results
    redis = RedisServer()
    try:
        redis.start()
    except RedisServerMissing as exc:
        log(f"Redis scenarios skipped: {exc}")
        results["redis_skipped"] = str(exc)
        return results
    try:
        two_nodes = ("2 gateway processes sharing a private redis-server; publishers and subscribers "
                     "alternate between the nodes")
        sqlite_db = await SqliteDatabase(workdir / "chat-redis.db").setup()
        if wanted("chat_redis_2nodes_sqlite"):
            await chat_scenario("chat_redis_2nodes_sqlite", f"{chat_text}; {two_nodes}; one shared SQLite file",
                                sqlite_db, redis.url, 2)
        if wanted("chat_redis_2nodes_postgres"):
            postgres = PostgresDatabase()
            try:
                await postgres.setup()
            except Exception as exc:
                message = f"chat_redis_2nodes_postgres skipped: PostgreSQL unavailable ({type(exc).__name__}: {exc})"
                log(message)
                results["postgres_skipped"] = message
            else:
                try:
                    await chat_scenario("chat_redis_2nodes_postgres",
                                        f"{chat_text}; {two_nodes}; PostgreSQL on 127.0.0.1", postgres, redis.url, 2)
                finally:
                    await postgres.drop()
        if wanted("fanout_redis_2nodes"):
            text = (f"1 publisher (node A) -> 50 subscribers (25 per node), {plan.redis_fanout_messages} "
                    f"messages of {PAYLOAD_BYTES} B to /sub/bench/..., window 16, through Redis pub/sub")
            log(f"fanout_redis_2nodes: {text}")
            nodes: list[GatewayNode] = []
            runs: list[Result] = []
            try:
                for _ in range(2):
                    nodes.append(gateway_node(sqlite_db.url, redis_url=redis.url,
                                              allow_client_broker_send=True).start(workdir))
                endpoint = Endpoint("gateway", [n.ws_url for n in nodes], "bench", "", "/", "/sub/bench/",
                                    [n.pid for n in nodes], named_logins=True)
                for run in range(plan.runs):
                    result = await pubsub_run(endpoint, destination=f"/sub/bench/redis-fanout-{run}",
                                              publishers=1, subscribers=50,
                                              per_publisher=plan.redis_fanout_messages, window=16,
                                              make_body=plain_body(PAYLOAD_BYTES), decode=plain_decoder,
                                              time_limit_s=plan.time_limit_s)
                    runs.append(result)
                    log(_line("fanout_redis_2nodes", "gateway", run, result))
            finally:
                for node in nodes:
                    node.stop()
            results["fanout_redis_2nodes"] = _gateway_only_entry(text, runs)
    finally:
        redis.close()
    return results


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_tables(report: dict[str, Any]) -> str:
    """The tables docs/benchmarks.md shows, generated from one report."""
    lines = ["| scenario | figure | gateway | RabbitMQ | ratio of medians | median of paired ratios |",
             "|---|---|---|---|---|---|"]
    for name, data in report["scenarios"].items():
        if not isinstance(data, dict) or "rabbitmq" not in data.get("median", {}):
            continue
        gw, peer = data["median"]["gateway"], data["median"]["rabbitmq"]
        for key, _ in COMPARED[data["kind"]]:
            lines.append(f"| {name} | {key} | {_fmt(gw.get(key))} | {_fmt(peer.get(key))} | "
                         f"{_fmt(data['ratio_gateway_over_peer'].get(key))} | "
                         f"{_fmt(data['paired_ratio_median'].get(key))} |")
    lines += ["", "| gateway-only scenario | messages/s | deliveries/s | p50 ms | p99 ms | server CPU µs/delivery "
              "| failed runs |", "|---|---|---|---|---|---|---|"]
    for name, data in report["scenarios"].items():
        if not isinstance(data, dict) or "rabbitmq" in data.get("median", {}) or "median" not in data:
            continue
        gw = data["median"]["gateway"]
        lines.append(f"| {name} | {_fmt(gw.get('messages_per_s'))} | {_fmt(gw.get('deliveries_per_s'))} | "
                     f"{_fmt(gw.get('p50_ms'))} | {_fmt(gw.get('p99_ms'))} | "
                     f"{_fmt(gw.get('server_cpu_us_per_delivery'))} | {data['failed_runs']['gateway']} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = Plan(**{**plan.__dict__, "runs": args.runs})
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python -m bench.run", *sys.argv[1:]]),
        "mode": "quick" if args.quick else "full",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plan": plan.__dict__,
        "gateway_tree": str(_tree[0]) if _tree else "this checkout",
        "machine": machine_info(),
        "notes": [],
    }
    peer: RabbitPeer | None = None
    if not args.no_peer:
        try:
            peer = RabbitPeer().ensure()
            report["machine"]["rabbitmq"] = peer.version
            report["notes"] += peer.notes
        except PeerUnavailable as exc:
            message = f"peer skipped: {exc}; only absolute gateway figures are reported"
            log(message)
            report["notes"].append(message)
    log(f"machine: {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="chat-gateway-bench-") as tmp:
        workdir = Path(tmp)
        url = f"sqlite+aiosqlite:///{workdir / 'pubsub.db'}"
        GatewayNode.migrate(url)
        gateway = gateway_node(url, allow_client_broker_send=True).start(workdir)
        try:
            endpoints = {"gateway": Endpoint("gateway", [gateway.ws_url], "bench", "", "/", "/sub/bench/",
                                             [gateway.pid], named_logins=True)}
            if peer is not None:
                endpoints["rabbitmq"] = Endpoint("rabbitmq", [peer.ws_url], peer.login, peer.passcode, "/",
                                                 "/topic/bench.", [peer.pid])
            scenarios = await run_comparative(plan, endpoints, only, log)
        finally:
            gateway.stop()
        scenarios.update(await run_gateway_only(plan, workdir, only, log))
    report["scenarios"] = scenarios
    report["duration_s"] = round(time.monotonic() - started, 1)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS_DIR / (
        f"{report['mode']}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json")
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    tmp_out.replace(out)
    print()
    print(markdown_tables(report))
    print(f"\nresults: {out} ({report['duration_s']} s)")
    failures = [f"{name}/{system} run {i + 1}: {r['failure']}"
                for name, data in scenarios.items() if isinstance(data, dict)
                for system, runs in data.get("runs", {}).items() for i, r in enumerate(runs) if r.get("failure")]
    for failure in failures:
        print(f"FAILED RUN {failure}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small run of each scenario (~1 minute)")
    parser.add_argument("--runs", type=int, default=0, help="runs per scenario and system (default 3, quick 1)")
    parser.add_argument("--only", default="", help="comma list of scenario names to run")
    parser.add_argument("--no-peer", action="store_true", help="do not start or measure RabbitMQ")
    parser.add_argument("--gateway-tree", default="",
                        help="run the gateway package of another checkout (A/B comparison of a change)")
    parser.add_argument("--out", default="", help="JSON file to write (default bench/results/<mode>-<time>.json)")
    curve = parser.add_argument_group("chat path at stepped offered rates (bench.chat_curve)")
    curve.add_argument("--curve", action="store_true",
                       help="run the stepped open-loop chat curve against RabbitMQ instead of the scenarios "
                            "above (full ~20 min; with --quick ~5 min); full mode rewrites the generated "
                            "block of docs/benchmarks.md and docs/bench-chat-curve.png")
    curve.add_argument("--curve-rates", default="",
                       help="offered msg/s ladder for 500x2 (comma list; 10x100 uses a tenth of each)")
    curve.add_argument("--curve-step-s", type=float, default=0.0, help="seconds of paced sends per step")
    curve.add_argument("--curve-systems", default="",
                       help="comma list of rabbitmq,gateway-sqlite,gateway-2nodes-pg (default all)")
    curve.add_argument("--curve-shapes", default="", help="comma list of 500x2,10x100 (default both)")
    curve.add_argument("--profile-rate", type=float, default=0.0,
                       help="offered msg/s of the profiled 500x2 SQLite step (default 800)")
    curve.add_argument("--no-profile", action="store_true", help="skip the py-spy profile step")
    curve.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    curve.add_argument("--plot", default="", help="PNG to write (default docs/bench-chat-curve.png; "
                       "quick: next to the JSON)")
    parser.add_argument("--redis-cluster", action="store_true",
                        help="run bench.redis_cluster instead: cross-node fan-out through one Redis vs a 3-shard "
                             "Redis Cluster (sharded and classic Pub/Sub), per-shard CPU, one-shard check")
    from bench import redis_cluster
    redis_cluster.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.redis_cluster:
        return redis_cluster.run(args)
    if args.gateway_tree:
        _tree.append(Path(args.gateway_tree).resolve())
    if args.curve:
        from bench import chat_curve
        from bench.procs import REPO
        tree = _tree[0] if _tree else REPO
        loop_factory = None
        with contextlib.suppress(ImportError):
            import uvloop
            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(chat_curve.main_async(args, tree))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
