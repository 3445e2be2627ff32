"""The Spring migration of docs/migrating-from-spring.md, step by step, on one real Redis.

Two real gateway processes share a redis-server and a database. A "Spring server" is what a Spring
server of the reference does on the bus, done with raw redis-py: a ``RedisMessageListenerContainer``
on its topic (``ChannelTopic(roomId)`` in the seed's generation, ``ChannelTopic("chatroom")`` in the
reference master) whose listener reads the payload with Jackson into a ChatMessage (unknown
properties ignored, as Spring Boot configures Jackson; a payload that is not JSON fails), and
``convertAndSend(topic, chatMessage)`` with ``Jackson2JsonRedisSerializer`` (compact UTF-8 JSON, fields
in declaration order).

The steps, each checked by what gateway subscribers on both nodes receive, what the Spring side reads
from Redis and what the database holds:

0. a room imported from Spring (a row inserted into ``rooms`` with Spring's UUID, as the guide's SQL
   does) is served by the gateway nodes;
1. mixed fleet, ``redis_payload=spring``: a Spring server's messages reach gateway subscribers as-is
   and are not stored; gateway messages are stored once, sequenced, and read by the Spring listener;
2. the Spring server is gone: gateway nodes alone, still Spring's payload;
3. ``redis_payload=envelope`` node by node: while one node publishes the envelope and the other the
   bare JSON, every gateway subscriber still gets everything once, in seq order; the envelope is
   unreadable for a Spring listener (why it waits until the last Spring server is gone);
4. rollback: back to ``spring`` node by node, then a Spring server listens and publishes again, and
   both directions work.

And the guide's SQL for a JPA fork's tables, run as printed there on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.cluster.conftest import ROOM_PREFIX, Cluster, chat_body
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import eventually
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

SPRING_FIELDS = ("type", "roomId", "sender", "message", "userCount")   # ChatMessage, declaration order
ENVELOPE_MAGIC = b"GW2\x1f"
TIMEOUT_S = 30.0


def jackson_read(raw: bytes) -> dict[str, Any]:
    """What Spring's listener gets from ``objectMapper.readValue(body, ChatMessage.class)``: the known
    properties (unknown ones ignored); ValueError when the payload is not a ChatMessage JSON."""
    value = json.loads(raw.decode("utf-8"))
    if not isinstance(value, dict) or value.get("type") not in ("ENTER", "QUIT", "TALK"):
        raise ValueError(f"not a ChatMessage: {raw[:80]!r}")
    return {name: value.get(name, 0 if name == "userCount" else None) for name in SPRING_FIELDS}


class SpringServer:
    """One Spring server's Redis side (see the module docstring), for one room."""

    def __init__(self, redis_url: str, mode: str, room: str) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub()
        self.channel = room if mode == "room" else "chatroom"
        self.room = room
        self.raw: list[bytes] = []            # every payload seen on the topic, in order
        self.unreadable: list[bytes] = []     # payloads Jackson would fail on

    async def start(self) -> SpringServer:
        await self.pubsub.subscribe(self.channel)
        confirmed = await self.pubsub.get_message(timeout=TIMEOUT_S)
        assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
        return self

    async def publish(self, sender: str, text: str) -> dict[str, Any]:
        message = {"type": "TALK", "roomId": self.room, "sender": sender, "message": text, "userCount": 0}
        payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        await self.client.publish(self.channel, payload)
        return message

    async def read(self, text: str) -> dict[str, Any]:
        """Listen until the ChatMessage with ``message == text`` arrives; return what Jackson read."""
        async def arrived() -> dict[str, Any] | None:
            raw = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if raw is None:
                return None
            data = bytes(raw["data"])
            self.raw.append(data)
            try:
                message = jackson_read(data)
            except ValueError:
                self.unreadable.append(data)
                return None
            return message if message["message"] == text else None
        return await eventually(arrived, f"the Spring listener reads {text!r}", timeout_s=TIMEOUT_S)

    async def next_raw(self) -> bytes:
        """The next payload on the topic, whatever it is."""
        async def arrived() -> bytes | None:
            raw = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            return None if raw is None else bytes(raw["data"])
        data = await eventually(arrived, "a payload on the topic", timeout_s=TIMEOUT_S)
        self.raw.append(data)
        return data

    async def stop(self) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()


def import_spring_room(database_url: str, room_id: str, name: str) -> None:
    """The guide's room import, on the test's SQLite database: Spring's roomId and name, no messages."""
    path = database_url.split(":///", 1)[1]
    created = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO rooms (room_id, name, created_at, last_seq) VALUES (?, ?, ?, 0)",
                   (room_id, name, created))


