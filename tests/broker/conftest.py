"""Fixtures for the broker tests: real redis-server processes and started broker nodes.

- ``redis_server``: one redis-server for the whole session (tests isolate themselves with a unique
  channel prefix, so they never see each other's traffic);
- ``private_redis``: a redis-server of the test's own, for fault tests that kill or pause it;
- ``bus`` (memory, redis-room, redis-single, redis-sharded) and ``redis_bus`` (the Redis kinds;
  redis-sharded = room mode with ``redis_sharded_pubsub`` on, SSUBSCRIBE/SPUBLISH on one server): a
  :class:`Bus` that makes started :class:`Node` objects and stops them after the test.

A :class:`Node` records what its broker delivered. Waiting is polling with a generous deadline
(:meth:`Node.wait_for`); "not delivered" is checked with :meth:`Bus.settle`: a barrier publication
sent after the publications under test, since one publisher's publications arrive in order.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gateway.broker.base import Broker, Publication
from gateway.broker.channels import SpringChannelMapper
from gateway.broker.memory import MemoryBroker
from gateway.broker.patterns import matches
from gateway.broker.redis import RedisBroker
from gateway.chat.payload import peek_seq
from tests.support.polling import eventually
from tests.support.redis_server import RedisServer, RedisServerMissing

BARRIER = "/sub/test/barrier"
DEADLINE_S = 10.0


def _start_server() -> RedisServer:
    server = RedisServer()
    try:
        server.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _start_server()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = _start_server()
    yield server
    server.close()


class Node:
    """One broker (= one gateway node) and everything its callbacks received."""

    def __init__(self, name: str, broker: Broker) -> None:
        self.name = name
        self.broker = broker
        self.received: list[Publication] = []
        self.unmatched: list[Publication] = []
        self.barriers: list[bytes] = []
        self.gaps: list[frozenset[str]] = []

    def on_publication(self, publication: Publication) -> None:
        if publication.destination == BARRIER:
            self.barriers.append(publication.body)
        elif any(matches(held, publication.destination) for held in self.broker.destinations()):
            # What a local subscriber would get: the broker hands on everything its channels carry
            # (a Redis glob or Spring's single channel carries more than the destination asked for),
            # and the receive path's fan-out matches destinations exactly, as this does.
            self.received.append(publication)
        else:
            self.unmatched.append(publication)

    def on_gap(self, destinations: frozenset[str]) -> None:
        self.gaps.append(destinations)

    async def start(self) -> Node:
        await self.broker.start(self.on_publication, self.on_gap)
        await self.broker.subscribe(BARRIER)
        return self

    def bodies(self, destination: str | None = None) -> list[bytes]:
        return [p.body for p in self.received if destination is None or p.destination == destination]

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
        """:func:`~tests.support.polling.eventually`, naming this node in the failure."""
        await eventually(condition, f"{what} on node {self.name}", timeout_s=timeout_s)

    async def wait_received(self, count: int) -> None:
        await self.wait_for(lambda: len(self.received) >= count, f"{count} publications")


class Bus:
    """Makes started nodes of one kind of broker; ``max_nodes`` is 1 for the memory broker."""

    def __init__(self, kind: str, server: RedisServer | None) -> None:
        self.kind = kind
        self.server = server
        self.prefix = f"t{uuid.uuid4().hex[:10]}:"
        self.nodes: list[Node] = []

    @property
    def max_nodes(self) -> int:
        return 1 if self.kind == "memory" else 64

    @property
    def mode(self) -> str:
        return "room" if self.sharded else self.kind.removeprefix("redis-")

    @property
    def sharded(self) -> bool:
        """Room channels over SSUBSCRIBE/SPUBLISH (``redis_sharded_pubsub``) on the one redis-server."""
        return self.kind == "redis-sharded"

    def mapper(self, node_id: str) -> SpringChannelMapper:
        return SpringChannelMapper(mode=self.mode, prefix=self.prefix, node_id=node_id, room_reader=peek_seq,
                                   sharded=self.sharded)

    def broker(self, node_id: str, **options: Any) -> Broker:
        if self.kind == "memory":
            return MemoryBroker(node_id)
        assert self.server is not None
        options.setdefault("reconnect_max_s", 0.5)
        options.setdefault("timeout_s", 2.0)
        return RedisBroker(self.server.url, node_id=node_id, channel_mapper=self.mapper(node_id), **options)

    async def node(self, *, start: bool = True, **options: Any) -> Node:
        if len(self.nodes) >= self.max_nodes:
            raise RuntimeError(f"the {self.kind} bus has at most {self.max_nodes} node(s)")
        name = f"n{len(self.nodes)}"
        node = Node(name, self.broker(name, **options))
        self.nodes.append(node)
        if start:
            await node.start()
        return node

    async def settle(self, publisher: Node, nodes: list[Node] | None = None) -> None:
        """Publish a barrier from ``publisher`` and wait until every node received it.

        Everything ``publisher`` published before has then been delivered (or will never be).
        """
        token = uuid.uuid4().hex.encode()
        await publisher.broker.publish(Publication(BARRIER, token, "text/plain"))
        for node in nodes if nodes is not None else self.nodes:
            barriers = node.barriers
            await node.wait_for(lambda: token in barriers, "the barrier")  # noqa: B023 (awaited here)

    async def close(self) -> None:
        for node in self.nodes:
            await node.broker.stop()


async def _make_bus(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    server = request.getfixturevalue("redis_server") if kind != "memory" else None
    bus = Bus(kind, server)
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture(params=["memory", pytest.param("redis-room", marks=pytest.mark.redis),
                        pytest.param("redis-single", marks=pytest.mark.redis),
                        pytest.param("redis-sharded", marks=pytest.mark.redis)])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    async for value in _make_bus(request.param, request):
        yield value


@pytest.fixture(params=[pytest.param("redis-room", marks=pytest.mark.redis),
                        pytest.param("redis-single", marks=pytest.mark.redis),
                        pytest.param("redis-sharded", marks=pytest.mark.redis)])
async def redis_bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    async for value in _make_bus(request.param, request):
        yield value
