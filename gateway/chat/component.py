"""Wires the chat domain into a Gateway: storage, presence, service, sequencer, handlers, routes.

Owns the chat layer's start-up and shutdown order: check the schema, start the group-commit
writer, presence and publisher; on shutdown (after sessions drained) commit what is queued, publish
what was committed, then stop presence and close the database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa
from starlette.routing import BaseRoute

from gateway.chat.group_commit import GroupCommitWriter
from gateway.chat.presence import MemoryPresence, Presence, RedisPresence
from gateway.chat.repository import ChatRepository, make_engine
from gateway.chat.routes import chat_routes
from gateway.chat.sequencer import RoomSequencer
from gateway.chat.service import ChatService

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)


class SchemaMissing(RuntimeError):
    pass


def chat_component(gateway: Gateway) -> Sequence[BaseRoute]:
    settings = gateway.settings
    engine = make_engine(settings.database_url, busy_timeout_s=settings.db_busy_timeout_s)
    repository = ChatRepository(engine)
    writer = GroupCommitWriter(repository, batch_max=settings.commit_batch_max,
                               max_pending=settings.max_pending_sends)
    presence: Presence
    if settings.redis_url is None:
        presence = MemoryPresence()
    else:
        presence = RedisPresence(settings.redis_url, node_id=settings.node_id,
                                 prefix=settings.redis_channel_prefix, ttl_s=settings.presence_ttl_s,
                                 refresh_s=settings.presence_refresh_s)
    service = ChatService(settings, repository, writer, presence, gateway.hub)
    sequencer = RoomSequencer(settings.chat_room_prefix, history=repository.history,
                              last_seq=repository.last_seq, encode=service.encode,
                              deliver=gateway.hub.deliver_locally)
    service.deliver_local = sequencer.offer_local
    hub = gateway.hub
    path = settings.chat_message_destination
    for prefix in settings.app_prefixes:
        if path.startswith(prefix.rstrip("/") + "/"):
            gateway.router.add(path[len(prefix.rstrip("/")):], service.handle_send)
            break
    else:
        raise ValueError(f"chat_message_destination {path!r} is not under an application prefix")

    async def track_room(session: object, subscription_id: str, destination: str) -> None:
        room_id = sequencer.room_of(destination)
        if room_id is not None:
            await sequencer.track(room_id)

    def untrack_room(destination: str) -> None:
        room_id = sequencer.room_of(destination)
        if room_id is not None:
            sequencer.forget(room_id)

    hub.interceptors.append(sequencer.intercept)
    hub.gap_listeners.append(sequencer.on_gap)
    hub.on_broker_subscribed.append(track_room)
    hub.on_subscribe.append(service.on_subscribe)
    hub.on_unsubscribe.append(service.on_unsubscribe)
    hub.on_destination_idle.append(untrack_room)
    hub.on_disconnect.append(service.on_disconnect)

    async def startup(gw: Gateway) -> None:
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1 FROM rooms WHERE 1 = 0"))
        except Exception as exc:
            raise SchemaMissing(f"database at {settings.database_url.split('@')[-1]} has no chat schema "
                                f"({type(exc).__name__}): run `chat-gateway migrate` first") from None
        await writer.start()
        await presence.start()
        await service.start()

    async def shutdown(gw: Gateway) -> None:
        # Commit what was read, then publish what was committed, then let go of Redis and the DB.
        await writer.stop(timeout=settings.drain_timeout_s)
        await service.stop(timeout=settings.drain_timeout_s)
        await presence.stop()
        await engine.dispose()

    gateway.startup.append(startup)
    gateway.shutdown.append(shutdown)
    gateway.extras["chat"] = service
    gateway.extras["sequencer"] = sequencer
    return chat_routes(service)
