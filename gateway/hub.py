"""The node's message hub: routing between STOMP sessions, application handlers and the broker.

Owns:
- :class:`MessageRouter`, the ``@MessageMapping`` analogue: handlers for application destinations
  (``/pub/...``), registered with a decorator on the path below the application prefix;
- :class:`Hub`: the node-local subscription registry, node-level broker (un)subscription on the first
  and last local subscriber, inbound publication fan-out (one :class:`MessageTemplate` per
  publication, rendered per receiver), publication interceptors (used by the chat layer to order
  and de-duplicate by sequence), and session lifecycle hooks (connect, subscribe, unsubscribe,
  disconnect — the last exactly once per session).

Data flows one way: session -> router -> handler -> broker.publish -> broker callback on every node
-> interceptors -> registry -> each session's ``deliver`` (which only enqueues, never awaits).

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.broker.base import Broker, Publication
from gateway.broker.patterns import is_pattern, matches
from gateway.broker.registry import SubscriptionRegistry
from gateway.limits import NodeLimits
from gateway.stomp.codec import MessageTemplate

log = logging.getLogger(__name__)


SEQ_HEADER = "x-seq"
"""MESSAGE header carrying a sequenced publication's ``seq`` (a room's message number)."""
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
Interceptor = Callable[[Publication], Iterable[Publication]]
ResumeHandler = Callable[[str, int], Awaitable[list[Publication]]]
"""(destination, after seq) -> the destination's publications after that seq, in order; raises
:class:`MessageRejected` when it cannot (not a sequenced destination, resume point too old)."""
SessionHook = Callable[[SessionInfo], Awaitable[None]]
SubscriptionHook = Callable[[SessionInfo, str, str], Awaitable[None]]
GapListener = Callable[[frozenset[str]], None]


class MessageRouter:
    """Application destination handlers keyed by the path below an application prefix."""

    def __init__(self, app_prefixes: tuple[str, ...] = ("/pub",)) -> None:
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
    """Per-node routing core; see the module docstring."""

    def __init__(self, broker: Broker, router: MessageRouter, *, node_id: str) -> None:
        self.broker = broker
        self.router = router
        self.node_id = node_id
        self.registry: SubscriptionRegistry[Subscriber] = SubscriptionRegistry()
        self.sessions: dict[str, Subscriber] = {}
        # The node's abuse limits (SEND rate, sessions per user and per address), started and stopped
        # with the hub; set by the app (a connection builds per-node ones when it finds None).
        self.limits: NodeLimits | None = None
        self.interceptors: list[Interceptor] = []
        self.on_connect: list[SessionHook] = []
        self.authorize_subscribe: list[SubscriptionHook] = []
        # Awaited for every subscription once the node's broker subscription is confirmed and before
        # the client's RECEIPT (the chat sequencer reads its baseline here): what is committed after
        # the RECEIPT reaches the subscriber.
        self.on_broker_subscribed: list[SubscriptionHook] = []
        self.on_subscribe: list[SubscriptionHook] = []
        self.on_unsubscribe: list[SubscriptionHook] = []
        self.on_disconnect: list[SessionHook] = []
        # Called with a destination when its last local subscription is gone (UNSUBSCRIBE or session end).
        self.on_destination_idle: list[Callable[[str], None]] = []
        self.gap_listeners: list[GapListener] = []
        self.resume_handler: ResumeHandler | None = None
        self._subscriptions: dict[str, dict[str, str]] = {}  # session id -> {sub id: destination}
        self._broker_lock = asyncio.Lock()
        self._ended: set[str] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self.receive_publication, self._gap)
        if self.limits is not None:
            await self.limits.start()

    async def stop(self) -> None:
        if self.limits is not None:
            await self.limits.stop()
        await self.broker.stop()

    def _gap(self, destinations: frozenset[str]) -> None:
        for listener in self.gap_listeners:
            try:
                listener(destinations)
            except Exception:
                log.exception("gap listener failed")

    # --- sessions ----------------------------------------------------------------------------

    def register(self, subscriber: Subscriber) -> None:
        self.sessions[subscriber.info.session_id] = subscriber

    async def session_connected(self, subscriber: Subscriber) -> None:
        for hook in self.on_connect:
            await hook(subscriber.info)

    async def session_ended(self, subscriber: Subscriber, *, connected: bool) -> None:
        """Remove the session's subscriptions and run disconnect hooks, exactly once per session."""
        info = subscriber.info
        if info.session_id in self._ended:
            return
        self._ended.add(info.session_id)
        self.sessions.pop(info.session_id, None)
        for sub_id, destination in list(self._subscriptions.get(info.session_id, {}).items()):
            await self._remove_subscription(subscriber, sub_id, destination)
        self._subscriptions.pop(info.session_id, None)
        if connected:
            for hook in self.on_disconnect:
                try:
                    await hook(info)
                except Exception:
                    log.exception("disconnect hook failed for session %s", info.session_id)
        self._ended.discard(info.session_id)

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, subscriber: Subscriber, subscription_id: str, destination: str) -> None:
        """Authorize, then register a subscription (broker-subscribing the node on the first).

        Raises :class:`SubscriptionDenied` from an ``authorize_subscribe`` hook before anything is
        registered. The caller answers the receipt, then calls :meth:`subscribed` for the hooks.
        """
        for check in self.authorize_subscribe:
            await check(subscriber.info, subscription_id, destination)
        async with self._broker_lock:
            if self.registry.add(destination, subscriber, subscription_id):
                try:
                    await self.broker.subscribe(destination)
                except BaseException:
                    self.registry.remove(destination, subscriber, subscription_id)
                    raise
        self._subscriptions.setdefault(subscriber.info.session_id, {})[subscription_id] = destination
        for hook in self.on_broker_subscribed:
            await hook(subscriber.info, subscription_id, destination)

    async def subscribed(self, subscriber: Subscriber, subscription_id: str, destination: str) -> None:
        """Run the ``on_subscribe`` hooks (presence ENTER, ...) once the subscription is in place."""
        for hook in self.on_subscribe:
            await hook(subscriber.info, subscription_id, destination)

    async def unsubscribe(self, subscriber: Subscriber, subscription_id: str, destination: str,
                          *, run_hooks: bool = True) -> None:
        removed = await self._remove_subscription(subscriber, subscription_id, destination)
        if removed and run_hooks:
            for hook in self.on_unsubscribe:
                await hook(subscriber.info, subscription_id, destination)

    async def _remove_subscription(self, subscriber: Subscriber, subscription_id: str, destination: str) -> bool:
        session_id = subscriber.info.session_id
        subs = self._subscriptions.get(session_id)
        if subs is None or subs.pop(subscription_id, None) is None:
            return False
        if not subs and session_id not in self.sessions:
            del self._subscriptions[session_id]  # an ended session's late subscription: leave nothing
        async with self._broker_lock:
            if self.registry.remove(destination, subscriber, subscription_id):
                try:
                    await self.broker.unsubscribe(destination)
                except Exception:
                    log.warning("broker unsubscribe of %s failed", destination, exc_info=True)
                for listener in self.on_destination_idle:
                    listener(destination)
        return True

    # --- publishing and delivery ---------------------------------------------------------------

    async def publish(self, publication: Publication) -> None:
        await self.broker.publish(publication)

    async def publish_many(self, publications: Sequence[Publication]) -> None:
        await self.broker.publish_many(publications)

    def receive_publication(self, publication: Publication) -> None:
        """Broker callback: run interceptors, then fan out locally. Never blocks."""
        publications: Iterable[Publication] = (publication,)
        for interceptor in self.interceptors:
            publications = [out for pub in publications for out in interceptor(pub)]
        for pub in publications:
            self.deliver_locally(pub)

    async def resume(self, destination: str, after: int) -> list[MessageTemplate]:
        """The MESSAGE templates of ``destination`` after ``after`` (see :data:`ResumeHandler`)."""
        if self.resume_handler is None:
            raise MessageRejected(f"{RESUME_HEADER} is not supported here")
        return [self.template(pub) for pub in await self.resume_handler(destination, after)]

    @staticmethod
    def template(publication: Publication) -> MessageTemplate:
        """A publication's MESSAGE, serialized once for every receiver (``x-seq`` when sequenced)."""
        extra = publication.headers
        if publication.seq is not None:
            extra = (*extra, (SEQ_HEADER, str(publication.seq)))
        return MessageTemplate(publication.destination, publication.body, content_type=publication.content_type,
                               extra_headers=extra, seq=publication.seq)

    def deliver_locally(self, publication: Publication) -> int:
        """Render ``publication`` to every local subscriber of its destination; returns the count."""
        receivers = list(self.registry.match(publication.destination))
        if not receivers:
            return 0
        template = self.template(publication)
        for subscriber, subscription_id in receivers:
            subscriber.deliver(template, subscription_id)
        return len(receivers)

    def close_all(self, code: int, reason: str, error: str | None = None) -> None:
        for subscriber in list(self.sessions.values()):
            subscriber.close_soon(code, reason, error)
