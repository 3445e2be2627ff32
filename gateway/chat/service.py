"""ChatMessageService: persist once, commit, then publish — the seed's fix, done right.

Owns the chat rules of the Spring reference:
- a client's SEND to ``/pub/chat/message`` is validated (bad JSON, unknown room, missing fields,
  oversize text -> ERROR, nothing stored), ``sender`` comes from the authenticated user when there is
  one (else the client's ``sender``, else ``UnknownUser``), it is saved through the group-commit
  writer and published to the room only after the commit; a client message id repeated by the same
  sender is not stored again and is re-published with the original id and seq (another sender's
  equal id is a different message); a sender name that is reserved (gateway.auth.is_reserved_name)
  is refused when the session has no user;
- authorization (gateway.authz, docs/security.md): the hub's ``authorize_subscribe`` hook and every
  SEND ask the ``authz_policy`` through a per-session cache (a SEND whose decision is cached costs a
  dictionary lookup, no await); :meth:`ChatService.membership_changed` drops this node's cached
  decisions about a room and closes a removed member's subscribed sessions at once; with a policy
  other than ``open``, every ``authz_cache_ttl_s`` one batched re-check closes the sessions that lost
  a room through a change made on another node;
- the SEND path is pipelined: :meth:`ChatService.handle_send` validates, waits for room in the
  writer (the node's backpressure, see ``max_pending_sends``), submits, and returns a future that
  resolves after the commit, so one session can have several SENDs in one group commit;
- after each group commit (:meth:`ChatService.committed`, the writer's ``on_commit``, in commit order) every stored message is
  encoded once (``userCount`` from the presence cache, never a Redis call per message), offered to
  this node's own subscribers at once through the sequencer (no bus round trip, and a frozen Redis
  does not stop it), and queued for the bus; one publisher task sends whatever is queued as one
  pipelined batch, in commit order;
- presence: ENTER on SUBSCRIBE to a room and QUIT on UNSUBSCRIBE, DISCONNECT or a lost connection,
  exactly once per session and room (Spring ran its disconnect path twice); the older frontend
  generation's client-sent ENTER is handled too (``<sender>님이 입장하셨습니다.``);
- a publish that fails after the commit is retried in the background until the bus is back (the
  message is durable; receivers' sequencers drop any copy they already delivered). The queue holds
  at most ``MAX_REPUBLISH_QUEUE`` messages; past it the oldest are dropped with an error log and
  other nodes get them by seq repair when the room's next message reveals the gap.

Metrics (:mod:`gateway.metrics`): messages published, failed publish attempts, the publish backlog
(committed messages not yet on the bus, a gauge set by the code that changes the queue) and the
publications dropped from it.

Listeners never write to the database: receiving nodes only deliver (see sequencer.py).
Must not import Starlette or the transport layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.auth import is_reserved_name
from gateway.authz import AccessRequest, Action, Authorizer, create_policy, refusal, wildcard_may_match
from gateway.broker.base import BrokerUnavailable, Publication
from gateway.chat.group_commit import GroupCommitWriter, WriterClosedError
from gateway.chat.models import MessageType, NewMessage, SaveResult, StoredMessage
from gateway.chat.payload import (
    SYSTEM_SENDER,
    UNKNOWN_SENDER,
    InvalidChatMessage,
    decode_inbound,
    encode_message,
    room_id_of,
)
from gateway.chat.presence import Presence
from gateway.chat.repository import (
    ChatRepository,
    DatabaseUnavailable,
    StorageError,
    UnknownRoomError,
    is_unavailable,
)
from gateway.close_codes import CLOSE_POLICY
from gateway.hub import (
    Hub,
    InboundMessage,
    MessageNotStored,
    MessageRejected,
    SessionInfo,
    Subscriber,
    SubscriptionDenied,
)
from gateway.metrics import MESSAGES_PUBLISHED, PUBLICATIONS_DROPPED, PUBLISH_BACKLOG, PUBLISH_FAILURES
from gateway.settings import Settings

log = logging.getLogger(__name__)

STATE_ATTR = "chat"                # the session attribute holding its ChatSessionState
MAX_REPUBLISH_QUEUE = 10000
PUBLISH_BATCH = 512                # most publications sent in one pipelined round trip
RESUME_PAGE = 500                  # messages read per query when a subscription resumes


def enter_text(name: str) -> str:
    return f"{name}님이 방에 입장했습니다."


def quit_text(name: str) -> str:
    return f"{name}님이 방에서 나갔습니다."


def legacy_enter_text(name: str) -> str:
    return f"{name}님이 입장하셨습니다."


@dataclass(slots=True)
class ChatSessionState:
    """What the chat layer remembers about one session."""

    # The presence joins this session holds (subscription id -> room id): joined after the RECEIPT,
    # left on UNSUBSCRIBE or session end. Which rooms it is subscribed to is the hub registry's fact
    # (ChatService.rooms_of), not this: a subscription can exist before its join.
    joined: dict[str, str] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)      # rooms its ENTER was published in
    name: str | None = None                               # the name a client-sent ENTER announced

    @staticmethod
    def of(session: SessionInfo) -> ChatSessionState:
        state = session.attributes.get(STATE_ATTR)
        if not isinstance(state, ChatSessionState):
            state = ChatSessionState()
            session.attributes[STATE_ATTR] = state
        return state


def _storage_failure(exc: BaseException) -> BaseException:
    """What a SEND's client is told when its message was not stored."""
    if isinstance(exc, UnknownRoomError):
        return MessageRejected(f"Unknown room {exc.room_id!r}")
    if isinstance(exc, StorageError):
        return MessageRejected(f"Message not stored: {exc}")
    if isinstance(exc, WriterClosedError):
        return MessageRejected("Server shutting down: message not stored, send it again")
    if isinstance(exc, DatabaseUnavailable):
        return MessageNotStored()
    return exc


