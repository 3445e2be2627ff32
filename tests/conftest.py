"""Fixtures shared by more than one test package: a Redis Cluster (3 primaries + 3 replicas) and a
Sentinel group (1 primary, 1 replica, 3 Sentinels), each started once per test module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

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
