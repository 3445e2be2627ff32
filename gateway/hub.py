"""The node's message hub: routing between STOMP sessions, application handlers and the broker.

Owns:
- :class:`MessageRouter`, the ``@MessageMapping`` analogue: handlers for application destinations
  (``/pub/...``), registered with a decorator on the path below the application prefix;
- :class:`Hub`: the node's sessions and their subscriptions (kept in one
  :class:`~gateway.broker.registry.SubscriptionRegistry`), the node's broker subscription on a
  destination's first local subscriber and its release after the last, and the session events a
  component reacts to through one :class:`HubListener` (authorize, subscription confirmed,
  subscribed, unsubscribed, destination idle, connected, ended — the last exactly once per session).

The send path goes session -> router -> handler -> ``Hub.publish``; what comes back from the bus
follows the receive path in :mod:`gateway.receive` (ordering stages, then the local fan-out over
this hub's registry).

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway import metrics
from gateway.broker.base import Broker, Publication
from gateway.broker.patterns import is_pattern, matches
from gateway.broker.registry import SubscriptionRegistry
from gateway.limits import NodeLimits
from gateway.receive import ReceivePath, message_template
from gateway.stomp.codec import MessageTemplate

log = logging.getLogger(__name__)


RESUME_HEADER = "x-resume-after"
"""SUBSCRIBE header: first deliver the destination's publications after this ``seq``, then live ones."""


class MessageRejected(Exception):
    """Raised by an application handler: the client gets an ERROR with ``str(exc)`` as ``message``,
    and the session is closed (STOMP's rule after an ERROR)."""

    close_session = True


class MessageNotStored(MessageRejected):
    """The message could not be stored right now (the database is down or too slow) and sending it
    again is safe. The client gets an ERROR whose ``message`` is ``not stored, retry`` and the
    session STAYS OPEN: a deliberate deviation from STOMP's close-after-ERROR, so that a database
    outage does not disconnect every session that sends."""

    close_session = False

    def __init__(self, message: str = "not stored, retry") -> None:
        super().__init__(message)


class SubscriptionDenied(Exception):
    """Raised by a subscribe hook: the client may not read this destination."""


@dataclass(slots=True, eq=False)
class SessionInfo:
    """What the rest of the node may know about one STOMP session."""

    session_id: str
    transport: str
    remote: str
    user: str | None = None
    version: str | None = None
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A client's SEND to an application destination, as a handler sees it."""

    session: SessionInfo
    destination: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Subscriber(Protocol):
    """A local session as the hub sees it (implemented by the transport's connection)."""

    info: SessionInfo

    def __hash__(self) -> int: ...

    def deliver(self, template: MessageTemplate, subscription_id: str) -> None:
        """Queue one MESSAGE for the subscription; must not block or raise."""

    def close_soon(self, code: int, reason: str, error: str | None = None) -> None:
        """Ask the session to close (optionally after an ERROR frame); must not block."""


Handler = Callable[[InboundMessage], Awaitable["asyncio.Future[None] | None"]]
"""An application destination's handler. It returns None when it is done, or a future that
resolves when the message is durable (or fails with :class:`MessageRejected`): the session then
reads on and answers the SEND's RECEIPT when the future resolves, in SEND order."""


class HubListener:
    """What a component (the chat layer) does at a session's events; every method is optional.

    The hub calls each listener in the order they were added, and awaits it: a slow listener delays
    the session's next frame, never another session.
    """

    async def authorize_subscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        """Before anything is registered; raise :class:`SubscriptionDenied` to refuse."""

    async def subscription_confirmed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        """The node's broker subscription is confirmed; before the client's RECEIPT (a baseline read
        here makes everything committed after the RECEIPT reach the subscriber)."""

    async def subscribed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        """After the RECEIPT (and any resume replay): presence ENTER and the like."""

    async def unsubscribed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        """A client's UNSUBSCRIBE was applied (not called for the subscriptions a session end removes)."""

    def destination_idle(self, destination: str) -> None:
        """The destination's last local subscription is gone (UNSUBSCRIBE or session end)."""

    async def session_connected(self, session: SessionInfo) -> None:
        """The session's CONNECT was accepted."""

    async def session_ended(self, session: SessionInfo) -> None:
        """A connected session ended; its subscriptions are already removed. Called once."""

    async def resume(self, destination: str, after: int) -> list[Publication] | None:
        """The destination's publications after ``after``, in order, if this listener serves it (None
        if not); raises :class:`MessageRejected` when it cannot (resume point too old, ...)."""
        return None


class MessageRouter:
    """Application destination handlers keyed by the path below an application prefix."""

    def __init__(self, app_prefixes: tuple[str, ...]) -> None:
        self.app_prefixes = app_prefixes
        self._exact: dict[str, Handler] = {}
        self._patterns: list[tuple[str, Handler]] = []

    def message_mapping(self, path: str) -> Callable[[Handler], Handler]:
        """Decorator: ``@router.message_mapping("/chat/message")`` handles ``/pub/chat/message``."""
        def register(handler: Handler) -> Handler:
            self.add(path, handler)
            return handler
        return register

    def add(self, path: str, handler: Handler) -> None:
        if not path.startswith("/"):
            path = "/" + path
        if is_pattern(path):
            self._patterns.append((path, handler))
        else:
            self._exact[path] = handler

    def resolve(self, destination: str) -> Handler | None:
        for prefix in self.app_prefixes:
            base = prefix.rstrip("/")
            if destination.startswith(base + "/"):
                path = destination[len(base):]
                handler = self._exact.get(path)
                if handler is not None:
                    return handler
                for pattern, pattern_handler in self._patterns:
                    if matches(pattern, path):
                        return pattern_handler
        return None