def _relay(outer: asyncio.Future[None], inner: asyncio.Future[SaveResult]) -> None:
    if inner.cancelled():
        if not outer.done():
            outer.set_exception(MessageRejected("Message not stored"))
        return
    exc = inner.exception()
    if outer.done():
        return
    if exc is None:
        outer.set_result(None)
    else:
        outer.set_exception(_storage_failure(exc))


def _revoke(subscriber: Subscriber, room_id: str) -> None:
    """End a session that lost access to a room it is subscribed to (ERROR, then close 1008)."""
    subscriber.close_soon(CLOSE_POLICY, "access revoked", error=f"Access to room {room_id!r} was revoked")


class PublicationEncoder:
    """A stored message as the room publication every node delivers: the ChatMessage JSON (with the
    room's cached ``userCount``), its ``seq``, and when it was stored (``committed_at``)."""

    def __init__(self, room_prefix: str, presence: Presence, node_id: str) -> None:
        self.room_prefix = room_prefix
        self.presence = presence
        self.node_id = node_id

    def __call__(self, stored: StoredMessage) -> Publication:
        # created_at is timezone-aware UTC however it was read (chat.models.UTCDateTime).
        return Publication(self.room_prefix + stored.room_id,
                           encode_message(stored, self.presence.cached(stored.room_id)),
                           origin=self.node_id, seq=stored.seq, committed_at=stored.created_at.timestamp())


