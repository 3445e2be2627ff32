"""The per-node room sequencer: once, in order, gaps repaired from the database (a fake history)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gateway.broker.base import Publication
from gateway.chat.models import MessageType, StoredMessage
from gateway.chat.payload import encode_message
from gateway.chat.sequencer import RoomSequencer
from gateway.settings import Settings

PREFIX = "/sub/chat/room/"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def stored(seq: int, room: str = "r") -> StoredMessage:
    return StoredMessage(seq, room, seq, MessageType.TALK, "s", f"m{seq}", NOW, None)


def pub(seq: int, room: str = "r") -> Publication:
    return Publication(PREFIX + room, encode_message(stored(seq, room), 0))


class World:
    """The database (committed messages) and what the node delivered locally."""

    def __init__(self, committed: int = 0) -> None:
        self.committed = [stored(i) for i in range(1, committed + 1)]
        self.delivered: list[int] = []
        self.history_calls = 0
        self.fail_history = 0
        self.sequencer = RoomSequencer(PREFIX, history=self.history, last_seq=self.last_seq,
                                       encode=self.encode, head_check_s=Settings().room_head_check_s)
        self.sequencer.downstream = self.deliver

    async def history(self, room: str, after: int, limit: int) -> list[StoredMessage]:
        self.history_calls += 1
        if self.fail_history:
            self.fail_history -= 1
            raise ConnectionError("database down")
        return [m for m in self.committed if m.room_id == room and m.seq > after][:limit]

    async def last_seq(self, room: str) -> int | None:
        return max((m.seq for m in self.committed if m.room_id == room), default=0)

    def encode(self, message: StoredMessage) -> Publication:
        return pub(message.seq, message.room_id)

    def deliver(self, publication: Publication) -> None:
        import json
        self.delivered.append(json.loads(publication.body)["seq"])

    def commit(self, seq: int) -> Publication:
        self.committed.append(stored(seq))
        return pub(seq)

    def receive(self, publication: Publication) -> None:
        self.sequencer.accept(publication)

    async def settle(self) -> None:
        for _ in range(200):
            await asyncio.sleep(0)
            if all(state.task is None for state in self.sequencer._rooms.values()):
                return
        raise AssertionError("repair did not finish")


async def test_in_order_messages_pass_straight_through() -> None:
    world = World(committed=2)
    await world.sequencer.track("r")
    for seq in (3, 4, 5):
        world.receive(world.commit(seq))
    assert world.delivered == [3, 4, 5]
    assert world.history_calls == 0


async def test_duplicates_are_dropped() -> None:
    world = World()
    await world.sequencer.track("r")
    first = world.commit(1)
    world.receive(first)
    world.receive(first)
    assert world.delivered == [1]
    assert world.sequencer.duplicates_dropped == 1


async def test_out_of_order_arrival_is_reordered_from_the_database() -> None:
    world = World()
    await world.sequencer.track("r")
    p1, p2, p3 = world.commit(1), world.commit(2), world.commit(3)
    world.receive(p3)          # 1 and 2 were committed but their publishes are late
    await world.settle()
    world.receive(p1)
    world.receive(p2)
    assert world.delivered == [1, 2, 3]


async def test_a_lost_publish_is_repaired_when_the_next_message_arrives() -> None:
    world = World()
    await world.sequencer.track("r")
    world.receive(world.commit(1))
    world.commit(2)            # the publishing node died after its commit
    world.receive(world.commit(3))
    await world.settle()
    assert world.delivered == [1, 2, 3]
    assert world.sequencer.repaired == 1


async def test_gap_signal_fetches_everything_after_the_last_delivered() -> None:
    world = World()
    await world.sequencer.track("r")
    world.receive(world.commit(1))
    for seq in (2, 3, 4):
        world.commit(seq)      # published while this node's subscriber connection was down
    world.sequencer.on_gap(frozenset({PREFIX + "r"}))
    await world.settle()
    assert world.delivered == [1, 2, 3, 4]


async def test_repair_retries_while_the_database_fails() -> None:
    world = World()
    await world.sequencer.track("r")
    world.receive(world.commit(1))
    world.commit(2)
    world.fail_history = 2
    world.receive(world.commit(3))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if world.delivered == [1, 2, 3]:
            break
    assert world.delivered == [1, 2, 3]


async def test_baseline_skips_history_committed_before_tracking() -> None:
    world = World(committed=5)
    await world.sequencer.track("r")
    world.receive(pub(5))      # a late publish of a message that is history for this node
    world.receive(world.commit(6))
    assert world.delivered == [6]


async def test_untracked_rooms_and_spring_payloads_pass_through() -> None:
    world = World()
    spring = Publication(PREFIX + "r", b'{"type":"TALK","roomId":"r","sender":"s","message":"m","userCount":0}')
    other = Publication("/sub/other", b"x")
    passed: list[Publication] = []
    world.sequencer.downstream = passed.append
    world.sequencer.accept(pub(9))                                      # not tracked
    await world.sequencer.track("r")
    world.sequencer.accept(spring)
    world.sequencer.accept(other)
    assert passed == [pub(9), spring, other]


@pytest.mark.parametrize("room", ["a/b", "", "*", "{id}", "r?"])
def test_room_of_only_exact_room_destinations(room: str) -> None:
    world = World()
    assert world.sequencer.room_of(PREFIX + room) is None
    assert world.sequencer.room_of(PREFIX + "abc-1") == "abc-1"


async def test_an_arrival_during_a_repair_read_makes_the_repair_read_again() -> None:
    """The read's snapshot can predate a commit whose successor arrives while the read runs."""
    world = World()
    await world.sequencer.track("r")
    world.receive(world.commit(1))
    reading = asyncio.Event()
    release = asyncio.Event()
    real_history = world.history

    async def slow_history(room: str, after: int, limit: int) -> list[StoredMessage]:
        snapshot = await real_history(room, after, limit)   # taken before 2 and 3 commit
        reading.set()
        await release.wait()
        return snapshot

    world.sequencer._history = slow_history
    world.sequencer.on_gap(frozenset({PREFIX + "r"}))       # a reconnect starts a repair read
    await reading.wait()
    late_2 = world.commit(2)                                 # its publish is delayed
    world.receive(world.commit(3))                           # 3 arrives while the read runs
    world.sequencer._history = real_history
    release.set()
    await world.settle()
    world.receive(late_2)
    assert world.delivered == [1, 2, 3]


