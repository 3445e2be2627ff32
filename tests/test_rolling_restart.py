"""Zero-downtime deploy of the seed's setup: ``deploy/rolling-restart`` while clients chat through nginx.

The local cluster runs as an operator runs it (``deploy/local-cluster start --detach``): real nginx, a
real redis-server, two ``chat-gateway serve`` processes, one SQLite database or a throw-away
PostgreSQL database. Chat clients connect
through nginx (raw STOMP over WebSocket), two rooms, several clients per room. Each client subscribes
to its room and keeps sending TALKs, one at a time, each with a receipt and a client message id; when
its connection is closed it reconnects through nginx and subscribes again with ``x-resume-after:<the
last x-seq it received>`` (the first subscription resumes after 0, so every client sees the whole
room), then sends again, first the message it had in flight (same client id) if it had no RECEIPT.

While they chat, ``deploy/rolling-restart`` replaces node1 and then node2 (each is marked down in
nginx, drained with SIGTERM, replaced on the same port, put back). Every client is on one of the two
nodes, so every client loses its connection at least once. Then:

- every acknowledged message is stored exactly once, and nothing is stored that no client had
  acknowledged (REST history through nginx);
- every client received its room's seqs exactly 1..N (N = the stored head): no gap, no duplicate;
- every client was back (reconnected and resubscribed) within :data:`RECONNECT_BOUND_S` of losing its
  connection, on the first attempt (nginx no longer sends new connections to the draining node), and
  the drained node closed it the documented way (STOMP ERROR, WebSocket close 1012).

Waits are for events (receipts, frames, the script's exit, counts reached) with generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from deploy.local_cluster import ClusterError, find_executable, local_nginx_conf
from tests.support.ci import skip_or_fail
from tests.support.polling import eventually
from tests.support.postgres import temporary_database
from tests.support.stomp_wire import WsStompClient

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[1]
CLIENTS_PER_ROOM = 3
ROOMS = 2
PACE_S = 0.05               # between one client's RECEIPT and its next SEND: ~20 messages/s per client
WARM_UP = 5                 # acknowledged messages per client before the restart starts
AFTER = 5                   # ... and after the restart is done
RECONNECT_BOUND_S = 30.0    # connection lost -> resubscribed; generous, CI machines are loaded
DEADLINE_S = 60.0           # any single awaited event
SHUTTING_DOWN = "Server shutting down, reconnect"


class Lost(Exception):
    """The client's connection is gone (closed by the server, or an ERROR that closes it)."""


@dataclass
class ChatClient:
    """One chat user through nginx: subscribed to its room, sending with receipts, resuming by x-seq."""

    name: str
    room: str
    ws_url: str
    seqs: list[int] = field(default_factory=list)        # x-seq of every MESSAGE, all connections
    acked: list[str] = field(default_factory=list)       # client ids with a RECEIPT
    connections: int = 0
    resent: int = 0                                      # SENDs repeated (same client id) after a lost connection
    failed_attempts: int = 0                             # connection attempts that did not end subscribed
    outages: list[float] = field(default_factory=list)   # seconds from a lost connection to resubscribed
    close_codes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)      # ERROR frames' messages
    stop_sending: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    idle: bool = False                                   # sending stopped, only receiving
    _receipts: int = 0

    def _on_frame(self, frame: Any) -> str | None:
        """Record a MESSAGE; return a RECEIPT's id; raise :class:`Lost` on an ERROR (it closes the session)."""
        if frame.command == "MESSAGE":
            self.seqs.append(int(frame.get("x-seq")))
            return None
        if frame.command == "RECEIPT":
            return str(frame.get("receipt-id"))
        if frame.command == "ERROR":
            self.errors.append(str(frame.get("message")))
            raise Lost(frame.get("message"))
        raise AssertionError(f"unexpected frame {frame}")

    async def _until_receipt(self, ws: WsStompClient, receipt: str) -> None:
        while True:
            if self._on_frame(await ws.next_frame(DEADLINE_S)) == receipt:
                return

    async def _connect(self) -> WsStompClient:
        """Connect through nginx and SUBSCRIBE with x-resume-after until it works."""
        while True:
            ws: WsStompClient | None = None
            try:
                ws = await WsStompClient.open(self.ws_url)
                connected = await ws.connect({"accept-version": "1.2", "host": "chat", "login": self.name})
                assert connected.command == "CONNECTED", connected
                self._receipts += 1
                receipt = f"sub-{self._receipts}"
                resume = str(self.seqs[-1]) if self.seqs else "0"
                await ws.send_frame("SUBSCRIBE", {"id": "room", "destination": f"/sub/chat/room/{self.room}",
                                                  "x-resume-after": resume, "receipt": receipt})
                await self._until_receipt(ws, receipt)
                self.connections += 1
                return ws
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, Lost, AssertionError):
                self.failed_attempts += 1
                if ws is not None:
                    await ws.close()
                await asyncio.sleep(0.2)   # a retry back-off, not a wait for something to happen

    async def _send(self, ws: WsStompClient, client_id: str) -> None:
        self._receipts += 1
        receipt = f"r-{self._receipts}"
        body = json.dumps({"type": "TALK", "roomId": self.room, "message": f"{client_id} says hi"})
        await ws.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": receipt,
                                     "client-msg-id": client_id, "content-type": "application/json"}, body)
        await self._until_receipt(ws, receipt)

    async def run(self) -> None:
        """Chat until :attr:`stop`; sending stops at :attr:`stop_sending` (after any message in flight)."""
        pending: str | None = None
        lost_at: float | None = None
        while not self.stop.is_set():
            ws = await self._connect()
            if lost_at is not None:
                self.outages.append(time.monotonic() - lost_at)
            try:
                while not self.stop_sending.is_set() or pending is not None:
                    if pending is not None:
                        self.resent += 1
                    pending = pending or f"{self.name}-{len(self.acked)}"
                    await self._send(ws, pending)
                    self.acked.append(pending)
                    pending = None
                    await asyncio.sleep(PACE_S)
                self.idle = True
                while not self.stop.is_set():     # keep receiving until the test has checked
                    try:
                        self._on_frame(await ws.next_frame(0.5))
                    except TimeoutError:
                        continue
                await ws.close()
            except (ConnectionClosed, Lost, TimeoutError):
                self.idle = False
                lost_at = time.monotonic()
                self.close_codes.append(await self._rest_of(ws))

    async def _rest_of(self, ws: WsStompClient) -> int | None:
        """Read what the server sent before it closed (a SEND fails on the closed socket before the
        ERROR queued ahead of the close is read); return the close code."""
        while True:
            try:
                self._on_frame(await ws.next_frame(DEADLINE_S))
            except Lost:
                continue
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd is not None else None
            except TimeoutError:
                return None