class ChatService:
    def __init__(self, settings: Settings, repository: ChatRepository, writer: GroupCommitWriter,
                 presence: Presence, hub: Hub, authz: Authorizer | None = None, *,
                 encode: Callable[[StoredMessage], Publication] | None = None,
                 deliver_local: Callable[[Publication], None] | None = None) -> None:
        self.settings = settings
        self.authz = authz or Authorizer(create_policy(settings, repository), ttl_s=settings.authz_cache_ttl_s)
        """Who may subscribe, send and read (gateway.authz); SEND checks hit its per-session cache."""
        self._reserved_users = frozenset(pair.partition(":")[0] for pair in settings.users)
        self.repository = repository
        self.writer = writer
        self.presence = presence
        self.hub = hub
        self.room_prefix = settings.chat_room_prefix
        self.encode = encode or PublicationEncoder(settings.chat_room_prefix, presence, hub.node_id)
        """A stored message as the publication every node delivers (shared with the sequencer)."""
        self.deliver_local = deliver_local
        """Where this node's committed messages go first (the sequencer's ``offer_local``)."""
        self._known_rooms: set[str] = set()
        self._outbox: deque[Publication] = deque()
        self._outbox_wakeup = asyncio.Event()
        self._publisher_task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self.dropped_publications = 0

    async def start(self) -> None:
        self._publisher_task = asyncio.create_task(self._publisher(), name="chat-publisher")
        if self.settings.authz_policy != "open":
            self._recheck_task = asyncio.create_task(self._rechecker(), name="chat-authz-recheck")

    async def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued for the bus (up to ``timeout`` seconds), then stop the publisher."""
        if self._recheck_task is not None:
            self._recheck_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck_task
            self._recheck_task = None
        task = self._publisher_task
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._outbox and not task.done() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._outbox:
            log.warning("%d committed messages were not published before shutdown; receivers "
                        "repair them from the database by sequence", len(self._outbox))

    def destination(self, room_id: str) -> str:
        return self.room_prefix + room_id

    def room_of(self, destination: str) -> str | None:
        return room_id_of(self.room_prefix, destination)

    async def room_exists(self, room_id: str) -> bool:
        """Whether the room exists; raises :class:`DatabaseUnavailable` when that cannot be told."""
        if room_id in self._known_rooms:
            return True
        try:
            room = await self.repository.get_room(room_id)
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(type(exc).__name__) from exc
            raise
        if room is not None:
            self._known_rooms.add(room_id)
            return True
        return False

    # --- persist once, then publish ---------------------------------------------------------------

    def submit(self, message: NewMessage) -> asyncio.Future[None]:
        """Queue ``message`` for the next group commit; the future resolves after it (or fails with
        :class:`MessageRejected` saying why the message was not stored)."""
        try:
            inner = self.writer.submit(message)
        except WriterClosedError as exc:
            raise _storage_failure(exc) from None
        outer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inner.add_done_callback(lambda done: _relay(outer, done))
        return outer

    def committed(self, batch: Sequence[tuple[NewMessage, SaveResult]]) -> None:
        """A group commit's messages, in commit order: deliver here first, then queue for the bus."""
        publications = [self.encode(result.message) for _, result in batch]
        deliver = self.deliver_local
        if deliver is not None:
            for publication in publications:
                deliver(publication)
        self._outbox.extend(publications)
        overflow = len(self._outbox) - MAX_REPUBLISH_QUEUE
        if overflow > 0:
            for _ in range(overflow):
                self._outbox.popleft()
            self.dropped_publications += overflow
            PUBLICATIONS_DROPPED.inc(overflow)
            log.error("publish queue over %d messages: dropped the %d oldest (committed; other nodes "
                      "repair them by seq when their room's next message arrives)", MAX_REPUBLISH_QUEUE,
                      overflow)
        PUBLISH_BACKLOG.set(len(self._outbox))
        self._outbox_wakeup.set()

    async def _publisher(self) -> None:
        delay = 0.2
        failing = False
        while True:
            while not self._outbox:
                self._outbox_wakeup.clear()
                await self._outbox_wakeup.wait()
            chunk = list(itertools.islice(self._outbox, PUBLISH_BATCH))
            try:
                await self.hub.publish_many(chunk)
            except BrokerUnavailable as exc:
                PUBLISH_FAILURES.inc()
                if not failing:
                    log.warning("publishing committed messages failed (%s); %d queued, retrying", exc,
                                len(self._outbox))
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_reconnect_max_s)
                continue
            # Only what was sent leaves the queue: an overflow in _committed may have dropped some of
            # the chunk's publications from the front meanwhile.
            sent = {id(publication) for publication in chunk}
            while self._outbox and id(self._outbox[0]) in sent:
                self._outbox.popleft()
            MESSAGES_PUBLISHED.inc(len(chunk))
            PUBLISH_BACKLOG.set(len(self._outbox))
            if failing:
                log.info("publishing recovered")
            failing = False
            delay = 0.2

    # --- resume ------------------------------------------------------------------------------

    async def resume(self, destination: str, after: int) -> list[Publication]:
        """A room's messages after seq ``after`` (for SUBSCRIBE ``x-resume-after``), in seq order."""
        room_id = self.room_of(destination)
        if room_id is None:
            raise MessageRejected(f"x-resume-after works only on room destinations ({self.room_prefix}<roomId>)")
        limit = self.settings.resume_max_messages
        try:
            head = await self.repository.last_seq(room_id)
            if head is None:
                raise MessageRejected(f"Unknown room {room_id!r}")
            if after > head:
                raise MessageRejected(f"resume point {after} is ahead of the room (last seq {head})")
            if head - after > limit:
                raise MessageRejected(f"resume point {after} is more than {limit} messages behind the room "
                                      f"(last seq {head}): load its history over REST, then subscribe again")
            found: list[StoredMessage] = []
            cursor = after
            while cursor < head:
                page = await self.repository.history(room_id, cursor, RESUME_PAGE)
                if not page:
                    break
                found.extend(page)
                cursor = page[-1].seq
        except MessageRejected:
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise MessageRejected("cannot resume now, the database is unavailable: subscribe again") from None
        return [self.encode(message) for message in found]

    # --- /pub/chat/message -------------------------------------------------------------------

    async def handle_send(self, inbound: InboundMessage) -> asyncio.Future[None] | None:
        try:
            chat = decode_inbound(inbound.body, max_chars=self.settings.max_message_chars)
        except InvalidChatMessage as exc:
            raise MessageRejected(str(exc)) from None
        try:
            exists = await self.room_exists(chat.room_id)
        except DatabaseUnavailable:
            raise MessageNotStored() from None
        if not exists:
            raise MessageRejected(f"Unknown room {chat.room_id!r}")
        session = inbound.session
        # Authorization: a dictionary lookup once the session's decision for the room is cached (the
        # first SEND to a room per authz_cache_ttl_s asks the policy); a refusal is an ERROR and close.
        allowed = self.authz.cached(session, Action.SEND, chat.room_id)
        if allowed is None:
            try:
                refused = await self.authz.check(session, Action.SEND, chat.room_id)
            except Exception as exc:
                if is_unavailable(exc):
                    raise MessageNotStored() from None  # the session stays open; sending again is safe
                raise
            if refused is not None:
                raise MessageRejected(refusal(refused))
        elif not allowed:
            raise MessageRejected(refusal(AccessRequest(Action.SEND, session.user, chat.room_id)))
        if session.user is None and chat.sender is not None and self.name_reserved(chat.sender):
            raise MessageRejected(f"The sender name {chat.sender!r} is reserved: choose another name")
        client_msg_id = inbound.header("client-msg-id") or chat.client_msg_id
        if client_msg_id is not None and not 0 < len(client_msg_id) <= 64:
            raise MessageRejected("client-msg-id must be 1 to 64 characters")
        if chat.type is MessageType.ENTER:
            # Older frontend generation: the client announces itself after subscribing.
            name = session.user or chat.sender or UNKNOWN_SENDER
            state = ChatSessionState.of(session)
            state.name = name
            if chat.room_id in state.announced:
                return None  # the server already announced this session in this room
            state.announced.add(chat.room_id)
            return self.submit(NewMessage(chat.room_id, MessageType.ENTER, SYSTEM_SENDER,
                                          legacy_enter_text(name), client_msg_id))
        sender = session.user or chat.sender or UNKNOWN_SENDER
        await self.writer.reserve()
        return self.submit(NewMessage(chat.room_id, MessageType.TALK, sender, chat.message, client_msg_id))

    # --- authorization -------------------------------------------------------------------------

    def name_reserved(self, name: str) -> bool:
        """Whether an unauthenticated client may not use ``name`` as its sender (see gateway.auth)."""
        return is_reserved_name(name, self._reserved_users)

    async def authorize_subscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        """The hub's ``authorize_subscribe`` hook: raises SubscriptionDenied with a clear message."""
        room_id = self.room_of(destination)
        if room_id is not None:
            try:
                refused = await self.authz.check(session, Action.SUBSCRIBE, room_id)
            except Exception as exc:
                if is_unavailable(exc):
                    raise SubscriptionDenied("cannot check access to the room now, the database is "
                                             "unavailable: subscribe again") from None
                raise
            if refused is not None:
                raise SubscriptionDenied(refusal(refused))
            return
        wildcard = wildcard_may_match(destination, self.room_prefix)
        if not wildcard and self.settings.authz_policy in ("open", "members"):
            return  # not a room: nothing the built-in policies guard
        request = AccessRequest(Action.SUBSCRIBE, session.user, None, destination, wildcard=wildcard)
        if not await self.authz.ask(request):
            raise SubscriptionDenied(refusal(request))

    def rooms_of(self, subscriber: Subscriber) -> set[str]:
        """The rooms a local session is subscribed to (asked of the hub's registry)."""
        rooms = (self.room_of(destination) for destination in self.hub.subscriptions_of(subscriber).values())
        return {room_id for room_id in rooms if room_id is not None}

    def membership_changed(self, room_id: str, user: str, *, added: bool) -> None:
        """A member was added or removed on this node: drop the room's cached decisions of every local
        session at once, and end the sessions of a removed member that are subscribed to the room
        (other nodes notice within authz_cache_ttl_s, see :meth:`recheck_subscriptions`)."""
        sessions = [subscriber.info for subscriber in self.hub.sessions.values()]
        self.authz.forget_room(sessions, room_id)
        if added:
            return
        for subscriber in list(self.hub.sessions.values()):
            info = subscriber.info
            if info.user == user and room_id in self.rooms_of(subscriber):
                _revoke(subscriber, room_id)

    async def recheck_subscriptions(self) -> int:
        """Re-ask the policy, in one batch, about every room a local session is subscribed to whose
        cached decision expired; close the sessions that lost a room. Returns how many were closed."""
        subscribed: list[tuple[SessionInfo, str]] = []
        for subscriber in list(self.hub.sessions.values()):
            info = subscriber.info
            for room_id in self.rooms_of(subscriber):
                subscribed.append((info, room_id))
        closed = 0
        for info, room_id in await self.authz.recheck(subscribed):
            target = self.hub.sessions.get(info.session_id)
            if target is not None:
                _revoke(target, room_id)
                closed += 1
        return closed

    async def _rechecker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.authz_cache_ttl_s)
            try:
                await self.recheck_subscriptions()
            except Exception as exc:
                if not is_unavailable(exc):
                    log.exception("re-checking subscriptions failed")

    # --- presence hooks ------------------------------------------------------------------------

    async def on_subscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        room_id = self.room_of(destination)
        if room_id is None:
            return
        state = ChatSessionState.of(session)
        state.joined[subscription_id] = room_id
        await self.presence.join(room_id)
        name = session.user or state.name
        if name is None or room_id in state.announced:
            return
        try:
            if not await self.room_exists(room_id):
                return
        except DatabaseUnavailable:
            log.debug("room %s: ENTER of session %s skipped, the database is unavailable", room_id,
                      session.session_id)
            return
        state.announced.add(room_id)
        await self._system_message(room_id, MessageType.ENTER, enter_text(name))

    async def on_unsubscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        room_id = ChatSessionState.of(session).joined.pop(subscription_id, None)
        if room_id is not None:
            await self._leave(session, room_id)

    async def on_disconnect(self, session: SessionInfo) -> None:
        joined = ChatSessionState.of(session).joined
        for subscription_id in list(joined):
            await self._leave(session, joined.pop(subscription_id))

    async def _leave(self, session: SessionInfo, room_id: str) -> None:
        await self.presence.leave(room_id)
        state = ChatSessionState.of(session)
        if room_id in state.joined.values():
            return  # still subscribed to the room through another subscription
        name = session.user or state.name
        if room_id not in state.announced or name is None:
            return
        state.announced.discard(room_id)
        await self._system_message(room_id, MessageType.QUIT, quit_text(name))

    async def _system_message(self, room_id: str, kind: MessageType, text: str) -> None:
        try:
            await self.submit(NewMessage(room_id, kind, SYSTEM_SENDER, text))
        except MessageNotStored:
            # Best effort while the database is down; the writer logs the outage once.
            log.debug("room %s: %s not stored, the database is unavailable", room_id, kind)
        except MessageRejected as exc:
            log.warning("room %s: %s not stored: %s", room_id, kind, exc)
