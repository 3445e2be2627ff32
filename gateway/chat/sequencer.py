"""Per-node room sequencer: each room's messages reach local subscribers once, in ``seq`` order.

Owns: the ordering stage of the receive path (:class:`gateway.receive.Stage`, between the bus and
the local fan-out; composed by :func:`gateway.receive.compose`) for room destinations: what it lets
through, holds or repairs goes on to its ``downstream``, so any later stage sees every message. It
keeps ordering state (last delivered ``seq``, held messages) only for rooms with a local exact
subscription: the chat layer's hub listener starts a room at its subscription's confirmation and
drops it when the registry reports the room idle. Redis Pub/Sub is
at-most-once and messages from different nodes interleave arbitrarily, so for every room with local
subscribers the node remembers the last ``seq`` it delivered and:

- drops a publication whose ``seq`` it already delivered (a re-publish, or a repair overlap);
- delivers the next ``seq`` at once;
- on a gap (``seq`` > last + 1), holds what arrived and fetches the missing messages from the
  database (they were committed before anything later was published), then delivers in order;
- on a broker gap signal (reconnect), fetches everything after the last delivered ``seq``.

The baseline is read from the database after the node's broker subscription is confirmed, so every
message committed later arrives through the bus or through repair. Publications without ``seq``
(Spring nodes in a mixed fleet) pass straight through. The interceptor itself never blocks:
database work runs in a task per room.

``seq`` is taken from :attr:`Publication.seq` (set by the publishing node, carried by the bus
envelope); only a bare Spring-form payload from Redis without it has its body read.

A quiet room's last message is not left to a later message to reveal: every ``head_check_s`` the
node reads the last ``seq`` of every room it tracks (one query), and a room still behind a head seen
one check earlier is repaired. A committed message whose publication was lost (its node died before
publishing, or its publish queue overflowed) therefore reaches subscribers within about two checks.

The node that commits a message offers it here directly (:meth:`offer_local`) before publishing it,
so its own subscribers do not wait for (or depend on) the bus round trip; the copy that comes back
through the bus is then a duplicate and dropped. Rooms this node does not track (no exact local
subscription) take only the bus copy, so pattern subscribers still get each message once.

Must not import Starlette or the transport layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from gateway import metrics
from gateway.broker.base import Publication
from gateway.broker.channels import room_id_of
from gateway.chat.models import StoredMessage
from gateway.chat.payload import peek_seq
from gateway.receive import Emit, not_composed

log = logging.getLogger(__name__)

HistoryFetch = Callable[[str, int, int], Awaitable[list[StoredMessage]]]
LastSeqFetch = Callable[[str], Awaitable[int | None]]
HeadsFetch = Callable[[list[str]], Awaitable[dict[str, int]]]
Encode = Callable[[StoredMessage], Publication]

REPAIR_BATCH = 200
MAX_HELD = 10000


@dataclass
class _Room:
    last: int | None = None
    ready: bool = False
    baseline: asyncio.Event = field(default_factory=asyncio.Event)
    held: dict[int, Publication] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    repair_requested: bool = False
    behind: int | None = None   # a head above ``last`` seen at the previous head check


class RoomSequencer:
    """The ``room-order`` stage; see the module docstring."""

    name = "room-order"

    def __init__(self, room_prefix: str, *, history: HistoryFetch, last_seq: LastSeqFetch, encode: Encode,
                 head_check_s: float, heads: HeadsFetch | None = None) -> None:
        self.room_prefix = room_prefix
        self._history = history
        self._last_seq = last_seq
        self._heads = heads
        self.head_check_s = head_check_s
        self._watcher: asyncio.Task[None] | None = None
        self._heads_failing = False
        self.head_repairs = 0
        self._encode = encode
        self.downstream: Emit = not_composed
        self._rooms: dict[str, _Room] = {}
        self.duplicates_dropped = 0
        self.repaired = 0

    def room_of(self, destination: str) -> str | None:
        return room_id_of(self.room_prefix, destination)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._heads is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_heads(), name="room-heads")

    async def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        tasks = [t for t in (watcher, *(s.task for s in self._rooms.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_heads(self) -> None:
        assert self._heads is not None
        while True:
            await asyncio.sleep(self.head_check_s)
            rooms = [room for room, state in self._rooms.items() if state.ready]
            if not rooms:
                continue
            try:
                heads = await self._heads(rooms)
            except Exception as exc:
                if not self._heads_failing:
                    log.warning("cannot read room heads (%s: %s); quiet rooms are checked again when "
                                "the database answers", type(exc).__name__, exc)
                self._heads_failing = True
                continue
            if self._heads_failing:
                log.info("room heads readable again")
            self._heads_failing = False
            self.check_heads(heads)

    def check_heads(self, heads: dict[str, int]) -> None:
        """Repair every tracked room still behind the head it had at the previous check."""
        for room_id, head in heads.items():
            state = self._rooms.get(room_id)
            if state is None or not state.ready:
                continue
            if state.last is None:
                # The baseline could not be read at SUBSCRIBE (database down): it starts here rather
                # than replaying the room's whole history.
                state.last = head
                continue
            last = state.last
            previous, state.behind = state.behind, (head if head > last else None)
            if previous is not None and last < previous and state.task is None:
                log.info("room %s: seq %d committed but not received after %.1fs; repairing from the "
                         "database", room_id, previous, self.head_check_s)
                self.head_repairs += 1
                state.repair_requested = True
                self._start_repair(room_id, state)

    # --- tracking ------------------------------------------------------------------------------

    async def track(self, room_id: str) -> None:
        """Called for each subscription to the room once the node's broker subscription is confirmed,
        before the subscriber's RECEIPT; returns once the room's baseline is known, so everything
        committed after the RECEIPT reaches the subscriber."""
        state = self._rooms.get(room_id)
        if state is not None:
            await state.baseline.wait()
            return
        state = _Room()
        self._rooms[room_id] = state
        metrics.ROOMS_SERVED.inc()
        try:
            state.last = await self._last_seq(room_id) or 0
        except Exception as exc:
            log.warning("room %s: cannot read its last seq (%s); delivering without ordering until the "
                        "database answers", room_id, type(exc).__name__)
            state.last = None
        finally:
            state.ready = True
            state.baseline.set()
        self._process(room_id, state)

    def forget(self, room_id: str) -> None:
        state = self._rooms.pop(room_id, None)
        if state is None:
            return
        metrics.ROOMS_SERVED.dec()
        if state.task is not None:
            state.task.cancel()

    def tracked(self) -> frozenset[str]:
        return frozenset(self._rooms)

    # --- the stage ------------------------------------------------------------------------------

    def accept(self, publication: Publication) -> None:
        """A publication from the bus: pass it on in order (untracked rooms and other destinations
        pass straight through)."""
        room_id = self.room_of(publication.destination)
        state = None if room_id is None else self._rooms.get(room_id)
        if room_id is None or state is None:
            self.downstream(publication)
            return
        for out in self._order(room_id, state, publication):
            self.downstream(out)

    def offer_local(self, publication: Publication) -> None:
        """A message this node just committed: pass it on now, in order, if the room is tracked (an
        untracked room's subscribers are pattern subscribers: they take the bus copy)."""
        room_id = self.room_of(publication.destination)
        state = None if room_id is None else self._rooms.get(room_id)
        if room_id is None or state is None:
            return
        for out in self._order(room_id, state, publication):
            self.downstream(out)

    def _order(self, room_id: str, state: _Room, publication: Publication) -> Iterable[Publication]:
        """What of ``publication`` to deliver now for a tracked room (nothing if held or a duplicate)."""
        seq = publication.seq
        if seq is None:
            _, seq = peek_seq(publication.body)
        if seq is None:
            return (publication,)
        if not state.ready or state.task is not None:
            self._hold(room_id, state, seq, publication)
            return ()
        if state.last is None:
            state.last = seq
            return (publication,)
        if seq <= state.last:
            self._duplicate()
            return ()
        if seq == state.last + 1:
            state.last = seq
            return (publication,)
        self._hold(room_id, state, seq, publication)
        self._start_repair(room_id, state)
        return ()

    def on_gap(self, destinations: frozenset[str]) -> None:
        """Broker reconnected: every tracked room may have missed messages."""
        for room_id, state in self._rooms.items():
            if state.ready:
                state.repair_requested = True
                self._start_repair(room_id, state)

    # --- internals -----------------------------------------------------------------------------

    def _duplicate(self) -> None:
        self.duplicates_dropped += 1
        metrics.DUPLICATES_DROPPED.inc()

    def _hold(self, room_id: str, state: _Room, seq: int, publication: Publication) -> None:
        if state.last is not None and seq <= state.last:
            self._duplicate()
            return
        state.held[seq] = publication
        if state.task is not None:
            # Arrived while a repair read may already be running: that read's snapshot can predate
            # the message this one waits for, so the repair must read again before giving up on it.
            state.repair_requested = True
        if len(state.held) > MAX_HELD:
            log.error("room %s: %d messages held waiting for repair; delivering them with a gap",
                      room_id, len(state.held))
            self._flush_held(state, force=True)

    def _process(self, room_id: str, state: _Room) -> None:
        """Deliver held messages that are now in order; start a repair if a gap remains."""
        self._flush_held(state)
        if state.held or state.repair_requested:
            self._start_repair(room_id, state)

    def _flush_held(self, state: _Room, *, force: bool = False) -> None:
        for seq in sorted(state.held):
            if state.last is not None and seq <= state.last:
                del state.held[seq]
                self._duplicate()
                continue
            if force or state.last is None or seq == state.last + 1:
                self.downstream(state.held.pop(seq))
                state.last = seq
            else:
                break

    def _start_repair(self, room_id: str, state: _Room) -> None:
        if state.task is None:
            metrics.SEQUENCER_REPAIRS.inc()
            state.task = asyncio.create_task(self._repair(room_id, state), name=f"repair-{room_id}")

    async def _repair(self, room_id: str, state: _Room) -> None:
        delay = 0.1
        try:
            while True:
                state.repair_requested = False
                try:
                    await self._repair_once(room_id, state)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    (log.warning if delay == 0.1 else log.debug)(
                        "room %s: repair failed (%s: %s); retrying with back-off", room_id, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self._flush_held(state)
                if state.repair_requested:
                    continue  # a gap signal or an arrival during the read: read again
                if not state.held:
                    break
                if state.held:
                    # A read that started after every held message arrived (so after their commits)
                    # lacks the seq they wait for: a real hole. Deliver in order past it.
                    log.warning("room %s: seq %s missing from the database; skipping", room_id,
                                (state.last or 0) + 1)
                    self._flush_held(state, force=True)
                    break
        finally:
            state.task = None

    async def _repair_once(self, room_id: str, state: _Room) -> None:
        while True:
            after = state.last or 0
            missing = await self._history(room_id, after, REPAIR_BATCH)
            for stored in missing:
                if state.last is not None and stored.seq <= state.last:
                    continue
                held = state.held.pop(stored.seq, None)
                publication = held if held is not None else self._encode(stored)
                if held is None:
                    self.repaired += 1
                    metrics.MESSAGES_RECOVERED.inc()
                self.downstream(publication)
                state.last = stored.seq
            if len(missing) < REPAIR_BATCH:
                return
