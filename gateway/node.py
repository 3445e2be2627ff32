"""One running node: :class:`Gateway`, everything a node runs, with a typed field for each part.

Owns the node's lifetime: :meth:`Gateway.start` composes the receive path (the components' ordering
stages, then the local fan-out: :func:`gateway.receive.compose`, the one place it is built), starts
the hub and broker on it, then the components' start steps; :meth:`Gateway.drain` stops taking
sessions and closes the open ones (ERROR the client will retry elsewhere, writers given
``drain_timeout_s``); :meth:`Gateway.stop` runs the components' stop steps in reverse, then stops
the hub. :mod:`gateway.app` only assembles a Gateway and its routes.

Must not import Starlette's application or routing (that is :mod:`gateway.app`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from gateway.broker.base import Broker
from gateway.chat.component import ChatComponent
from gateway.close_codes import CLOSE_SERVICE_RESTART
from gateway.host import HealthCheck, Step
from gateway.hub import Hub, MessageRouter, Subscriber
from gateway.receive import LocalFanout, ReceivePath, Stage, compose
from gateway.settings import Settings
from gateway.stomp.session import Authenticator, SessionConfig
from gateway.transport.base import Connection, FrameSink
from gateway.transport.connection import StompConnection
from gateway.transport.sockjs import SessionRegistry

log = logging.getLogger("gateway")


@dataclass(eq=False)
class Gateway:
    """Everything one node runs; available to routes as ``request.app.state.gateway``.

    Implements :class:`gateway.host.Host` for the components.
    """

    settings: Settings
    broker: Broker
    hub: Hub
    router: MessageRouter
    authenticator: Authenticator
    config: SessionConfig
    fanout: LocalFanout[Subscriber]
    sockjs: SessionRegistry | None = None
    chat: ChatComponent | None = None
    receive_stages: list[Stage] = field(default_factory=list)
    """Ordering stages between the bus and ``fanout``, in order (the chat layer adds its sequencer)."""
    receive: ReceivePath | None = None
    """The composed receive path, once started."""
    startup: list[Step] = field(default_factory=list)
    shutdown: list[Step] = field(default_factory=list)
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)
    """Dependencies /readyz reports besides the bus (e.g. "database")."""
    ready: bool = False
    draining: bool = False

    def new_connection(self, sink: FrameSink, *, transport: str, remote: str) -> Connection:
        return StompConnection(self.hub, self.settings, self.config, sink, transport=transport,
                               remote=remote, authenticator=self.authenticator)

    async def start(self) -> None:
        self.receive = compose(self.receive_stages, self.fanout)
        await self.hub.start(self.receive)
        for step in self.startup:
            await step()
        self.ready = True
        log.info("node %s ready (broker: %s, database: %s, receive path: %s)", self.settings.node_id,
                 type(self.broker).__name__, self.settings.database_url.split("@")[-1],
                 " -> ".join(("bus", *self.receive.names)))

    async def drain(self) -> None:
        """Stop taking sessions and close the open ones, giving writers ``drain_timeout_s`` to flush."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        self.hub.close_all(CLOSE_SERVICE_RESTART, "Server shutting down",
                           error="Server shutting down, reconnect")
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        while self.hub.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.sockjs is not None:
            # Whatever SockJS sessions are left (no STOMP CONNECT yet, polls in flight) get c[3000].
            await self.sockjs.close_all()

    async def stop(self) -> None:
        """Drain, run the stop steps in reverse order, then stop the hub and broker."""
        await self.drain()
        for step in reversed(self.shutdown):
            try:
                await step()
            except Exception:
                log.exception("shutdown step failed")
        await self.hub.stop()
