"""Wires the chat domain into a Gateway: storage, presence, service, sequencer, handlers, routes.

Owns the chat layer's start-up and shutdown order: check the schema, start the group-commit
writer, presence and publisher; on shutdown (after sessions drained) commit what is queued, publish
what was committed, then stop presence and close the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa
from starlette.routing import BaseRoute

from gateway.chat.group_commit import GroupCommitWriter
from gateway.chat.migrations import schema_problem
from gateway.chat.presence import MemoryPresence, Presence, RedisPresence
from gateway.chat.repository import ChatRepository, is_sqlite_url, make_engine
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
    engine = make_engine(settings.database_url, busy_timeout_s=settings.db_busy_timeout_s,
                         connect_timeout_s=settings.db_connect_timeout_s,
                         statement_timeout_s=settings.db_statement_timeout_s)
    repository = ChatRepository(engine)
    # SQLite bounds a stuck batch itself (busy_timeout); elsewhere the whole batch gets a deadline.
    batch_timeout = (None if is_sqlite_url(settings.database_url)
                     else settings.db_connect_timeout_s + 2 * settings.db_statement_timeout_s)
    writer = GroupCommitWriter(repository, batch_max=settings.commit_batch_max,
                               max_pending=settings.max_pending_sends, batch_timeout_s=batch_timeout)
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
                              deliver=gateway.hub.deliver_locally, heads=repository.last_seqs,
                              head_check_s=settings.room_head_check_s)
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

    hub.resume_handler = service.resume
    hub.authorize_subscribe.append(service.authorize_subscribe)
    hub.interceptors.append(sequencer.intercept)
    hub.gap_listeners.append(sequencer.on_gap)
    hub.on_broker_subscribed.append(track_room)
    hub.on_subscribe.append(service.on_subscribe)
    hub.on_unsubscribe.append(service.on_unsubscribe)
    hub.on_destination_idle.append(untrack_room)
    hub.on_disconnect.append(service.on_disconnect)

    async def database_ready() -> bool:
        try:
            async with asyncio.timeout(settings.db_connect_timeout_s + settings.db_statement_timeout_s):
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True

    async def startup(gw: Gateway) -> None:
        where = settings.database_url.split("@")[-1]
        try:
            problem = await schema_problem(engine)
        except Exception as exc:
            raise SchemaMissing(f"database at {where} is unreachable ({type(exc).__name__}: {exc})") from None
        if problem is not None:
            raise SchemaMissing(f"database at {where}: {problem}")
        await writer.start()
        await presence.start()
        await service.start()
        await sequencer.start()

    async def shutdown(gw: Gateway) -> None:
        # Commit what was read, then publish what was committed, then let go of Redis and the DB.
        await writer.stop(timeout=settings.drain_timeout_s)
        await service.stop(timeout=settings.drain_timeout_s)
        await sequencer.stop()
        await presence.stop()
        await engine.dispose()

    gateway.health_checks["database"] = database_ready
    gateway.startup.append(startup)
    gateway.shutdown.append(shutdown)
    gateway.extras["chat"] = service
    gateway.extras["sequencer"] = sequencer
    return chat_routes(service)
