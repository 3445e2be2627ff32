"""Wires the chat domain into a node: storage, presence, service, sequencer, handlers, routes.

Owns the chat layer's composition, in one place (:func:`chat_component`): the send path (the handler
on ``chat_message_destination`` -> :class:`ChatService` -> :class:`GroupCommitWriter`, whose commits
go to ``ChatService.committed``, which offers them to the sequencer before publishing), the receive
path's ordering stage (:class:`RoomSequencer`), the hub listener (:class:`ChatListener`), and the
start-up and shutdown order: check the schema, register the node in the fleet (refusing to start
beside a node that delivers differently, :mod:`gateway.chat.fleet`), start the group-commit writer,
presence and publisher; on shutdown (after sessions drained) commit what is queued, publish what was
committed, then stop presence, leave the fleet and close the database.

Must not import Starlette's app, the transport layer or the node (``gateway.node``, ``gateway.app``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from starlette.routing import BaseRoute

from gateway.broker.base import Publication
from gateway.chat.fleet import node_registry
from gateway.chat.group_commit import GroupCommitWriter
from gateway.chat.migrations import schema_problem
from gateway.chat.presence import MemoryPresence, Presence, RedisPresence
from gateway.chat.repository import ChatRepository, is_sqlite_url, make_engine
from gateway.chat.routes import chat_routes
from gateway.chat.sequencer import RoomSequencer
from gateway.chat.service import ChatService, PublicationEncoder
from gateway.host import Host
from gateway.hub import HubListener, SessionInfo
from gateway.startup import StartupRefused

log = logging.getLogger(__name__)


class SchemaMissing(StartupRefused):
    """The database is unreachable at start, or its schema is not at the Alembic head."""


class ChatListener(HubListener):
    """The chat layer's answers to the hub's session events: access checks, presence and ENTER/QUIT
    (the service), and which rooms the sequencer orders (from confirmation to idle)."""

    def __init__(self, service: ChatService, sequencer: RoomSequencer) -> None:
        self.service = service
        self.sequencer = sequencer

    async def authorize_subscribe(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        await self.service.authorize_subscribe(session, subscription_id, destination)

    async def subscription_confirmed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        room_id = self.sequencer.room_of(destination)
        if room_id is not None:
            await self.sequencer.track(room_id)

    async def subscribed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        await self.service.on_subscribe(session, subscription_id, destination)

    async def unsubscribed(self, session: SessionInfo, subscription_id: str, destination: str) -> None:
        await self.service.on_unsubscribe(session, subscription_id, destination)

    def destination_idle(self, destination: str) -> None:
        room_id = self.sequencer.room_of(destination)
        if room_id is not None:
            self.sequencer.forget(room_id)

    async def session_ended(self, session: SessionInfo) -> None:
        await self.service.on_disconnect(session)

    async def resume(self, destination: str, after: int) -> list[Publication] | None:
        return await self.service.resume(destination, after)


@dataclass(frozen=True, eq=False)
class ChatComponent:
    """The chat domain as the node holds it."""

    service: ChatService
    sequencer: RoomSequencer
    writer: GroupCommitWriter
    repository: ChatRepository
    routes: tuple[BaseRoute, ...]


def chat_component(host: Host) -> ChatComponent:
    settings = host.settings
    hub = host.hub
    engine = make_engine(settings.database_url, busy_timeout_s=settings.db_busy_timeout_s,
                         connect_timeout_s=settings.db_connect_timeout_s,
                         statement_timeout_s=settings.db_statement_timeout_s)
    repository = ChatRepository(engine)
    # The live nodes on this database: a node whose delivery (Redis, channels) differs refuses to start.
    fleet = node_registry(engine, settings)
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
    encode = PublicationEncoder(settings.chat_room_prefix, presence, settings.node_id)
    # Receive path: the sequencer is the ordering stage between the bus and the local fan-out.
    sequencer = RoomSequencer(settings.chat_room_prefix, history=repository.history,
                              last_seq=repository.last_seq, encode=encode, heads=repository.last_seqs,
                              head_check_s=settings.room_head_check_s)
    host.receive_stages.append(sequencer)
    # Send path: handler -> service -> writer; each commit goes to the service, which offers it to
    # the sequencer (this node's subscribers) and then queues it for the bus.
    service = ChatService(settings, repository, writer, presence, hub, encode=encode,
                          deliver_local=sequencer.offer_local)
    writer.on_commit = service.committed
    path = settings.chat_message_destination
    for prefix in settings.app_prefixes:
        if path.startswith(prefix.rstrip("/") + "/"):
            host.router.add(path[len(prefix.rstrip("/")):], service.handle_send)
            break
    else:
        raise ValueError(f"chat_message_destination {path!r} is not under an application prefix")
    hub.listeners.append(ChatListener(service, sequencer))

    async def database_ready() -> bool:
        try:
            async with asyncio.timeout(settings.db_connect_timeout_s + settings.db_statement_timeout_s):
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True

    async def startup() -> None:
        where = settings.database_url.split("@")[-1]
        try:
            problem = await schema_problem(engine)
        except Exception as exc:
            raise SchemaMissing(f"database at {where} is unreachable ({type(exc).__name__}: {exc})") from None
        if problem is not None:
            raise SchemaMissing(f"database at {where}: {problem}")
        await fleet.start()
        try:
            await writer.start()
            await presence.start()
            await service.start()
            await sequencer.start()
        except BaseException:
            # No stop step runs after a failed start: leave the fleet now, not after node_stale_s.
            await fleet.stop()
            raise

    async def shutdown() -> None:
        # Commit what was read, then publish what was committed, then let go of Redis and the DB.
        await writer.stop(timeout=settings.drain_timeout_s)
        await service.stop(timeout=settings.drain_timeout_s)
        await sequencer.stop()
        await presence.stop()
        await fleet.stop()
        await engine.dispose()

    host.health_checks["database"] = database_ready
    host.startup.append(startup)
    host.shutdown.append(shutdown)
    return ChatComponent(service, sequencer, writer, repository, tuple(chat_routes(service)))
