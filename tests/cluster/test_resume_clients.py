"""Resume after a node's death, with real STOMP clients: stomp.py and @stomp/stompjs 7.

Two real gateway processes share one redis-server and one database (SQLite, and PostgreSQL when the
test server is there). A subscriber on node 1 tracks the ``x-seq`` header of every MESSAGE it gets.
A sender on node 0 keeps sending TALKs, one at a time, each with a receipt and a client message id
(a ``not stored, retry`` ERROR is answered by sending the same client id again). Node 1 is SIGKILLed;
the subscriber notices its connection is gone, waits until the room has moved on (so that the
resume really has messages to replay), connects to node 0 and SUBSCRIBEs with
``x-resume-after:<last x-seq it saw>``. After a while the sender sends a last message; once the
subscriber has it, what it received over both connections must be exactly the room's stored history
(REST), in seq order: no gap, no duplicate, each acknowledged client id exactly once.

Every wait is for an event (a receipt, a frame, a script's progress line, a count reached) with a
generous deadline; none sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import stomp

from tests.cluster.conftest import ROOM_PREFIX, Cluster, chat_body
from tests.support.node import NodeScript
from tests.support.polling import eventually
from tests.support.stomp_wire import WsStompClient

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

DEADLINE_S = 60.0      # for any single awaited event; CI machines are loaded
SEEN_BEFORE_KILL = 30  # messages the subscriber has before its node is killed
MISSED_AT_LEAST = 20   # messages committed after the kill before the subscriber resumes
LIVE_AT_LEAST = 20     # messages committed after the resume RECEIPT before the last one
DONE_TEXT = "the last message"

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
# The sender sends as fast as the nodes answer: the per-address SEND rate limit is not what is tested here.
SETTINGS = {"send_rate_per_s": 0}


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """:func:`~tests.support.polling.eventually` with this test's deadline."""
    await eventually(predicate, what, timeout_s=timeout)


@dataclass
class Sender:
    """TALKs into a room from one session on node 0, one SEND in flight, until told to finish."""

    ws: WsStompClient
    room: str
    prefix: str = "m"                                    # client ids are <prefix>-0, <prefix>-1, ...
    acked: list[str] = field(default_factory=list)      # client ids, in RECEIPT order
    retried: int = 0                                     # 'not stored, retry' ERRORs answered
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self) -> None:
        self._stop.set()

    async def _send(self, client_id: str, text: str) -> None:
        for attempt in range(20):
            await self.ws.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": f"r-{client_id}-{attempt}",
                                              "client-msg-id": client_id, "content-type": "application/json"},
                                     chat_body(self.room, text))
            frame = await self.ws.next_frame(DEADLINE_S)
            if frame.command == "RECEIPT":
                assert frame.get("receipt-id") == f"r-{client_id}-{attempt}", frame
                self.acked.append(client_id)
                return
            assert frame.command == "ERROR" and frame.get("message") == "not stored, retry", frame
            self.retried += 1
        raise AssertionError(f"{client_id} never stored")

    async def run(self, limit: int = 20000, *, last: bool = True) -> None:
        """Send ``<prefix>-0``, ``<prefix>-1``, ... until :meth:`finish`, then (``last``)
        :data:`DONE_TEXT` with client id ``done``."""
        for i in range(limit):
            if self._stop.is_set():
                break
            await self._send(f"{self.prefix}-{i}", f"{self.prefix} message {i}")
        if last:
            await self._send("done", DONE_TEXT)


async def start_sender(cluster: Cluster, room: str) -> tuple[Sender, asyncio.Task[None]]:
    sender = Sender(await cluster.client(0, login="sam"), room)
    return sender, asyncio.create_task(sender.run())


def check_against_history(received: list[dict[str, Any]], history: list[dict[str, Any]], sender: Sender,
                          resumed_after: int) -> None:
    """``received``: one dict per MESSAGE, in arrival order: ``xseq`` (header), ``seq``, ``id``,
    ``clientMsgId`` and ``message`` (body)."""
    assert all(r["xseq"] == r["seq"] for r in received), [r for r in received if r["xseq"] != r["seq"]][:5]
    got = [r["seq"] for r in received]
    stored = [m["seq"] for m in history]
    assert stored == list(range(1, len(stored) + 1)), "the stored room itself has a gap"
    duplicates = [seq for seq, n in Counter(got).items() if n > 1]
    assert not duplicates, f"duplicates: {duplicates[:20]}"
    assert got == stored, (f"received {len(got)} messages, {len(stored)} stored; missing "
                           f"{sorted(set(stored) - set(got))[:20]}, order ok: {got == sorted(got)}")
    assert [r["id"] for r in received] == [m["id"] for m in history]
    ids = Counter(m.get("clientMsgId") for m in history)
    assert all(ids[client_id] == 1 for client_id in sender.acked), "an acknowledged message is not stored once"
    assert set(ids) == set(sender.acked), "a stored message nobody acknowledged"
    assert received[-1]["message"] == DONE_TEXT
    # The resume had something to replay: messages committed while the subscriber had no node.
    replayed = [seq for seq in got if seq > resumed_after]
    assert resumed_after >= SEEN_BEFORE_KILL and len(replayed) >= MISSED_AT_LEAST + LIVE_AT_LEAST


