"""Prometheus ``/metrics``: names and exposition (unit), the values after known scenarios on a real chat
server (integration), and multiprocess mode across real processes.

The in-process servers share the test process's default registry with every other test, so the
scenario tests assert on *deltas* between two scrapes of the server's own ``/metrics`` over HTTP.
The multiprocess test runs everything in subprocesses with ``PROMETHEUS_MULTIPROC_DIR`` set (the
value class of prometheus_client is chosen at its first import, so it cannot be switched in here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from gateway import metrics
from gateway.metrics_route import METRICS_PATH, metrics_routes
from tests.support.gateway_process import REPO
from tests.support.live_server import LiveServer
from tests.support.net import free_port
from tests.support.polling import eventually, eventually_sync
from tests.support.stomp_wire import WsStompClient, frame

ROOM_PREFIX = "/sub/chat/room/"
SEND_HEADERS = {"destination": "/pub/chat/message", "content-type": "application/json"}
ALLOWED_LABELS = {"transport", "command", "reason", "cause", "limit", "action"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Key = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Scrapes:
    """Reads a server's ``/metrics`` and tells how much a sample moved since a baseline."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base: Samples = {}

    async def scrape(self) -> Samples:
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.get(METRICS_PATH)
        assert response.status_code == 200, response.text
        return parse(response.text)

    async def baseline(self) -> None:
        self.base = await self.scrape()

    async def delta(self, name: str, **labels: str) -> float:
        return value(await self.scrape(), name, **labels) - value(self.base, name, **labels)

    async def deltas(self, keys: list[Key]) -> dict[Key, float]:
        now = await self.scrape()
        return {k: value(now, k[0], **dict(k[1])) - value(self.base, k[0], **dict(k[1])) for k in keys}

    async def moved(self, expected: dict[Key, float]) -> None:
        """Wait until every sample moved by exactly its expected amount (the writer task flushes its
        MESSAGE count after the transport write the client already saw, so some lag the frames); on
        a timeout, compare them all for a readable failure."""
        keys = list(expected)

        async def check() -> bool:
            return await self.deltas(keys) == expected
        try:
            await eventually(check, "the metrics to move by the expected amounts", timeout_s=30)
        except AssertionError:
            assert await self.deltas(keys) == expected
            raise


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


# --- unit: names, exposition, the route --------------------------------------------------------------


def test_every_metric_follows_the_naming_conventions() -> None:
    families = list(text_string_to_metric_families(metrics.exposition()[0].decode()))
    ours = [family for family in families if family.name.startswith("chat_gateway_")]
    assert len(ours) >= 25
    for family in ours:
        assert re.fullmatch(r"chat_gateway_[a-z][a-z0-9_]*[a-z0-9]", family.name), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_messages")), family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= ALLOWED_LABELS, (family.name, sample.labels)


def test_the_receive_path_metrics_have_the_agreed_names_and_types() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    assert families["chat_gateway_messages_delivered"] == "counter"
    assert families["chat_gateway_save_to_deliver_seconds"] == "histogram"
    assert families["chat_gateway_sequencer_repairs"] == "counter"
    assert families["chat_gateway_messages_recovered"] == "counter"
    assert families["chat_gateway_duplicates_dropped"] == "counter"
    assert families["chat_gateway_subscriptions"] == "gauge"
    assert families["chat_gateway_rooms_served"] == "gauge"
    # Gauges are summed over live worker processes in multiprocess mode.
    for gauge in (metrics.SESSIONS, metrics.SUBSCRIPTIONS, metrics.ROOMS_SERVED, metrics.PUBLISH_BACKLOG):
        assert gauge._multiprocess_mode == "livesum"


