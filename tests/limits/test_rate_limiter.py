"""gateway.limits on its own: the local bucket, the refusal meter, and the Redis-backed limiter against
a real redis-server (one Redis call per sync interval whatever the message rate, a cluster-wide bucket
shared by two limiters, per-node buckets while Redis is unreachable)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from gateway.limits import AddressCounter, LocalRateLimiter, RedisRateLimiter, RefusalMeter, address_of
from tests.support.gateway_process import free_port
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_local_bucket_gives_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(2.0, 5, clock=clock)
    assert [limiter.try_acquire("u") for _ in range(6)] == [True] * 5 + [False]
    clock.now += 1.0                      # 2 tokens refilled
    assert [limiter.try_acquire("u") for _ in range(3)] == [True, True, False]
    assert limiter.try_acquire("other") is True   # one bucket per key
    clock.now += 3600                     # never more than the burst
    assert sum(limiter.try_acquire("u") for _ in range(10)) == 5


def test_refusal_meter_closes_after_about_the_limit_within_ten_seconds() -> None:
    meter = RefusalMeter(10)
    assert not any(meter.refuse(0.0) for _ in range(10))
    assert meter.refuse(0.0)              # the 11th refusal at once
    slow = RefusalMeter(10)
    # One refusal a second is forgiven as fast as it comes: never closed.
    assert not any(slow.refuse(float(t)) for t in range(100))
    assert not any(RefusalMeter(0).refuse(0.0) for _ in range(1000))   # 0 = never close


def test_address_counter_and_address_of() -> None:
    counter = AddressCounter(2)
    assert counter.acquire("10.0.0.1") and counter.acquire("10.0.0.1")
    assert not counter.acquire("10.0.0.1")
    assert counter.acquire("10.0.0.2")
    counter.release("10.0.0.1")
    assert counter.acquire("10.0.0.1")
    assert address_of("10.1.2.3:5555") == "10.1.2.3"
    assert address_of("::1:5555") == "::1"
    assert address_of("unknown") == "unknown"


async def test_redis_limiter_makes_one_call_per_interval_not_per_message(redis_server: RedisServer) -> None:
    limiter = RedisRateLimiter(Redis.from_url(redis_server.url), 100000.0, 100000, sync_s=0.1, timeout_s=2)
    await limiter.start()
    try:
        assert await limiter.acquire("user:a") is True     # unknown key: one call
        loop = asyncio.get_running_loop()
        started = loop.time()
        granted = 0
        for i in range(20000):
            allowed = limiter.try_acquire("user:a")
            granted += bool(allowed)
            if i % 500 == 0:
                await asyncio.sleep(0.01)
        elapsed = loop.time() - started
        assert granted == 20000
        assert limiter.syncs <= elapsed / 0.1 + 3, (limiter.syncs, elapsed)
    finally:
        await limiter.stop()


async def test_two_limiters_share_one_bucket_through_redis(redis_server: RedisServer) -> None:
    a = RedisRateLimiter(Redis.from_url(redis_server.url), 0.5, 10, sync_s=0.05, timeout_s=2)
    b = RedisRateLimiter(Redis.from_url(redis_server.url), 0.5, 10, sync_s=0.05, timeout_s=2)
    await a.start()
    await b.start()
    try:
        on_a = [await a.acquire("user:x") for _ in range(10)]
        assert all(on_a)
        await asyncio.sleep(0.5)           # a reports what it spent
        on_b = [await b.acquire("user:x") for _ in range(10)]
        assert sum(on_b) <= 1, on_b       # what refilled meanwhile (0.5/s), not a fresh burst
        assert all([await b.acquire("user:y") for _ in range(10)])   # another key has its own bucket
    finally:
        await a.stop()
        await b.stop()


async def test_without_redis_the_limiter_limits_per_node_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.limits")
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    limiter = RedisRateLimiter(unreachable, 1.0, 5, sync_s=0.05, timeout_s=0.5)
    await limiter.start()
    try:
        got = [await limiter.acquire("user:z") for _ in range(8)]
        assert got == [True] * 5 + [False] * 3
        await asyncio.sleep(0.3)
        warnings = [r for r in caplog.records if "Redis sync failed" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await limiter.stop()