# --- stomp.py --------------------------------------------------------------------------------------

class Subscriber(stomp.ConnectionListener):  # type: ignore[misc]
    """What one stomp.py connection received (called from stomp.py's receiver thread)."""

    def __init__(self, log: list[dict[str, Any]], lock: threading.Lock) -> None:
        self.log = log
        self.lock = lock
        self.receipts: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.disconnected = False

    def on_message(self, frame: Any) -> None:
        body = json.loads(frame.body)
        with self.lock:
            self.log.append({"xseq": int(frame.headers["x-seq"]), "seq": body["seq"], "id": body["id"],
                             "clientMsgId": body.get("clientMsgId"), "message": body["message"]})

    def on_receipt(self, frame: Any) -> None:
        with self.lock:
            self.receipts.append(frame.headers["receipt-id"])

    def on_error(self, frame: Any) -> None:
        with self.lock:
            self.errors.append(dict(frame.headers))

    def on_disconnected(self) -> None:
        self.disconnected = True


def stomp_py_subscribe(port: int, room: str, log: list[dict[str, Any]], lock: threading.Lock,
                       resume_after: int | None) -> tuple[stomp.WSConnection, Subscriber]:
    """Connect stomp.py to a node and subscribe to the room (resuming when ``resume_after`` is given);
    returns once the SUBSCRIBE's RECEIPT arrived. Blocking: run it in a thread."""
    conn = stomp.WSConnection([("127.0.0.1", port)], ws_path="/ws-stomp/websocket", reconnect_attempts_max=1)
    listener = Subscriber(log, lock)
    conn.set_listener("subscriber", listener)
    conn.connect(wait=True)
    headers = {} if resume_after is None else {"x-resume-after": str(resume_after)}
    conn.subscribe(ROOM_PREFIX + room, id="room", headers=headers, receipt="subscribed")
    deadline = time.monotonic() + DEADLINE_S
    while "subscribed" not in listener.receipts:
        assert not listener.errors, listener.errors
        assert time.monotonic() < deadline, "no RECEIPT for the SUBSCRIBE"
        time.sleep(0.01)
    return conn, listener


@pytest.mark.parametrize("database", DATABASES)
async def test_stomp_py_resumes_on_another_node_after_its_node_is_killed(cluster_factory: Any,
                                                                         database: str) -> None:
    cluster = await cluster_factory(2, database=database, settings=SETTINGS)
    room = await cluster.create_room("resume with stomp.py")
    log: list[dict[str, Any]] = []
    lock = threading.Lock()
    first, first_listener = await asyncio.to_thread(stomp_py_subscribe, cluster.nodes[1].port, room, log, lock, None)
    second: stomp.WSConnection | None = None
    sender, sending = await start_sender(cluster, room)
    try:
        await until(lambda: len(log) >= SEEN_BEFORE_KILL, f"{SEEN_BEFORE_KILL} messages on node 1")
        await asyncio.to_thread(cluster.nodes[1].kill)
        await until(lambda: first_listener.disconnected, "stomp.py to notice its node died")
        with lock:
            last = max(r["xseq"] for r in log)
        acked_at_loss = len(sender.acked)
        await until(lambda: len(sender.acked) >= acked_at_loss + MISSED_AT_LEAST, "messages sent meanwhile")

        second, _ = await asyncio.to_thread(stomp_py_subscribe, cluster.nodes[0].port, room, log, lock, last)
        acked_at_resume = len(sender.acked)
        await until(lambda: len(sender.acked) >= acked_at_resume + LIVE_AT_LEAST, "messages sent after resuming")
        sender.finish()
        await asyncio.wait_for(sending, DEADLINE_S)
        await until(lambda: bool(log) and log[-1]["message"] == DONE_TEXT, "the last message on node 0")
        history = await cluster.history(room)
        with lock:
            received = list(log)
        check_against_history(received, history, sender, last)
    finally:
        sender.finish()
        for conn in (first, second):
            if conn is not None and conn.is_connected():
                await asyncio.to_thread(conn.disconnect)