def test_label_children_cover_every_fixed_label_value() -> None:
    assert set(metrics.ERRORS_BY_REASON) == set(metrics.ERROR_REASONS)
    assert set(metrics.FRAMES_IN_BY_COMMAND) == set(metrics.CLIENT_COMMANDS)
    from gateway.authz import Action
    assert {action.value for action in Action} == set(metrics.ACCESS_ACTIONS)
    from gateway.stomp.frames import CLIENT_COMMANDS, SERVER_COMMANDS
    assert set(CLIENT_COMMANDS) == set(metrics.CLIENT_COMMANDS)
    assert set(SERVER_COMMANDS) == set(metrics.SERVER_COMMANDS)


async def test_the_route_serves_the_text_exposition() -> None:
    before = value(parse(metrics.exposition()[0].decode()), "chat_gateway_redis_reconnects_total")
    metrics.REDIS_RECONNECTS.inc(2)
    app = Starlette(routes=metrics_routes())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.get(METRICS_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert value(parse(response.text), "chat_gateway_redis_reconnects_total") == before + 2


# --- integration: a real chat server ----------------------------------------------------------------


async def create_room(server: LiveServer) -> str:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post("/chat/room", data={"name": "metrics"})
        response.raise_for_status()
        return str(response.json()["roomId"])


async def connect(server: LiveServer, headers: dict[str, str] | None = None) -> WsStompClient:
    ws = await WsStompClient.open(server.ws_url)
    await ws.connect({"accept-version": "1.2", "host": "x", **(headers or {})})
    return ws


def sends(room: str, count: int, tag: str = "m") -> bytes:
    return b"".join(
        frame("SEND", {**SEND_HEADERS, "receipt": f"{tag}-{i}"},
              json.dumps({"type": "TALK", "roomId": room, "message": f"{tag}-{i}"}))
        for i in range(count))


async def test_n_sends_move_committed_published_frames_and_batches_by_n(make_server: Any) -> None:
    n = 40
    server = await make_server()
    room = await create_room(server)
    scrapes = Scrapes(server.url)
    await scrapes.baseline()
    # Anonymous sessions without a login: no ENTER/QUIT system messages, so the room gets exactly n.
    listener = await connect(server)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    sender = await connect(server)
    await scrapes.moved({key("chat_gateway_sessions", transport="websocket"): 2,
                         key("chat_gateway_connections_total", transport="websocket"): 2})
    await sender.send(sends(room, n))
    for i in range(n):
        got = await sender.next_frame(30)
        assert (got.command, got.get("receipt-id")) == ("RECEIPT", f"m-{i}"), got
    for _ in range(n):
        assert (await listener.next_frame(30)).command == "MESSAGE"
    await scrapes.moved({
        key("chat_gateway_messages_committed_total"): n,
        key("chat_gateway_messages_published_total"): n,
        key("chat_gateway_frames_received_total", command="SEND"): n,
        key("chat_gateway_frames_received_total", command="CONNECT"): 2,
        key("chat_gateway_frames_received_total", command="SUBSCRIBE"): 1,
        key("chat_gateway_frames_sent_total", command="CONNECTED"): 2,
        key("chat_gateway_frames_sent_total", command="RECEIPT"): n + 1,
        key("chat_gateway_frames_sent_total", command="MESSAGE"): n,
        key("chat_gateway_frames_sent_total", command="ERROR"): 0,
        key("chat_gateway_commit_batch_messages_sum"): n,
        key("chat_gateway_publish_backlog"): 0,
    })
    # Every successful transaction is observed once in both histograms.
    batches = await scrapes.delta("chat_gateway_commit_batch_messages_count")
    assert 1 <= batches <= n
    assert await scrapes.delta("chat_gateway_commit_duration_seconds_count") == batches
    await listener.close()
    await sender.close()
    await scrapes.moved({key("chat_gateway_sessions", transport="websocket"): 0,
                         key("chat_gateway_connections_total", transport="websocket"): 2})


async def test_refused_frames_count_errors_by_reason(make_server: Any) -> None:
    server = await make_server()
    scrapes = Scrapes(server.url)
    await scrapes.baseline()
    unknown_room = await connect(server)
    await unknown_room.send(sends("00000000-0000-0000-0000-000000000000", 1))
    assert (await unknown_room.next_frame(30)).command == "ERROR"
    broken = await connect(server)
    await broken.send(b"SEND\ncontent-length:nope\n\n\x00")  # a protocol violation the session refuses
    assert (await broken.next_frame(30)).command == "ERROR"
    await scrapes.moved({
        key("chat_gateway_errors_sent_total", reason="rejected"): 1,
        key("chat_gateway_errors_sent_total", reason="protocol"): 1,
        key("chat_gateway_errors_sent_total", reason="auth"): 0,
        key("chat_gateway_frames_sent_total", command="ERROR"): 2,
        key("chat_gateway_messages_committed_total"): 0,
    })


async def test_a_refused_connect_counts_an_auth_failure(make_server: Any) -> None:
    server = await make_server(auth="users", users=("alice:secret",))
    scrapes = Scrapes(server.url)
    await scrapes.baseline()
    ws = await WsStompClient.open(server.ws_url)
    await ws.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "login": "alice", "passcode": "wrong"})
    refused = await ws.next_frame(30)
    assert refused.command == "ERROR", refused
    await connect(server, {"login": "alice", "passcode": "secret"})
    await scrapes.moved({
        key("chat_gateway_auth_failures_total", reason="bad_credentials"): 1,
        key("chat_gateway_errors_sent_total", reason="auth"): 1,
        key("chat_gateway_errors_sent_total", reason="protocol"): 0,
        key("chat_gateway_frames_sent_total", command="CONNECTED"): 1,
    })