async def subscribers(cluster: Cluster, room: str, after: int) -> list[WsStompClient]:
    """One anonymous subscriber per node (no ENTER notices), resuming after seq ``after``."""
    out = []
    for node in range(len(cluster.nodes)):
        ws = await cluster.client(node)
        await ws.subscribe(ROOM_PREFIX + room, "room", extra={"x-resume-after": str(after)})
        out.append(ws)
    return out


async def gateway_send(cluster: Cluster, node: int, room: str, text: str) -> None:
    ws = await cluster.client(node, login=f"gw-user-{node}")
    await ws.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "r",
                                 "content-type": "application/json"}, chat_body(room, text))
    frame = await ws.next_frame(TIMEOUT_S)
    assert frame.command == "RECEIPT", frame
    await ws.close()


async def received(ws: WsStompClient, count: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        frame = await ws.next_frame(TIMEOUT_S)
        assert frame.command == "MESSAGE", frame
        body = json.loads(frame.body)
        if frame.get("x-seq") is not None:
            assert int(frame.get("x-seq")) == body["seq"]
        out.append(body)
    return out


async def restart(node: GatewayProcess, **settings: Any) -> None:
    """A rolling-restart step for one node: drain (SIGTERM), start again with ``settings`` changed."""
    node.stop()
    node.settings.update(settings)
    node.start(wait=False)
    node.wait_ready(60)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["single", "room"])
async def test_migration_steps_and_rollback_on_one_redis(cluster_factory: Any, redis: RedisServer,
                                                         mode: str) -> None:
    cluster = await cluster_factory(2, redis=redis, settings={"redis_channel_mode": mode,
                                                              "redis_payload": "spring"})
    room = str(uuid4())                         # a room Spring created: its UUID is kept
    import_spring_room(cluster.database_url, room, "from spring")
    assert (await cluster.get(f"/chat/room/{room}", 1))["name"] == "from spring"
    stored: list[str] = []                      # texts the gateway must have stored, in seq order

    async def check_history() -> None:
        history = await cluster.history(room)
        assert [m["message"] for m in history] == stored
        assert [m["seq"] for m in history] == list(range(1, len(stored) + 1))

    # --- step 1: Spring and gateway nodes on one Redis, Spring's channels and payload ---------------
    spring = await SpringServer(redis.url, mode, room).start()
    listeners = await subscribers(cluster, room, after=0)
    from_spring = await spring.publish("spring-user", "안녕 from a Spring server")
    for ws in listeners:
        assert await received(ws, 1) == [from_spring]          # as-is: no id, no seq, not stored
    for node in (0, 1):
        text = f"step 1 from gateway node {node}"
        await gateway_send(cluster, node, room, text)
        stored.append(text)
        read = await spring.read(text)
        assert read == {"type": "TALK", "roomId": room, "sender": f"gw-user-{node}", "message": text,
                        "userCount": read["userCount"]}
        for ws in listeners:
            assert [m["message"] for m in await received(ws, 1)] == [text]
    assert spring.unreadable == []
    await check_history()
    await spring.stop()

    # --- step 2: the last Spring server is gone; gateway nodes, still Spring's payload ---------------
    monitor = await SpringServer(redis.url, mode, room).start()   # reads the bus as Spring would
    for node in (1, 0):
        text = f"step 2 from gateway node {node}"
        await gateway_send(cluster, node, room, text)
        stored.append(text)
        await monitor.read(text)
        for ws in listeners:
            got = await received(ws, 1)
            assert [m["message"] for m in got] == [text] and got[0]["seq"] == len(stored)
    await check_history()

    # --- step 3: redis_payload=envelope, node by node -------------------------------------------------
    await restart(cluster.nodes[0], redis_payload="envelope")
    listeners = await subscribers(cluster, room, after=len(stored))
    for node in (0, 1, 0, 1):
        text = f"step 3a from gateway node {node} ({'envelope' if node == 0 else 'spring'} payload)"
        await gateway_send(cluster, node, room, text)
        stored.append(text)
        for ws in listeners:
            got = await received(ws, 1)
            assert [m["message"] for m in got] == [text] and got[0]["seq"] == len(stored)
        if node == 1:
            await monitor.read(text)                  # node 1 still publishes what Spring reads
    assert len(monitor.unreadable) == 2 and all(raw.startswith(ENVELOPE_MAGIC) for raw in monitor.unreadable)
    await restart(cluster.nodes[1], redis_payload="envelope")
    listeners = await subscribers(cluster, room, after=len(stored))
    for node in (1, 0):
        text = f"step 3b from gateway node {node} (envelope payload)"
        await gateway_send(cluster, node, room, text)
        stored.append(text)
        for ws in listeners:
            got = await received(ws, 1)
            assert [m["message"] for m in got] == [text] and got[0]["seq"] == len(stored)
        raw = await monitor.next_raw()
        assert raw.startswith(ENVELOPE_MAGIC) and text.encode() in raw, raw
    await check_history()
    await monitor.stop()

    # --- step 4: rollback: spring payload node by node, then a Spring server comes back ----------------
    await restart(cluster.nodes[0], redis_payload="spring")
    await restart(cluster.nodes[1], redis_payload="spring")
    spring = await SpringServer(redis.url, mode, room).start()
    listeners = await subscribers(cluster, room, after=len(stored))
    for node in (0, 1):
        text = f"step 4 from gateway node {node} after the rollback"
        await gateway_send(cluster, node, room, text)
        stored.append(text)
        assert (await spring.read(text))["sender"] == f"gw-user-{node}"
        for ws in listeners:
            got = await received(ws, 1)
            assert [m["message"] for m in got] == [text] and got[0]["seq"] == len(stored)
    back = await spring.publish("spring-user", "Spring is back")
    for ws in listeners:
        assert await received(ws, 1) == [back]
    assert spring.unreadable == []
    await spring.stop()
    await check_history()