async def until(predicate: Any, what: str, timeout: float = DEADLINE_S) -> None:
    """:func:`~tests.support.polling.eventually` with this test's deadline."""
    await eventually(predicate, what, timeout_s=timeout)


async def history(http: httpx.AsyncClient, room: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = (await http.get(f"/chat/room/{room}/messages",
                               params={"after": out[-1]["seq"] if out else 0, "limit": 500})).json()
        out.extend(page)
        if len(page) < 500:
            return out


def _cli(state: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHON"] = sys.executable
    return subprocess.run([str(REPO / "deploy" / "local-cluster"), "--state-file", str(state), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _require_tools() -> None:
    for tool, package in (("nginx", "nginx"), ("redis-server", "redis-server")):
        try:
            find_executable(tool, package=package)
        except ClusterError as exc:
            skip_or_fail(str(exc), tests="the rolling-restart tests")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def cluster_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A local cluster started with the CLI (as an operator does) on an SQLite file or a throw-away
    PostgreSQL database; yields (nginx URL, state file)."""
    _require_tools()
    state = tmp_path / "state.json"
    async with contextlib.AsyncExitStack() as stack:
        database = []
        if request.param == "postgres":
            database = ["--database-url", await stack.enter_async_context(temporary_database())]
        # All clients come through nginx from one address: the per-address SEND bucket of
        # auth=anonymous is not what is tested here.
        started = _cli(state, "start", "--detach", "--nodes", "2", *database, "--", "--send-rate-per-s", "0",
                       timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        match = re.search(r"chat cluster ready: (http://127\.0\.0\.1:\d+)/chat/room", started.stdout)
        assert match is not None, started.stdout
        try:
            yield match.group(1), state
        finally:
            stopped = _cli(state, "stop", timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_a_node_marked_down_is_kept_in_the_upstream_and_real_nginx_accepts_it(tmp_path: Path) -> None:
    _require_tools()
    conf = local_nginx_conf((REPO / "deploy" / "nginx.conf").read_text(), listen="127.0.0.1:1",
                            upstreams=["127.0.0.1:2", "127.0.0.1:3"], prefix=tmp_path, down={"127.0.0.1:2"})
    assert "server 127.0.0.1:2 max_fails=1 fail_timeout=10s down;" in conf
    assert "server 127.0.0.1:3 max_fails=1 fail_timeout=10s;" in conf
    for sub in ("logs", "temp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run([find_executable("nginx"), "-t", "-p", str(tmp_path), "-e",
                             str(tmp_path / "logs" / "error.log"), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_rolling_restart_without_a_running_cluster_says_so(tmp_path: Path) -> None:
    result = subprocess.run([str(REPO / "deploy" / "rolling-restart"), "--state-file", str(tmp_path / "none.json")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1
    assert "no local cluster is running" in result.stderr


@pytest.mark.timeout(420)
async def test_rolling_restart_under_chat_loses_nothing_doubles_nothing_and_every_client_resumes(
        cluster_url: tuple[str, Path]) -> None:
    url, state_file = cluster_url
    before = json.loads(state_file.read_text())
    ws_url = url.replace("http://", "ws://") + "/ws-stomp/websocket"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        rooms = []
        for r in range(ROOMS):
            response = await http.post("/chat/room", data={"name": f"deploy-{r}"})
            response.raise_for_status()
            rooms.append(str(response.json()["roomId"]))
        clients = [ChatClient(f"user{r}{c}", room, ws_url) for r, room in enumerate(rooms)
                   for c in range(CLIENTS_PER_ROOM)]
        tasks = [asyncio.create_task(client.run()) for client in clients]
        try:
            await until(lambda: all(len(c.acked) >= WARM_UP for c in clients), "every client chatting")

            started = time.monotonic()
            restart = await asyncio.create_subprocess_exec(
                str(REPO / "deploy" / "rolling-restart"), "--state-file", str(state_file),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
                     "PYTHON": sys.executable})
            output, _ = await asyncio.wait_for(restart.communicate(), 300)
            restart_s = time.monotonic() - started
            report = output.decode(errors="replace")
            assert restart.returncode == 0, report
            assert report.rstrip().endswith("rolling-restart: ok"), report
            for node in ("node1", "node2"):
                assert f"{node}: out of nginx" in report and f"{node}: back in nginx" in report, report
            assert report.index("node1: back in nginx") < report.index("node2: out of nginx"), report

            acked_at_end = {c.name: len(c.acked) for c in clients}
            await until(lambda: all(c.connections >= 2 and len(c.acked) >= acked_at_end[c.name] + AFTER
                                    for c in clients), "every client back and chatting after the restart")
            for client in clients:
                client.stop_sending.set()
            await until(lambda: all(c.idle for c in clients), "every client's last SEND answered")

            # Quiet now: every client must reach its room's stored head, and only that.
            stored = {room: await history(http, room) for room in rooms}
            heads = {room: len(messages) for room, messages in stored.items()}
            await until(lambda: all(len(c.seqs) >= heads[c.room] for c in clients), "every client at the head")
            received = {c.name: list(c.seqs) for c in clients}   # closing them below adds QUIT notices
            again = {room: len(await history(http, room)) for room in rooms}
            assert again == heads, "the rooms moved after the senders stopped"
        finally:
            for client in clients:
                client.stop_sending.set()
                client.stop.set()
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)
        for client, result in zip(clients, done, strict=True):
            assert result is None, f"{client.name}: {result!r}"

    after = json.loads(state_file.read_text())
    for old, new in zip(before["nodes"], after["nodes"], strict=True):
        assert old["node_id"] == new["node_id"] and old["url"] == new["url"]
        assert old["pid"] != new["pid"], "a node was not replaced"

    for room, messages in stored.items():
        seqs = [m["seq"] for m in messages]
        assert seqs == list(range(1, len(seqs) + 1)), f"room {room}'s stored seqs have a gap"
        talk_ids = Counter(m.get("clientMsgId") for m in messages if m["type"] == "TALK")
        acked = [cid for c in clients if c.room == room for cid in c.acked]
        doubled = [cid for cid in acked if talk_ids[cid] != 1]
        assert not doubled, f"acknowledged but not stored exactly once: {doubled[:10]}"
        assert set(talk_ids) == set(acked), f"stored but never acknowledged: {sorted(set(talk_ids) - set(acked))[:10]}"

    for client in clients:
        n = heads[client.room]
        seqs = received[client.name]
        duplicates = [seq for seq, count in Counter(seqs).items() if count > 1]
        assert not duplicates, f"{client.name} got duplicates {duplicates[:10]}"
        assert seqs == list(range(1, n + 1)), (
            f"{client.name}: missing {sorted(set(range(1, n + 1)) - set(seqs))[:10]}, {len(seqs)} for {n}")
        assert client.connections >= 2, f"{client.name} never lost its node"
        assert len(client.outages) == client.connections - 1
        assert max(client.outages) < RECONNECT_BOUND_S, (client.name, client.outages)
        assert client.failed_attempts == 0, f"{client.name}: a reconnect reached a node that was going away"
        assert set(client.close_codes) == {1012}, (client.name, client.close_codes)
        assert set(client.errors) == {SHUTTING_DOWN}, (client.name, client.errors)

    outages = [o for c in clients for o in c.outages]
    print(f"rolling restart {restart_s:.1f} s; {sum(len(c.acked) for c in clients)} messages acknowledged; "
          f"{len(outages)} reconnects, longest outage {max(outages):.2f} s; "
          f"{sum(c.resent for c in clients)} SENDs repeated after a lost connection")
