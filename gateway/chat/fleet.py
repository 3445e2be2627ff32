"""The fleet check: a record of the live gateway nodes on one database, and refusing a split fleet.

Two nodes that share a database but not a bus split delivery silently: each delivers only what its
own sessions send (no ``redis_url`` on one of them), or they publish on channels the other never
subscribes to (another Redis, channel mode, prefix, single channel or sharded Pub/Sub). A node
without Redis cannot ask Redis who else is running, so the record is kept in the DATABASE, in the
``gateway_nodes`` table (gateway.chat.models, migration 0003).

Owns all SQL on ``gateway_nodes`` and the node's part in it (:class:`NodeRegistry`):

* :meth:`NodeRegistry.start` (the chat layer's first startup step after the schema check, BEFORE
  the node takes traffic): drop stale rows, replace this node id's row (an earlier run of the same
  node that crashed), insert this node's row with its :class:`DeliveryFingerprint`, commit; THEN
  read the other live rows and raise :class:`FleetConflict` (a :class:`gateway.startup.StartupRefused`:
  one line naming the other node, what differs and what to do) if one is incompatible, after
  deleting its own row again. Registering before looking means two incompatible nodes starting at
  the same moment cannot both miss each other: the later reader sees the earlier writer.
* every ``node_heartbeat_s`` a background task refreshes ``last_seen`` (re-inserting the row if it
  was dropped as stale, e.g. after a long database outage);
* :meth:`NodeRegistry.stop` (clean shutdown) deletes the row.

A row is live while ``last_seen`` is less than ``node_stale_s`` old. Clock: ``started_at`` and
``last_seen`` are written with the DATABASE's clock (``now()`` on PostgreSQL, SQLite's
``strftime('now')``, which for a file shared by processes on one machine is that machine's clock),
and every age is the database's current time minus ``last_seen`` read in the same statement, so the
nodes' own clocks never enter; skew between nodes does not matter at all.

Compatible: both nodes use Redis, at the same place (kind, hosts, Sentinel service, database number,
compared without credentials or options: give every node the same ``redis_url``), with the same
channel mode, prefix, single channel (in ``single`` mode) and ``redis_sharded_pubsub``. The payload
form (``redis_payload``) may differ: receivers read both (a fleet switches it node by node). Nodes
without Redis are never compatible with any other node on the database. Spring servers do not
register: they are not checked.

It must not import the chat service, sequencer or presence, the hub, STOMP or transport code; of the
broker only ``gateway.broker.redis_urls`` (to name a Redis without its credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.broker.redis_urls import parse_redis_url
from gateway.chat.models import UTCDateTime, gateway_nodes
from gateway.chat.repository import is_sqlite_url, write_transaction
from gateway.settings import Settings
from gateway.startup import StartupRefused

log = logging.getLogger(__name__)


class FleetConflict(StartupRefused):
    """Another live node on this database would not see this node's messages (or the other way round)."""


def redis_location(redis_url: str) -> str:
    """Where ``redis_url`` points, without credentials or options, normalised for comparison:
    ``host:port/db``, ``unix:/path/db``, ``sentinel h:p,h:p service S/db`` or ``cluster h:p,h:p``."""
    target = parse_redis_url(redis_url)
    options = target.options
    db = int(options.get("db") or 0)
    if target.kind == "single":
        path = options.get("path")
        if path:
            return f"unix:{path}/{db}"
        return f"{str(options.get('host', 'localhost')).lower()}:{int(options.get('port') or 6379)}/{db}"
    hosts = ",".join(f"{host.lower()}:{port}" for host, port in sorted(set(target.hosts)))
    if target.kind == "sentinel":
        return f"sentinel {hosts} service {target.service}/{db}"
    return f"cluster {hosts}"


@dataclass(frozen=True, slots=True)
class DeliveryFingerprint:
    """How a node delivers between nodes: the settings two nodes on one database must agree on."""

    redis: str | None
    """:func:`redis_location` of ``redis_url``; None = no Redis (the in-memory broker, this node only)."""
    channel_mode: str
    channel_prefix: str
    single_channel: str
    sharded_pubsub: bool
    payload: str
    """``redis_payload``: recorded, never a conflict (receivers read both forms)."""

    @classmethod
    def of(cls, settings: Settings) -> DeliveryFingerprint:
        return cls(redis=None if settings.redis_url is None else redis_location(settings.redis_url),
                   channel_mode=settings.redis_channel_mode, channel_prefix=settings.redis_channel_prefix,
                   single_channel=settings.redis_single_channel,
                   sharded_pubsub=settings.redis_sharded_pubsub, payload=settings.redis_payload)

    def columns(self) -> dict[str, Any]:
        return {"redis": self.redis, "channel_mode": self.channel_mode, "channel_prefix": self.channel_prefix,
                "single_channel": self.single_channel, "sharded_pubsub": self.sharded_pubsub,
                "payload": self.payload}


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """Another node's row, with its age by the database's clock."""

    node_id: str
    fingerprint: DeliveryFingerprint
    started_at: datetime
    last_seen: datetime
    age_s: float


