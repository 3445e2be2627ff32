"""The :class:`Broker` protocol: how nodes share publications.

Owns: the contract between the gateway and its message bus. A broker moves :class:`Publication`
values between nodes; it knows nothing of STOMP sessions or WebSockets. Every node runs one
broker; the node subscribes to a destination when its first local session does and unsubscribes
when the last one leaves. Every publication a node receives (its own included, exactly once) is
handed to the ``on_publication`` callback given to :meth:`Broker.start`; that callback must never
block (it only enqueues frames for session writers).

``on_gap`` is called when the broker may have missed publications (e.g. the Redis subscriber
connection dropped and came back); receivers use it to repair from history.

Implementations: :mod:`gateway.broker.memory` (single node) and :mod:`gateway.broker.redis`.
Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Publication:
    """One message for a broker destination (e.g. ``/sub/chat/room/<roomId>``).

    ``body`` is the MESSAGE body as bytes (ChatMessage JSON for rooms). ``headers`` are extra headers
    every receiver gets besides the standard ones (never credentials). ``content_type`` is put in
    the MESSAGE's ``content-type`` header. ``origin`` is the publishing node's id.

    ``seq`` is the publication's position in its destination's order (a room's gap-free message
    sequence), carried next to the body so receivers can order without reading the body; None for
    publications that have no order (plain broker destinations, a Spring node's payload).
    """

    destination: str
    body: bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    origin: str = ""
    seq: int | None = None
    committed_at: float | None = field(default=None, compare=False)
    """When the message was stored (Unix seconds), where the receiving node knows it: set by the chat
    layer for what this node committed and for what it repairs from the database; not carried by the
    bus (Spring's wire format has no such field). Feeds the save-to-deliver latency metric."""


PublicationHandler = Callable[[Publication], None]
RoomPayloadReader = Callable[[bytes], tuple[str | None, int | None]]
"""Reads ``(room id, seq)`` from a room payload that travels bare, as Spring servers write and read it
(the chat layer's ChatMessage JSON); either may be None. Supplied by the application, so the broker
never knows the payload's format."""
GapHandler = Callable[[frozenset[str]], None]
"""Called with the destinations (and patterns) that may have lost publications."""


class BrokerUnavailable(Exception):
    """Publishing failed because the bus cannot be reached; nothing was sent."""


@runtime_checkable
class Broker(Protocol):
    """A message bus between gateway nodes."""

    async def start(self, on_publication: PublicationHandler, on_gap: GapHandler | None = None) -> None:
        """Connect and begin delivering received publications to ``on_publication``."""

    async def stop(self) -> None:
        """Disconnect; no callbacks run after this returns."""

    async def subscribe(self, destination: str) -> None:
        """Start receiving publications for ``destination`` (an exact destination or an Ant pattern).

        Idempotent: the hub calls it once, for the destination's first local subscriber. The broker
        hands on whatever its channels carry (in Spring's ``single`` mode, every room): which local
        sessions receive a publication is the receive path's question, not the broker's.
        """

    async def unsubscribe(self, destination: str) -> None:
        """Stop receiving publications for ``destination`` (after its last local subscriber)."""

    async def publish(self, publication: Publication) -> None:
        """Send ``publication`` to every node subscribed to its destination (this one included).

        Raises :class:`BrokerUnavailable` when it could not be sent.
        """

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        """Send ``publications`` in order, in as few round trips as the bus allows (one pipeline).

        Raises :class:`BrokerUnavailable` when they could not all be sent; some may have been.
        """

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern this node holds on the bus."""

    @property
    def healthy(self) -> bool:
        """False while the broker is known to be disconnected (its listener is not subscribed)."""

    async def ping(self) -> bool:
        """Whether the bus answers a round trip now (for readiness; never raises)."""
