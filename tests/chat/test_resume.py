"""SUBSCRIBE with ``x-resume-after``: the room's messages after that seq, then live ones, with no gap
and no duplicate; every MESSAGE carries ``x-seq``. Real server, real SQLite, raw STOMP frames."""

from __future__ import annotations

import json
from typing import Any

from tests.chat.test_chat_service import ROOM_PREFIX, client, create_room
from tests.chat.test_pipelined_sends import receipts, sends
from tests.support.stomp_wire import WsStompClient, frame

RESUME = "x-resume-after"


async def seqs(ws: WsStompClient, count: int) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        frame = await ws.next_frame(60)
        assert frame.command == "MESSAGE", frame
        assert frame.get("x-seq") == str(json.loads(frame.body)["seq"])
        out.append(int(frame.get("x-seq") or 0))
    return out


async def room_with(server: Any, count: int) -> str:
    """A new room holding ``count`` stored messages (seq 1..count)."""
    room = await create_room(server)
    sender = await client(server)
    await sender.send(sends(room, "m", count))
    await receipts(sender, count)
    return room


async def resuming(server: Any, room: str, after: str, **headers: str) -> WsStompClient:
    """A session that SUBSCRIBEs to ``room`` with ``x-resume-after: after``."""
    ws = await client(server)
    await ws.send_frame("SUBSCRIBE", {"destination": ROOM_PREFIX + room, "id": "s", RESUME: after, **headers})
    return ws


def big_sends(room: str, tag: str, count: int) -> bytes:
    return b"".join(frame("SEND", {"destination": "/pub/chat/message", "receipt": f"{tag}-{i}"},
                          json.dumps({"type": "TALK", "roomId": room, "message": f"{tag}-{i} " + "x" * 2000}).encode())
                    for i in range(count))


async def test_resume_replays_after_the_seq_then_goes_live_without_gap_or_duplicate(make_server: Any) -> None:
    # The resumer stops reading on purpose below: a loaded machine must not make that a slow consumer.
    server = await make_server(outbound_send_timeout_s=120)
    room = await create_room(server)
    sender = await client(server)
    for _ in range(10):
        await sender.send(big_sends(room, "early", 200))
        await receipts(sender, 200)
    resumer = await client(server)
    await resumer.send_frame("SUBSCRIBE", {"destination": ROOM_PREFIX + room, "id": "s", RESUME: "12",
                                           "receipt": "sub"})
    # The replay (about 4 MB) stalls on the socket while the resumer does not read; live messages
    # committed meanwhile must wait behind it, not overtake it.
    for i in range(20):
        await sender.send(sends(room, f"live{i}", 1))
        await receipts(sender, 1)
    got: list[int] = []
    while len(got) < 2020 - 12:
        frame = await resumer.next_frame(60)
        if frame.command == "RECEIPT":
            continue
        assert frame.command == "MESSAGE", frame
        got.append(int(frame.get("x-seq") or 0))
    assert got == list(range(13, 2021))


async def test_resume_from_zero_replays_the_whole_room(make_server: Any) -> None:
    server = await make_server()
    room = await room_with(server, 5)
    resumer = await resuming(server, room, "0")
    assert await seqs(resumer, 5) == [1, 2, 3, 4, 5]
    await (await client(server)).send(sends(room, "after", 1))
    assert await seqs(resumer, 1) == [6]


async def test_a_resume_point_older_than_the_retention_limit_is_an_error(make_server: Any) -> None:
    server = await make_server(resume_max_messages=5)
    room = await room_with(server, 8)
    resumer = await resuming(server, room, "2", receipt="sub")
    frames = [await resumer.next_frame(30)]
    if frames[0].command == "RECEIPT":
        frames.append(await resumer.next_frame(30))
    error = frames[-1]
    assert error.command == "ERROR" and "more than 5 messages behind" in (error.get("message") or "")
    # Exactly at the limit still works.
    again = await client(server)
    await again.send_frame("SUBSCRIBE", {"destination": ROOM_PREFIX + room, "id": "s", RESUME: "3"})
    assert await seqs(again, 5) == [4, 5, 6, 7, 8]


async def test_bad_resume_headers_are_errors(make_server: Any) -> None:
    server = await make_server()
    await create_room(server)
    for destination, value, reason in (("/sub/chat/room/x", "-1", "must be a sequence number"),
                                       ("/sub/other", "0", "only on room destinations")):
        ws = await client(server)
        await ws.send_frame("SUBSCRIBE", {"destination": destination, "id": "s", RESUME: value})
        error = await ws.next_frame(30)
        assert error.command == "ERROR" and reason in (error.get("message") or ""), error


async def test_a_resume_point_ahead_of_the_room_is_an_error_without_a_receipt(make_server: Any) -> None:
    server = await make_server()
    room = await room_with(server, 2)
    resumer = await resuming(server, room, "7", receipt="sub")
    error = await resumer.next_frame(30)   # the resume is refused before the RECEIPT
    assert error.command == "ERROR" and error.get("receipt-id") == "sub"
    assert "ahead of the room (last seq 2)" in (error.get("message") or "")
