"""Database failures are values, not crashes: real gateway processes on a real PostgreSQL database.

Two faults, each held for several seconds while a client keeps sending with receipts and client
message ids: the database refusing connections (``ALLOW_CONNECTIONS false`` and its backends
terminated) and a table lock held by another session. Every SEND gets a RECEIPT or the retryable
ERROR ``not stored, retry``; the sessions stay open; nothing is delivered that is not stored;
``/readyz`` follows the database; a SUBSCRIBE works while the database is down.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from tests.cluster.conftest import ROOM_PREFIX, Cluster, chat_body
from tests.support.postgres import ADMIN_URL
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

OUTAGE_S = 6.0
# The sender retries as fast as the refusals come: the per-address SEND rate limit is not under test here.
FAST_DB = {"db_connect_timeout_s": 1, "db_statement_timeout_s": 1, "send_rate_per_s": 0}


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/readyz", timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def database_name(cluster: Cluster) -> str:
    return cluster.database_url.rsplit("/", 1)[1]


@asynccontextmanager
async def refusing_connections(name: str) -> AsyncIterator[None]:
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


@asynccontextmanager
async def table_locked(cluster: Cluster) -> AsyncIterator[None]:
    conn = await asyncpg.connect(cluster.database_url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


class Sender:
    """Sends numbered TALKs with receipts and client ids; records each SEND's answer."""

    def __init__(self, ws: WsStompClient, room: str) -> None:
        self.ws = ws
        self.room = room
        self.sent = 0
        self.answers: dict[str, str] = {}     # receipt id -> "RECEIPT" or the ERROR's message

    async def send(self) -> str:
        receipt = f"m{self.sent}"
        self.sent += 1
        await self.ws.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": receipt},
                                 chat_body(self.room, receipt, clientMsgId=receipt))
        return receipt

    async def answer(self, receipt: str, timeout: float = 30.0) -> str:
        while receipt not in self.answers:
            frame = await self.ws.next_frame(timeout)
            if frame.command in ("RECEIPT", "ERROR"):
                rid = frame.get("receipt-id") or ""
                self.answers[rid] = "RECEIPT" if frame.command == "RECEIPT" else (frame.get("message") or "")
        return self.answers[receipt]


async def delivered(ws: WsStompClient, quiet_s: float = 3.0) -> list[dict[str, Any]]:
    out = []
    while True:
        try:
            frame = await ws.next_frame(quiet_s)
        except TimeoutError:
            return out
        if frame.command == "MESSAGE":
            out.append(json.loads(frame.body))


async def run_outage(cluster: Cluster, outage: Callable[[], Any],
                     during: Callable[[], Awaitable[None]] | None = None) -> None:
    room = await cluster.create_room()
    listener = await cluster.client(1)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    sender = Sender(await cluster.client(0), room)
    assert await sender.answer(await sender.send()) == "RECEIPT"
    outcomes: list[str] = []
    async with outage():
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() < end:
            outcomes.append(await sender.answer(await sender.send()))
        if during is not None:
            await during()
    assert set(outcomes) <= {"RECEIPT", "not stored, retry"}, outcomes
    assert "not stored, retry" in outcomes
    # The same session is still open and stores again once the database answers.
    deadline = time.monotonic() + 30
    while await sender.answer(await sender.send()) != "RECEIPT":
        assert time.monotonic() < deadline, "the database did not come back for the sender"
        await asyncio.sleep(0.2)
    stored = {m["clientMsgId"] for m in await cluster.history(room)}
    acknowledged = {rid for rid, answer in sender.answers.items() if answer == "RECEIPT"}
    refused = {rid for rid, answer in sender.answers.items() if answer != "RECEIPT"}
    assert acknowledged <= stored and not (refused & stored)
    got = await delivered(listener)
    assert {m["clientMsgId"] for m in got} <= stored          # nothing delivered that is not stored
    assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)
    assert acknowledged <= {m["clientMsgId"] for m in got}     # and every stored one was delivered
    for node in cluster.nodes:
        log = node.log_text()
        assert "Traceback" not in log
        assert log.count("database unavailable") <= 3         # one line per burst, not one per SEND


@pytest.fixture
async def pg_cluster(cluster_factory: Any, redis: RedisServer) -> Cluster:
    cluster: Cluster = await cluster_factory(2, database="postgres", redis=redis, settings=FAST_DB)
    return cluster


async def test_a_database_refusing_connections(pg_cluster: Cluster) -> None:
    url = pg_cluster.nodes[0].url

    async def while_down() -> None:
        # /readyz follows the database, and a SUBSCRIBE still works (its ENTER is best effort).
        status, body = await asyncio.to_thread(readyz, url)
        assert status == 503 and body["checks"]["database"] == "down", body
        assert body["checks"]["redis"] == "up" and body["checks"]["listener"] == "up"
        late = await pg_cluster.client(0, login="late")
        await late.subscribe(ROOM_PREFIX + "any-room-id", "late")

    await run_outage(pg_cluster, lambda: refusing_connections(database_name(pg_cluster)), while_down)
    status, body = await asyncio.to_thread(readyz, url)
    assert status == 200 and body["checks"]["database"] == "up", body


async def test_a_table_lock(pg_cluster: Cluster) -> None:
    await run_outage(pg_cluster, lambda: table_locked(pg_cluster))