def guide_sql() -> str:
    """The JPA import SQL block of docs/migrating-from-spring.md, as printed there."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "migrating-from-spring.md").read_text()
    match = re.search(r"```sql\n(.*?)```", text, re.S)
    assert match is not None, "the guide has no SQL block"
    return match.group(1)


@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_the_guides_jpa_import_gives_rooms_with_history_that_continue_in_sequence(
        cluster_factory: Any) -> None:
    """A JPA fork's tables (ordinal enum, a NULL timestamp, two rooms) imported with the guide's SQL:
    the gateway serves the rooms with their history numbered 1..n in Spring's id order, and the next
    message of a room gets n + 1."""
    cluster = await cluster_factory(1, database="postgres")
    one, two = str(uuid4()), str(uuid4())
    db = await asyncpg.connect(cluster.database_url.replace("+asyncpg", ""))
    try:
        await db.execute("""
            CREATE TABLE chat_room (room_id varchar(255) PRIMARY KEY, name varchar(255));
            CREATE TABLE chat_message (id bigserial PRIMARY KEY, type smallint, room_id varchar(255),
                                       sender varchar(255), message varchar(255), created_at timestamp)""")
        await db.executemany("INSERT INTO chat_room VALUES ($1, $2)", [(one, "room one"), (two, "room two's")])
        await db.executemany(
            "INSERT INTO chat_message (type, room_id, sender, message, created_at) VALUES ($1, $2, $3, $4, $5)",
            [(0, one, "[알림]", "alice님이 방에 입장했습니다.", datetime(2024, 1, 1, 12, 0)),
             (2, two, "bob", "hi two", datetime(2024, 1, 1, 12, 1)),
             (2, one, "alice", "hello one", None),
             (1, one, "[알림]", "alice님이 방에서 나갔습니다.", datetime(2024, 1, 1, 12, 3))])
        await db.execute(guide_sql())
    finally:
        await db.close()

    assert (await cluster.get(f"/chat/room/{one}"))["lastSeq"] == 3
    assert (await cluster.get(f"/chat/room/{two}"))["name"] == "room two's"
    history = await cluster.history(one)
    assert [(m["seq"], m["type"], m["sender"], m["message"]) for m in history] == [
        (1, "ENTER", "[알림]", "alice님이 방에 입장했습니다."), (2, "TALK", "alice", "hello one"),
        (3, "QUIT", "[알림]", "alice님이 방에서 나갔습니다.")]
    assert [m["message"] for m in await cluster.history(two)] == ["hi two"]

    listener = await cluster.client(0)
    await listener.subscribe(ROOM_PREFIX + one, "room", extra={"x-resume-after": "1"})
    replayed = await received(listener, 2)
    assert [m["seq"] for m in replayed] == [2, 3]
    await gateway_send(cluster, 0, one, "the first message after the import")
    live = await received(listener, 1)
    assert live[0]["seq"] == 4 and live[0]["message"] == "the first message after the import"