async def test_a_send_over_the_rate_limit_counts_a_refusal(make_server: Any) -> None:
    # A bucket of 2 that refills once a minute: the third SEND of one burst is refused whatever the
    # machine's speed.
    server = await make_server(send_rate_per_s=1 / 60, send_burst=2)
    room = await create_room(server)
    scrapes = Scrapes(server.url)
    await scrapes.baseline()
    sender = await connect(server)
    await sender.send(sends(room, 3))
    answers = [await sender.next_frame(30) for _ in range(3)]
    assert [f.command for f in answers] == ["RECEIPT", "RECEIPT", "ERROR"], answers
    await scrapes.moved({
        key("chat_gateway_limit_refusals_total", limit="send_rate"): 1,
        key("chat_gateway_errors_sent_total", reason="rate_limit"): 1,
        key("chat_gateway_messages_committed_total"): 2,
        key("chat_gateway_frames_received_total", command="SEND"): 3,
    })


# --- multiprocess: several real processes, one endpoint ----------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    from gateway import metrics
    metrics.MESSAGES_COMMITTED.inc(int(sys.argv[1]))
    metrics.SESSIONS.labels("websocket").inc(int(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.read()   # stays alive (its live gauges count) until the test closes stdin
""")

SERVER = textwrap.dedent("""
    import sys
    import uvicorn
    from starlette.applications import Starlette
    from gateway.metrics_route import metrics_routes
    uvicorn.run(Starlette(routes=metrics_routes()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
""")


def test_the_endpoint_sums_the_processes_of_a_multiprocess_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    workers = []
    for amount in (3, 4):
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(amount)], env=env, cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        workers.append(worker)
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env, cwd=REPO)
    def scrape() -> Samples:
        return parse(httpx.get(f"http://127.0.0.1:{port}{METRICS_PATH}", timeout=10).text)

    def committed(samples: Samples) -> float:
        return value(samples, "chat_gateway_messages_committed_total")

    def sessions(samples: Samples) -> float:
        return value(samples, "chat_gateway_sessions", transport="websocket")

    def scrape_until(condition: Callable[[Samples], bool], what: str) -> Samples:
        def poll() -> Samples | None:
            samples = scrape()
            return samples if condition(samples) else None
        return eventually_sync(poll, what, timeout_s=30, interval_s=0.1, ignoring=(httpx.TransportError,))

    try:
        both = scrape_until(lambda s: committed(s) == 7, "both workers' counters summed")
        assert sessions(both) == 7
        # One worker exits: its counter still counts, its live gauge no longer does.
        first = workers.pop(0)
        assert first.stdin is not None
        first.stdin.close()
        first.wait(30)
        after = scrape_until(lambda s: sessions(s) == 4, "the dead worker's gauge forgotten")
        assert committed(after) == 7
    finally:
        server.terminate()
        server.wait(30)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(30)


# --- the Grafana dashboard -----------------------------------------------------------------------------


def test_the_dashboard_queries_only_metrics_the_gateway_exposes() -> None:
    from bench.metrics_dashboard import DASHBOARD, dashboard_exprs, metric_names, parse_promql

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # Sample names by family (a labelled family without children yet has no samples, only its TYPE).
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    exposed = {family.name + suffix for family in text_string_to_metric_families(metrics.exposition()[0].decode())
               for suffix in suffixes.get(family.type, ("",))}
    used: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        used |= metric_names(parse_promql(expr))
    assert used <= exposed, used - exposed
    chat_metrics = {name for name in exposed if name.startswith("chat_gateway_")}
    # Every family of the gateway appears on the dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in chat_metrics}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families <= shown, families - shown


# --- serve --workers 2: any worker answers for both -----------------------------------------------------


@pytest.mark.redis
@pytest.mark.cluster
@pytest.mark.timeout(300)
async def test_with_two_workers_every_scrape_sums_both(tmp_path: Path) -> None:
    from tests.support.gateway_process import GatewayProcess
    from tests.support.redis_server import RedisServer
    from tests.test_workers_drain import worker_of, worker_pids

    sends_each = 3
    with RedisServer() as redis:
        gateway = GatewayProcess({"redis_url": redis.url, "workers": 2, "heartbeat_receive_ms": 0,
                                  "send_rate_per_s": 0}, workdir=tmp_path)
        gateway.start(timeout=60)
        clients: list[WsStompClient] = []
        try:
            supervisor = gateway.pid or 0
            workers = eventually_sync(lambda: worker_pids(supervisor), "the supervisor's two workers", timeout_s=60)
            gateway.wait_ready(60)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
                response = await http.post("/chat/room", data={"name": "workers"})
                response.raise_for_status()
                room = str(response.json()["roomId"])
            per_worker: dict[int, int] = dict.fromkeys(workers, 0)

            async def open_client() -> WsStompClient:
                ws = await WsStompClient.open(gateway.ws_url)
                # Anonymous, no login: no ENTER/QUIT system messages, the room gets exactly our SENDs.
                connected = await ws.connect({"accept-version": "1.2", "host": "x"})
                per_worker[worker_of(connected.get("session") or "", workers)] += 1
                return ws

            while min(per_worker.values()) < 2:
                assert len(clients) < 48, f"the sessions all landed on one worker: {per_worker}"
                clients += await asyncio.gather(*(open_client() for _ in range(4)))
            for ws in clients:
                await ws.send(sends(room, sends_each))
            for ws in clients:
                for _ in range(sends_each):
                    assert (await ws.next_frame(60)).command == "RECEIPT"
            total = len(clients)
            expected = {key("chat_gateway_sessions", transport="websocket"): total,
                        key("chat_gateway_connections_total", transport="websocket"): total,
                        key("chat_gateway_messages_committed_total"): total * sends_each,
                        key("chat_gateway_frames_received_total", command="SEND"): total * sends_each}
            scrapes = Scrapes(gateway.url)   # baseline: nothing (a fresh multiprocess directory)
            await scrapes.moved(expected)
            # Whichever worker the kernel hands a scrape to, it answers for both.
            for _ in range(8):
                assert await scrapes.deltas(list(expected)) == expected
        finally:
            for ws in clients:
                with contextlib.suppress(Exception):
                    await ws.close()
            gateway.cleanup()
