"""In-memory broker: the embedded single-node default.

Owns: delivering publications to this process's own ``on_publication`` callback for destinations
it is subscribed to. Publishing never blocks and never fails while started.
Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.broker.base import BrokerUnavailable, GapHandler, Publication, PublicationHandler
from gateway.broker.patterns import is_pattern, matches


class MemoryBroker:
    """A :class:`~gateway.broker.base.Broker` whose only node is this process."""

    def __init__(self, node_id: str = "memory") -> None:
        self.node_id = node_id
        self._handler: PublicationHandler | None = None
        self._exact: set[str] = set()      # the destinations subscribed (the hub subscribes each once)
        self._patterns: set[str] = set()

    async def start(self, on_publication: PublicationHandler, on_gap: GapHandler | None = None) -> None:
        self._handler = on_publication

    async def stop(self) -> None:
        self._handler = None

    @property
    def healthy(self) -> bool:
        return self._handler is not None

    async def subscribe(self, destination: str) -> None:
        (self._patterns if is_pattern(destination) else self._exact).add(destination)

    async def unsubscribe(self, destination: str) -> None:
        (self._patterns if is_pattern(destination) else self._exact).discard(destination)

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern this node is subscribed to."""
        return frozenset(self._exact) | frozenset(self._patterns)

    async def ping(self) -> bool:
        return self._handler is not None

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        for publication in publications:
            await self.publish(publication)

    async def publish(self, publication: Publication) -> None:
        handler = self._handler
        if handler is None:
            raise BrokerUnavailable("memory broker is not started")
        if publication.destination in self._exact or any(
                matches(p, publication.destination) for p in self._patterns):
            handler(publication)
