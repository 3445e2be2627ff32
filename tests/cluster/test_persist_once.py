"""The seed's bug as a regression test, on real gateway processes and a real Redis.

N messages sent through different nodes, subscribers on every node: exactly N rows, and every
subscriber receives every message exactly once, in per-room ``seq`` order. With 1 node (memory
broker), 2 and 3 nodes (Redis), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cluster.conftest import ROOM_PREFIX, chat_body, read_chat

pytestmark = pytest.mark.cluster

MESSAGES_PER_NODE = 30


async def run_scenario(cluster: Any, rooms: int = 1) -> None:
    nodes = len(cluster.nodes)
    room_ids = [await cluster.create_room(f"room{i}", node=i % nodes) for i in range(rooms)]
    # Two anonymous subscribers per node and room (anonymous: no ENTER/QUIT notices in the count).
    subscribers = []
    for room in room_ids:
        for node in range(nodes):
            for copy in range(2):
                ws = await cluster.client(node)
                await ws.subscribe(ROOM_PREFIX + room, f"s{copy}")
                subscribers.append((room, ws))
    senders = [await cluster.client(node, login=f"user{node}") for node in range(nodes)]

    async def send_all(node: int) -> None:
        ws = senders[node]
        for i in range(MESSAGES_PER_NODE):
            room = room_ids[i % rooms]
            await ws.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, f"n{node}-{i}"))

    await asyncio.gather(*(send_all(node) for node in range(nodes)))
    total = nodes * MESSAGES_PER_NODE
    per_room = {room: sum(1 for i in range(MESSAGES_PER_NODE) if room_ids[i % rooms] == room) * nodes
                for room in room_ids}

    for room, ws in subscribers:
        received = await read_chat(ws, per_room[room])
        seqs = [m["seq"] for m in received]
        assert seqs == list(range(1, per_room[room] + 1)), f"gap, duplicate or disorder: {seqs}"
        assert {m["roomId"] for m in received} == {room}

    stored: list[dict[str, Any]] = []
    for room in room_ids:
        history = await cluster.history(room)
        assert [m["seq"] for m in history] == list(range(1, per_room[room] + 1))
        stored.extend(history)
    assert len(stored) == total, "every message must be one row"
    assert sorted(m["message"] for m in stored) == sorted(
        f"n{node}-{i}" for node in range(nodes) for i in range(MESSAGES_PER_NODE))
    assert len({m["id"] for m in stored}) == total
    # Senders came from the session (login), not from the body.
    assert {m["sender"] for m in stored} == {f"user{node}" for node in range(nodes)}


@pytest.mark.parametrize("nodes", [1, 2, 3])
async def test_each_message_is_stored_once_and_delivered_once_everywhere(cluster_factory: Any, nodes: int) -> None:
    cluster = await cluster_factory(nodes)
    await run_scenario(cluster)


@pytest.mark.postgres
async def test_three_nodes_on_postgresql_two_rooms(cluster_factory: Any) -> None:
    cluster = await cluster_factory(3, database="postgres")
    await run_scenario(cluster, rooms=2)


async def test_three_nodes_on_sqlite_two_rooms(cluster_factory: Any) -> None:
    cluster = await cluster_factory(3)
    await run_scenario(cluster, rooms=2)


async def test_a_second_worker_without_redis_is_refused() -> None:
    from tests.support.gateway_process import run_cli

    result = run_cli("serve", "--workers", "2", "--port", "0")
    assert result.returncode == 2
    assert "workers > 1 needs redis_url" in result.stderr
    assert "Traceback" not in result.stderr
