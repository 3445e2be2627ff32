"""The limits' Lua scripts on a real Redis Cluster (3 primaries + 3 replicas): every key of one script
shares a hash tag, so the cluster runs it on one shard. Two nodes' NodeLimits in one process share
a user's SEND bucket and session count through the cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.limits import NodeLimits, create_limits
from gateway.settings import load_settings
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServerMissing

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses()
    try:
        processes.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield processes
    finally:
        processes.close()


def _limits(url: str, node: str) -> NodeLimits:
    return create_limits(load_settings(environ={}, redis_url=url, node_id=node, send_rate_per_s=0.5,
                                       send_burst=10, max_sessions_per_user=3, rate_limit_sync_s=0.05))


async def test_send_bucket_and_session_count_are_shared_through_a_redis_cluster(
        redis_cluster: RedisClusterProcesses) -> None:
    a, b = _limits(redis_cluster.url, "node-a"), _limits(redis_cluster.url, "node-b")
    await a.start()
    await b.start()
    try:
        assert a.rate is not None and b.rate is not None
        assert all([await a.rate.acquire("user:carol") for _ in range(10)])
        await asyncio.sleep(0.5)    # node a reports what carol spent
        assert sum([await b.rate.acquire("user:carol") for _ in range(10)]) <= 1
        assert all([await b.rate.acquire("user:dave") for _ in range(10)])

        assert await a.sessions.acquire("carol", 3) and await a.sessions.acquire("carol", 3)
        assert await b.sessions.acquire("carol", 3)
        assert not await b.sessions.acquire("carol", 3)     # 3 across both nodes
        assert not await a.sessions.acquire("carol", 3)
        a.sessions.release("carol")
        for _ in range(100):
            if await b.sessions.acquire("carol", 3):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the released session was never freed in the cluster")
    finally:
        await a.stop()
        await b.stop()
