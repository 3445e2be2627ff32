"""gateway.chat.fleet on real databases (a SQLite file and a throw-away PostgreSQL database each).

The registry itself: register / check / heartbeat / unregister, stale rows and an earlier run of the
same node id, ages by the database's clock; and the pure compatibility rules of two fingerprints.
Whole gateway processes refusing to start are in tests/cluster/test_split_fleet.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.chat.fleet import (
    DeliveryFingerprint,
    FleetConflict,
    NodeRegistry,
    incompatibility,
    node_registry,
    redis_location,
)
from gateway.chat.models import gateway_nodes
from gateway.settings import SettingsError, load_settings
from gateway.startup import StartupRefused
from tests.support.polling import eventually

NO_REDIS = DeliveryFingerprint(redis=None, channel_mode="room", channel_prefix="", single_channel="chatroom",
                               sharded_pubsub=False, payload="spring")
REDIS_X = replace(NO_REDIS, redis="127.0.0.1:6379/0")


def registry(engine: AsyncEngine, node_id: str, fingerprint: DeliveryFingerprint, *,
             heartbeat_s: float = 5.0, stale_s: float = 30.0) -> NodeRegistry:
    return NodeRegistry(engine, node_id, fingerprint, heartbeat_s=heartbeat_s, stale_s=stale_s, timeout_s=60)


async def rows(engine: AsyncEngine) -> dict[str, dict[str, object]]:
    async with engine.connect() as conn:
        result = (await conn.execute(sa.select(gateway_nodes))).mappings().all()
    return {str(row["node_id"]): dict(row) for row in result}


async def insert_row(engine: AsyncEngine, node_id: str, fingerprint: DeliveryFingerprint,
                     last_seen: datetime) -> None:
    async with engine.begin() as conn:
        await conn.execute(gateway_nodes.insert().values(node_id=node_id, incarnation="old", started_at=last_seen,
                                                         last_seen=last_seen, **fingerprint.columns()))


# --- the rules ------------------------------------------------------------------------------------

def test_two_nodes_without_redis_are_incompatible() -> None:
    reason = incompatibility(NO_REDIS, NO_REDIS, "web-2")
    assert reason is not None and "without Redis" in reason and "--redis-url" in reason and "stop web-2" in reason


def test_redis_on_one_side_only_is_incompatible_both_ways() -> None:
    assert "this node has no Redis" in (incompatibility(NO_REDIS, REDIS_X, "b") or "")
    assert "cannot see this node's messages" in (incompatibility(REDIS_X, NO_REDIS, "b") or "")


@pytest.mark.parametrize(("theirs", "expected"), [
    (replace(REDIS_X, redis="10.0.0.9:6379/0"), "uses Redis at 10.0.0.9:6379/0, this node 127.0.0.1:6379/0"),
    (replace(REDIS_X, channel_prefix="p2"), "redis_channel_prefix 'p2', this node ''"),
    (replace(REDIS_X, channel_mode="single"), "redis_channel_mode 'single', this node 'room'"),
    (replace(REDIS_X, sharded_pubsub=True), "redis_sharded_pubsub True, this node False"),
])
def test_different_redis_or_channels_are_incompatible(theirs: DeliveryFingerprint, expected: str) -> None:
    assert expected in (incompatibility(REDIS_X, theirs, "b") or "")


def test_same_redis_and_channels_are_compatible_whatever_the_payload_form() -> None:
    assert incompatibility(REDIS_X, REDIS_X, "b") is None
    assert incompatibility(REDIS_X, replace(REDIS_X, payload="envelope"), "b") is None
    # The single channel only matters in single mode.
    assert incompatibility(REDIS_X, replace(REDIS_X, single_channel="other"), "b") is None
    single = replace(REDIS_X, channel_mode="single")
    assert "redis_single_channel 'other'" in (incompatibility(single, replace(single, single_channel="other"), "b")
                                              or "")


def test_redis_location_has_no_credentials_and_ignores_spelling() -> None:
    assert redis_location("redis://:s3cret@Redis.example:6380/2?socket_timeout=3") == "redis.example:6380/2"
    assert redis_location("redis://user:pw@localhost") == "localhost:6379/0"
    assert redis_location("unix:///run/redis.sock?db=1") == "unix:/run/redis.sock/1"
    assert (redis_location("redis+cluster://:pw@b:7001,a:7000") == redis_location("redis+cluster://a:7000,b:7001")
            == "cluster a:7000,b:7001")
    assert redis_location("redis+sentinel://:pw@s2:26380,s1/mymaster/3") == \
        "sentinel s1:26379,s2:26380 service mymaster/3"
    for url in ("redis://:s3cret@h:1/0", "redis+sentinel://u:s3cret@s:1/m", "redis+cluster://:s3cret@c:1"):
        assert "s3cret" not in redis_location(url)


def test_stale_must_exceed_heartbeat() -> None:
    with pytest.raises(SettingsError, match=r"node_stale_s .* must exceed node_heartbeat_s"):
        load_settings(environ={}, node_heartbeat_s=10, node_stale_s=10)
    settings = load_settings(environ={}, redis_url="redis://:pw@h:6379/0")
    assert (settings.node_heartbeat_s, settings.node_stale_s) == (5.0, 30.0)
    fingerprint = DeliveryFingerprint.of(settings)
    assert fingerprint.redis == "h:6379/0"
    assert issubclass(FleetConflict, StartupRefused)


# --- the registry on a database -------------------------------------------------------------------

async def test_a_second_node_without_redis_is_refused_and_leaves_no_row(engine: AsyncEngine) -> None:
    first = registry(engine, "web-1", NO_REDIS)
    await first.start()
    try:
        second = registry(engine, "web-2", NO_REDIS)
        with pytest.raises(FleetConflict) as refused:
            await second.start()
        line = str(refused.value)
        assert line.startswith("refusing to start: node web-1 (seen ")
        assert "without Redis" in line and "--redis-url" in line and "stop web-1" in line
        assert "\n" not in line
        assert set(await rows(engine)) == {"web-1"}
    finally:
        await first.stop()
    assert await rows(engine) == {}


async def test_nodes_on_one_redis_start_and_each_stop_removes_its_row(engine: AsyncEngine) -> None:
    nodes = [registry(engine, f"w{i}", REDIS_X) for i in range(3)]
    for node in nodes:
        await node.start()
    stored = await rows(engine)
    assert set(stored) == {"w0", "w1", "w2"}
    assert stored["w0"]["redis"] == "127.0.0.1:6379/0" and stored["w0"]["payload"] == "spring"
    assert [e.node_id for e in await nodes[0].live_nodes()] != []
    await nodes[1].stop()
    assert set(await rows(engine)) == {"w0", "w2"}
    for node in (nodes[0], nodes[2]):
        await node.stop()
    assert await rows(engine) == {}


async def test_another_prefix_is_refused(engine: AsyncEngine) -> None:
    first = registry(engine, "a", replace(REDIS_X, channel_prefix="p1"))
    await first.start()
    try:
        with pytest.raises(FleetConflict, match=r"node a .* uses redis_channel_prefix 'p1', this node 'p2'"):
            await registry(engine, "b", replace(REDIS_X, channel_prefix="p2")).start()
    finally:
        await first.stop()


async def test_a_stale_row_does_not_block_and_is_dropped(engine: AsyncEngine) -> None:
    await insert_row(engine, "crashed", NO_REDIS, datetime.now(UTC) - timedelta(minutes=5))
    node = registry(engine, "fresh", NO_REDIS)
    await node.start()
    try:
        assert set(await rows(engine)) == {"fresh"}
    finally:
        await node.stop()


async def test_an_earlier_run_of_the_same_node_id_is_replaced(engine: AsyncEngine) -> None:
    # A crash a moment ago: the row is still live, but it is this node's own.
    await insert_row(engine, "web-1", REDIS_X, datetime.now(UTC))
    node = registry(engine, "web-1", NO_REDIS)
    await node.start()
    try:
        stored = await rows(engine)
        assert set(stored) == {"web-1"}
        assert stored["web-1"]["incarnation"] == node.incarnation and stored["web-1"]["redis"] is None
    finally:
        await node.stop()


async def test_ages_come_from_the_database_clock(engine: AsyncEngine) -> None:
    # A row whose last_seen lies in the node's future (another machine's clock would not matter:
    # the registry writes the database's time); an age is never negative.
    await insert_row(engine, "ahead", REDIS_X, datetime.now(UTC) + timedelta(seconds=20))
    node = registry(engine, "me", REDIS_X)
    await node.register()
    try:
        (entry,) = await node.live_nodes()
        assert entry.node_id == "ahead" and entry.age_s == 0.0
        async with engine.connect() as conn:
            mine = (await conn.execute(sa.select(gateway_nodes.c.last_seen).where(
                gateway_nodes.c.node_id == "me"))).scalar_one()
        assert mine.tzinfo is not None
        assert abs((mine - datetime.now(UTC)).total_seconds()) < 600  # the database's own now(), in UTC
    finally:
        await node.stop()


async def test_heartbeats_refresh_last_seen_and_re_register_a_dropped_row(
        engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    node = registry(engine, "beating", REDIS_X, heartbeat_s=0.05, stale_s=30)
    await node.start()
    try:
        first = (await rows(engine))["beating"]["last_seen"]
        await eventually(lambda: _last_seen_after(engine, "beating", first), "a refreshed last_seen", timeout_s=30)
        # Another node dropped the row as stale (a long outage) and an incompatible one started.
        async with engine.begin() as conn:  # one transaction: the node sees both or neither
            await conn.execute(gateway_nodes.delete())
            await conn.execute(gateway_nodes.insert().values(
                node_id="intruder", incarnation="other", started_at=datetime.now(UTC), last_seen=datetime.now(UTC),
                **NO_REDIS.columns()))
        with caplog.at_level("WARNING", logger="gateway.chat.fleet"):
            await eventually(lambda: _has_row(engine, "beating"), "the row registered again", timeout_s=30)
            await eventually(lambda: any("node intruder" in r.getMessage() and r.levelname == "ERROR"
                                         for r in caplog.records), "the conflict logged", timeout_s=30)
    finally:
        await node.stop()
    assert set(await rows(engine)) == {"intruder"}


async def test_a_displaced_process_stops_refreshing_and_does_not_delete_the_new_row(engine: AsyncEngine) -> None:
    old = registry(engine, "same", REDIS_X, heartbeat_s=0.05)
    await old.start()
    new = registry(engine, "same", REDIS_X)
    await new.start()
    try:
        await eventually(lambda: old._displaced, "the old process to notice", timeout_s=30)
        await old.stop()
        stored = await rows(engine)
        assert stored["same"]["incarnation"] == new.incarnation
    finally:
        await new.stop()


async def test_a_database_failure_at_registration_is_one_line() -> None:
    from gateway.chat.repository import make_engine

    engine = make_engine("sqlite+aiosqlite:////nonexistent-dir/x.db")  # cannot be opened
    try:
        node = registry(engine, "n", NO_REDIS)
        with pytest.raises(StartupRefused, match=r"^refusing to start: could not record node n in the database"):
            await node.start()
    finally:
        await engine.dispose()


async def test_node_registry_reads_the_settings(engine: AsyncEngine, database_url: str) -> None:
    settings = load_settings(environ={}, database_url=database_url, node_id="n1", node_heartbeat_s=1,
                             node_stale_s=4, redis_url="redis://h:1/0", redis_channel_prefix="x:")
    node = node_registry(engine, settings)
    assert (node.node_id, node.heartbeat_s, node.stale_s) == ("n1", 1, 4)
    assert node.stop_timeout_s == settings.drain_timeout_s < node.timeout_s  # shutdown waits no longer than a drain
    assert node.fingerprint == replace(REDIS_X, redis="h:1/0", channel_prefix="x:")


async def _last_seen_after(engine: AsyncEngine, node_id: str, before: object) -> bool:
    stored = await rows(engine)
    return node_id in stored and stored[node_id]["last_seen"] > before  # type: ignore[operator]


async def _has_row(engine: AsyncEngine, node_id: str) -> bool:
    return node_id in await rows(engine)
