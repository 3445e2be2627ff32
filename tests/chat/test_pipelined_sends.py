"""Pipelined SENDs and the node's backpressure, over a real server on a real SQLite file.

A session may have ``send_window`` SENDs in flight; they join the same group commits, their RECEIPTs
leave in SEND order and the room's seq order follows the send order. The node holds at most
``max_pending_sends`` uncommitted SENDs: past that it stops reading from sending sessions. A SEND
that was read is committed even when its session goes away before the commit.

The database is held with a real write lock (``BEGIN IMMEDIATE`` on another connection) to make
commits wait; every step waits for an observable event, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.chat.service import ChatService
from tests.chat.test_chat_service import ROOM_PREFIX, client, create_room, db_count
from tests.support.live_server import LiveServer
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient, frame

SEND_HEADERS = {"destination": "/pub/chat/message", "content-type": "application/json"}


def chat_service(server: LiveServer) -> ChatService:
    assert server.gateway.chat is not None
    return server.gateway.chat.service


@contextmanager
def write_lock(server: LiveServer) -> Iterator[None]:
    """Hold the SQLite database's write lock from another connection: commits wait until released."""
    path = server.gateway.settings.database_url.split("///", 1)[1]
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()


def sends(room: str, tag: str, count: int, *, receipts: bool = True) -> bytes:
    """``count`` SEND frames in one WebSocket message (what a pipelining client writes)."""
    out = []
    for i in range(count):
        headers = dict(SEND_HEADERS)
        if receipts:
            headers["receipt"] = f"{tag}-{i}"
        body = json.dumps({"type": "TALK", "roomId": room, "message": f"{tag}-{i}"}).encode()
        out.append(frame("SEND", headers, body))
    return b"".join(out)


async def receipts(ws: WsStompClient, count: int) -> list[str]:
    out = []
    while len(out) < count:
        got = await ws.next_frame(60)
        assert got.command == "RECEIPT", got
        out.append(got.get("receipt-id") or "")
    return out


async def messages(ws: WsStompClient, count: int) -> list[dict[str, Any]]:
    out = []
    while len(out) < count:
        got = await ws.next_frame(60)
        assert got.command == "MESSAGE", got
        out.append(json.loads(got.body))
    return out


async def test_receipts_leave_in_send_order_and_seq_follows_it(make_server: Any) -> None:
    server = await make_server(send_window=64)
    room = await create_room(server)
    listener = await client(server)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    sender = await client(server)
    writer = chat_service(server).writer
    with write_lock(server):
        await sender.send(sends(room, "m", 300))
        # The window fills while the first commit waits: the session read ahead of its commits.
        await eventually(lambda: writer.pending >= 64, "a full window of SENDs in flight", timeout_s=60)
    assert await receipts(sender, 300) == [f"m-{i}" for i in range(300)]
    got = await messages(listener, 300)
    assert [m["message"] for m in got] == [f"m-{i}" for i in range(300)]
    assert [m["seq"] for m in got] == list(range(1, 301))
    assert writer.stats.largest_batch >= 64  # one session's SENDs shared group commits
    assert await db_count(server) == 300


async def test_a_window_of_one_answers_one_send_at_a_time(make_server: Any) -> None:
    server = await make_server(send_window=1)
    room = await create_room(server)
    sender = await client(server)
    writer = chat_service(server).writer
    with write_lock(server):
        await sender.send(sends(room, "w", 20))
        await eventually(lambda: writer.pending == 1, "the first SEND in flight", timeout_s=60)
        assert writer.pending == 1  # the next SEND is not read before the first is answered
    assert await receipts(sender, 20) == [f"w-{i}" for i in range(20)]
    assert writer.stats.largest_batch == 1
    assert await db_count(server) == 20


async def test_a_refused_send_in_the_window_answers_after_the_receipts_before_it(make_server: Any) -> None:
    server = await make_server()
    room = await create_room(server)
    sender = await client(server)
    bad = frame("SEND", {**SEND_HEADERS, "receipt": "bad"},
                b'{"type":"TALK","roomId":"00000000-0000-0000-0000-000000000000","message":"x"}')
    with write_lock(server):
        await sender.send(sends(room, "ok", 3) + bad + sends(room, "after", 2))
        await eventually(lambda: chat_service(server).writer.pending == 3, "3 SENDs in flight", timeout_s=60)
    assert await receipts(sender, 3) == ["ok-0", "ok-1", "ok-2"]
    error = await sender.next_frame(60)
    assert error.command == "ERROR" and error.get("receipt-id") == "bad"
    assert "Unknown room" in (error.get("message") or "")
    code, _ = await sender.closed(60)
    assert code == 1002
    # Frames after the refused one are not taken once it failed: only the first three are stored.
    assert await db_count(server) == 3


async def test_backpressure_bounds_uncommitted_sends_and_loses_nothing(make_server: Any) -> None:
    server = await make_server(max_pending_sends=8, send_window=64)
    room = await create_room(server)
    listener = await client(server)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    senders = [await client(server) for _ in range(4)]
    writer = chat_service(server).writer
    with write_lock(server):
        for index, ws in enumerate(senders):
            await ws.send(sends(room, f"s{index}", 50))
        await eventually(lambda: writer.pending == 8, "the node's bound of uncommitted SENDs", timeout_s=60)
        # Everything is written to the sockets; the node still holds no more than its bound.
        await asyncio.sleep(0)
        assert writer.pending == 8
    for index, ws in enumerate(senders):
        assert await receipts(ws, 50) == [f"s{index}-{i}" for i in range(50)]
    got = await messages(listener, 200)
    assert [m["seq"] for m in got] == list(range(1, 201))
    for index in range(4):  # each session's messages keep its send order in the room
        mine = [m["message"] for m in got if m["message"].startswith(f"s{index}-")]
        assert mine == [f"s{index}-{i}" for i in range(50)]
    assert await db_count(server) == 200
    assert writer.pending == 0


async def test_sends_in_flight_when_the_session_goes_away_are_still_committed(make_server: Any) -> None:
    server = await make_server()
    room = await create_room(server)
    sender = await client(server)
    writer = chat_service(server).writer
    with write_lock(server):
        await sender.send(sends(room, "gone", 20))
        await eventually(lambda: writer.pending == 20, "20 SENDs in flight", timeout_s=60)
        await sender.close()
        await eventually(lambda: server.session_count == 0, "the session to end", timeout_s=60)
    await eventually(lambda: writer.pending == 0, "the commits", timeout_s=60)
    assert await db_count(server) == 20
