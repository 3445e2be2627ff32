"""The receive path: what happens to a publication between the bus and the session writers.

Owns the stages' contract (:class:`Stage`), their composition (:func:`compose`, called once, by
:meth:`gateway.node.Gateway.start`) and the last stage, :class:`LocalFanout`. In order:

1. **bus** — the node's broker (:mod:`gateway.broker.memory`, :mod:`gateway.broker.redis`) receives
   a message on a channel it holds;
2. **envelope decode** — :meth:`gateway.broker.channels.SpringChannelMapper.decode` turns the Redis
   payload (the gateway's envelope or a Spring node's bare JSON) into a :class:`Publication`; the
   broker hands it to the path's entry;
3. **ordering** — the stages components contribute, in order; the chat layer contributes
   :class:`gateway.chat.sequencer.RoomSequencer` (per-room ``seq`` order, duplicates dropped, gaps
   repaired from the database). A stage passes on zero or more publications, now or later (held and
   repaired ones too), always to its ``downstream``: every later stage sees them;
4. **local registry** — :meth:`LocalFanout.deliver` looks the destination up in the hub's
   :class:`gateway.broker.registry.SubscriptionRegistry` and renders one MESSAGE template;
5. **session writers** — :meth:`Receiver.deliver` of every local subscription
   (:meth:`gateway.transport.connection.StompConnection.deliver`) enqueues the frame for the session's
   writer task. Nothing on the path awaits.

A bus gap (the broker may have missed publications) goes to every stage's ``on_gap``.

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gateway import metrics
from gateway.broker.base import Publication
from gateway.broker.registry import SubscriptionRegistry
from gateway.stomp.codec import MessageTemplate

SEQ_HEADER = "x-seq"
"""MESSAGE header carrying a sequenced publication's ``seq`` (a room's message number)."""

Emit = Callable[[Publication], None]
GapSignal = Callable[[frozenset[str]], None]


def not_composed(publication: Publication) -> None:
    """A stage's ``downstream`` until :func:`compose` sets it."""
    raise RuntimeError(f"receive stage for {publication.destination} is not composed into a path "
                       "(gateway.receive.compose)")


class Stage(Protocol):
    """One step of the receive path between the bus and the local fan-out.

    ``accept`` never blocks: it passes publications on (now, or later from a task) by calling
    ``downstream``, which :func:`compose` sets to the next stage's ``accept``.
    """

    name: str
    downstream: Emit

    def accept(self, publication: Publication) -> None: ...

    def on_gap(self, destinations: frozenset[str]) -> None:
        """The bus may have lost publications for these destinations (or all, after a reconnect)."""


@dataclass(frozen=True, slots=True)
class ReceivePath:
    """A composed path: the broker's two callbacks."""

    accept: Emit
    gap: GapSignal
    names: tuple[str, ...]
    """The stages in order, for logs and docs (e.g. ``("room-order", "local-fanout")``)."""


def compose(stages: Sequence[Stage], fanout: LocalFanout[Any]) -> ReceivePath:
    """Chain ``stages`` in order in front of ``fanout``; the one place the receive path is built."""
    downstream: Emit = fanout.deliver
    for stage in reversed(stages):
        stage.downstream = downstream
        downstream = stage.accept

    def gap(destinations: frozenset[str]) -> None:
        for stage in stages:
            stage.on_gap(destinations)

    return ReceivePath(downstream, gap, (*(stage.name for stage in stages), "local-fanout"))


class Receiver(Hashable, Protocol):
    """A local session as the fan-out sees it (the transport's connection)."""

    def deliver(self, template: MessageTemplate, subscription_id: str) -> None:
        """Queue one MESSAGE for the subscription; must not block or raise."""


R = TypeVar("R", bound=Receiver)


def message_template(publication: Publication) -> MessageTemplate:
    """A publication's MESSAGE, serialized once for every receiver (``x-seq`` when sequenced)."""
    extra = publication.headers
    if publication.seq is not None:
        extra = (*extra, (SEQ_HEADER, str(publication.seq)))
    return MessageTemplate(publication.destination, publication.body, content_type=publication.content_type,
                           extra_headers=extra, seq=publication.seq)


class LocalFanout(Generic[R]):
    """The last stage: every local subscription of a publication's destination gets its MESSAGE."""

    def __init__(self, registry: SubscriptionRegistry[R]) -> None:
        self.registry = registry

    def deliver(self, publication: Publication) -> None:
        receivers = list(self.registry.match(publication.destination))
        if not receivers:
            return
        template = message_template(publication)
        for receiver, subscription_id in receivers:
            receiver.deliver(template, subscription_id)
        metrics.MESSAGES_DELIVERED.inc(len(receivers))
        if publication.committed_at is not None:
            metrics.SAVE_TO_DELIVER.observe(max(0.0, time.time() - publication.committed_at))