class Hub:
    """Per-node sessions and subscriptions; see the module docstring."""

    def __init__(self, broker: Broker, router: MessageRouter, *, node_id: str) -> None:
        self.broker = broker
        self.router = router
        self.node_id = node_id
        self.registry: SubscriptionRegistry[Subscriber] = SubscriptionRegistry()
        self.sessions: dict[str, Subscriber] = {}
        # The node's abuse limits (SEND rate, sessions per user and per address), started and stopped
        # with the hub; set by the app (a connection builds per-node ones when it finds None).
        self.limits: NodeLimits | None = None
        self.listeners: list[HubListener] = []
        self._broker_lock = asyncio.Lock()
        self._ended: set[str] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, receive: ReceivePath) -> None:
        """Start the broker feeding ``receive`` (see :func:`gateway.receive.compose`), then the limits."""
        await self.broker.start(receive.accept, receive.gap)
        if self.limits is not None:
            await self.limits.start()

    async def stop(self) -> None:
        if self.limits is not None:
            await self.limits.stop()
        await self.broker.stop()

    # --- sessions ----------------------------------------------------------------------------

    def register(self, subscriber: Subscriber) -> None:
        self.sessions[subscriber.info.session_id] = subscriber

    async def session_connected(self, subscriber: Subscriber) -> None:
        for listener in self.listeners:
            await listener.session_connected(subscriber.info)

    async def session_ended(self, subscriber: Subscriber, *, connected: bool) -> None:
        """Remove the session's subscriptions and tell the listeners, exactly once per session."""
        info = subscriber.info
        if info.session_id in self._ended:
            return
        self._ended.add(info.session_id)
        self.sessions.pop(info.session_id, None)
        for sub_id, destination in self.registry.subscriptions_of(subscriber).items():
            await self._remove_subscription(subscriber, sub_id, destination)
        if connected:
            for listener in self.listeners:
                try:
                    await listener.session_ended(info)
                except Exception:
                    log.exception("session end listener failed for session %s", info.session_id)
        self._ended.discard(info.session_id)

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, subscriber: Subscriber, subscription_id: str, destination: str) -> None:
        """Authorize, then register a subscription (broker-subscribing the node on the first).

        Raises :class:`SubscriptionDenied` from a listener before anything is registered. The caller
        answers the receipt, then calls :meth:`subscribed`.
        """
        for listener in self.listeners:
            await listener.authorize_subscribe(subscriber.info, subscription_id, destination)
        async with self._broker_lock:
            if self.registry.add(destination, subscriber, subscription_id):
                try:
                    await self.broker.subscribe(destination)
                except BaseException:
                    self.registry.remove(destination, subscriber, subscription_id)
                    raise
        metrics.SUBSCRIPTIONS.inc()
        for listener in self.listeners:
            await listener.subscription_confirmed(subscriber.info, subscription_id, destination)

    async def subscribed(self, subscriber: Subscriber, subscription_id: str, destination: str) -> None:
        """Tell the listeners (presence ENTER, ...) once the subscription is in place."""
        for listener in self.listeners:
            await listener.subscribed(subscriber.info, subscription_id, destination)

    async def unsubscribe(self, subscriber: Subscriber, subscription_id: str, destination: str,
                          *, run_hooks: bool = True) -> None:
        removed = await self._remove_subscription(subscriber, subscription_id, destination)
        if removed and run_hooks:
            for listener in self.listeners:
                await listener.unsubscribed(subscriber.info, subscription_id, destination)

    async def _remove_subscription(self, subscriber: Subscriber, subscription_id: str, destination: str) -> bool:
        if not self.registry.holds(subscriber, subscription_id):
            return False
        async with self._broker_lock:
            idle = self.registry.remove(destination, subscriber, subscription_id)
            metrics.SUBSCRIPTIONS.dec()
            if idle:
                try:
                    await self.broker.unsubscribe(destination)
                except Exception:
                    log.warning("broker unsubscribe of %s failed", destination, exc_info=True)
                for listener in self.listeners:
                    try:
                        listener.destination_idle(destination)
                    except Exception:
                        log.exception("destination idle listener failed for %s", destination)
        return True

    def subscriptions_of(self, subscriber: Subscriber) -> dict[str, str]:
        """The subscriber's subscriptions (subscription id -> destination), from the registry."""
        return self.registry.subscriptions_of(subscriber)

    # --- publishing and resume ------------------------------------------------------------------

    async def publish(self, publication: Publication) -> None:
        await self.broker.publish(publication)

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        await self.broker.publish_many(publications)

    async def resume(self, destination: str, after: int) -> list[MessageTemplate]:
        """The MESSAGE templates of ``destination`` after ``after``, from the first listener that
        serves the destination; :class:`MessageRejected` if none does."""
        for listener in self.listeners:
            publications = await listener.resume(destination, after)
            if publications is not None:
                return [message_template(pub) for pub in publications]
        raise MessageRejected(f"{RESUME_HEADER} is not supported for {destination}")

    def close_all(self, code: int, reason: str, error: str | None = None) -> None:
        for subscriber in list(self.sessions.values()):
            subscriber.close_soon(code, reason, error)
