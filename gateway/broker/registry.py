"""The node-local subscription registry: which sessions hold which subscriptions.

Owns the node's one record of local subscriptions: which (subscriber, subscription id) pairs should
receive a destination, and each subscriber's subscriptions (the other way round, for session end and
for the chat layer's access re-checks). Nothing else keeps a copy: the hub, the broker, presence and
the sequencer ask it or react to its first/last transitions. (A session's STOMP state keeps its own
subscription ids for the protocol's checks; that is the client's view, not the node's.)
Exact destinations are a dict lookup (the hot path: rooms); Ant patterns are checked in a list.
It reports when a destination gains its first or loses its last local subscriber, so the node can
subscribe or unsubscribe on the broker exactly once per destination.

Must not import Starlette, asyncio or the chat domain.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from gateway.broker.patterns import compile_pattern, is_pattern

S = TypeVar("S", bound=Hashable)


class SubscriptionRegistry(Generic[S]):
    """Subscriptions of local subscribers ``S`` (sessions), keyed by destination."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[tuple[S, str], None]] = {}
        self._patterns: dict[str, dict[tuple[S, str], None]] = {}
        self._by_subscriber: dict[S, dict[str, str]] = {}   # subscriber -> {subscription id: destination}

    def add(self, destination: str, subscriber: S, subscription_id: str) -> bool:
        """Register; True when this is the destination's first local subscription."""
        table = self._patterns if is_pattern(destination) else self._exact
        if is_pattern(destination):
            compile_pattern(destination)  # fail early on a broken pattern
        entries = table.setdefault(destination, {})
        first = not entries
        entries[(subscriber, subscription_id)] = None
        self._by_subscriber.setdefault(subscriber, {})[subscription_id] = destination
        return first

    def remove(self, destination: str, subscriber: S, subscription_id: str) -> bool:
        """Unregister; True when the destination has no local subscription left."""
        own = self._by_subscriber.get(subscriber)
        if own is not None and own.get(subscription_id) == destination:
            del own[subscription_id]
            if not own:
                del self._by_subscriber[subscriber]
        table = self._patterns if is_pattern(destination) else self._exact
        entries = table.get(destination)
        if entries is None:
            return False
        entries.pop((subscriber, subscription_id), None)
        if not entries:
            del table[destination]
            return True
        return False

    def match(self, destination: str) -> Iterator[tuple[S, str]]:
        """Every (subscriber, subscription id) that should receive a publication to ``destination``."""
        entries = self._exact.get(destination)
        if entries:
            yield from list(entries)
        for pattern, pattern_entries in list(self._patterns.items()):
            if compile_pattern(pattern).match(destination) is not None:
                yield from list(pattern_entries)

    def holds(self, subscriber: S, subscription_id: str) -> bool:
        """Whether ``subscriber`` has a subscription with this id."""
        return subscription_id in self._by_subscriber.get(subscriber, {})

    def subscriptions_of(self, subscriber: S) -> dict[str, str]:
        """A copy of ``subscriber``'s subscriptions: subscription id -> destination."""
        return dict(self._by_subscriber.get(subscriber, {}))

    def subscribers(self) -> list[S]:
        """Every subscriber holding at least one subscription."""
        return list(self._by_subscriber)

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern with at least one local subscription."""
        return frozenset(self._exact) | frozenset(self._patterns)

    def count(self, destination: str) -> int:
        table = self._patterns if is_pattern(destination) else self._exact
        return len(table.get(destination, ()))
