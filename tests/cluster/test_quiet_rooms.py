"""A quiet room's last message reaches every node without a later message to reveal the gap.

The message is committed the way a node that dies right after its commit leaves it: the row and the
room counter are in the database (written through the real repository on the shared database), and
no publication ever reaches Redis. Real gateway processes, a real redis-server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.chat.models import MessageType, NewMessage
from gateway.chat.repository import ChatRepository, make_engine
from tests.cluster.conftest import ROOM_PREFIX, chat_body, read_chat
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.cluster


async def commit_without_publishing(database_url: str, room: str, text: str) -> int:
    engine = make_engine(database_url)
    try:
        (saved,) = await ChatRepository(engine).save_messages(
            [NewMessage(room, MessageType.TALK, "ghost", text)])
    finally:
        await engine.dispose()
    return saved.message.seq


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_quiet_rooms_last_message_arrives_within_the_bound(
        cluster_factory: Any, redis: RedisServer, database: str) -> None:
    cluster = await cluster_factory(2, redis=redis, database=database, settings={"room_head_check_s": 0.5})
    room = await cluster.create_room()
    listeners = [await cluster.client(node) for node in (0, 1)]
    for ws in listeners:
        await ws.subscribe(ROOM_PREFIX + room, "s")
    sender = await cluster.client(0)
    await sender.send_frame("SEND", {"destination": "/pub/chat/message"}, chat_body(room, "live"))
    for ws in listeners:
        frame = await ws.next_frame(20)
        assert frame.command == "MESSAGE" and frame.get("x-seq") == "1"
        assert json.loads(frame.body)["message"] == "live"
    assert await commit_without_publishing(cluster.database_url, room, "last words") == 2
    # No further traffic in the room: the head check finds seq 2 and repairs it (bound: 2 checks).
    for ws in listeners:
        got = await read_chat(ws, 1, timeout=30)
        assert [(m["seq"], m["message"]) for m in got] == [(2, "last words")]
    for node in cluster.nodes:
        assert "repairing from the database" in node.log_text()