# --- @stomp/stompjs 7 ------------------------------------------------------------------------------

@pytest.mark.node
@pytest.mark.parametrize("database", DATABASES)
async def test_stompjs_resumes_on_another_node_after_its_node_is_killed(cluster_factory: Any,
                                                                        database: str) -> None:
    cluster = await cluster_factory(2, database=database, settings=SETTINGS)
    room = await cluster.create_room("resume with stompjs")
    script = NodeScript("stompjs7.mjs", {
        "scenario": "resume", "room": room, "doneText": DONE_TEXT, "killAfter": SEEN_BEFORE_KILL,
        "urls": [cluster.nodes[1].ws_url, cluster.nodes[0].ws_url], "httpUrl": cluster.nodes[0].url,
        "minGap": MISSED_AT_LEAST, "timeoutMs": 240_000})
    sender: Sender | None = None
    try:
        await asyncio.to_thread(script.wait_event, "subscribed", DEADLINE_S)
        sender, sending = await start_sender(cluster, room)
        await asyncio.to_thread(script.wait_event, "received", DEADLINE_S)
        await asyncio.to_thread(cluster.nodes[1].kill)
        resumed = await asyncio.to_thread(script.wait_event, "resumed", DEADLINE_S * 2)
        acked_at_resume = len(sender.acked)
        await until(lambda: len(sender.acked) >= acked_at_resume + LIVE_AT_LEAST, "messages sent after resuming")
        sender.finish()
        await asyncio.wait_for(sending, DEADLINE_S)
        result = await asyncio.to_thread(script.result, DEADLINE_S)
    finally:
        if sender is not None:
            sender.finish()
        script.kill()
    assert resumed["url"] == cluster.nodes[0].ws_url
    assert result["subscribeHeaders"][0].get("x-resume-after") is None
    assert result["subscribeHeaders"][1]["x-resume-after"] == str(resumed["after"])
    history = await cluster.history(room)
    assert sender is not None
    check_against_history(result["received"], history, sender, int(resumed["after"]))


# --- many resumes into a room the node already serves, under live traffic from both nodes -----------

async def test_repeated_resumes_under_live_traffic_are_contiguous(cluster_factory: Any) -> None:
    """A node that already serves the room (another subscriber is there) and gets messages both from
    its own sessions and through Redis: every resume, from a point a little behind the head, yields
    exactly after+1, after+2, ... through the replay into live delivery (raw STOMP frames)."""
    cluster = await cluster_factory(2, settings=SETTINGS)
    room = await cluster.create_room("many resumes")
    observer = await cluster.client(0)
    await observer.subscribe(ROOM_PREFIX + room, "observer")
    observing = asyncio.create_task(_drain(observer))
    senders = [Sender(await cluster.client(node, login=f"s{node}"), room, prefix=f"n{node}") for node in (0, 1)]
    tasks = [asyncio.create_task(sender.run(last=False)) for sender in senders]
    resumer = await cluster.client(0)
    try:
        await until(lambda: sum(len(s.acked) for s in senders) >= 80, "traffic")
        for i in range(30):
            head = (await cluster.get(f"/chat/room/{room}"))["lastSeq"]
            after = max(0, head - (i * 7) % 60)
            await resumer.send_frame("SUBSCRIBE", {"id": f"r{i}", "destination": ROOM_PREFIX + room,
                                                   "x-resume-after": str(after), "receipt": f"rs{i}"})
            got: list[int] = []
            while not got or got[-1] < head + 10:
                frame = await resumer.next_frame(DEADLINE_S)
                if frame.command == "RECEIPT":
                    assert frame.get("receipt-id") == f"rs{i}"
                    continue
                assert frame.command == "MESSAGE" and frame.get("subscription") == f"r{i}", frame
                got.append(int(frame.get("x-seq") or 0))
            assert got == list(range(after + 1, after + 1 + len(got))), f"resume {i} after {after} (head {head}): {got}"
            await resumer.send_frame("UNSUBSCRIBE", {"id": f"r{i}", "receipt": f"ru{i}"})
            while (frame := await resumer.next_frame(DEADLINE_S)).command != "RECEIPT":
                assert frame.command == "MESSAGE" and frame.get("subscription") == f"r{i}", frame
            assert frame.get("receipt-id") == f"ru{i}"
    finally:
        for sender in senders:
            sender.finish()
        await asyncio.gather(*tasks)
        observing.cancel()
    history = await cluster.history(room)
    assert [m["seq"] for m in history] == list(range(1, len(history) + 1))


async def _drain(ws: WsStompClient) -> None:
    """Keep reading a subscriber's frames (so the node never closes it as a slow consumer)."""
    while True:
        await ws.next_frame(3600)
