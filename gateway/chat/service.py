"""ChatMessageService: persist once, commit, then publish — the seed's fix, done right.

Owns the chat rules of the Spring reference:
- a client's SEND to ``/pub/chat/message`` is validated (bad JSON, unknown room, missing fields,
  oversize text -> ERROR, nothing stored), ``sender`` comes from the authenticated user when there is
  one (else the client's ``sender``, else ``UnknownUser``), it is saved through the group-commit
  writer and published to the room only after the commit; a repeated client message id is not
  stored again and is re-published with the original id and seq;
- presence: ENTER on SUBSCRIBE to a room and QUIT on UNSUBSCRIBE, DISCONNECT or a lost connection,
  exactly once per session and room (Spring ran its disconnect path twice); the older frontend
  generation's client-sent ENTER is handled too (``<sender>님이 입장하셨습니다.``);
- a publish that fails after the commit is retried in the background until the bus is back (the
  message is durable; receivers' sequencers drop any copy they already delivered).

Listeners never write to the database: receiving nodes only deliver (see sequencer.py).
Must not import Starlette or the transport layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from gateway.broker.base import BrokerUnavailable, Publication
from gateway.chat.group_commit import GroupCommitWriter
from gateway.chat.models import MessageType, NewMessage, StoredMessage
from gateway.chat.payload import (
    SYSTEM_SENDER,
    UNKNOWN_SENDER,
    InvalidChatMessage,
    decode_inbound,
    encode_message,
    room_id_of,
)
from gateway.chat.presence import Presence
from gateway.chat.repository import ChatRepository, StorageError, UnknownRoomError
from gateway.hub import Hub, InboundMessage, MessageRejected, SessionInfo
from gateway.settings import Settings

log = logging.getLogger(__name__)

STATE_ATTR = "chat"                # the session attribute holding its ChatSessionState
MAX_REPUBLISH_QUEUE = 10000


def enter_text(name: str) -> str:
    return f"{name}님이 방에 입장했습니다."


def quit_text(name: str) -> str:
    return f"{name}님이 방에서 나갔습니다."


def legacy_enter_text(name: str) -> str:
    return f"{name}님이 입장하셨습니다."


@dataclass(slots=True)
class ChatSessionState:
    """What the chat layer remembers about one session."""

    rooms: dict[str, str] = field(default_factory=dict)   # subscription id -> room id
    announced: set[str] = field(default_factory=set)      # rooms its ENTER was published in
    name: str | None = None                               # the name a client-sent ENTER announced

    @staticmethod
    def of(session: SessionInfo) -> ChatSessionState:
        state = session.attributes.get(STATE_ATTR)
        if not isinstance(state, ChatSessionState):
            state = ChatSessionState()
            session.attributes[STATE_ATTR] = state
        return state


class ChatService:
    def __init__(self, settings: Settings, repository: ChatRepository, writer: GroupCommitWriter,
                 presence: Presence, hub: Hub) -> None:
        self.settings = settings
        self.repository = repository
        self.writer = writer
        self.presence = presence
        self.hub = hub
        self.room_prefix = settings.chat_room_prefix
        self._known_rooms: set[str] = set()
        self._republish: deque[Publication] = deque(maxlen=MAX_REPUBLISH_QUEUE)
        self._republish_wakeup = asyncio.Event()
        self._republish_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._republish_task = asyncio.create_task(self._republisher(), name="chat-republisher")

    async def stop(self) -> None:
        if self._republish_task is not None:
            self._republish_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._republish_task
        if self._republish:
            log.warning("%d committed messages were not re-published before shutdown; receivers "
                        "repair them from the database by sequence", len(self._republish))

    def destination(self, room_id: str) -> str:
        return self.room_prefix + room_id

    def room_of(self, destination: str) -> str | None:
        return room_id_of(self.room_prefix, destination)

    async def room_exists(self, room_id: str) -> bool:
        if room_id in self._known_rooms:
            return True
        if await self.repository.get_room(room_id) is not None:
            self._known_rooms.add(room_id)
            return True
        return False

    # --- persist once, then publish ---------------------------------------------------------------

    async def encode(self, stored: StoredMessage) -> Publication:
        count = await self.presence.count(stored.room_id)
        return Publication(self.destination(stored.room_id), encode_message(stored, count),
                           origin=self.hub.node_id)

    async def persist_and_publish(self, message: NewMessage) -> StoredMessage:
        try:
            result = await self.writer.save(message)
        except UnknownRoomError:
            raise MessageRejected(f"Unknown room {message.room_id!r}") from None
        except StorageError as exc:
            raise MessageRejected(f"Message not stored: {exc}") from None
        publication = await self.encode(result.message)
        try:
            await self.hub.publish(publication)
        except BrokerUnavailable:
            log.warning("publish of room %s seq %d failed; queued for re-publish", message.room_id,
                        result.message.seq)
            self._republish.append(publication)
            self._republish_wakeup.set()
        return result.message

    async def _republisher(self) -> None:
        delay = 0.2
        while True:
            while not self._republish:
                self._republish_wakeup.clear()
                await self._republish_wakeup.wait()
            publication = self._republish[0]
            try:
                await self.hub.publish(publication)
            except BrokerUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_reconnect_max_s)
                continue
            self._republish.popleft()
            delay = 0.2

    # --- /pub/chat/message -------------------------------------------------------------------

    async def handle_send(self, inbound: InboundMessage) -> None:
        try:
            chat = decode_inbound(inbound.body, max_chars=self.settings.max_message_chars)
        except InvalidChatMessage as exc:
            raise MessageRejected(str(exc)) from None
        if not await self.room_exists(chat.room_id):
            raise MessageRejected(f"Unknown room {chat.room_id!r}")
        client_msg_id = inbound.header("client-msg-id") or chat.client_msg_id
        if client_msg_id is not None and not 0 < len(client_msg_id) <= 64:
            raise MessageRejected("client-msg-id must be 1 to 64 characters")
        session = inbound.session
        if chat.type is MessageType.ENTER:
            # Older frontend generation: the client announces itself after subscribing.
            name = session.user or chat.sender or UNKNOWN_SENDER
            state = ChatSessionState.of(session)
            state.name = name
            if chat.room_id in state.announced:
                return  # the server already announced this session in this room
            state.announced.add(chat.room_id)
            await self.persist_and_publish(NewMessage(chat.room_id, MessageType.ENTER, SYSTEM_SENDER,
                                                      legacy_enter_text(name), client_msg_id))
            return
        sender = session.user or chat.sender or UNKNOWN_SENDER
        await self.persist_and_publish(NewMessage(chat.room_id, MessageType.TALK, sender, chat.message,
                                                  client_msg_id))

    # --- presence hooks ------------------------------------------------------------------------

    async def on_subscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        room_id = self.room_of(destination)
        if room_id is None:
            return
        state = ChatSessionState.of(session)
        state.rooms[subscription_id] = room_id
        await self.presence.join(room_id)
        name = session.user or state.name
        if name is None or room_id in state.announced or not await self.room_exists(room_id):
            return
        state.announced.add(room_id)
        await self._system_message(room_id, MessageType.ENTER, enter_text(name))

    async def on_unsubscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        room_id = ChatSessionState.of(session).rooms.pop(subscription_id, None)
        if room_id is not None:
            await self._leave(session, room_id)

    async def on_disconnect(self, session: SessionInfo) -> None:
        rooms = ChatSessionState.of(session).rooms
        for subscription_id in list(rooms):
            await self._leave(session, rooms.pop(subscription_id))

    async def _leave(self, session: SessionInfo, room_id: str) -> None:
        await self.presence.leave(room_id)
        state = ChatSessionState.of(session)
        if room_id in state.rooms.values():
            return  # still subscribed to the room through another subscription
        name = session.user or state.name
        if room_id not in state.announced or name is None:
            return
        state.announced.discard(room_id)
        await self._system_message(room_id, MessageType.QUIT, quit_text(name))

    async def _system_message(self, room_id: str, kind: MessageType, text: str) -> None:
        try:
            await self.persist_and_publish(NewMessage(room_id, kind, SYSTEM_SENDER, text))
        except MessageRejected as exc:
            log.warning("room %s: %s not stored: %s", room_id, kind, exc)