def incompatibility(mine: DeliveryFingerprint, theirs: DeliveryFingerprint, other: str) -> str | None:
    """Why a node with ``mine`` and the node ``other`` with ``theirs`` on one database would split
    delivery, and what to do, as the tail of a sentence; None when they are compatible."""
    share = "nodes sharing a database must share one Redis"
    if mine.redis is None and theirs.redis is None:
        return (f"uses this database without Redis, as this node would: each node would deliver only its own "
                f"sessions' messages; {share} (set --redis-url on every node), or stop {other}")
    if mine.redis is None:
        return (f"uses Redis at {theirs.redis} and this node has no Redis, so neither would see the other's "
                f"messages; {share}: set --redis-url to that Redis on this node, or stop {other}")
    if theirs.redis is None:
        return (f"uses this database without Redis, so it cannot see this node's messages; {share}: "
                f"restart {other} with --redis-url (this node uses Redis at {mine.redis}), or stop it")
    if mine.redis != theirs.redis:
        return (f"uses Redis at {theirs.redis}, this node {mine.redis}; {share} (named by the same "
                f"--redis-url on every node), or stop {other}")
    same = "nodes sharing a database must use the same Redis channels"
    for label, flag, a, b in (
            ("redis_channel_mode", "--redis-channel-mode", theirs.channel_mode, mine.channel_mode),
            ("redis_channel_prefix", "--redis-channel-prefix", theirs.channel_prefix, mine.channel_prefix),
            ("redis_sharded_pubsub", "--redis-sharded-pubsub", theirs.sharded_pubsub, mine.sharded_pubsub)):
        if a != b:
            return (f"uses {label} {a!r}, this node {b!r}; {same}: set the same {flag} on every node, "
                    f"or stop {other}")
    if mine.channel_mode == "single" and mine.single_channel != theirs.single_channel:
        return (f"uses redis_single_channel {theirs.single_channel!r}, this node {mine.single_channel!r}; "
                f"{same}: set the same --redis-single-channel on every node, or stop {other}")
    return None


