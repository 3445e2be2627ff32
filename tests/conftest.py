"""Fixtures shared by more than one test package: a Redis Cluster (3 primaries + 3 replicas) and a
Sentinel group (1 primary, 1 replica, 3 Sentinels), each started once per test module; ``make_server``,
real chat servers on one migrated SQLite file (tests/chat, tests/test_metrics.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.app import create_app
from gateway.chat.migrations import upgrade
from gateway.settings import load_settings
from tests.support.live_server import LiveServer
from tests.support.redis_cluster import RedisClusterProcesses, RedisSentinelGroup
from tests.support.redis_server import RedisServerMissing

Processes = TypeVar("Processes", RedisClusterProcesses, RedisSentinelGroup)


def _running(processes: Processes) -> Iterator[Processes]:
    try:
        processes.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    yield from _running(RedisClusterProcesses())


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[RedisSentinelGroup]:
    yield from _running(RedisSentinelGroup())


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts real chat servers (memory broker) on one migrated SQLite file, with settings overrides."""
    servers: list[LiveServer] = []

    async def make(**overrides: Any) -> LiveServer:
        # These tests push thousands of SENDs from one session to exercise pipelining, storage and
        # resume; the SEND rate limit (50/s, burst 500 by default) is tested in tests/limits.
        overrides.setdefault("send_rate_per_s", 0)
        url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
        await asyncio.to_thread(upgrade, url)
        settings = load_settings(environ={}, database_url=url, heartbeat_receive_ms=0, node_id="test-node",
                                 db_busy_timeout_s=120, **overrides)
        server = LiveServer(create_app(settings)).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
