"""The chat domain over a real server (memory broker, migrated SQLite): persist once, then publish.

Every case checks both sides: what the clients received and what rows the database holds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import create_app
from gateway.chat.migrations import upgrade
from gateway.chat.repository import make_engine
from gateway.settings import load_settings
from tests.support.live_server import LiveServer
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient

ROOM_PREFIX = "/sub/chat/room/"


@pytest.fixture
async def chat_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[LiveServer]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    await asyncio.to_thread(upgrade, url)
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = load_settings(environ={}, database_url=url, heartbeat_receive_ms=0, node_id="test-node",
                             **overrides)
    server = LiveServer(create_app(settings)).start()
    try:
        yield server
    finally:
        server.stop()


async def create_room(server: LiveServer, name: str = "lobby") -> str:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post("/chat/room", data={"name": name})
        response.raise_for_status()
        return str(response.json()["roomId"])


async def rows(server: LiveServer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/chat/rooms")
        out: list[dict[str, Any]] = []
        for room in response.json():
            history = await http.get(f"/chat/room/{room['roomId']}/messages", params={"limit": 500})
            out.extend(history.json())
        return out


async def db_count(server: LiveServer) -> int:
    engine = make_engine(server.gateway.settings.database_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one())
    finally:
        await engine.dispose()


async def client(server: LiveServer, login: str | None = None) -> WsStompClient:
    ws = await WsStompClient.open(server.ws_url)
    headers = {"accept-version": "1.2", "host": "x"}
    if login is not None:
        headers["login"] = login
    await ws.connect(headers)
    return ws


async def next_chat(ws: WsStompClient) -> dict[str, Any]:
    frame = await ws.next_frame()
    assert frame.command == "MESSAGE", frame
    return dict(json.loads(frame.body))


async def send_chat(ws: WsStompClient, body: dict[str, Any], **headers: str) -> None:
    await ws.send_frame("SEND", {"destination": "/pub/chat/message", "content-type": "application/json",
                                 **headers}, json.dumps(body).encode())


async def test_talk_is_stored_once_and_reaches_every_subscriber_with_seq(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    alice, bob = await client(chat_server, "alice"), await client(chat_server, "bob")
    await alice.subscribe(ROOM_PREFIX + room, "s-a")
    assert (await next_chat(alice))["message"] == "alice님이 방에 입장했습니다."
    await bob.subscribe(ROOM_PREFIX + room, "s-b")
    enter_bob = await next_chat(alice)
    assert enter_bob["message"] == "bob님이 방에 입장했습니다." and enter_bob["userCount"] == 2
    assert (await next_chat(bob))["seq"] == enter_bob["seq"]

    await send_chat(bob, {"type": "TALK", "roomId": room, "message": "hi", "sender": "mallory"}, receipt="r1")
    own = [await bob.next_frame(), await bob.next_frame()]  # its own TALK and the RECEIPT, in either order
    assert sorted(f.command for f in own) == ["MESSAGE", "RECEIPT"]
    assert [f.get("receipt-id") for f in own if f.command == "RECEIPT"] == ["r1"]
    got = [await next_chat(alice)]
    assert got[0]["type"] == "TALK" and got[0]["sender"] == "bob"  # sender from the session, not the body
    assert list(got[0])[:5] == ["type", "roomId", "sender", "message", "userCount"]
    assert got[0]["seq"] == enter_bob["seq"] + 1 and got[0]["userCount"] == 2
    assert await db_count(chat_server) == 3
    await alice.close()
    await bob.close()


async def test_receipt_comes_after_the_commit(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    ws = await client(chat_server)
    await send_chat(ws, {"type": "TALK", "roomId": room, "message": "durable"}, receipt="r-9")
    frame = await ws.next_frame()
    assert frame.command == "RECEIPT" and frame.get("receipt-id") == "r-9"
    stored = await rows(chat_server)
    assert [m["message"] for m in stored] == ["durable"]
    assert stored[0]["sender"] == "UnknownUser"
    await ws.close()


async def test_client_message_id_is_stored_once_and_republished_with_the_same_seq(
        chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    listener = await client(chat_server)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    sender = await client(chat_server, "carol")
    for _ in range(2):
        await send_chat(sender, {"type": "TALK", "roomId": room, "message": "once"}, **{"client-msg-id": "m-1"})
    await send_chat(sender, {"type": "TALK", "roomId": room, "message": "twice", "clientMsgId": "m-2"})
    first = await next_chat(listener)
    assert first["message"] == "once" and first["clientMsgId"] == "m-1"
    # The re-publish of m-1 carries the same seq; the node delivers each seq once.
    second = await next_chat(listener)
    assert second["message"] == "twice" and second["seq"] == first["seq"] + 1
    assert [m["message"] for m in await rows(chat_server)] == ["once", "twice"]
    await listener.close()
    await sender.close()


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "not valid JSON"),
    (b'{"type":"TALK","roomId":"00000000-0000-0000-0000-000000000000","message":"x"}', "Unknown room"),
    (b'{"type":"TALK","message":"x"}', "'roomId' is required"),
    (b'{"type":"TALK","roomId":"ROOM"}', "'message' is required"),
    (b'{"type":"TALK","roomId":"ROOM","message":"' + b"x" * 4001 + b'"}', "longer than 4000"),
    (b'{"type":"QUIT","roomId":"ROOM"}', "sent by the server"),
])
async def test_malformed_send_gets_error_and_leaves_no_row_and_no_publish(
        chat_server: LiveServer, body: bytes, reason: str) -> None:
    room = await create_room(chat_server)
    listener = await client(chat_server)
    await listener.subscribe(ROOM_PREFIX + room, "s")
    ws = await client(chat_server)
    await ws.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "bad"},
                        body.replace(b"ROOM", room.encode()))
    error = await ws.next_frame()
    assert error.command == "ERROR" and reason in (error.get("message") or "")
    assert error.get("receipt-id") == "bad"
    code, _ = await ws.closed()
    assert code == 1002
    # Nothing was published: a later valid message is the first the listener sees.
    probe = await client(chat_server)
    await send_chat(probe, {"type": "TALK", "roomId": room, "message": "probe"})
    assert (await next_chat(listener))["message"] == "probe"
    assert [m["message"] for m in await rows(chat_server)] == ["probe"]
    for ws_ in (listener, probe):
        await ws_.close()


async def test_enter_and_quit_once_per_session_and_counts_never_negative(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    watcher = await client(chat_server)
    await watcher.subscribe(ROOM_PREFIX + room, "w")
    dave = await client(chat_server, "dave")
    await dave.subscribe(ROOM_PREFIX + room, "d1")
    assert (await next_chat(watcher))["message"] == "dave님이 방에 입장했습니다."
    assert (await next_chat(dave))["message"] == "dave님이 방에 입장했습니다."
    await dave.send_frame("DISCONNECT", {"receipt": "bye"})
    assert (await dave.next_frame()).command == "RECEIPT"
    quit_msg = await next_chat(watcher)
    assert quit_msg["type"] == "QUIT" and quit_msg["message"] == "dave님이 방에서 나갔습니다."
    assert quit_msg["userCount"] == 1
    # A second session drops without DISCONNECT: QUIT once as well.
    erin = await client(chat_server, "erin")
    await erin.subscribe(ROOM_PREFIX + room, "e1")
    await next_chat(watcher)
    await erin.close()
    quit_erin = await next_chat(watcher)
    assert quit_erin["message"] == "erin님이 방에서 나갔습니다." and quit_erin["userCount"] == 1
    async with httpx.AsyncClient(base_url=chat_server.url) as http:
        listed = (await http.get("/chat/rooms")).json()
    assert listed == [{"roomId": room, "name": "lobby", "userCount": 1}]
    kinds = [m["type"] for m in await rows(chat_server)]
    assert kinds == ["ENTER", "QUIT", "ENTER", "QUIT"]
    await watcher.close()


async def test_older_frontend_generation_sends_its_own_enter(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    old = await client(chat_server)           # ws.connect({}, ...): no user
    await old.subscribe(ROOM_PREFIX + room, "sub-0")
    await send_chat(old, {"type": "ENTER", "roomId": room, "sender": "happydaddy"})
    enter = await next_chat(old)
    assert enter["message"] == "happydaddy님이 입장하셨습니다." and enter["sender"] == "[알림]"
    await send_chat(old, {"type": "TALK", "roomId": room, "sender": "happydaddy", "message": "hello"})
    talk = await next_chat(old)
    assert talk["sender"] == "happydaddy"
    await old.close()


async def test_rest_rooms_and_history_paging(chat_server: LiveServer) -> None:
    room = await create_room(chat_server, "paging")
    ws = await client(chat_server, "pat")
    for i in range(5):
        await send_chat(ws, {"type": "TALK", "roomId": room, "message": f"m{i}"}, receipt=f"r{i}")
        assert (await ws.next_frame()).command == "RECEIPT"
    async with httpx.AsyncClient(base_url=chat_server.url) as http:
        page = (await http.get(f"/chat/room/{room}/messages", params={"after": 2, "limit": 2})).json()
        assert [m["seq"] for m in page] == [3, 4]
        assert all({"id", "seq", "createdAt"} <= set(m) for m in page)
        assert (await http.get(f"/chat/room/{room}")).json() == {"roomId": room, "name": "paging", "userCount": 0,
                                                                 "lastSeq": 5}
        missing = await http.get("/chat/room/nope")
        assert missing.status_code == 404 and "error" in missing.json()
        assert (await http.get("/chat/room/nope/messages")).status_code == 404
        assert (await http.get(f"/chat/room/{room}/messages", params={"after": "x"})).status_code == 400
        by_query = await http.post("/chat/room", params={"name": "from-query"})
        assert by_query.json()["name"] == "from-query" and by_query.json()["userCount"] == 0
        assert (await http.post("/chat/room", data={"name": " "})).status_code == 400
        assert (await http.post("/chat/room", data={"name": "x" * 101})).status_code == 400
    await ws.close()


@pytest.mark.parametrize("chat_server", [{"history_max_limit": 3}], indirect=True)
async def test_history_limit_is_clamped_to_the_setting(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    ws = await client(chat_server)
    for i in range(5):
        await send_chat(ws, {"type": "TALK", "roomId": room, "message": f"m{i}"}, receipt=f"r{i}")
        assert (await ws.next_frame()).command == "RECEIPT"
    async with httpx.AsyncClient(base_url=chat_server.url) as http:
        page = (await http.get(f"/chat/room/{room}/messages", params={"limit": 100})).json()
    assert [m["seq"] for m in page] == [1, 2, 3]
    await ws.close()


async def test_the_node_forgets_a_room_when_its_last_local_subscriber_leaves(chat_server: LiveServer) -> None:
    room = await create_room(chat_server)
    assert chat_server.gateway.chat is not None
    sequencer = chat_server.gateway.chat.sequencer
    ws = await client(chat_server)
    await ws.subscribe(ROOM_PREFIX + room, "a")
    await ws.subscribe(ROOM_PREFIX + room, "b")
    assert sequencer.tracked() == {room}
    await ws.send_frame("UNSUBSCRIBE", {"id": "a", "receipt": "u"})
    assert (await ws.next_frame()).command == "RECEIPT"
    assert sequencer.tracked() == {room}          # still one local subscription
    await ws.close()                               # the session ends without UNSUBSCRIBE
    await eventually(lambda: not sequencer.tracked(), "the room to be forgotten")