def _db_now(engine: AsyncEngine) -> sa.ColumnElement[datetime]:
    """The database's current time as a UTC-aware datetime expression.

    On SQLite: millisecond precision, written as SQLAlchemy writes a DATETIME (six fractional digits),
    so a value read back compares equal to the stored text.
    """
    if engine.dialect.name == "sqlite":
        return sa.type_coerce(sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now"), UTCDateTime())
    return sa.type_coerce(sa.func.statement_timestamp(), UTCDateTime())


def _entry(row: Any) -> NodeEntry:
    fingerprint = DeliveryFingerprint(redis=row.redis, channel_mode=row.channel_mode,
                                      channel_prefix=row.channel_prefix, single_channel=row.single_channel,
                                      sharded_pubsub=bool(row.sharded_pubsub), payload=row.payload)
    return NodeEntry(node_id=row.node_id, fingerprint=fingerprint, started_at=row.started_at,
                     last_seen=row.last_seen, age_s=max(0.0, (row.db_now - row.last_seen).total_seconds()))


class NodeRegistry:
    """This node's row in ``gateway_nodes``: registered and checked at start, refreshed, deleted at stop."""

    def __init__(self, engine: AsyncEngine, node_id: str, fingerprint: DeliveryFingerprint, *,
                 heartbeat_s: float, stale_s: float, timeout_s: float, stop_timeout_s: float | None = None) -> None:
        if stale_s <= heartbeat_s:
            raise ValueError("stale_s must exceed heartbeat_s")
        self.engine = engine
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self.stop_timeout_s = timeout_s if stop_timeout_s is None else stop_timeout_s
        self.incarnation = uuid.uuid4().hex
        self.registered = False
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._displaced = False

    # --- the steps -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register, then refuse (:class:`FleetConflict`) if a live node is incompatible; else keep the
        row fresh until :meth:`stop`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.register()
                others = await self.live_nodes()
        except Exception as exc:
            await self._forget(self.timeout_s)
            raise StartupRefused(f"refusing to start: could not record node {self.node_id} in the "
                                 f"database's gateway_nodes table ({type(exc).__name__}: {exc})") from None
        for entry, reason in self._conflicts(others):
            await self._forget(self.timeout_s)
            more = [e.node_id for e in others if e is not entry]
            also = f" (other live nodes: {', '.join(more)})" if more else ""
            expires = max(1.0, self.stale_s - entry.age_s)
            raise FleetConflict(f"refusing to start: node {entry.node_id} (seen {entry.age_s:.0f} s ago) "
                                f"{reason} (if {entry.node_id} is no longer running, its entry expires in "
                                f"{expires:.0f} s: node_stale_s){also}")
        if others:
            log.info("fleet: node %s joins %d live node(s) on this database: %s", self.node_id, len(others),
                     ", ".join(e.node_id for e in others))
        self._task = asyncio.create_task(self._heartbeats(), name=f"fleet-heartbeat-{self.node_id}")

    async def stop(self) -> None:
        """Stop refreshing and delete this node's row, waiting at most ``stop_timeout_s`` (a failure is
        logged; the row then expires after ``stale_s``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._forget(self.stop_timeout_s)

    async def register(self) -> None:
        """Drop stale rows and an earlier run's row of this node id, then insert this node's row."""
        now = _db_now(self.engine)
        async with write_transaction(self.engine) as conn:
            rows = (await conn.execute(sa.select(gateway_nodes.c.node_id, gateway_nodes.c.last_seen,
                                                 now.label("db_now")))).all()
            for row in rows:
                age = (row.db_now - row.last_seen).total_seconds()
                if row.node_id == self.node_id:
                    if age < self.stale_s:
                        log.warning("fleet: node id %s was seen %.0f s ago: taking over the entry of an earlier "
                                    "run (if another process runs with this node id, give each node its own)",
                                    self.node_id, age)
                elif age < self.stale_s:
                    continue
                # Only the row as read: a node that refreshed meanwhile keeps it.
                await conn.execute(gateway_nodes.delete().where(gateway_nodes.c.node_id == row.node_id,
                                                                gateway_nodes.c.last_seen == row.last_seen))
            await self._insert(conn)
        self.registered = True

    async def live_nodes(self) -> list[NodeEntry]:
        """The other nodes' live rows, most recently seen first."""
        query = sa.select(gateway_nodes, _db_now(self.engine).label("db_now")).where(
            gateway_nodes.c.node_id != self.node_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        entries = [_entry(row) for row in rows]
        return sorted((e for e in entries if e.age_s < self.stale_s), key=lambda e: e.age_s)

    async def heartbeat(self) -> None:
        """Refresh ``last_seen``; re-insert the row if it is gone (dropped as stale by another node)."""
        mine = (gateway_nodes.c.node_id == self.node_id) & (gateway_nodes.c.incarnation == self.incarnation)
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(gateway_nodes.update().where(mine).values(
                last_seen=_db_now(self.engine)))
            if result.rowcount:
                self._displaced = False
                return
            taken = (await conn.execute(sa.select(gateway_nodes.c.incarnation).where(
                gateway_nodes.c.node_id == self.node_id))).first()
            if taken is not None:
                if not self._displaced:
                    log.warning("fleet: another process registered node id %s; this process no longer "
                                "refreshes its entry (give each node its own node_id)", self.node_id)
                self._displaced = True
                return
            await self._insert(conn)
        log.warning("fleet: node %s's entry had expired (database unreachable for over %g s?); registered again",
                    self.node_id, self.stale_s)
        # Meanwhile another node may have started without seeing this one: say so (a running node
        # cannot refuse to start any more).
        for entry, reason in self._conflicts(await self.live_nodes()):
            log.error("fleet: node %s (seen %.0f s ago) started while this node's entry had expired and %s",
                      entry.node_id, entry.age_s, reason)

    # --- internals -------------------------------------------------------------------------------

    def _conflicts(self, others: list[NodeEntry]) -> list[tuple[NodeEntry, str]]:
        """The live nodes whose delivery this node's cannot share, with what differs."""
        found = ((entry, incompatibility(self.fingerprint, entry.fingerprint, entry.node_id)) for entry in others)
        return [(entry, reason) for entry, reason in found if reason is not None]

    async def _insert(self, conn: AsyncConnection) -> None:
        now = _db_now(self.engine)
        await conn.execute(gateway_nodes.insert().values(
            node_id=self.node_id, incarnation=self.incarnation, started_at=now, last_seen=now,
            **self.fingerprint.columns()))

    async def _forget(self, timeout_s: float) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            async with asyncio.timeout(timeout_s):
                async with write_transaction(self.engine) as conn:
                    await conn.execute(gateway_nodes.delete().where(
                        gateway_nodes.c.node_id == self.node_id, gateway_nodes.c.incarnation == self.incarnation))
        except Exception as exc:
            log.warning("fleet: could not delete node %s's entry (%s: %s); it expires in %g s",
                        self.node_id, type(exc).__name__, exc, self.stale_s)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.heartbeat()
            except Exception as exc:
                if not self._failing:
                    log.warning("fleet: could not refresh node %s's entry (%s: %s); retrying every %g s",
                                self.node_id, type(exc).__name__, exc, self.heartbeat_s)
                self._failing = True
            else:
                if self._failing:
                    log.info("fleet: node %s's entry is refreshed again", self.node_id)
                self._failing = False


def node_registry(engine: AsyncEngine, settings: Settings) -> NodeRegistry:
    """The registry of this node (``settings.node_id``) on the chat database's ``engine``."""
    timeout_s = settings.db_connect_timeout_s + 2 * settings.db_statement_timeout_s
    if is_sqlite_url(settings.database_url):
        timeout_s += settings.db_busy_timeout_s
    # At shutdown the drain has already waited for the database; an unreachable one is not waited
    # for again longer than drain_timeout_s (the row then expires).
    return NodeRegistry(engine, settings.node_id, DeliveryFingerprint.of(settings),
                        heartbeat_s=settings.node_heartbeat_s, stale_s=settings.node_stale_s,
                        timeout_s=timeout_s, stop_timeout_s=min(timeout_s, settings.drain_timeout_s))