async def test_a_quiet_rooms_lost_last_message_is_repaired_at_the_second_head_check() -> None:
    world = World()
    await world.sequencer.track("r")
    world.receive(world.commit(1))
    world.commit(2)            # committed, never published, and nothing follows in this room
    world.sequencer.check_heads({"r": 2})        # first sight: maybe just in flight
    await world.settle()
    assert world.delivered == [1] and world.history_calls == 0
    world.sequencer.check_heads({"r": 2})        # still behind one check later: repair
    await world.settle()
    assert world.delivered == [1, 2]
    assert world.sequencer.head_repairs == 1


async def test_a_message_arriving_between_head_checks_needs_no_repair() -> None:
    world = World()
    await world.sequencer.track("r")
    late = world.commit(1)
    world.sequencer.check_heads({"r": 1})
    world.receive(late)                          # the publication was only in flight
    world.sequencer.check_heads({"r": 1})
    await world.settle()
    assert world.delivered == [1] and world.history_calls == 0


async def test_the_head_watcher_reads_heads_on_its_own() -> None:
    world = World()
    calls: list[list[str]] = []

    async def heads(rooms: list[str]) -> dict[str, int]:
        calls.append(rooms)
        return {room: await world.last_seq(room) or 0 for room in rooms}

    world.sequencer = RoomSequencer(PREFIX, history=world.history, last_seq=world.last_seq,
                                    encode=world.encode, heads=heads, head_check_s=0.01)
    world.sequencer.downstream = world.deliver
    await world.sequencer.track("r")
    world.commit(1)
    await world.sequencer.start()
    try:
        for _ in range(500):
            if world.delivered == [1]:
                break
            await asyncio.sleep(0.01)
    finally:
        await world.sequencer.stop()
    assert world.delivered == [1]
    assert calls and calls[0] == ["r"]
