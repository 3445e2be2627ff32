"""The node-local subscription registry: which sessions hold which subscriptions.

Owns: mapping a destination to the (subscriber, subscription id) pairs that should receive it.
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

    def add(self, destination: str, subscriber: S, subscription_id: str) -> bool:
        """Register; True when this is the destination's first local subscription."""
        table = self._patterns if is_pattern(destination) else self._exact
        if is_pattern(destination):
            compile_pattern(destination)  # fail early on a broken pattern
        entries = table.setdefault(destination, {})
        first = not entries
        entries[(subscriber, subscription_id)] = None
        return first

    def remove(self, destination: str, subscriber: S, subscription_id: str) -> bool:
        """Unregister; True when the destination has no local subscription left."""
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

    def destinations(self) -> frozenset[str]:
        """Every destination and pattern with at least one local subscription."""
        return frozenset(self._exact) | frozenset(self._patterns)

    def count(self, destination: str) -> int:
        table = self._patterns if is_pattern(destination) else self._exact
        return len(table.get(destination, ()))
