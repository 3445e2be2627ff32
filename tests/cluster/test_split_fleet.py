"""A node refuses to start when it would split delivery with a live node on the same database.

Real ``chat-gateway serve`` processes on one database — a migrated SQLite file and a throw-away
PostgreSQL database, every test on both — and real redis-servers. A refused node exits with status 3
(uvicorn's startup failure) and ONE line naming the other node, what differs and what to do, without
a traceback; compatible nodes start; a node stopped cleanly, an earlier run of the same node id and a
stale entry (a crashed node's, written here with an old ``last_seen``) do not block anyone.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.chat.models import gateway_nodes
from gateway.chat.repository import make_engine
from tests.support.gateway_process import GatewayProcess, run_cli
from tests.support.polling import eventually
from tests.support.postgres import temporary_database
from tests.support.redis_server import RedisServer

#: uvicorn's exit status when the application's startup fails.
STARTUP_FAILURE = 3
#: After a clean shutdown uvicorn re-raises the SIGTERM it handled.
CLEAN_STOP = (0, -signal.SIGTERM)

BACKENDS = [pytest.param("sqlite", id="sqlite"),
            pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}"
        migrated = run_cli("migrate", "--database-url", url)
        assert migrated.returncode == 0, migrated.stderr
        yield url
    else:
        async with temporary_database() as url:
            migrated = run_cli("migrate", "--database-url", url)
            assert migrated.returncode == 0, migrated.stderr
            yield url


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[Any]:
    made: list[GatewayProcess] = []

    def make(node_id: str, **settings: Any) -> GatewayProcess:
        workdir = tmp_path / f"{node_id}-{len(made)}"
        workdir.mkdir()
        process = GatewayProcess({"database_url": database_url, "node_id": node_id, "heartbeat_receive_ms": 0,
                                  **settings}, workdir=workdir)
        made.append(process)
        return process

    try:
        yield make
    finally:
        for process in made:
            process.cleanup()


def refusal(process: GatewayProcess) -> str:
    """Start ``process``, expect it to exit with the startup failure; return its one refusal line."""
    process.start(wait=False)
    assert process.process is not None
    code = process.process.wait(120)
    log = process.log_text()
    assert code == STARTUP_FAILURE, log
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "refusing to start" in line]
    assert len(lines) == 1, log
    return lines[0]


async def node_ids(database_url: str) -> set[str]:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            return set((await conn.execute(sa.select(gateway_nodes.c.node_id))).scalars())
    finally:
        await engine.dispose()


async def test_a_second_node_without_redis_is_refused(node: Any, database_url: str) -> None:
    first = node("web-1").start()
    line = refusal(node("web-2"))
    assert "refusing to start: node web-1 (seen " in line
    assert "without Redis" in line and "--redis-url" in line and "or stop web-1" in line
    # The refused node left nothing behind; the running one still serves.
    assert first.running and await node_ids(database_url) == {"web-1"}
    first.wait_ready()


async def test_a_node_with_redis_beside_one_without_is_refused(node: Any, redis: RedisServer) -> None:
    node("plain").start()
    line = refusal(node("bused", redis_url=redis.url))
    assert "node plain (seen " in line and "cannot see this node's messages" in line and "--redis-url" in line


async def test_nodes_on_one_redis_start(node: Any, redis: RedisServer, database_url: str) -> None:
    first = node("a", redis_url=redis.url).start()
    second = node("b", redis_url=redis.url).start()
    first.wait_ready()
    second.wait_ready()
    assert await node_ids(database_url) == {"a", "b"}
    assert second.stop() in CLEAN_STOP
    assert await node_ids(database_url) == {"a"}  # a clean stop removes the node's entry


async def test_another_channel_prefix_is_refused(node: Any, redis: RedisServer) -> None:
    node("a", redis_url=redis.url, redis_channel_prefix="p1").start()
    line = refusal(node("b", redis_url=redis.url, redis_channel_prefix="p2"))
    assert "node a (seen " in line and "redis_channel_prefix 'p1', this node 'p2'" in line
    assert "--redis-channel-prefix" in line


async def test_a_node_stopped_cleanly_does_not_block(node: Any, database_url: str) -> None:
    first = node("old").start()
    assert first.stop() in CLEAN_STOP
    assert await node_ids(database_url) == set()
    node("new").start().wait_ready()


async def test_a_crashed_node_restarting_under_its_own_id_starts(node: Any, database_url: str) -> None:
    first = node("web-1").start()
    first.kill()  # no clean stop: its entry is still live
    assert await node_ids(database_url) == {"web-1"}
    first.start().wait_ready()
    line = refusal(node("web-2"))  # and the new run is registered and checked like any node
    assert "node web-1 (seen " in line


async def test_a_stale_entry_does_not_block(node: Any, database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            old = datetime.now(UTC) - timedelta(minutes=10)
            await conn.execute(gateway_nodes.insert().values(
                node_id="crashed", incarnation="x", redis=None, channel_mode="room", channel_prefix="",
                single_channel="chatroom", sharded_pubsub=False, payload="spring", started_at=old, last_seen=old))
    finally:
        await engine.dispose()
    node("fresh").start().wait_ready()
    assert await node_ids(database_url) == {"fresh"}  # the stale entry was dropped


async def test_workers_of_one_node_are_compatible_nodes(node: Any, redis: RedisServer, database_url: str) -> None:
    served = node("", redis_url=redis.url, workers=2).start()
    served.wait_ready(60)

    async def two_workers() -> bool:
        return len(await node_ids(database_url)) == 2

    await eventually(two_workers, "both workers registered", timeout_s=60)
    line = refusal(node("plain"))
    assert "refusing to start: node " in line and "cannot see" not in line and "without Redis" not in line
    assert "this node has no Redis" in line
