"""Chat traffic with exact checks, for the Sentinel and Cluster tests (real gateway processes).

- :class:`RoomWatch`: one subscriber per gateway node on one room; every MESSAGE it reads must carry
  the next ``seq`` (so nothing is lost, duplicated or reordered on that subscriber, ever).
- :class:`Traffic`: senders (one per node, logged in) that SEND with a ``receipt`` header and count a
  message as acknowledged only when its RECEIPT came back; :meth:`Traffic.run_until` keeps sending
  in the background while a test injects a fault.
- :func:`check_all`: every acknowledged message is one row of its room's history, and every watch
  received the room's whole history in order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.cluster.conftest import ROOM_PREFIX, Cluster, chat_body
from tests.support.stomp_wire import WsStompClient

_ids = itertools.count(1)


@dataclass
class RoomWatch:
    room: str
    clients: list[WsStompClient]
    seqs: list[list[int]] = field(default_factory=list)

    @classmethod
    async def open(cls, cluster: Cluster, room: str) -> RoomWatch:
        clients = []
        for node in range(len(cluster.nodes)):
            ws = await cluster.client(node)
            await ws.subscribe(ROOM_PREFIX + room, f"w{next(_ids)}")
            clients.append(ws)
        return cls(room, clients, [[] for _ in clients])

    async def read_until(self, last_seq: int, timeout_s: float) -> None:
        """Read on every subscriber until it has seq ``last_seq``; each seq must be the previous + 1."""
        async def one(index: int) -> None:
            ws, seen = self.clients[index], self.seqs[index]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while (seen[-1] if seen else 0) < last_seq:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AssertionError(f"room {self.room} node {index}: got up to seq "
                                         f"{seen[-1] if seen else 0}, want {last_seq} within {timeout_s} s")
                frame = await ws.next_frame(remaining)
                assert frame.command == "MESSAGE", frame
                message = json.loads(frame.body)
                assert message["roomId"] == self.room
                expected = (seen[-1] if seen else 0) + 1
                assert message["seq"] == expected, (
                    f"room {self.room} node {index}: seq {message['seq']} after {expected - 1} "
                    "(lost, duplicated or out of order)")
                seen.append(message["seq"])

        await asyncio.gather(*(one(i) for i in range(len(self.clients))))


@dataclass
class Traffic:
    cluster: Cluster
    rooms: list[str]
    senders: list[WsStompClient]
    acknowledged: dict[str, list[str]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    async def open(cls, cluster: Cluster, rooms: list[str]) -> Traffic:
        senders = [await cluster.client(node, login=f"user{node}") for node in range(len(cluster.nodes))]
        return cls(cluster, rooms, senders, {room: [] for room in rooms})

    async def send_round(self, per_room: int = 1, receipt_timeout_s: float = 60.0) -> None:
        """``per_room`` messages to every room, spread over the senders; returns once all are RECEIPTed."""
        pending: dict[int, dict[str, tuple[str, str]]] = {i: {} for i in range(len(self.senders))}
        for room in self.rooms:
            for _ in range(per_room):
                n = next(self.counter)
                sender = n % len(self.senders)
                text = f"m{n}"
                receipt = f"r{n}"
                pending[sender][receipt] = (room, text)
                await self.senders[sender].send_frame(
                    "SEND", {"destination": "/pub/chat/message", "receipt": receipt}, chat_body(room, text))

        async def collect(sender: int) -> None:
            ws = self.senders[sender]
            while pending[sender]:
                frame = await ws.next_frame(receipt_timeout_s)
                assert frame.command == "RECEIPT", frame
                room, text = pending[sender].pop(frame.get("receipt-id") or "")
                self.acknowledged[room].append(text)

        await asyncio.gather(*(collect(i) for i in range(len(self.senders))))

    async def run_until(self, stop: asyncio.Event, pause_s: float = 0.05) -> int:
        """Send rounds until ``stop`` is set; returns how many rounds were acknowledged."""
        rounds = 0
        while not stop.is_set():
            await self.send_round()
            rounds += 1
            await asyncio.sleep(pause_s)
        return rounds

    def last_seq(self, room: str) -> int:
        return len(self.acknowledged[room])


async def check_all(cluster: Cluster, traffic: Traffic, watches: list[RoomWatch], timeout_s: float) -> None:
    """Every acknowledged message stored once; every subscriber got every stored message, in order."""
    for watch in watches:
        await watch.read_until(traffic.last_seq(watch.room), timeout_s)
    for watch in watches:
        history: list[dict[str, Any]] = await cluster.history(watch.room)
        assert [m["seq"] for m in history] == list(range(1, len(history) + 1))
        assert Counter(m["message"] for m in history) == Counter(traffic.acknowledged[watch.room]), \
            "every acknowledged message is exactly one row"
        assert all(seqs == list(range(1, len(history) + 1)) for seqs in watch.seqs), \
            "every subscriber received the whole history once, in order"
